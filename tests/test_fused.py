"""The fused Triton path against the reference path: outputs, statistics and every gradient.

Runs on a CUDA device natively in float32, bfloat16 and float16, or on the CPU under Triton's
interpreter (`TRITON_INTERPRET=1`), which is how `make test` runs it. The interpreter's low-precision
`tl.dot` is wrong, but every kernel converts its operands to float32 before a `tl.dot`, so bf16 and
fp16 activations (their loads, stores and roundings) are checked under the interpreter too, on a
slice of the options; the full option sweep runs them on a GPU only, to keep the CPU run short.
Without a GPU or the interpreter it is skipped (the main run leaves it to the interpreter run).
"""

import itertools
import os
import sys
from unittest import mock

import pytest
import torch
from conftest import SELECTIONS, make_layer, padding_mask

from lime_kernels import (
    LiMEDoRALinear,
    LiMEEmbedding,
    LiMELinear,
    LiMELoRAFALinear,
    LiMEPromptEncoder,
    LiMESliceFineLinear,
)
from lime_kernels import eager as eager_path
from lime_kernels import reference as reference_path
from lime_kernels.testing import assert_close as _close

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRETER
pytestmark = pytest.mark.skipif(not (INTERPRETER or CUDA), reason="needs a CUDA device or TRITON_INTERPRET=1")

DEVICE = "cuda" if CUDA else "cpu"
ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPES = ALL_DTYPES if CUDA else [torch.float32]  # for the long sweeps

REPRESENTATIONS = {
    "token": dict(rep_mode="token", n_gram=1),
    "window3": dict(rep_mode="token", n_gram=3, ngram_mode="window"),
    "anchor2": dict(rep_mode="token", n_gram=2, ngram_mode="anchor"),
    "mean": dict(rep_mode="mean"),
    "last": dict(rep_mode="last"),
}
COMBINATIONS = list(itertools.product(["cosine", "maxabs"], SELECTIONS, REPRESENTATIONS, ["left", "right"]))


def _pair(dtype, seed=0, **kwargs):
    """A reference layer and a fused layer with the same parameters, on the test device."""
    kwargs.setdefault("d_in", 40)
    kwargs.setdefault("d_out", 70)
    kwargs.setdefault("jitter_noise", 0.2)
    reference = make_layer(dtype=dtype, peft_dtype=torch.float32, moe_dtype=torch.float32, seed=seed,
                           backend="reference", **kwargs).to(DEVICE)
    fused = make_layer(dtype=dtype, peft_dtype=torch.float32, moe_dtype=torch.float32, seed=seed,
                       backend="triton", **kwargs).to(DEVICE)
    fused.load_state_dict(reference.state_dict())
    return reference, fused


# Hard routing choices (a top-k or AutoTop-K boundary, the arg-max the max's gradient goes to, the
# maxabs router's batch-wide arg-max) may flip between paths after a last-bit difference (TF32, the
# GPU's approximate exp and sqrt, the interpreter's truncating bf16 cast). The parity tests therefore
# draw inputs whose closest such choice is at least this far from a tie (probabilities, or |features|
# relative to their max), instead of loosening the tolerances. The bounds are several times the
# routing's own differences between the paths: TF32's 2^-11 on the adapter's features moves a
# probability by about 2e-4; a bf16 ulp (2^-8) of DoRA's rounded features by about 1e-3.
NEAR_TIE = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 1e-3}


def routing_margin(run) -> float:
    """How close to a tie the hard routing choices of the reference calls in `run()` come."""
    captured = []
    original = reference_path.routing_probs

    def capture(frozen, adapted, valid, options, jitter=None, history=None):
        probs = original(frozen, adapted, valid, options, jitter, history)
        captured.append((probs.detach(), frozen.detach(), adapted.detach(), valid, options))
        return probs

    def reference_instead(function):  # the eager path's signature (`native` picks the C++ operators: ignored)
        return lambda *args, native=False, **kwargs: function(*args, **kwargs)

    # Without gradients the reference layers run the eager path's forward (lime_kernels.eager), which computes
    # the same probabilities without routing_probs: the margins are read from the reference's own calls.
    with mock.patch.object(reference_path, "routing_probs", capture), torch.no_grad(), \
            mock.patch.object(eager_path, "route", reference_instead(reference_path.route)), \
            mock.patch.object(eager_path, "lime_linear", reference_instead(reference_path.lime_linear_routed)):
        run()
    assert captured, "the call did not route"
    margins = [1.0]
    for probs, frozen, adapted, valid, options in captured:
        kept = (probs.reshape(-1, probs.shape[-1]) if valid is None else probs[valid]).double()  # None: all valid
        num_experts = kept.shape[-1]
        if kept.numel() == 0 or num_experts == 1:
            continue
        ordered = kept.sort(dim=-1, descending=True).values
        boundaries = [options.top_k]
        if options.auto_topk:
            margins.append((ordered[:, 0] - ordered[:, 1]).min().item())
            below_max = kept < ordered[:, :1]
            distance = (kept - options.auto_topk_threshold * ordered[:, :1]).abs()[below_max]
            margins.append(distance.min().item() if distance.numel() else 1.0)
            boundaries = [min(2 * options.top_k, num_experts)] if options.sparse_mode else []
        margins += [(ordered[:, k - 1] - ordered[:, k]).min().item() for k in boundaries if k < num_experts]
        if options.router == "maxabs":
            # The batch-wide max: exact copies of it (n-gram anchors, one prompt bank for every sequence)
            # share its gradient the same way on both paths; a different value close to it would not.
            for features in (frozen, adapted):
                pooled = reference_path.routing_representation(features, valid, options).abs().flatten().double()
                distinct = pooled.unique()
                if distinct.numel() > 1:
                    first, second = distinct[-1], distinct[-2]
                    margins.append(((first - second) / first.clamp_min(1e-12)).item())
    return min(margins)


def tie_free(draw, run, dtype, attempts=200):
    """The first of `draw(generator seeded 0, 1, ...)` on which `run(inputs)` (the reference layer)
    makes no near-tie routing choice."""
    for attempt in range(attempts):
        inputs = draw(torch.Generator().manual_seed(attempt))
        if routing_margin(lambda: run(inputs)) > NEAR_TIE[dtype]:
            return inputs
    raise AssertionError(f"no input without near-ties (margin {NEAR_TIE[dtype]}) in {attempts} draws")


def tie_free_input(reference, shape, dtype, mask=None, training=True, seed=1234):
    """A random input `shape` for `run_both(reference, ...)` with the same mask, mode and seed."""
    def run(x):
        reference.train(training)
        torch.manual_seed(seed)
        reference(x, attention_mask=mask)

    return tie_free(lambda generator: torch.randn(shape, generator=generator).to(DEVICE, dtype), run, dtype)


