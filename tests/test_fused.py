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


def run_both(reference, fused, x, mask=None, training=True, seed=1234, dtype=torch.float32):
    """Same input, same random numbers: compare outputs, statistics and every gradient."""
    results = []
    for layer in (reference, fused):
        layer.train(training)
        for parameter in layer.parameters():
            parameter.grad = None
        inputs = x.detach().clone().requires_grad_(True)
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
    _close("grad x", dx_f, dx_r, dtype)
    assert grads_f.keys() == grads_r.keys()
    for name in grads_r:
        _close(f"grad {name}", grads_f[name], grads_r[name], dtype)
    return out_f


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
        torch.manual_seed(index)
        x = torch.randn(3, 29, 40, device=DEVICE, dtype=dtype)  # 87 tokens: not a multiple of the blocks
        run_both(reference, fused, x, padding_mask(padding, 3, 29).to(DEVICE), dtype=dtype)


SIZES = [(rank, experts) for rank in (1, 2, 4, 8, 16) for experts in (2, 4, 8)]


@pytest.mark.parametrize("rank,experts", SIZES)
def test_fused_awkward_sizes(rank, experts):
    index = SIZES.index((rank, experts))
    n_gram = (1, 2, 3, 5)[index % 4]
    for dtype in DTYPES:
        reference, fused = _pair(dtype, seed=index, num_experts=experts, rank=rank, n_gram=n_gram, d_in=33, d_out=21,
                                 top_k=min(2, experts))
        x = torch.randn(2, 37, 33, device=DEVICE, dtype=dtype)
        run_both(reference, fused, x, padding_mask("right", 2, 37).to(DEVICE), dtype=dtype)


@pytest.mark.parametrize("shape,mask", [((4, 1, 40), None), ((9, 40), torch.tensor([1, 0, 1, 1, 0, 1, 1, 1, 1])),
                                        ((2, 3, 5, 40), None)])
def test_fused_single_tokens_2d_and_folded_inputs(shape, mask):
    for dtype in ALL_DTYPES:
        reference, fused = _pair(dtype, num_experts=4, n_gram=3)
        x = torch.randn(shape, device=DEVICE, dtype=dtype)
        out = run_both(reference, fused, x, None if mask is None else mask.to(DEVICE), dtype=dtype)
        assert out.shape == (*shape[:-1], 70)


def test_fused_eval_mode_and_dropout():
    for dtype in ALL_DTYPES:
        reference, fused = _pair(dtype, num_experts=4, n_gram=2)
        x = torch.randn(2, 11, 40, device=DEVICE, dtype=dtype)
        run_both(reference, fused, x, padding_mask("left", 2, 11).to(DEVICE), training=False, dtype=dtype)
        reference, fused = _pair(dtype, num_experts=4, dropout=0.3)
        run_both(reference, fused, x, padding_mask("left", 2, 11).to(DEVICE), dtype=dtype)


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
    reference, fused = _pair(torch.float32, num_experts=4)
    x = torch.randn(2, 9, 40, device=DEVICE)
    for frozen in (("A", "B"), ("LiMEs", "LiME_shared", "gamma"), ("A", "B", "LiMEs", "LiME_shared", "gamma")):
        for layer in (reference, fused):
            for name, parameter in layer.named_parameters():
                parameter.requires_grad_(name.split(".")[0] != "linear" and name not in frozen)
        run_both(reference, fused, x.clone().requires_grad_(True), training=False)
        assert all(getattr(fused, name).grad is None for name in frozen)


def test_fused_gradients_are_bit_for_bit_repeatable():
    """Every reduction of the backward runs in an order fixed by the shape (no atomics)."""
    _, fused = _pair(torch.float32, num_experts=4, n_gram=3)
    x = torch.randn(3, 29, 40, device=DEVICE)

    def gradients():
        for parameter in fused.parameters():
            parameter.grad = None
        inputs = x.clone().requires_grad_(True)
        torch.manual_seed(0)
        out = fused.train()(inputs)
        (out.square().sum() + fused.last_stats.importance).backward()
        return [inputs.grad] + [p.grad.clone() for p in (fused.A, fused.B, fused.LiMEs, fused.LiME_shared, fused.gamma)]

    first, second = gradients(), gradients()
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


def test_fused_compiles_without_graph_breaks():
    from lime_kernels.fused import fused_lime_linear
    from lime_kernels.options import RoutingOptions

    torch.manual_seed(0)
    _, fused = _pair(torch.float32, num_experts=4, n_gram=2)
    options = RoutingOptions(num_experts=4, n_gram=2, jitter_noise=0.0)
    x = torch.randn(2, 9, 40, device=DEVICE)

    def function(x, A, B, LiMEs, shared, gamma):
        result = fused_lime_linear(
            x=x, adapter_input=None, weight=fused.linear.weight, bias=fused.linear.bias, base=None, A=A, B=B,
            LiMEs=LiMEs, LiME_shared=shared, gamma=gamma, options=options, scaling=8.0, valid=None, jitter=None)
        return result.out.square().sum() + result.stats[:2].sum()

    params = [fused.A, fused.B, fused.LiMEs, fused.LiME_shared, fused.gamma]
    eager = torch.autograd.grad(function(x, *params), params)
    compiled = torch.compile(function, fullgraph=True)
    got = torch.autograd.grad(compiled(x, *params), params)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


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
        x = torch.randn(3, 29, 40, device=DEVICE, dtype=dtype)
        run_both(reference, fused, x, padding_mask("left", 3, 29).to(DEVICE), dtype=dtype)


def test_fused_embedding_matches_the_reference():
    for dtype in ALL_DTYPES:
        def build(backend):
            return LiMEEmbedding(torch.nn.Embedding(50, 70, dtype=dtype), num_experts=4, n_gram=3, pad_token_id=0,
                                 backend=backend)

        reference, fused = _variant_pair(dtype, build)
        ids = torch.randint(1, 50, (3, 21), device=DEVICE)
        ids[1, :5] = 0
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
        embeds = torch.randn(3, 11, 70, device=DEVICE, dtype=dtype)
        mask = padding_mask("right", 3, 11).to(DEVICE)
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
        x = torch.randn(3, 29, 40, device=DEVICE, dtype=dtype)
        run_both(reference, fused, x, padding_mask("left", 3, 29).to(DEVICE), dtype=dtype)


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
