"""The C++ CPU operators (`lime_kernels.cpu`): every layer variant on backend='cpu' against backend='reference'
in float64 (outputs, statistics, every gradient), the operators' schemas and fake implementations
(`torch.library.opcheck`), and how the backend is chosen and refused.

`tests/test_eager.py` holds the routing options against the reference (float64, gradcheck, bf16); here the
layers around it."""

import itertools
import warnings

import pytest
import torch

from lime_kernels import (LiMEDoRALinear, LiMEEmbedding, LiMELinear, LiMELoRAFALinear, LiMEPromptEncoder,
                          LiMESliceFineLinear, cpu, eager, layer as layer_module)
from lime_kernels.options import RoutingOptions

pytestmark = pytest.mark.skipif(not cpu.available(), reason=str(cpu.unavailable_reason()))


def _randomized(module):
    with torch.no_grad():
        for _, parameter in module.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    return module


def _call(make, backend, inputs, training, mask=None):
    """Output, every trainable gradient and the statistics' values after one seeded call (and a balance loss)."""
    torch.manual_seed(0)
    module = _randomized(make(backend)).double().train(training)
    assert module.resolve_backend(torch.zeros(1, 1, 1)) == backend  # a CPU input: the backend is chosen by device
    torch.manual_seed(1)
    x = inputs.clone().requires_grad_(inputs.is_floating_point())
    out = module(x, attention_mask=mask) if mask is not None else module(x)
    stats = module.last_stats
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
    if training and stats is not None:
        loss = loss + 0.3 * stats.importance + 0.2 * stats.kl_uniform
    loss.backward()
    grads = {name: p.grad for name, p in module.named_parameters() if p.requires_grad}
    if x.requires_grad:
        grads["input"] = x.grad
    values = None if stats is None else [s for s in stats if s is not None]
    return out.detach(), grads, values


def _assert_backends_agree(make, inputs, training, mask=None):
    expected = _call(make, "reference", inputs, training, mask)
    actual = _call(make, "cpu", inputs, training, mask)
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-12, atol=1e-12)
    assert actual[1].keys() == expected[1].keys()
    for name in expected[1]:
        assert (actual[1][name] is None) == (expected[1][name] is None), name
        if expected[1][name] is not None:
            torch.testing.assert_close(actual[1][name], expected[1][name], rtol=1e-10, atol=1e-10,
                                       msg=lambda m, name=name: f"gradient of {name}: {m}")
    assert (actual[2] is None) == (expected[2] is None)
    for got, want in zip(actual[2] or [], expected[2] or []):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


LINEARS = [LiMELinear, LiMELoRAFALinear, LiMEDoRALinear, LiMESliceFineLinear]


@pytest.mark.parametrize("cls,compat,n_gram,training", list(itertools.product(LINEARS, ["lime", "original"], [1, 3],
                                                                               [True, False])))
def test_every_linear_variant_on_the_cpu_backend_equals_the_reference(cls, compat, n_gram, training):
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]]) if compat == "lime" else None

    def make(backend):
        return cls(torch.nn.Linear(16, 12), num_experts=4, rank=3, n_gram=n_gram, jitter_noise=0.2, dropout=0.3,
                   compat=compat, backend=backend)

    _assert_backends_agree(make, x, training, mask)


@pytest.mark.parametrize("peft,training", list(itertools.product(["lora", "lora_fa"], [True, False])))
def test_the_embedding_on_the_cpu_backend_equals_the_reference(peft, training):
    ids = torch.randint(0, 20, (2, 7))

    def make(backend):
        return LiMEEmbedding(torch.nn.Embedding(20, 12), num_experts=4, rank=3, n_gram=3, jitter_noise=0.2, peft=peft,
                             backend=backend)

    _assert_backends_agree(make, ids, training)


@pytest.mark.parametrize("compat,input_conditioned,training",
                         list(itertools.product(["lime", "original"], [True, False], [True, False])))
def test_prompts_on_the_cpu_backend_equal_the_reference(compat, input_conditioned, training):
    embeds = torch.randn(2, 5, 12, dtype=torch.float64)

    def make(backend):
        return LiMEPromptEncoder(6, 12, num_experts=4, n_gram=3, jitter_noise=0.2, input_conditioned=input_conditioned,
                                 compat=compat, backend=backend)

    _assert_backends_agree(make, embeds, training)


def _opcheck_inputs(dtype, shared, masked, jittered, pooled):
    generator = torch.Generator().manual_seed(0)
    tokens, width, experts = (2, 5), 9, 4

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    return dict(
        base=draw(*tokens, width), delta=draw(*tokens, width),
        frozen=draw(*tokens, experts) if pooled else None, adapted=draw(*tokens, experts) if pooled else None,
        experts=draw(experts, width), shared=draw(width) if shared else None,
        gamma=torch.full((1,), 0.4, dtype=dtype) if shared else None,
        valid=torch.tensor([[True] * 5, [False, True, True, True, False]]) if masked else None,
        jitter=(0.9 + 0.2 * torch.rand(10, experts, generator=generator)) if jittered else None)