def run_both(reference, fused, x, mask=None, training=True, seed=1234, dtype=torch.float32, input_grad=True):
    """Same input, same random numbers: compare outputs, statistics and every gradient."""
    results = []
    for layer in (reference, fused):
        layer.train(training)
        for parameter in layer.parameters():
            parameter.grad = None
        inputs = x.detach().clone().requires_grad_(input_grad)
        torch.manual_seed(seed)
        out = layer(inputs, attention_mask=mask)
        stats = layer.last_stats
        torch.manual_seed(seed + 1)
        loss = (out.float() * torch.randn(out.shape, device=out.device)).sum()
        if training:
            loss = loss + 0.3 * stats.importance + 0.7 * stats.kl_uniform
        loss.backward()
        results.append((out, stats, inputs.grad, {n: p.grad for n, p in layer.named_parameters() if p.requires_grad}))
    (out_r, stats_r, dx_r, grads_r), (out_f, stats_f, dx_f, grads_f) = results
    _close("output", out_f, out_r, dtype)
    names = ("importance", "kl_uniform", "load", "usage", "active_experts", "active_histogram") if training else ("usage",)
    for name in names:
        _close(name, getattr(stats_f, name).reshape(-1), getattr(stats_r, name).reshape(-1), dtype, floor=1.0)
    if input_grad:
        _close("grad x", dx_f, dx_r, dtype)
    else:
        assert dx_f is None and dx_r is None
    assert grads_f.keys() == grads_r.keys()
    for name in grads_r:
        _close(f"grad {name}", grads_f[name], grads_r[name], dtype)
    return out_f


def training_gradients(fused, x, mask=None):
    """One training step's gradients (input, then A, B, LiMEs, LiME_shared, gamma) from a fixed seed."""
    fused.zero_grad(set_to_none=True)
    inputs = x.clone().requires_grad_(True)
    torch.manual_seed(0)
    out = fused.train()(inputs, attention_mask=mask)
    (out.float().square().sum() + fused.last_stats.importance).backward()
    return [inputs.grad] + [p.grad.clone() for p in (fused.A, fused.B, fused.LiMEs, fused.LiME_shared, fused.gamma)]


# bf16 and fp16 on CPU too for a slice: every router and representation once, each selection twice.
LOW_PRECISION_SLICE = {
    (router, list(SELECTIONS)[index % len(SELECTIONS)], representation, ("left", "right")[index % 2])
    for index, (router, representation) in enumerate(itertools.product(["cosine", "maxabs"], REPRESENTATIONS))
}


@pytest.mark.parametrize("router,selection,representation,padding", COMBINATIONS)
def test_fused_matches_reference(router, selection, representation, padding):
    index = COMBINATIONS.index((router, selection, representation, padding))
    in_slice = (router, selection, representation, padding) in LOW_PRECISION_SLICE
    for dtype in ALL_DTYPES if in_slice else DTYPES:
        reference, fused = _pair(dtype, seed=index, num_experts=4, rank=3, router=router,
                                 use_shared_LiME=index % 2 == 0, **SELECTIONS[selection], **REPRESENTATIONS[representation])
        mask = padding_mask(padding, 3, 29).to(DEVICE)
        x = tie_free_input(reference, (3, 29, 40), dtype, mask)  # 87 tokens: not a multiple of the blocks
        run_both(reference, fused, x, mask, dtype=dtype)


SIZES = [(rank, experts) for rank in (1, 2, 4, 8, 16) for experts in (2, 4, 8)]


@pytest.mark.parametrize("rank,experts", SIZES)
def test_fused_awkward_sizes(rank, experts):
    index = SIZES.index((rank, experts))
    n_gram = (1, 2, 3, 5)[index % 4]
    for dtype in DTYPES:
        reference, fused = _pair(dtype, seed=index, num_experts=experts, rank=rank, n_gram=n_gram, d_in=33, d_out=21,
                                 top_k=min(2, experts))
        mask = padding_mask("right", 2, 37).to(DEVICE)
        run_both(reference, fused, tie_free_input(reference, (2, 37, 33), dtype, mask), mask, dtype=dtype)


@pytest.mark.parametrize("shape,mask", [((4, 1, 40), None), ((9, 40), torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 1])),
                                        ((2, 3, 5, 40), None)])
def test_fused_single_tokens_2d_and_folded_inputs(shape, mask):
    for dtype in ALL_DTYPES:
        reference, fused = _pair(dtype, num_experts=4, n_gram=3)
        mask_here = None if mask is None else mask.to(DEVICE)
        x = tie_free_input(reference, shape, dtype, mask_here)
        out = run_both(reference, fused, x, mask_here, dtype=dtype)
        assert out.shape == (*shape[:-1], 70)


def test_fused_eval_mode_and_dropout():
    for dtype in ALL_DTYPES:
        mask = padding_mask("left", 2, 11).to(DEVICE)
        reference, fused = _pair(dtype, num_experts=4, n_gram=2)
        x = tie_free_input(reference, (2, 11, 40), dtype, mask, training=False)
        run_both(reference, fused, x, mask, training=False, dtype=dtype)
        reference, fused = _pair(dtype, num_experts=4, dropout=0.3)
        run_both(reference, fused, tie_free_input(reference, (2, 11, 40), dtype, mask), mask, dtype=dtype)


def test_fused_masked_tokens_return_the_frozen_output_exactly():
    for dtype in ALL_DTYPES:
        _, fused = _pair(dtype, num_experts=4, n_gram=2)
        mask = padding_mask("left", 3, 13).to(DEVICE)
        x = torch.randn(3, 13, 40, device=DEVICE, dtype=dtype)
        out = fused.train()(x, attention_mask=mask)
        base = fused.linear(x)
        assert torch.equal(out[mask == 0], base[mask == 0])
        assert not torch.equal(out[mask == 1], base[mask == 1])


