"""The eager path (`lime_kernels.eager`, one autograd node with a hand-written backward) against the
reference (`reference.route`, autograd through every operator) in float64, both as Python operators and
as the C++ CPU operators (`native=True`, `lime_kernels.cpu`); the statistics computed only when read; and
how many operators a LiME layer's training step dispatches."""

import functools
import itertools

import pytest
import torch
from conftest import make_layer

import lime
from lime_kernels import RoutingOptions, cpu, eager, reference
from lime_kernels.accounting import account

# The eager node's two implementations: Python operators, and the C++ CPU operators (skipped, with the build's
# reason, where they cannot be built).
NATIVE = [False, pytest.param(True, marks=pytest.mark.skipif(not cpu.available(), reason=str(cpu.unavailable_reason())))]

SELECTION_MODES = {
    "auto": dict(auto_topk=True),
    "soft": dict(auto_topk=False, soft_topk=True),
    "hard": dict(auto_topk=False, soft_topk=False),
    "sparse-auto": dict(auto_topk=True, sparse_mode=True),
    "sparse-hard": dict(auto_topk=False, sparse_mode=True),
}
REPRESENTATIONS = {"token": dict(), "window3": dict(n_gram=3), "anchor2": dict(n_gram=2, ngram_mode="anchor"),
                   "mean": dict(rep_mode="mean"), "last": dict(rep_mode="last")}
CASES = list(itertools.product(["cosine", "maxabs"], SELECTION_MODES, REPRESENTATIONS))


def _inputs(seed, *, padded, jittered, shared, base_grad, dtype=torch.float64, base_dtype=None):
    generator = torch.Generator().manual_seed(seed)
    batch, tokens, features, experts = 2, 5, 7, 4

    def draw(*shape):
        return torch.randn(*shape, generator=generator, dtype=dtype)

    base = draw(batch, tokens, features).to(base_dtype or dtype).requires_grad_(base_grad)
    delta = draw(batch, tokens, features).requires_grad_()
    LiMEs = (torch.rand(experts, features, generator=generator, dtype=dtype) + 0.5).requires_grad_()
    LiME_shared = draw(features).requires_grad_() if shared else None
    gamma = torch.full((1,), 0.3, dtype=dtype, requires_grad=True) if shared else None
    valid = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], dtype=torch.bool) if padded else None
    jitter = (0.9 + 0.2 * torch.rand(batch * tokens, experts, generator=generator)) if jittered else None
    return (base, delta, LiMEs, LiME_shared, gamma), valid, jitter