OPTION_CASES = [(False, 0), (True, 1), (False, 2), (True, 3)]  # (maxabs, selection)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("maxabs,selection", OPTION_CASES)
def test_the_operators_pass_opcheck(dtype, maxabs, selection):
    """Schema, fake implementation (what torch.compile traces), dispatch and the autograd kernels of all four
    operators agree with what they compute, with and without every optional input."""
    options = (maxabs, selection, 2, 4, 0.5, 0.5, 0.6, 0.4)
    for shared, masked, jittered, pooled in [(False,) * 4, (True,) * 4, (True, False, True, False),
                                             (False, True, False, True)]:
        inputs = _opcheck_inputs(dtype, shared, masked, jittered, pooled)
        tensors = [inputs[name] for name in ("base", "delta", "frozen", "adapted", "experts", "shared", "gamma", "valid",
                                             "jitter")]
        torch.library.opcheck(torch.ops.lime_cpu.route_modulate.default, (*tensors, *options))
        grad_out = torch.randn_like(inputs["base"])
        grad_probs = torch.randn(2, 5, 4, dtype=dtype)
        for needs in [(True, True, True, True, True), (False, True, False, True, False)]:
            torch.library.opcheck(torch.ops.lime_cpu.route_modulate_backward.default,
                                  (grad_out, grad_probs, *tensors, *options, *needs))
        torch.library.opcheck(torch.ops.lime_cpu.route_modulate_backward.default,
                              (None, grad_probs, *tensors, *options, True, True, True, True, True))
    x, A, B = torch.randn(2, 5, 6, dtype=dtype), torch.randn(3, 6, dtype=dtype), torch.randn(9, 3, dtype=dtype)
    inputs = _opcheck_inputs(dtype, True, True, True, False)
    rest = [inputs[name] for name in ("experts", "shared", "gamma", "valid", "jitter")]
    torch.library.opcheck(torch.ops.lime_cpu.lora_route_modulate.default, (x, inputs["base"], A, B, 1.5, *rest, *options))
    out, probs, projected, delta = torch.ops.lime_cpu.lora_route_modulate(x, inputs["base"], A, B, 1.5, *rest, *options)
    for needs in [(True, True, True, True, True, True), (False, False, False, True, True, False)]:
        torch.library.opcheck(torch.ops.lime_cpu.lora_route_modulate_backward.default,
                              (torch.randn_like(out), torch.randn_like(probs), x, projected, A, B, 1.5, inputs["base"],
                               delta, *rest, *options, *needs))
    # With inputs that require gradients: the forward operators' autograd kernels (C++), traced by AOTAutograd too.
    def trained(*tensors):
        return [t.clone().requires_grad_() for t in tensors]

    torch.library.opcheck(torch.ops.lime_cpu.lora_route_modulate.default,
                          (*trained(x, inputs["base"], A, B), 1.5, *trained(*rest[:3]), *rest[3:], *options))
    pooled = _opcheck_inputs(dtype, True, True, True, True)
    torch.library.opcheck(torch.ops.lime_cpu.route_modulate.default,
                          (*trained(*(pooled[name] for name in ("base", "delta", "frozen", "adapted", "experts", "shared",
                                                                  "gamma"))), pooled["valid"], pooled["jitter"], *options))


def test_a_bf16_layer_on_the_cpu_backend_matches_the_reference():
    """bf16 activations with float32 adapter parameters (the usual training setup): the same rounding points."""
    results = {}
    for backend in ("reference", "cpu"):
        torch.manual_seed(0)
        layer = _randomized(LiMELinear(torch.nn.Linear(16, 12), num_experts=4, rank=3, backend=backend))
        layer.linear.to(torch.bfloat16)
        torch.manual_seed(1)
        x = torch.randn(2, 7, 16, dtype=torch.bfloat16, requires_grad=True)
        out = layer(x)
        out.float().square().sum().backward()
        results[backend] = (out, x.grad, layer.B.grad, layer.LiMEs.grad)
    assert results["cpu"][0].dtype == torch.bfloat16
    torch.testing.assert_close(results["cpu"][0], results["reference"][0], rtol=1e-2, atol=1e-2)
    for got, want in zip(results["cpu"][1:], results["reference"][1:]):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_bad_operator_inputs_are_refused_with_their_shapes():
    base, delta = torch.randn(2, 5, 9), torch.randn(2, 5, 9)
    options = (False, 0, 2, 4, 0.5, 0.5, 0.5, 0.5)
    with pytest.raises(RuntimeError, match=r"experts must be \(E, Dout\) with 1 <= E <= Dout = 9; got \[4, 8\]"):
        torch.ops.lime_cpu.route_modulate(base, delta, None, None, torch.randn(4, 8), None, None, None, None, *options)
    with pytest.raises(RuntimeError, match=r"jitter must have 10 rows of 4 values; got shape \[10, 3\]"):
        torch.ops.lime_cpu.route_modulate(base, delta, None, None, torch.randn(4, 9), None, None, None,
                                          torch.ones(10, 3), *options)
    with pytest.raises(RuntimeError, match=r"selection must be 0..3; got 7"):
        torch.ops.lime_cpu.route_modulate(base, delta, None, None, torch.randn(4, 9), None, None, None, None, False, 7,
                                          2, 4, 0.5, 0.5, 0.5, 0.5)