def test_fused_respects_which_inputs_need_gradients():
    """Each subset of parameters (and the input or not) gets exactly its gradients. With nothing
    upstream of the routing to differentiate (the input and the adapter frozen) there is no input pass:
    the finishing kernel's own launch writes the gradients (all of the modulation's, or d gamma alone)."""
    from lime_kernels.fused.common import record_launches

    reference, fused = _pair(torch.float32, num_experts=4)
    x = tie_free_input(reference, (2, 9, 40), torch.float32, training=False)
    cases = [(("A", "B"), True), (("LiMEs", "LiME_shared", "gamma"), True),
             (("A", "B", "LiMEs", "LiME_shared", "gamma"), True), (("A", "B"), False),
             (("A", "B", "LiMEs", "LiME_shared"), False)]
    for frozen, input_grad in cases:
        for layer in (reference, fused):
            for name, parameter in layer.named_parameters():
                parameter.requires_grad_(name.split(".")[0] != "linear" and name not in frozen)
        with record_launches() as launches:
            run_both(reference, fused, x, training=False, input_grad=input_grad)
        assert all(getattr(fused, name).grad is None for name in frozen)
        names = {launch.name for launch in launches}
        assert ("_finish_kernel" in names) == (not input_grad), (frozen, input_grad, names)
        assert ("_input_grad_kernel" in names) == input_grad, (frozen, input_grad, names)


def test_fused_gradients_are_bit_for_bit_repeatable():
    """Every reduction of the backward runs in an order fixed by the shape (the input pass's arrival
    counters decide which program sums the partials, never the order it sums them in)."""
    _, fused = _pair(torch.float32, num_experts=4, n_gram=3)
    x = torch.randn(3, 29, 40, device=DEVICE)
    first, second = training_gradients(fused, x), training_gradients(fused, x)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_fused_under_non_reentrant_checkpointing():
    from torch.utils.checkpoint import checkpoint

    _, fused = _pair(torch.float32, num_experts=4, n_gram=2, dropout=0.2)
    x = torch.randn(2, 9, 40, device=DEVICE)
    mask = padding_mask("right", 2, 9).to(DEVICE)
    grads = []
    for use_checkpoint in (False, True):
        fused.zero_grad()
        torch.manual_seed(3)
        out = checkpoint(fused, x, mask, use_reentrant=False) if use_checkpoint else fused.train()(x, mask)
        out.square().sum().backward()
        grads.append([p.grad.clone() for p in (fused.A, fused.B, fused.LiMEs)])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-6, atol=1e-7)


def test_fused_op_registration_opcheck():
    """torch.library.opcheck: schema, fake implementation and autograd registration agree."""
    from lime_kernels.fused.op import fused_lime

    torch.manual_seed(0)
    tokens, d_in, d_out, rank, experts = 12, 16, 20, 2, 4

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEVICE) * scale).requires_grad_(True)

    valid = torch.tensor([True] * 10 + [False] * 2, device=DEVICE)
    options = (6, 0, 8.0, 1, 0.5, 0.7, "cosine", "token", 2, "window", 0, 0.5, 0.5)
    weight, bias = torch.randn(d_out, d_in, device=DEVICE), torch.randn(d_out, device=DEVICE)
    experts_args = (torch.rand(experts, d_out, device=DEVICE, requires_grad=True), leaf(d_out),
                    torch.full((1,), 0.5, device=DEVICE, requires_grad=True))
    cases = {
        "lora": (leaf(tokens, d_in), None, weight, bias, None, None, leaf(rank, d_in), leaf(d_out, rank),
                 *experts_args, None, valid, None),
        "dora": (leaf(tokens, d_in), None, weight, bias, None, None, leaf(rank, d_in), leaf(d_out, rank),
                 *experts_args, (1 + 0.1 * torch.randn(d_out, device=DEVICE)).requires_grad_(True), valid, None),
        "given base": (None, leaf(tokens, d_in), None, None, leaf(tokens, d_out), None, leaf(rank, d_in),
                       leaf(d_out, rank), *experts_args, None, valid, None),
        "given z": (None, None, None, None, leaf(tokens, d_out), torch.randn(tokens, rank, device=DEVICE), None,
                    leaf(d_out, rank), *experts_args, None, None, None),
    }
    for name, args in cases.items():
        torch.library.opcheck(fused_lime, args + options)