def _outputs_and_gradients(route, tensors, options, valid, jitter, seed):
    routed = route(*tensors, options, valid, jitter)
    generator = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(routed.out.shape, generator=generator, dtype=torch.float64).to(routed.out.dtype)
    grad_probs = torch.randn(routed.probs.shape, generator=generator, dtype=routed.probs.dtype)
    loss = (routed.out * grad_out).sum() + (routed.probs * grad_probs).sum()
    differentiable = [t for t in tensors if t is not None and t.requires_grad]
    return routed.out, routed.probs, torch.autograd.grad(loss, differentiable)


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("router,selection,representation", CASES)
def test_eager_route_equals_the_reference_in_float64(router, selection, representation, native):
    """Outputs, probabilities and the gradients of every input (base, delta, the experts, the shared
    vector, gamma), with and without padding, jitter, the shared expert and a base that takes gradients."""
    options = RoutingOptions(num_experts=4, top_k=2, router=router, jitter_noise=0.1, **SELECTION_MODES[selection],
                             **REPRESENTATIONS[representation])
    for index, (padded, jittered, shared) in enumerate(itertools.product([False, True], repeat=3)):
        base_grad = padded != shared  # a frozen output with and without a gradient, in both padding cases
        seed = CASES.index((router, selection, representation)) * 8 + index
        tensors, valid, jitter = _inputs(seed, padded=padded, jittered=jittered, shared=shared, base_grad=base_grad)
        expected = _outputs_and_gradients(reference.route, tensors, options, valid, jitter, seed)
        actual = _outputs_and_gradients(functools.partial(eager.route, native=native), tensors, options, valid, jitter,
                                        seed)
        where = f"{router}/{selection}/{representation} padded={padded} jitter={jittered} shared={shared}"
        torch.testing.assert_close(actual[0], expected[0], rtol=1e-12, atol=1e-12, msg=lambda m: f"out, {where}: {m}")
        torch.testing.assert_close(actual[1], expected[1], rtol=1e-12, atol=1e-12, msg=lambda m: f"probs, {where}: {m}")
        assert len(actual[2]) == len(expected[2])
        for number, (got, want) in enumerate(zip(actual[2], expected[2])):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10,
                                       msg=lambda m, number=number: f"gradient {number}, {where}: {m}")
        if padded:  # invalid tokens return the frozen output exactly
            assert torch.equal(actual[0][~valid], tensors[0][~valid])


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("router,selection", list(itertools.product(["cosine", "maxabs"], SELECTION_MODES)))
def test_eager_lime_linear_with_its_adapter_inside_equals_the_reference(router, selection, native):
    """Per-token routing takes the adapter's two products into the same node: the gradients of the input,
    A and B as the reference's autograd gives them, for each subset of them that needs one (LoRA-FA: A
    frozen; a frozen adapter: the experts' gradients alone, and no adapter backward at all)."""
    options = RoutingOptions(num_experts=4, top_k=2, router=router, **SELECTION_MODES[selection])
    wanted = [(True, True, True), (False, True, True), (True, False, True), (False, False, True), (True, False, False),
              (False, False, False)]  # (x, A, B) requiring gradients
    for index, (padded, jittered, shared, (x_grad, A_grad, B_grad)) in enumerate(
            itertools.product([False, True], [False, True], [False, True], wanted)):
        generator = torch.Generator().manual_seed(index)
        x = torch.randn(2, 5, 6, generator=generator, dtype=torch.float64, requires_grad=x_grad)
        base = x.detach() @ torch.randn(7, 6, generator=generator, dtype=torch.float64).t()
        A = torch.randn(3, 6, generator=generator, dtype=torch.float64).requires_grad_(A_grad)
        B = torch.randn(7, 3, generator=generator, dtype=torch.float64).requires_grad_(B_grad)
        (_, _, LiMEs, LiME_shared, gamma), valid, jitter = _inputs(index, padded=padded, jittered=jittered,
                                                                     shared=shared, base_grad=False)
        results = []
        for function in (reference.lime_linear_routed, functools.partial(eager.lime_linear, native=native)):
            routed = function(x, base, A, B, LiMEs, LiME_shared, gamma, options, 1.7, valid, jitter)
            loss = (routed.out * torch.linspace(-1, 1, routed.out.numel(), dtype=torch.float64).view_as(routed.out)).sum()
            loss = loss + (routed.probs * torch.linspace(1, -2, routed.probs.numel(), dtype=torch.float64).view_as(routed.probs)).sum()
            differentiable = [t for t in (x, A, B, LiMEs, LiME_shared, gamma) if t is not None and t.requires_grad]
            results.append((routed.out, torch.autograd.grad(loss, differentiable)))
        (want_out, want_grads), (got_out, got_grads) = results
        torch.testing.assert_close(got_out, want_out, rtol=1e-12, atol=1e-12)
        for got, want in zip(got_grads, want_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("router,selection", [("cosine", "auto"), ("cosine", "soft"), ("maxabs", "hard"),
                                              ("maxabs", "sparse-auto")])
def test_eager_route_passes_gradcheck(router, selection, native):
    options = RoutingOptions(num_experts=4, top_k=2, router=router, **SELECTION_MODES[selection])
    (base, delta, LiMEs, LiME_shared, gamma), valid, jitter = _inputs(
        7, padded=True, jittered=True, shared=True, base_grad=True)

    def function(base, delta, LiMEs, LiME_shared, gamma):
        routed = eager.route(base, delta, LiMEs, LiME_shared, gamma, options, valid, jitter, native=native)
        return routed.out, routed.probs

    assert torch.autograd.gradcheck(function, (base, delta, LiMEs, LiME_shared, gamma), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("native", NATIVE)
def test_eager_route_in_mixed_precision_matches_the_reference(native):
    """A bf16 frozen output with float32 adapter math: the same rounding points as the reference."""
    options = RoutingOptions(num_experts=4)
    tensors, valid, jitter = _inputs(3, padded=True, jittered=True, shared=True, base_grad=True,
                                     dtype=torch.float32, base_dtype=torch.bfloat16)
    expected = _outputs_and_gradients(reference.route, tensors, options, valid, jitter, 3)
    actual = _outputs_and_gradients(functools.partial(eager.route, native=native), tensors, options, valid, jitter, 3)
    assert actual[0].dtype == torch.bfloat16
    torch.testing.assert_close(actual[0], expected[0], rtol=0, atol=0)
    for got, want in zip(actual[2], expected[2]):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("native", NATIVE)
def test_a_balance_loss_alone_trains_the_experts_as_the_reference_does(native):
    """Only the statistics are differentiated (the output's gradient arrives as None)."""
    grads = {}
    for name, route in (("reference", reference.route), ("eager", functools.partial(eager.route, native=native))):
        tensors, valid, jitter = _inputs(5, padded=True, jittered=False, shared=True, base_grad=True)
        routed = route(*tensors, RoutingOptions(num_experts=4), valid, jitter)
        stats = reference.routing_stats(routed.probs, valid, RoutingOptions(num_experts=4), "full")
        grads[name] = torch.autograd.grad(stats.importance + stats.kl_uniform, [tensors[0], tensors[1]])
    for got, want in zip(grads["eager"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _training_step_operators(layer, x):
    with account() as forward:
        out = layer(x)
    with account() as backward:
        out.sum().backward()
    return [op.name for op in forward.ops], [op.name for op in backward.ops]


def test_statistics_are_computed_only_when_read():
    """The forward dispatches the same operators with and without `track_aux`: the statistics wait for
    `last_stats` to be read, and then equal those computed from the forward's probabilities."""
    x = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    operators = {}
    for track_aux in (False, True):
        layer = make_layer(num_experts=4, track_aux=track_aux, seed=0).train()
        torch.manual_seed(0)
        operators[track_aux] = _training_step_operators(layer, x)[0]
    assert operators[True] == operators[False]
    torch.manual_seed(0)
    with account() as reading:
        stats = layer.last_stats
    assert len(reading.ops) > 10 and stats.importance.grad_fn is not None
    assert layer.last_stats is stats  # computed once


def test_statistics_read_late_still_carry_the_balance_gradient():
    """Read under no_grad first (a log), the statistics still train when a balance loss reads them."""
    layer = make_layer(num_experts=4, seed=1).train()
    model = torch.nn.Sequential(layer)
    model(torch.randn(2, 6, 8, dtype=torch.float64))
    with torch.no_grad():
        assert layer.last_stats.usage.shape == (4,)
    lime.compute_balance_loss(model).backward()
    assert layer.LiMEs.grad is None  # the balance loss reaches the adapter through the routing features
    assert layer.B.grad is not None and layer.B.grad.abs().sum() > 0


def test_a_lime_training_step_dispatches_fewer_operators_than_before():
    """The operators of one LiME layer's training forward + backward on the reference backend (E = 4, r = 8, the
    defaults: jitter, AutoTop-K, the shared expert). Before the eager path and deferred statistics: 98 + 107. A
    LoRA (PEFT's layer) dispatches 14 + 28 on the same input; the budget here keeps LiME within 3.5x of it."""
    layer = make_layer(num_experts=4, rank=8, seed=2, dtype=torch.float32, backend="reference").train()
    x = torch.randn(4, 32, 8, requires_grad=True)
    forward, backward = _training_step_operators(layer, x)
    assert len(forward) <= 45 and len(backward) <= 100, (len(forward), len(backward), forward, backward)
    assert "aten::_softmax_backward_data" in backward  # the hand-written backward ran, not autograd's chain


@pytest.mark.skipif(not cpu.available(), reason=str(cpu.unavailable_reason()))
def test_on_the_cpu_backend_the_adapter_and_routing_are_one_operator_each_way():
    """backend='cpu': the frozen layer, the jitter, then ONE operator for the adapter, routing and modulation
    forward, and one for all of their backward (fewer operators than PEFT's LoRA layer, 14 + 28)."""
    layer = make_layer(num_experts=4, rank=8, seed=2, dtype=torch.float32, backend="cpu").train()
    forward, backward = _training_step_operators(layer, torch.randn(4, 32, 8, requires_grad=True))
    assert forward.count("lime_cpu::lora_route_modulate") == 1 and len(forward) <= 8, forward
    assert backward.count("lime_cpu::lora_route_modulate_backward") == 1 and len(backward) <= 16, backward
    assert not any(name.startswith("aten::_softmax") for name in forward + backward)


@pytest.mark.parametrize("native", NATIVE)
@pytest.mark.parametrize("router,selection,representation", CASES)
def test_without_gradients_the_forward_alone_equals_the_reference(router, selection, representation, native):
    """Evaluation and decoding (no graph recorded) call the node's forward directly: the reference's output
    and probabilities, the frozen output on invalid tokens."""
    options = RoutingOptions(num_experts=4, top_k=2, router=router, **SELECTION_MODES[selection],
                             **REPRESENTATIONS[representation])
    for index, (padded, shared) in enumerate(itertools.product([False, True], repeat=2)):
        tensors, valid, _ = _inputs(index, padded=padded, jittered=False, shared=shared, base_grad=False)
        with torch.no_grad():
            expected = reference.route(*tensors, options, valid)
            actual = eager.route(*tensors, options, valid, native=native)
        torch.testing.assert_close(actual.out, expected.out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(actual.probs, expected.probs, rtol=1e-12, atol=1e-12)
        if padded:
            assert torch.equal(actual.out[~valid], tensors[0][~valid])


@pytest.mark.parametrize("backend,budget", [("reference", 36),
                                            pytest.param("cpu", 6, marks=pytest.mark.skipif(
                                                not cpu.available(), reason=str(cpu.unavailable_reason())))])
def test_a_decoding_call_dispatches_fewer_operators_than_the_reference(backend, budget):
    """One token through a LiME layer in eval mode without autograd (a decoding step's call): the node's
    forward alone, in fewer operators than the reference's (39 for the same call; on the cpu backend the
    frozen layer and one operator), the same output."""
    layer = make_layer(num_experts=4, rank=8, seed=2, dtype=torch.float32, backend=backend).eval()
    x = torch.randn(1, 1, 8)
    with torch.no_grad():
        with account() as recorded:
            out = layer(x)
        A, B, scaling = layer.adapter_factors()
        expected = reference.lime_linear_routed(x, layer.linear(x), A, B, layer.LiMEs, layer.LiME_shared, layer.gamma,
                                                layer.routing, scaling).out
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert len(recorded.ops) <= budget, [op.name for op in recorded.ops]