def test_auto_takes_the_cpu_operators_on_the_cpu_and_cpu_refuses_other_devices():
    layer = LiMELinear(torch.nn.Linear(16, 12), backend="auto")
    assert layer.resolve_backend(torch.randn(2, 3, 16)) == "cpu"
    assert LiMELinear(torch.nn.Linear(16, 12), backend="reference").resolve_backend(torch.randn(2, 3, 16)) == "reference"
    explicit = LiMELinear(torch.nn.Linear(16, 12), backend="cpu")
    with pytest.raises(ValueError, match=r"backend='cpu' needs CPU tensors \(got an input on meta\)"):
        explicit.resolve_backend(torch.randn(2, 3, 16, device="meta"))


def test_without_the_operators_cpu_raises_and_auto_warns_once_then_runs_the_reference(monkeypatch):
    reason = "the environment sets LIME_CPU_KERNEL=0"
    monkeypatch.setitem(cpu._state, "tried", True)
    monkeypatch.setitem(cpu._state, "reason", reason)
    monkeypatch.setattr(layer_module, "_warned_cpu_reference", [False])
    x = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match=f"backend='cpu' cannot run: {reason}"):
        LiMELinear(torch.nn.Linear(16, 12), backend="cpu")(x)
    layer = LiMELinear(torch.nn.Linear(16, 12), backend="auto")
    with pytest.warns(UserWarning, match=f"C\\+\\+ CPU operators are unavailable \\({reason}\\)"):
        assert layer.resolve_backend(x) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer(x)  # warned once per process


def test_the_environment_switch_names_itself(monkeypatch):
    monkeypatch.setenv("LIME_CPU_KERNEL", "0")
    assert cpu._build() == "the environment sets LIME_CPU_KERNEL=0"


def test_the_options_reach_the_operators_as_the_kernels_number_them():
    options = RoutingOptions(num_experts=6, top_k=2, auto_topk=True, sparse_mode=True, router="maxabs",
                             gamma_routing=0.25, temperature=2.0, auto_topk_threshold=0.3, soft_topk_temperature=0.2)
    assert eager._cpu_options(options) == (True, 3, 2, 4, 0.3, 0.2, 0.375, 0.125)


