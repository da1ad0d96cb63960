"""The reference path against the loop implementation, gradcheck, and its documented properties."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import SELECTIONS, compare_with_loop, make_layer, padding_mask, tolerance_check
from loop_lime import loop_lime

from lime_kernels import RoutingOptions, lime_linear, sample_jitter

REPRESENTATIONS = {
    "token": dict(rep_mode="token", n_gram=1),
    "window2": dict(rep_mode="token", n_gram=2, ngram_mode="window"),
    "window3": dict(rep_mode="token", n_gram=3, ngram_mode="window"),
    "anchor3": dict(rep_mode="token", n_gram=3, ngram_mode="anchor"),
    "mean": dict(rep_mode="mean"),
    "last": dict(rep_mode="last"),
}
COMBINATIONS = list(itertools.product(["cosine", "maxabs"], SELECTIONS, REPRESENTATIONS, ["none", "left", "right"]))


@pytest.mark.parametrize("router,selection,representation,mask_kind", COMBINATIONS)
def test_reference_matches_loop_training(router, selection, representation, mask_kind):
    index = COMBINATIONS.index((router, selection, representation, mask_kind))
    layer = make_layer(
        num_experts=4, rank=3, router=router, use_shared_LiME=index % 2 == 0, jitter_noise=0.2,
        seed=index, **SELECTIONS[selection], **REPRESENTATIONS[representation],
    )
    torch.manual_seed(100 + index)
    x = torch.randn(3, 7, 8, dtype=torch.float64)
    compare_with_loop(layer, x, padding_mask(mask_kind, 3, 7), training=True)


@pytest.mark.parametrize("router,selection", list(itertools.product(["cosine", "maxabs"], SELECTIONS)))
def test_reference_matches_loop_eval(router, selection):
    layer = make_layer(num_experts=3, rank=2, router=router, n_gram=2, **SELECTIONS[selection] | {"top_k": 1})
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    compare_with_loop(layer, x, padding_mask("left", 2, 5), training=False)


def test_single_token_and_2d_input():
    layer = make_layer(num_experts=4, n_gram=3)
    compare_with_loop(layer, torch.randn(4, 1, 8, dtype=torch.float64), None, training=True)
    out2d = compare_with_loop(layer, torch.randn(5, 8, dtype=torch.float64), torch.tensor([1, 0, 1, 1, 0]), training=True)
    assert out2d.shape == (5, 10)


def test_extra_leading_dimensions_fold_into_batch():
    layer = make_layer(num_experts=2, n_gram=2).eval()
    x = torch.randn(2, 3, 4, 8, dtype=torch.float64)
    out = layer(x)
    assert out.shape == (2, 3, 4, 10)
    torch.testing.assert_close(out.reshape(6, 4, 10), layer(x.reshape(6, 4, 8)), rtol=0, atol=0)


def test_dropout_feeds_the_adapter_only():
    layer = make_layer(num_experts=3, dropout=0.4, jitter_noise=0.1).train()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    torch.manual_seed(7)
    jitter = sample_jitter(12, 3, 0.1, x.device).double()
    dropped = F.dropout(x, p=0.4, training=True)  # the layer draws the jitter first, then the dropout mask
    torch.manual_seed(7)
    out = layer(x)
    expected, _ = loop_lime(
        x, layer.linear.weight, layer.linear.bias, layer.A, layer.B, layer.LiMEs, layer.LiME_shared, layer.gamma,
        options=layer.routing, scaling=layer.adapter.scaling, jitter=jitter, adapter_input=dropped,
    )
    tolerance_check("output with dropout", out, expected)
    without_dropout, _ = loop_lime(
        x, layer.linear.weight, layer.linear.bias, layer.A, layer.B, layer.LiMEs, layer.LiME_shared, layer.gamma,
        options=layer.routing, scaling=layer.adapter.scaling, jitter=jitter,
    )
    assert not torch.allclose(out, without_dropout), "dropout had no effect"
    layer.eval()
    torch.testing.assert_close(layer(x), loop_lime(
        x, layer.linear.weight, layer.linear.bias, layer.A, layer.B, layer.LiMEs, layer.LiME_shared, layer.gamma,
        options=layer.routing, scaling=layer.adapter.scaling,
    )[0])


@pytest.mark.parametrize(
    "overrides",
    [
        dict(router="cosine", n_gram=3, ngram_mode="window", auto_topk=True),
        dict(router="maxabs", n_gram=2, ngram_mode="anchor", auto_topk=False, soft_topk=True, top_k=2),
        dict(router="cosine", rep_mode="mean", auto_topk=True, sparse_mode=True, top_k=2),
        dict(router="maxabs", rep_mode="last", auto_topk=False, soft_topk=False, top_k=2),
    ],
)
def test_gradcheck_float64(overrides):
    torch.manual_seed(3)
    options = RoutingOptions(num_experts=3, jitter_noise=0.2, **overrides)
    weight = torch.randn(7, 5, dtype=torch.float64)
    x = torch.randn(2, 6, 5, dtype=torch.float64, requires_grad=True)
    A = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    B = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    LiMEs = (1 + 0.1 * torch.randn(3, 7, dtype=torch.float64)).requires_grad_(True)
    shared = torch.randn(7, dtype=torch.float64, requires_grad=True)
    gamma = torch.tensor([0.6], dtype=torch.float64, requires_grad=True)
    valid = padding_mask("right", 2, 6) != 0
    jitter = sample_jitter(12, 3, 0.2, x.device).double()

    def function(x, A, B, LiMEs, shared, gamma):
        out, stats = lime_linear(
            x, x @ weight.t(), A, B, LiMEs, shared, gamma, options, scaling=1.5,
            valid=valid, jitter=jitter, aux="full",
        )
        return out, stats.importance, stats.kl_uniform

    assert torch.autograd.gradcheck(function, (x, A, B, LiMEs, shared, gamma), eps=1e-6, atol=1e-6)
