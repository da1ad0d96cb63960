"""Awkward shapes and option mixes drawn by hypothesis, reference vs the loop implementation."""

import torch
from conftest import compare_with_loop, make_layer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


@st.composite
def layer_cases(draw):
    num_experts = draw(st.integers(1, 5))
    d_out = draw(st.integers(num_experts, 11))
    d_in = draw(st.integers(1, 9))
    rep_mode = draw(st.sampled_from(["token", "token", "mean", "last"]))
    options = dict(
        num_experts=num_experts,
        rank=draw(st.integers(1, min(4, d_in, d_out))),
        alpha=draw(st.sampled_from([1.0, 8.0, 16.0])),
        top_k=draw(st.integers(1, num_experts)),
        router=draw(st.sampled_from(["cosine", "maxabs"])),
        rep_mode=rep_mode,
        n_gram=draw(st.integers(1, 5)) if rep_mode == "token" else 1,
        ngram_mode=draw(st.sampled_from(["window", "anchor"])),
        temperature=draw(st.sampled_from([0.3, 0.5, 2.0])),
        gamma_routing=draw(st.sampled_from([0.0, 0.7, 1.0])),
        jitter_noise=draw(st.sampled_from([0.0, 0.2])),
        auto_topk=draw(st.booleans()),
        auto_topk_threshold=draw(st.sampled_from([0.2, 0.5, 1.0])),
        soft_topk=draw(st.booleans()),
        sparse_mode=draw(st.booleans()),
        use_shared_LiME=draw(st.booleans()),
    )
    batch = draw(st.integers(1, 3))
    tokens = draw(st.integers(1, 6))
    mask = draw(st.none() | st.lists(st.lists(st.booleans(), min_size=tokens, max_size=tokens), min_size=batch, max_size=batch))
    return options, d_in, d_out, batch, tokens, mask, draw(st.booleans()), draw(st.integers(0, 2**16))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(layer_cases())
def test_awkward_shapes_match_the_loop(case):
    options, d_in, d_out, batch, tokens, mask, training, seed = case
    layer = make_layer(d_in=d_in, d_out=d_out, seed=seed, **options)
    torch.manual_seed(seed)
    x = torch.randn(batch, tokens, d_in, dtype=torch.float64)
    compare_with_loop(layer, x, None if mask is None else torch.tensor(mask, dtype=torch.long), training=training, seed=seed)
