"""Documented properties: batch invariance of the cosine router, batch dependence of maxabs,
masked tokens returning the frozen output exactly, jitter reproducibility, dtypes."""

import pytest
import torch
from conftest import make_layer, padding_mask

from lime_kernels import LiMELinear, sample_jitter


def _embed(sequence, tokens, pad_left, filler):
    """Place `sequence` (L, D) into a row of length `tokens` padded with `filler` rows."""
    length = sequence.shape[0]
    row = filler[:tokens].clone()
    start = tokens - length if pad_left else 0
    row[start : start + length] = sequence
    mask = torch.zeros(tokens, dtype=torch.long)
    mask[start : start + length] = 1
    return row, mask, slice(start, start + length)


@pytest.mark.parametrize("rep_mode,n_gram,ngram_mode", [("token", 1, "window"), ("token", 3, "window"), ("mean", 1, "window"), ("last", 1, "window")])
@pytest.mark.parametrize("pad_left", [False, True])
def test_cosine_router_is_batch_invariant(rep_mode, n_gram, ngram_mode, pad_left):
    layer = make_layer(num_experts=4, router="cosine", rep_mode=rep_mode, n_gram=n_gram, ngram_mode=ngram_mode).eval()
    torch.manual_seed(0)
    sequence = torch.randn(5, 8, dtype=torch.float64)
    alone = layer(sequence.unsqueeze(0))[0]

    others = torch.randn(2, 9, 8, dtype=torch.float64) * 50  # large activations elsewhere in the batch
    filler = torch.randn(9, 8, dtype=torch.float64) * 100  # padding rows with garbage values
    row, mask, where = _embed(sequence, 9, pad_left, filler)
    batch = torch.cat([others, row.unsqueeze(0)])
    masks = torch.cat([torch.ones(2, 9, dtype=torch.long), mask.unsqueeze(0)])
    together = layer(batch, attention_mask=masks)[2, where]
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)


def test_maxabs_router_depends_on_the_batch():
    """maxabs normalizes by the largest |feature| of the whole batch (the original code's behaviour)."""
    layer = make_layer(num_experts=4, router="maxabs").eval()
    torch.manual_seed(0)
    sequence = torch.randn(1, 5, 8, dtype=torch.float64)
    alone = layer(sequence)
    with_loud_neighbour = layer(torch.cat([sequence, 30 * torch.randn(1, 5, 8, dtype=torch.float64)]))[:1]
    assert (with_loud_neighbour - alone).abs().max() > 1e-3
    # ... and padding tokens count in that max (they are part of the batch).
    padded = torch.cat([sequence, 30 * torch.randn(1, 2, 8, dtype=torch.float64)], dim=1)
    mask = torch.tensor([[1] * 5 + [0, 0]])
    assert (layer(padded, attention_mask=mask)[:, :5] - alone).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mask_kind", ["left", "right"])
def test_masked_tokens_return_the_frozen_output_exactly(dtype, mask_kind):
    layer = make_layer(dtype=dtype, peft_dtype=torch.float32, moe_dtype=torch.float32, num_experts=4, n_gram=2).train()
    x = torch.randn(3, 6, 8, dtype=dtype)
    mask = padding_mask(mask_kind, 3, 6)
    out = layer(x, attention_mask=mask)
    base = layer.linear(x)
    invalid = mask == 0
    assert out.dtype == dtype
    assert torch.equal(out[invalid], base[invalid])
    assert not torch.equal(out[~invalid], base[~invalid])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_activations_with_float32_adapters(dtype):
    """bf16/fp16 activations, fp32 adapters: output in the activation dtype, each gradient in its
    parameter's dtype, and values within the activation dtype's rounding of the fp32 computation."""
    layer = make_layer(dtype=dtype, peft_dtype=torch.float32, moe_dtype=torch.float32, num_experts=4).eval()
    full = make_layer(dtype=torch.float32, num_experts=4).eval()
    full.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    x = torch.randn(2, 5, 8, dtype=dtype, requires_grad=True)
    out = layer(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), full(x.detach().float()), rtol=2e-2, atol=2e-2)
    out.float().sum().backward()
    assert x.grad.dtype == dtype
    assert {p.grad.dtype for p in (layer.A, layer.B, layer.LiMEs, layer.LiME_shared, layer.gamma)} == {torch.float32}


def test_jitter_comes_from_torch_rng_as_a_tokens_by_experts_tensor():
    layer = make_layer(num_experts=4, jitter_noise=0.3).train()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    torch.manual_seed(11)
    first = layer(x)
    torch.manual_seed(11)
    second = layer(x)
    torch.manual_seed(12)
    third = layer(x)
    assert torch.equal(first, second) and not torch.equal(first, third)
    torch.manual_seed(11)
    noise = sample_jitter(10, 4, 0.3, x.device)
    assert noise.shape == (10, 4) and noise.dtype == torch.float32
    assert noise.min() >= 0.7 and noise.max() <= 1.3
    layer.eval()
    torch.manual_seed(11)
    assert not torch.equal(layer(x), first), "eval mode applies no jitter"