def _two_fused_layers(n_gram: int) -> torch.nn.Module:
    """Two fused LiME layers around a GELU, seeded: two calls build the same model."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        LiMELinear(torch.nn.Linear(64, 96, device=DEVICE), num_experts=4, n_gram=n_gram, jitter_noise=0.0,
                   backend="triton"),
        torch.nn.GELU(),
        LiMELinear(torch.nn.Linear(96, 64, device=DEVICE), num_experts=4, jitter_noise=0.0, backend="triton"),
    )


def _compiled_steps_equal_eager(n_gram: int, x: torch.Tensor, steps: int, **compile_options) -> None:
    """Training steps (output, balance term, every gradient) of `torch.compile(fullgraph=True)` over two
    fused layers equal eager ones."""
    eager, compiled_model = _two_fused_layers(n_gram), _two_fused_layers(n_gram)
    compiled = torch.compile(compiled_model, fullgraph=True, **compile_options)
    for _ in range(steps):
        results = []
        for model, call in ((eager, eager), (compiled_model, compiled)):
            model.zero_grad(set_to_none=True)
            out = call(x)
            (out.square().mean() + sum(layer.last_stats.importance for layer in model[::2])).backward()
            grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
            results.append([out.detach().clone()] + grads)
        for a, b in zip(*results):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_fused_layers_compile_without_graph_breaks():
    """torch.compile(fullgraph=True) traces a model of fused layers whole (the custom ops and their fake
    implementations; what CUDA graphs need too) and trains as eager does."""
    _compiled_steps_equal_eager(n_gram=2, x=torch.randn(4, 8, 64, device=DEVICE), steps=2)


def test_tiny_llava_onevision_trains_the_same_on_both_backends():
    """The README's apply_peft call on the tiny LLaVA-OneVision: losses and every LiME gradient of a
    few training steps agree between backend='triton' and backend='reference'."""
    import lime
    from lime.tiny import build_tiny_llava_onevision
    from llava_helpers import README_TARGETS, make_batch

    runs = []
    for backend in ("reference", "triton"):
        model, processor = build_tiny_llava_onevision(seed=0)
        model = lime.apply_peft(model, targets=README_TARGETS, backend=backend, tokenizer=processor.tokenizer).to(DEVICE)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        batch = make_batch(processor, ["What is shown?", "Which option is correct? A B C D"], ["a cat", "B"]).to(DEVICE)
        model.train()
        torch.manual_seed(7)
        losses, grads = [], None
        for step in range(3):
            optimizer.zero_grad()
            loss = model(**batch).loss + lime.compute_balance_loss(model)
            loss.backward()
            if step == 0:
                grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            optimizer.step()
            losses.append(loss.item())
        runs.append((losses, grads))
    (losses_r, grads_r), (losses_f, grads_f) = runs
    assert losses_f == pytest.approx(losses_r, rel=1e-4), (losses_f, losses_r)
    assert losses_f[-1] < losses_f[0]
    for name in grads_r:
        _close(f"grad {name}", grads_f[name], grads_r[name], torch.float32)


def test_a_compiled_tiny_llava_training_step_is_one_graph_through_the_custom_ops():
    """torch.compile(model, fullgraph=True) over the tiny LLaVA-OneVision with fused LiME layers (padded text,
    balance loss, backward; the reference backend's case is in test_compile.py): one graph for the model and one
    for the balance loss, traced through the custom ops' fake implementations (lime::fused_lime in the forward,
    lime::fused_lime_backward in the backward), three steps compiled once, no host-synchronizing operator, and
    the losses of eager reference steps."""
    import lime
    from compile_helpers import compiled_training_steps, recorded_host_syncs
    from lime.tiny import build_tiny_llava_onevision
    from llava_helpers import README_TARGETS, text_batch

    losses = {}
    for backend in ("reference", "triton"):
        model, processor = build_tiny_llava_onevision(seed=0)
        torch.manual_seed(1)
        lime.apply_peft(model, targets=README_TARGETS, tokenizer=processor.tokenizer, backend=backend)
        batch = text_batch(processor).to(DEVICE)
        torch.manual_seed(7)
        if backend == "reference":
            losses[backend] = []
            optimizer = torch.optim.SGD([p for p in model.to(DEVICE).parameters() if p.requires_grad], lr=0.1)
            for _ in range(3):  # compiled_training_steps' steps, eagerly
                loss = model.train()(**batch).loss + lime.compute_balance_loss(model)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses[backend].append(loss.detach())
            continue
        record, losses[backend] = compiled_training_steps(model.to(DEVICE), batch)
    assert (len(record.graphs), len(record.fw_graphs), len(record.bw_graphs)) == (2, 2, 2)
    operators = [{node.target._schema.name for graph in graphs for node in graph.graph.nodes
                  if isinstance(node.target, torch._ops.OpOverload)} for graphs in (record.fw_graphs, record.bw_graphs)]
    assert "lime::fused_lime" in operators[0] and "lime::fused_lime_backward" in operators[1]
    assert recorded_host_syncs(record) == []
    # Two SGD steps (lr 0.1) amplify the backends' rounding differences: 5e-5 relative by the third loss.
    torch.testing.assert_close(torch.stack(losses["triton"]), torch.stack(losses["reference"]), rtol=1e-4, atol=1e-5)


class _ScaledLinear(torch.nn.Linear):
    """A linear layer with its own forward: the fused path takes its output as given (like bitsandbytes')."""

    def forward(self, x):
        return 0.5 * super().forward(x)


def _variant_pair(dtype, build, seed=0):
    torch.manual_seed(seed)
    reference = build("reference").to(DEVICE)
    fused = build("triton").to(DEVICE)
    fused.load_state_dict(reference.state_dict())
    with torch.no_grad():
        for layer in (reference, fused):
            torch.manual_seed(seed + 1)
            for name, parameter in layer.named_parameters():
                if name in ("B", "m", "part_T", "gamma"):
                    parameter.add_(0.3 * torch.randn_like(parameter))
    return reference, fused


VARIANTS = {
    "lora_fa": lambda backend, dtype: LiMELoRAFALinear(torch.nn.Linear(40, 70, dtype=dtype), num_experts=4, n_gram=2,
                                                       backend=backend),
    "dora": lambda backend, dtype: LiMEDoRALinear(torch.nn.Linear(40, 70, dtype=dtype), num_experts=4, router="maxabs",
                                                  backend=backend),
    "dora_detached": lambda backend, dtype: LiMEDoRALinear(torch.nn.Linear(40, 70, dtype=dtype), num_experts=3,
                                                           dora_detach_norm=True, dropout=0.2, backend=backend),
    "slicefine_e2_r3": lambda backend, dtype: LiMESliceFineLinear(torch.nn.Linear(40, 70, dtype=dtype), num_experts=2,
                                                                  rank=3, backend=backend),
    "slicefine_e4_r2": lambda backend, dtype: LiMESliceFineLinear(torch.nn.Linear(40, 70, dtype=dtype), num_experts=4,
                                                                  rank=2, rep_mode="mean", backend=backend),
    "given_base": lambda backend, dtype: LiMELinear(_ScaledLinear(40, 70, dtype=dtype), num_experts=4, dropout=0.1,
                                                    backend=backend),
    "given_base_dora": lambda backend, dtype: LiMEDoRALinear(_ScaledLinear(40, 70, dtype=dtype), num_experts=4,
                                                             backend=backend),
}


# The interpreter casts float32 to bfloat16 by truncation (a GPU rounds to nearest even, as torch
# does), so bit-exact bf16 roundings are checked on a GPU only.
EXACT_DTYPES = ALL_DTYPES if CUDA else [torch.float32, torch.float16]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_variants_keep_masked_tokens_exactly_as_the_reference(variant):
    """Masked tokens get the variant's frozen output base' (DoRA's `scale * base + bias`, SliceFine's
    bias in its sliced channels) rounded once to the activation dtype, exactly as the reference does."""
    for dtype in EXACT_DTYPES:
        reference, fused = _variant_pair(dtype, lambda backend: VARIANTS[variant](backend, dtype))
        mask = padding_mask("left", 3, 13).to(DEVICE)
        x = torch.randn(3, 13, 40, device=DEVICE, dtype=dtype)
        out_r, out_f = (layer.train()(x, attention_mask=mask) for layer in (reference, fused))
        masked = mask == 0
        assert torch.equal(out_f[masked], out_r[masked]), (
            f"{dtype}: masked tokens differ by up to {(out_f[masked] - out_r[masked]).abs().max().item():.3e}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_variants_match_the_reference(variant):
    for dtype in ALL_DTYPES:
        reference, fused = _variant_pair(dtype, lambda backend: VARIANTS[variant](backend, dtype))
        mask = padding_mask("left", 3, 29).to(DEVICE)
        run_both(reference, fused, tie_free_input(reference, (3, 29, 40), dtype, mask), mask, dtype=dtype)


def test_fused_embedding_matches_the_reference():
    for dtype in ALL_DTYPES:
        def build(backend):
            return LiMEEmbedding(torch.nn.Embedding(50, 70, dtype=dtype), num_experts=4, n_gram=3, pad_token_id=0,
                                 backend=backend)

        reference, fused = _variant_pair(dtype, build)

        def draw_ids(generator):
            ids = torch.randint(1, 50, (3, 21), generator=generator).to(DEVICE)
            ids[1, :5] = 0
            return ids

        def run_reference(ids):
            reference.train()
            torch.manual_seed(5)
            reference(ids)

        ids = tie_free(draw_ids, run_reference, dtype)
        results = []
        for layer in (reference, fused):
            layer.train().zero_grad()
            torch.manual_seed(5)
            out = layer(ids)
            (out.float().square().sum() + layer.last_stats.importance).backward()
            results.append((out, layer.B.grad.clone(), layer.A.grad.clone(), layer.LiMEs.grad.clone()))
        for name, fused_value, reference_value in zip(("output", "dB", "dA", "dLiMEs"), results[1], results[0]):
            _close(name, fused_value, reference_value, dtype)
        assert torch.equal(results[1][0][ids == 0], fused.embedding(ids)[ids == 0])


def test_fused_prompt_encoder_matches_the_reference():
    """Prompts: the frozen bank plus the inputs' mean is given to the op (and takes a gradient back
    to the inputs), z is the one-hot of the virtual token and B the prompt deltas."""
    for dtype in ALL_DTYPES:
        def build(backend):
            return LiMEPromptEncoder(6, 70, num_experts=4, n_gram=2, router="maxabs", backend=backend, device=DEVICE)

        reference, fused = _variant_pair(dtype, build)
        with torch.no_grad():
            for layer in (reference, fused):
                torch.manual_seed(2)
                layer.prompt_delta.normal_()
        mask = padding_mask("right", 3, 11).to(DEVICE)

        def run_reference(embeds):
            reference.train()
            torch.manual_seed(5)
            reference(embeds, mask)

        embeds = tie_free(lambda generator: torch.randn(3, 11, 70, generator=generator).to(DEVICE, dtype),
                          run_reference, dtype)
        results = []
        for layer in (reference, fused):
            layer.train().zero_grad()
            inputs = embeds.clone().requires_grad_(True)
            torch.manual_seed(5)
            prompts = layer(inputs, mask)
            (prompts.float().square().sum() + layer.last_stats.kl_uniform).backward()
            results.append((prompts, inputs.grad, layer.prompt_delta.grad.clone(), layer.LiMEs.grad.clone(),
                            layer.gamma.grad.clone()))
        for name, fused_value, reference_value in zip(("prompts", "d inputs", "d prompt_delta", "dLiMEs", "dgamma"),
                                                      results[1], results[0]):
            _close(name, fused_value, reference_value, dtype)


@pytest.mark.parametrize("variant", ["dora", "lora_fa", "slicefine", "embedding", "prompt"])
def test_tiny_llava_onevision_variants_train_the_same_on_both_backends(variant):
    import lime
    import lime.prompt_tuning
    from lime.tiny import build_tiny_llava_onevision
    from llava_helpers import README_TARGETS, make_batch

    runs = []
    for backend in ("reference", "triton"):
        model, processor = build_tiny_llava_onevision(seed=0)
        if variant == "prompt":
            lime.prompt_tuning.apply_peft(model, num_virtual_tokens=4, backend=backend)
        elif variant == "embedding":
            lime.apply_peft(model, targets=README_TARGETS + ["embed_tokens"], tokenizer=processor.tokenizer,
                            backend=backend)
        else:
            lime.apply_peft(model, targets=README_TARGETS, peft=variant, backend=backend)
        model.to(DEVICE).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        batch = make_batch(processor, ["What is shown?", "Which option is correct? A B C D"], ["a cat", "B"]).to(DEVICE)
        torch.manual_seed(7)
        losses = []
        for step in range(3):
            optimizer.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        runs.append(losses)
    assert runs[1] == pytest.approx(runs[0], rel=1e-4), runs


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_fused_on_quantized_bases(kind):
    """bitsandbytes computes the frozen output; the fused op takes it as given (CPU: the interpreter)."""
    bnb = pytest.importorskip("bitsandbytes")
    for dtype in (torch.float32,):
        def build(backend):
            torch.manual_seed(0)
            if kind == "8bit":
                base = bnb.nn.Linear8bitLt(40, 70, has_fp16_weights=False)
            else:
                base = bnb.nn.Linear4bit(40, 70, compute_dtype=dtype, quant_type="nf4")
            base = base.to(DEVICE)
            base(torch.zeros(1, 40, device=DEVICE, dtype=dtype))  # quantizes an 8-bit layer
            return LiMEDoRALinear(base, num_experts=4, backend=backend) if kind == "4bit" else LiMELinear(
                base, num_experts=4, n_gram=2, backend=backend)

        # Both built from the same seed (a quantized state dict does not load into a fresh layer).
        reference, fused = build("reference"), build("triton")
        for layer in (reference, fused):
            torch.manual_seed(1)
            with torch.no_grad():
                layer.B.normal_(0, 0.3)
        mask = padding_mask("left", 3, 29).to(DEVICE)
        run_both(reference, fused, tie_free_input(reference, (3, 29, 40), dtype, mask), mask, dtype=dtype)


@pytest.mark.skipif(CUDA, reason="the CPU processes of this DDP run use the interpreter")
def test_fused_kernels_under_ddp(tmp_path):
    """DDP on two CPU processes (gloo) with backend='triton': the ranks end with identical parameters."""
    from test_trainer import assert_ranks_agree_and_trained, run_ddp_training

    assert_ranks_agree_and_trained(*run_ddp_training(tmp_path, backend="triton", port=29527, interpret=True))


def test_benchmark_measures_the_fused_provider():
    """The benchmark's `lime-fused` paths, which only a GPU run times, work end to end at a tiny
    scale: the layer measurement (repeated backward through a retained graph included) and the
    training step; the fused layer saves less for backward than the reference layer."""
    import math
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import run as bench

    device = torch.device(DEVICE)
    measured = {}
    for provider in ("lime-fused", "lime-reference"):
        torch.manual_seed(0)
        x = torch.randn(2, 16, 32, device=device, requires_grad=True)
        grad = torch.randn(2, 16, 48, device=device)
        layer = bench.build_layer(provider, torch.nn.Linear(32, 48, device=device), rank=8, experts=4, n_gram=3)
        rows = bench._measure_layer(layer, x, grad, device, repeats=2, warmup=1)
        measured[provider] = {(row["mode"], row["metric"]): row["p50"] for row in rows}
    fused, reference = measured["lime-fused"], measured["lime-reference"]
    assert all(fused[(mode, "time")] > 0 for mode in ("forward", "backward", "full"))
    assert fused[("-", "trainable_parameters")] == reference[("-", "trainable_parameters")] == 881
    assert fused[("forward", "saved_activations")] < reference[("forward", "saved_activations")]

    rows = bench.train_step_sweep(dict(model="tiny", batch=1, seq=8, steps=2), ["lime-fused"], device, torch.float32, {})
    values = {row["metric"]: row["p50"] for row in rows}
    assert values["samples_per_second"] > 0 and values["saved_activations"] > 0
    assert values["trainable_parameters"] > 0 and all(row["provider"] == "lime-fused" for row in rows)
    assert math.isnan(values["peak_memory"]) == (device.type == "cpu")


# --- GPU behaviour the interpreter cannot show, checked where the CPU can show it ----------------------

AUTOCAST_VARIANTS = {
    "lora": lambda backend, dtype, router: LiMELinear(torch.nn.Linear(40, 70, dtype=dtype), num_experts=4,
                                                      router=router, backend=backend),
    "lora_fa": lambda backend, dtype, router: LiMELoRAFALinear(torch.nn.Linear(40, 70, dtype=dtype), num_experts=4,
                                                               n_gram=2, router=router, backend=backend),
    "dora": lambda backend, dtype, router: LiMEDoRALinear(torch.nn.Linear(40, 70, dtype=dtype), num_experts=4,
                                                          router=router, backend=backend),
    "slicefine": lambda backend, dtype, router: LiMESliceFineLinear(torch.nn.Linear(40, 70, dtype=dtype),
                                                                    num_experts=4, rank=2, router=router,
                                                                    backend=backend),
    "given_base": lambda backend, dtype, router: LiMELinear(_ScaledLinear(40, 70, dtype=dtype), num_experts=4,
                                                            router=router, backend=backend),
}


@pytest.mark.parametrize("variant", list(AUTOCAST_VARIANTS))
@pytest.mark.parametrize("router", ["cosine", "maxabs"])
def test_fused_under_autocast_matches_the_reference(variant, router):
    """Under autocast (HF Trainer's bf16=True) the frozen product runs in bf16 as nn.Linear would and
    LiME's own math in float32, on both backends: same outputs and gradients, float32 weights."""
    device_type = torch.device(DEVICE).type
    reference, fused = _variant_pair(torch.float32, lambda backend: AUTOCAST_VARIANTS[variant](backend, torch.float32,
                                                                                               router))
    mask = padding_mask("left", 3, 29).to(DEVICE)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        x = tie_free_input(reference, (3, 29, 40), torch.bfloat16, mask).float()
        out = run_both(reference, fused, x, mask, dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16


def test_fused_under_autocast_writes_one_output_tensor():
    """Autocast does not send the plain linear layer down the slower 'frozen output given' route: the
    forward creates a single [tokens, Dout] tensor (the frozen product, modulated in place)."""
    from lime_kernels.accounting import account

    _, fused = _pair(torch.float32, num_experts=4)
    x = torch.randn(2, 9, 40, device=DEVICE)
    with torch.autocast(torch.device(DEVICE).type, dtype=torch.bfloat16), account() as recorded:
        fused.train()(x)
    outputs = [op.name for op in recorded.ops if op.launches and (18, 70) in op.output_shapes]
    assert outputs == ["aten::addmm"], outputs  # F.linear with a bias, as the dispatcher sees it


@pytest.mark.parametrize("shape", [(0, 5, 40), (3, 0, 40), (0, 40)])
@pytest.mark.parametrize("variant", ["lora", "dora", "slicefine", "given_base"])
def test_empty_batches_give_empty_outputs_and_zero_gradients(shape, variant):
    """0 sequences or 0 tokens: both backends return an empty output, and zero gradients."""
    reference, fused = _variant_pair(torch.float32, lambda backend: AUTOCAST_VARIANTS[variant](backend, torch.float32,
                                                                                               "cosine"))
    for layer in (reference, fused):
        layer.train()
        x = torch.randn(shape, device=DEVICE, requires_grad=True)
        out = layer(x)
        assert out.shape == (*shape[:-1], 70)
        (out.sum() + layer.last_stats.importance + layer.last_stats.kl_uniform).backward()
        assert x.grad.shape == x.shape
        for name, parameter in layer.named_parameters():
            if parameter.requires_grad:
                assert parameter.grad is not None and not parameter.grad.any(), name


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_a_batch_without_valid_tokens_has_zero_statistics_on_both_backends(variant):
    """All padding: importance, kl, load and active experts are 0 (not E*sum(0^2)-1 = -1), fused as reference."""
    reference, fused = _variant_pair(torch.float32, lambda backend: AUTOCAST_VARIANTS[variant](backend, torch.float32,
                                                                                               "cosine"))
    x = torch.randn(2, 5, 40, device=DEVICE)
    mask = torch.zeros(2, 5, dtype=torch.long, device=DEVICE)
    outputs = []
    for layer in (reference, fused):
        outputs.append(layer.train()(x, attention_mask=mask))
        stats = layer.last_stats
        values = [stats.importance.item(), stats.kl_uniform.item(), stats.load.item(), stats.active_experts.item()]
        assert values == [0.0, 0.0, 0.0, 0.0], (layer.adapter.backend, values)
        assert not stats.usage.any() and not stats.active_histogram.any()
    torch.testing.assert_close(outputs[1], outputs[0])


def _training_step(layer, x, mask):
    out = layer.train()(x, attention_mask=mask)
    (out.float().square().mean() + 0.1 * layer.last_stats.importance + 0.01 * layer.last_stats.kl_uniform).backward()


STEP_VARIANTS = {
    "lora": dict(),
    "window-maxabs": dict(n_gram=3, router="maxabs"),
    "mean-sparse": dict(rep_mode="mean", sparse_mode=True, top_k=2),
    "dora": dict(peft="dora"),
    "slicefine": dict(peft="slicefine"),
    "given_base": dict(peft="given_base"),
}


def _step_layer(options):
    options = dict(options)
    peft = options.pop("peft", "lora")
    builders = {"lora": LiMELinear, "dora": LiMEDoRALinear, "slicefine": LiMESliceFineLinear}
    if peft == "given_base":
        return LiMELinear(_ScaledLinear(40, 70), num_experts=4, backend="triton", **options).to(DEVICE)
    return builders[peft](torch.nn.Linear(40, 70), num_experts=4, backend="triton", **options).to(DEVICE)


@pytest.mark.parametrize("variant", list(STEP_VARIANTS))
def test_fused_training_step_has_no_host_sync_and_no_zero_fill(variant):
    """A fused training step (forward, statistics, balance loss, backward) dispatches no operator that
    synchronizes the host with the GPU, and materializes no zero gradient for the outputs nothing used."""
    from lime_kernels.accounting import FILL_OPS, account

    layer = _step_layer(STEP_VARIANTS[variant])
    x = torch.randn(2, 9, 40, device=DEVICE, requires_grad=True)
    mask = padding_mask("left", 2, 9).to(DEVICE)
    with account() as recorded:
        _training_step(layer, x, mask)
    assert recorded.host_syncs == [], recorded.host_syncs
    fills = [(op.name, op.output_shapes) for op in recorded.named(FILL_OPS) if op.output_shapes != ((),)]
    assert fills == [], fills  # the only fill is autograd's 1 for the scalar loss


def test_fused_launches_per_training_step():
    """The default layer costs 4 launches forward (the jitter noise drawn from torch's RNG, the frozen
    GEMM, the projection with routing, the epilogue) and 3 backward (the pass over dout by token and
    column blocks, the input pass that also finishes the parameter gradients, cuBLAS adding dout W)."""
    from lime_kernels.accounting import account

    layer = _step_layer({})
    x = torch.randn(2, 9, 40, device=DEVICE, requires_grad=True)
    with account() as forward:
        out = layer.train()(x)
    stats = layer.last_stats
    grads = (torch.randn_like(out), torch.ones_like(stats.importance), torch.ones_like(stats.kl_uniform))
    with account() as backward:
        torch.autograd.backward((out, stats.importance, stats.kl_uniform), grads)

    def launched(recorded):
        return [op.name for op in recorded.ops if op.launches] + [launch.name for launch in recorded.launches]

    assert sorted(launched(forward)) == sorted(["aten::uniform_", "aten::addmm", "_project_kernel",
                                                "_modulation_forward_kernel"])
    assert sorted(launched(backward)) == sorted(["_modulation_backward_kernel", "_input_grad_kernel",
                                                 "aten::addmm_"])


@pytest.mark.parametrize("tokens", [1, 64])
def test_fused_decode_call_launches_three_kernels(tokens):
    """A generation-sized call (evaluation, no gradient): the frozen GEMM, the projection with routing,
    the epilogue; no statistics beyond the usage, no host sync."""
    from lime_kernels.accounting import account

    layer = _step_layer({}).eval()
    x = torch.randn(1, tokens, 40, device=DEVICE)
    with torch.no_grad(), account() as recorded:
        layer(x)
    launched = [op.name for op in recorded.ops if op.launches] + [launch.name for launch in recorded.launches]
    assert sorted(launched) == sorted(["aten::addmm", "_project_kernel", "_modulation_forward_kernel"]), launched
    assert recorded.host_syncs == []


@pytest.mark.parametrize("variant", ["lora", "dora", "given_base"])
def test_fused_call_without_autograd_gives_the_recorded_calls_results(variant):
    """Under no_grad the layer skips autograd.Function's bookkeeping: the output and every statistic
    are those of the same call with autograd recording, bit for bit (training mode, jitter included,
    and eval mode), and no graph is left behind. Forward-mode AD is not mistaken for inference."""
    options = {"given_base": dict(peft="given_base")}.get(variant, dict(peft=variant))
    layer = _step_layer(dict(options, n_gram=2, jitter_noise=0.1))
    mask = padding_mask("left", 2, 9).to(DEVICE)
    x = torch.randn(2, 9, 40, device=DEVICE)
    for training in (True, False):
        layer.train(training)
        results = []
        for grad_enabled in (True, False):
            torch.manual_seed(7)
            with torch.set_grad_enabled(grad_enabled):
                out = layer(x, attention_mask=mask)
            assert (out.grad_fn is not None) == grad_enabled
            results.append((out, layer.last_stats))
        (recorded, recorded_stats), (plain, plain_stats) = results
        assert torch.equal(plain, recorded)
        for name in ("importance", "kl_uniform", "load", "usage", "active_experts", "active_histogram"):
            expected, got = getattr(recorded_stats, name), getattr(plain_stats, name)
            assert (expected is None) == (got is None), name
            if expected is not None:
                assert torch.equal(got, expected), name
                assert got.grad_fn is None, name
    # Forward-mode AD still meets the Function, which says it has no jvp (the tangent is never dropped).
    with torch.no_grad(), torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError, match="jvp"):
            layer(dual, attention_mask=mask)


# (tokens, Din, Dout, rank, experts): issue 12's shape, then LLaVA-OneVision-7B's q, k/v and down
# projections and the 0.5B's k/v projection at 8,192 tokens.
def _cost_model():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import cost_model

    return cost_model


WORKSPACE_SHAPES = _cost_model().WORKSPACE_SHAPES


@pytest.mark.parametrize("shape", WORKSPACE_SHAPES)
def test_fused_backward_workspace_is_bounded(shape):
    """The backward's temporary memory (bounded partial sums, [tokens, r] and [tokens, E] buffers) is at
    most 1/8 of the larger activation it reads (dout or x), whatever the length."""
    workspace, dout_bytes, x_bytes = _cost_model().backward_workspace(*shape)
    assert 0 < workspace <= max(dout_bytes, x_bytes) / 8, (shape, workspace / max(dout_bytes, x_bytes))


def test_fused_multi_tile_shapes_reach_every_launcher_branch():
    """Aligned hidden sizes (multiples of 16) and 1,024 tokens: several token and column blocks in every
    kernel, the backward's partial sums over several token splits (dB/dLiMEs and dA), against the
    reference."""
    from lime_kernels.fused.common import record_launches
    from lime_kernels.fused.modulation import backward_blocks

    reference, fused = _pair(torch.float32, num_experts=8, rank=16, d_in=96, d_out=144, top_k=2)
    mask = padding_mask("right", 2, 512).to(DEVICE)
    x = tie_free_input(reference, (2, 512, 96), torch.float32, mask)
    with record_launches() as launches:
        run_both(reference, fused, x, mask)
    grids = {launch.name: launch.grid for launch in launches}
    # The pass over dout: token-block programs, then column blocks x token splits.
    blocks = backward_blocks(16, 16, torch.float32)
    token_blocks = -(-1024 // blocks["ROW_BLOCK_M"])
    column_blocks = -(-144 // blocks["COL_BLOCK_N"])
    column_programs = grids["_modulation_backward_kernel"][0] - token_blocks
    assert token_blocks > 1 and column_blocks > 1 and column_programs % column_blocks == 0, (grids, blocks)
    assert column_programs // column_blocks > 1, (grids, blocks)  # several token splits
    assert grids["_input_grad_kernel"][0] > 1 and grids["_input_grad_kernel"][1] > 1, grids
    assert min(grids["_modulation_forward_kernel"]) > 1 and grids["_project_kernel"][0] > 1, grids


# --- on a GPU only (`python -m benchmarks.gpu_report` runs them natively) ------------------------------

gpu = pytest.mark.gpu


@gpu
def test_gpu_bf16_parity_at_an_aligned_multi_tile_shape_with_repeatable_gradients():
    reference, fused = _pair(torch.bfloat16, d_in=512, d_out=512, num_experts=8, rank=16, top_k=2)
    mask = padding_mask("left", 2, 1024).to(DEVICE)
    x = tie_free_input(reference, (2, 1024, 512), torch.bfloat16, mask)
    run_both(reference, fused, x, mask, dtype=torch.bfloat16)
    first, second = training_gradients(fused, x, mask), training_gradients(fused, x, mask)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@gpu
def test_gpu_input_pass_finishes_the_gradients_from_every_program():
    """The input pass's last-arriving programs sum partial sums other programs of the same launch
    wrote (arrival counters with acquire-release atomics): many splits and column blocks, two inputs
    alternated ten times (so a stale read would pick up the other input's partial sums, left in the
    reused memory), each input's gradients equal every time and close to the reference."""
    from lime_kernels.fused.common import record_launches

    reference, fused = _pair(torch.bfloat16, d_in=1024, d_out=1024, num_experts=8, rank=16, top_k=2)
    shape = (2, 1024, 1024)
    inputs = [tie_free_input(reference, shape, torch.bfloat16),
              torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(DEVICE, torch.bfloat16)]
    with record_launches() as launches:
        run_both(reference, fused, inputs[0], dtype=torch.bfloat16)
    grid = next(launch.grid for launch in launches if launch.name == "_input_grad_kernel")
    assert grid[0] >= 16 and grid[1] >= 4, grid
    first = [training_gradients(fused, x) for x in inputs]
    for _ in range(10):
        for x, expected in zip(inputs, first):
            assert all(torch.equal(a, b) for a, b in zip(training_gradients(fused, x), expected))


@gpu
def test_gpu_output_of_more_than_2_31_elements():
    """tokens x Dout > 2^31 (64-bit offsets everywhere): the first and last tokens' outputs and input
    gradients against the reference run on those tokens alone (routing is per token here)."""
    tokens, d_in, d_out = 131072, 64, 16448
    assert tokens * d_out > 2**31
    reference, fused = _pair(torch.bfloat16, d_in=d_in, d_out=d_out, num_experts=4, rank=2)
    for layer in (reference, fused):
        layer.eval()
    torch.manual_seed(0)
    x = torch.randn(1, tokens, d_in, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    out = fused(x)
    dout = torch.randn(4, d_out, device=DEVICE, dtype=torch.bfloat16)
    ends = [0, 1, tokens - 2, tokens - 1]
    full_dout = torch.zeros_like(out)
    full_dout[0, ends] = dout
    out.backward(full_dout)
    x_ends = x.detach()[:, ends].clone().requires_grad_(True)
    expected = reference(x_ends)
    expected.backward(dout.unsqueeze(0))
    _close("output (first and last tokens)", out[:, ends].detach(), expected.detach(), torch.bfloat16)
    _close("grad x (first and last tokens)", x.grad[:, ends], x_ends.grad, torch.bfloat16)


@gpu
def test_gpu_strided_and_unaligned_input():
    reference, fused = _pair(torch.bfloat16, num_experts=4)
    mask = padding_mask("left", 3, 29).to(DEVICE)
    dense = tie_free_input(reference, (3, 29, 40), torch.bfloat16, mask)
    storage = torch.zeros(3, 29, 43, device=DEVICE, dtype=torch.bfloat16)
    storage[..., 1:41] = dense
    strided = storage[..., 1:41]  # row stride 43, first element not 16-byte aligned
    assert not strided.is_contiguous()
    run_both(reference, fused, strided, mask, dtype=torch.bfloat16)


@gpu
def test_gpu_side_stream_gives_the_default_streams_results():
    reference, fused = _pair(torch.float32, num_experts=4, n_gram=2)
    mask = padding_mask("left", 3, 29).to(DEVICE)
    x = tie_free_input(reference, (3, 29, 40), torch.float32, mask)

    def step():
        fused.zero_grad(set_to_none=True)
        inputs = (x * 1.0).requires_grad_(True)  # produced on the current stream, read right after
        torch.manual_seed(0)
        out = fused.train()(inputs, attention_mask=mask)
        (out.square().sum() + fused.last_stats.importance).backward()
        return [out.detach(), inputs.grad] + [p.grad for p in (fused.A, fused.B, fused.LiMEs)]

    expected = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_layer_on_the_second_device_while_the_first_is_current():
    reference, fused = _pair(torch.float32, num_experts=4)
    reference, fused = reference.to("cuda:1"), fused.to("cuda:1")
    mask = padding_mask("left", 3, 29).to("cuda:1")
    torch.cuda.set_device(0)
    x = tie_free_input(reference, (3, 29, 40), torch.float32, mask).to("cuda:1")
    run_both(reference, fused, x, mask)


@gpu
def test_gpu_training_step_never_synchronizes():
    for options in STEP_VARIANTS.values():
        layer = _step_layer(options)
        x = torch.randn(2, 9, 40, device=DEVICE, requires_grad=True)
        mask = padding_mask("left", 2, 9).to(DEVICE)
        _training_step(layer, x, mask)  # compiles the kernels first (loading them may synchronize)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _training_step(layer, x, mask)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@gpu
def test_gpu_backward_peak_memory_within_the_bound():
    """Measured on the device: one backward's peak memory beyond what it returns stays within the
    accounted workspace bound (1/8 of the larger activation it reads)."""
    tokens, d_in, d_out, rank, experts = 16384, 3584, 18944, 16, 8
    layer = LiMELinear(torch.nn.Linear(d_in, d_out, bias=False, device=DEVICE, dtype=torch.bfloat16),
                       num_experts=experts, rank=rank, backend="triton")
    x = torch.randn(1, tokens, d_in, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    for _ in range(2):  # the second backward is measured (cuBLAS workspaces and kernels are ready)
        layer.zero_grad(set_to_none=True)
        x.grad = None
        out = layer.train()(x)
        dout = torch.randn_like(out)
        loss_parts = (out, layer.last_stats.importance)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        torch.autograd.backward(loss_parts, (dout, torch.ones((), device=DEVICE)))
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    returned = x.numel() * x.element_size() + sum(p.grad.numel() * p.grad.element_size()
                                                   for p in layer.parameters() if p.grad is not None)
    bound = max(dout.numel(), x.numel()) * 2 / 8
    assert peak - returned <= bound, (peak - returned, bound)


@gpu
def test_gpu_model_of_fused_layers_under_cuda_graphs():
    """torch.compile(mode="reduce-overhead") captures a model of fused layers in CUDA graphs: no host
    synchronization or data-dependent shape stops it; its training steps equal eager ones."""
    _compiled_steps_equal_eager(n_gram=1, x=torch.randn(4, 32, 64, device=DEVICE), steps=3, mode="reduce-overhead")