@pytest.mark.parametrize("n_gram", [1, 3])
def test_under_torch_compile_training_and_inference_trace_the_reference(n_gram):
    """torch.compile(fullgraph=True) on backend='cpu' traces the reference, with gradients and without
    (eager._traces_reference): neither graph calls a C++ operator, and both equal eager to rounding."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        layer = _randomized(LiMELinear(torch.nn.Linear(16, 12), num_experts=4, rank=3, n_gram=n_gram, jitter_noise=0.0,
                                       backend="cpu")).train()
        x = torch.randn(2, 7, 16, requires_grad=True)
        torch._dynamo.reset()
        record = AotEagerAndRecordGraphs()
        call = torch.compile(layer, fullgraph=True, backend=record) if compiled else layer
        out = call(x)
        (out.square().sum() + layer.last_stats.importance).backward()
        with torch.no_grad():
            inference = call(x)
        grads = {name: p.grad for name, p in layer.named_parameters() if p.requires_grad}
        results.append((out.detach(), inference, x.grad, grads, record))
    (eager_out, eager_inference, eager_x, eager_grads, _), (out, inference, x_grad, grads, record) = results
    graphs = [str(graph.graph) for graph in record.graphs]
    assert len(graphs) == 2 and not any("lime_cpu" in graph for graph in graphs), \
        "training and inference trace the reference"
    torch.testing.assert_close(inference, eager_inference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, eager_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x_grad, eager_x, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def _direct_and_general(cls, dtype, training, provider_mask):
    """(output, gradients, statistics) of one seeded call through `_direct_cpu_forward` and through the general
    path (the direct one switched off on the layer), from the same parameters and the same random state."""
    from lime_kernels.inputs import ContextMask

    results = []
    for direct in (True, False):
        torch.manual_seed(0)
        layer = _randomized(cls(torch.nn.Linear(16, 12), num_experts=4, rank=3, jitter_noise=0.2, dropout=0.3,
                                backend="auto")).to(dtype).train(training)
        if provider_mask is not None:  # as apply_peft installs it: the model call's padding mask
            layer.mask_provider = lambda: ContextMask(provider_mask, True, aligned={})
        if not direct:
            layer._direct_cpu_options = lambda: None
        taken = []
        original = layer._direct_cpu_forward
        layer._direct_cpu_forward = lambda *arguments: taken.append(1) or original(*arguments)
        torch.manual_seed(1)
        x = torch.randn(2, 7, 16, dtype=dtype, requires_grad=True)
        out = layer(x)
        assert bool(taken) == direct
        stats = layer.last_stats
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum()
        if training:
            loss = loss + 0.3 * stats.importance + 0.2 * stats.kl_uniform
        loss.backward()
        grads = {name: p.grad for name, p in layer.named_parameters() if p.requires_grad}
        grads["input"] = x.grad
        results.append((out, grads, [s for s in stats if s is not None]))
    return results


@pytest.mark.parametrize("cls,dtype,training,padded", list(itertools.product(
    [LiMELinear, LiMELoRAFALinear], [torch.float32, torch.float64], [True, False], [False, True])))
def test_direct_calls_equal_the_general_path_bit_for_bit(cls, dtype, training, padded):
    """`LiMELinear._direct_cpu_forward` skips the general path's checks, not its work: the same mask, random draws
    (jitter, dropout), output, gradients and statistics, exactly."""
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]]) if padded else None
    (direct_out, direct_grads, direct_stats), (out, grads, stats) = _direct_and_general(cls, dtype, training, mask)
    assert torch.equal(direct_out, out)
    assert direct_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.equal(direct_grads[name], grad), name
    assert len(direct_stats) == len(stats) and all(torch.equal(a, b) for a, b in zip(direct_stats, stats))


def test_the_direct_path_is_taken_where_it_applies_and_follows_the_layers_state():
    def direct(layer):
        return layer._direct_cpu_options() is not None

    def linear():
        return torch.nn.Linear(16, 12)

    layer = LiMELinear(linear(), num_experts=4, rank=3)
    assert direct(layer) and direct(LiMELoRAFALinear(linear(), num_experts=4, rank=3, backend="cpu"))
    for other in (LiMEDoRALinear(linear(), num_experts=4, rank=3), LiMESliceFineLinear(linear(), num_experts=4, rank=3),
                  LiMELinear(linear(), num_experts=4, rank=3, compat="original"),
                  LiMELinear(linear(), num_experts=4, rank=3, n_gram=3),
                  LiMELinear(linear(), num_experts=4, rank=3, rep_mode="mean"),
                  LiMELinear(linear(), num_experts=4, rank=3, backend="reference")):
        assert not direct(other), other
    layer.update_routing(n_gram=2)  # a new options object: worked out again
    assert not direct(layer)
    layer.update_routing(n_gram=1)
    assert direct(layer) and layer._direct_cpu_options() is layer.routing
    layer.eval()
    assert direct(layer) and layer.__dict__["_direct_cpu"][0][0] is False  # kept per mode
    layer.compile_reference()
    assert not direct(layer)


def test_a_model_calls_layers_share_one_alignment_of_its_mask():
    """`context_valid_mask` keeps what it aligned in the call's `aligned` dict, per input shape and kind of layer
    (in the sequence model or beside it); a compiled graph and a context without the dict align afresh."""
    from lime.injection import _same_context
    from lime_kernels.inputs import ContextMask, context_valid_mask

    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    context = ContextMask(mask, True, aligned={})
    first = context_valid_mask(context, torch.Size([2, 3, 8]))
    assert first[1] and first[0].tolist() == [[True, True, True], [False, True, True]]
    assert context_valid_mask(context, torch.Size([2, 3, 16])) is first  # the same (B, T): the same alignment
    assert context_valid_mask(context._replace(in_sequence_model=False), torch.Size([2, 3, 8])) == (None, False)
    assert context_valid_mask(context, torch.Size([2, 4, 8]))[0].tolist() == (mask != 0).tolist()
    assert len(context.aligned) == 3
    plain = ContextMask(mask, True)
    assert context_valid_mask(plain, torch.Size([2, 3, 8])) is not context_valid_mask(plain, torch.Size([2, 3, 8]))
    # Two calls offering the same tensors are the same context for checkpointing, whatever their dicts hold.
    assert _same_context(context, ContextMask(mask, True, aligned={}))
    assert not _same_context(context, ContextMask(mask.clone(), True, aligned={}))