def test_training_records_statistics_and_eval_only_usage():
    layer = make_layer(num_experts=4).train()
    layer(torch.randn(2, 3, 8, dtype=torch.float64))
    stats = layer.last_stats
    assert stats.importance.requires_grad and stats.kl_uniform.requires_grad
    assert not stats.load.requires_grad and not stats.usage.requires_grad
    layer.eval()
    layer(torch.randn(2, 3, 8, dtype=torch.float64))
    assert layer.last_stats.importance is None and layer.last_stats.usage.shape == (4,)
    layer.set_track_aux(False)
    layer.train()
    layer(torch.randn(2, 3, 8, dtype=torch.float64))
    assert layer.last_stats is None


def test_sparse_mode_weights_are_exactly_zero_outside_the_selection():
    from lime_kernels.reference import mixing_weights, selected_experts

    layer = make_layer(num_experts=6, sparse_mode=True, auto_topk=True, top_k=1, auto_topk_threshold=0.2)
    probs = torch.softmax(torch.randn(4, 7, 6, dtype=torch.float64) * 3, dim=-1)
    weights, selected = mixing_weights(probs, layer.routing), selected_experts(probs, layer.routing)
    assert torch.equal(weights == 0, ~selected)
    assert (selected.sum(-1) <= 2).all() and (selected.sum(-1) >= 1).all()
    assert torch.equal(selected.gather(-1, probs.argmax(-1, keepdim=True)).squeeze(-1), torch.ones(4, 7, dtype=torch.bool))
    torch.testing.assert_close(weights.sum(-1), torch.ones(4, 7, dtype=torch.float64))


def test_exposes_the_wrapped_layer():
    linear = torch.nn.Linear(8, 16)
    layer = LiMELinear(linear)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert (layer.in_features, layer.out_features) == (8, 16)
    assert not layer.weight.requires_grad
    names = {name for name, _ in layer.named_parameters()}
    assert names == {"linear.weight", "linear.bias", "A", "B", "LiMEs", "LiME_shared", "gamma"}
    assert layer.A.shape == (2, 8) and layer.B.shape == (16, 2) and layer.LiMEs.shape == (4, 16)
    assert layer.LiME_shared.shape == (16,) and layer.gamma.shape == (1,)
    assert torch.equal(layer.B, torch.zeros(16, 2)) and torch.equal(layer.gamma, torch.zeros(1))
    assert ((layer.LiMEs >= 0.9) & (layer.LiMEs <= 1.1)).all()


@pytest.mark.parametrize("selection", ["auto", "hard"])
def test_a_batch_without_valid_tokens_has_zero_statistics_and_zero_balance_loss(selection):
    """All padding in training: no statistic (importance and load read E*sum(0^2)-1 = -1 before), so the
    balance loss neither rewards nor penalizes that layer; the output is the frozen output."""
    import lime

    options = dict(auto_topk=True) if selection == "auto" else dict(auto_topk=False, soft_topk=False, top_k=2)
    layer = make_layer(num_experts=4, **options).train()
    model = torch.nn.Sequential(layer)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    out = layer(x, attention_mask=torch.zeros(2, 3, dtype=torch.long))
    torch.testing.assert_close(out, layer.linear(x), rtol=0, atol=0)
    stats = layer.last_stats
    for name in ("importance", "kl_uniform", "load", "active_experts"):
        assert getattr(stats, name).item() == 0.0, name
    assert not stats.usage.any() and not stats.active_histogram.any()
    loss = lime.compute_balance_loss(model)
    assert loss.item() == 0.0
    loss.backward()  # a zero with a graph: nothing to learn from no tokens
    assert layer.LiMEs.grad is None or not layer.LiMEs.grad.any()
    # One valid token back: the statistics are the usual ones again (importance >= 0).
    layer(x, attention_mask=torch.tensor([[1, 0, 0], [0, 0, 0]]))
    assert layer.last_stats.importance.item() >= 0.0 and layer.last_stats.load.item() >= 0.0


@pytest.mark.parametrize("options", [dict(), dict(n_gram=3), dict(rep_mode="mean", sparse_mode=True, top_k=2),
                                     dict(router="maxabs", auto_topk=False, top_k=2)],
                         ids=["default", "window3", "mean-sparse", "maxabs-hard"])
def test_a_reference_training_step_has_no_host_sync(options):
    """Forward with a padding mask, the statistics (histogram included), the balance loss and the backward
    dispatch no operator that waits for the device (a boolean index and bincount once did, every call)."""
    import lime
    from lime_kernels.accounting import account

    layer = make_layer(num_experts=4, backend="reference", **options).train()
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    mask = padding_mask("left", 2, 5)
    with account() as recorded:
        out = layer(x, attention_mask=mask)
        (out.square().mean() + lime.compute_balance_loss(torch.nn.Sequential(layer))).backward()
    assert recorded.host_syncs == [], recorded.host_syncs
    assert layer.last_stats.active_histogram.sum().item() == int(mask.sum())
