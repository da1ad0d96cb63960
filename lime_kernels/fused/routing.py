"""Zero-parameter routing on `[tokens, E]` features, forward and backward, in Triton.

The per-token steps (normalization, blend, temperature, jitter, softmax, mixing weights, and back
through them) are `@triton.jit` helpers that other stages call inline: the projection kernel routes
its own rows when routing is per token (`rep_mode="token"`, `n_gram=1`, cosine router), and the
backward's pass over `dout` (`modulation.py`) runs the routing backward on the rows it has just
reduced. Only what needs other tokens has kernels of its own here:
- `_sequence_summary_kernel` (rep_mode mean / last): one program per sequence;
- `_pooled_absmax_kernel` (router maxabs): per-block maxima of |pooled feature| (the batch-wide max);
- `_routing_forward_kernel`: pooling (n-gram window / anchor / summary), then the per-token steps;
- `_pooling_backward_kernel` / `_sequence_summary_backward_kernel`: back through the pooling and the
  batch-wide max, for u and v in one launch.
The load-balancing statistics are per-block partial sums written by whichever kernel routes, finished
in a fixed order by `_finish_statistics` (called by the modulation epilogue's first program), so no
launch, no atomic and no host synchronization is spent on them.

Codes (constexpr): REP 0 = token, 1 = mean, 2 = last; SELECTION 0 = dense AutoTop-K, 1 = dense soft
top-k, 2 = hard top-k (dense or sparse), 3 = sparse AutoTop-K. Ties in a top-k choice go to the
lowest expert index. Experts occupy `lanes = max(16, next power of two)` register lanes, which
`tl.dot` accepts as a dimension.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..reference import LOG_EPS, NORM_EPS, WEIGHT_EPS
from .common import cdiv, dot_width, launch, next_power_of_2

# The reference's clamps, as compile-time constants of the kernels.
_NORM_EPS: tl.constexpr = tl.constexpr(NORM_EPS)
_WEIGHT_EPS: tl.constexpr = tl.constexpr(WEIGHT_EPS)
_LOG_EPS: tl.constexpr = tl.constexpr(LOG_EPS)

REP_CODES = {"token": 0, "mean": 1, "last": 2}

# The detached statistics vector the forward returns beside importance and kl_uniform: these entries,
# then `usage` (E values).
STAT_LOAD, STAT_ACTIVE, STAT_VALID = range(3)
STAT_USAGE = 3


ROUTING_WARPS = 8
# The routing pass's register limit per thread. Without one, ptxas 12.8 (Triton 3.6's) stops its
# 8-warp builds at 64 registers and spills 8 bytes in three builds (the maxabs router on sm_80 and
# sm_90, AutoTop-K's sparse mode on sm_90); 128 (two programs per SM, plenty for a pass over
# [tokens, E]) spills in none, under Triton 3.6 or 3.8 (`python -m lime_kernels.compile_check`).
ROUTING_FORWARD_REGISTERS = 128


def routing_rows(lanes: int) -> int:
    """Tokens per routing block for `lanes` experts: [tokens, lanes] float32 tiles stay in registers
    (with `ROUTING_WARPS` warps) without spilling on sm_80 / sm_90 (see `python -m
    lime_kernels.compile_check`)."""
    return max(16, min(64, 1024 // lanes))


def absmax_rows(lanes: int) -> int:
    """Tokens per block of `_pooled_absmax_kernel`, which holds pooled u and v at once: half a
    routing block (no spills on sm_80 / sm_90)."""
    return max(16, routing_rows(lanes) // 2)


def histogram_lanes(num_experts: int) -> int:
    """Bins 0..E of the number of selected experts per token."""
    return next_power_of_2(num_experts + 1)


def statistics_width(lanes: int, num_experts: int) -> int:
    """A block's partial statistics: probability sums, selection counts, histogram, valid count."""
    return 2 * lanes + histogram_lanes(num_experts) + 1


# --- helpers ------------------------------------------------------------------------------------


@triton.jit
def _load_rows(ptr, rows, lanes, row_ok, num_experts):
    return tl.load(ptr + rows[:, None] * num_experts + lanes[None, :],
                   mask=row_ok[:, None] & (lanes[None, :] < num_experts), other=0.0)


@triton.jit
def _store_rows(ptr, values, rows, lanes, row_ok, num_experts):
    tl.store(ptr + rows[:, None] * num_experts + lanes[None, :], values,
             mask=row_ok[:, None] & (lanes[None, :] < num_experts))


@triton.jit
def valid_rows(valid_ptr, rows, row_ok, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        return (tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0) & row_ok
    else:
        return row_ok


@triton.jit
def _pooled(raw_ptr, summary_ptr, seq_state_ptr, valid_ptr, rows, pos, seq, row_ok, lanes,
            num_experts, seq_len, n_gram,
            HAS_MASK: tl.constexpr, REP: tl.constexpr, WINDOW: tl.constexpr, ANCHOR: tl.constexpr):
    """The routing representation of each row: (features, window count)."""
    own = _load_rows(raw_ptr, rows, lanes, row_ok, num_experts)
    count = tl.full(rows.shape, 1.0, tl.float32)
    if REP != 0:
        has = tl.load(seq_state_ptr + seq * 2, mask=row_ok, other=0.0) > 0  # its count of valid tokens
        summary = _load_rows(summary_ptr, seq, lanes, row_ok, num_experts)
        pooled = tl.where(has[:, None], summary, own)
    elif WINDOW:
        valid = valid_rows(valid_ptr, rows, row_ok, HAS_MASK)
        total = tl.zeros(own.shape, tl.float32)
        count = tl.zeros(rows.shape, tl.float32)
        for offset in range(0, n_gram):
            source_ok = row_ok & (pos >= offset)
            source_ok = valid_rows(valid_ptr, rows - offset, source_ok, HAS_MASK)
            total += _load_rows(raw_ptr, rows - offset, lanes, source_ok, num_experts)
            count += source_ok.to(tl.float32)
        pooled = tl.where(valid[:, None], total / tl.maximum(count, 1.0)[:, None], own)
    elif ANCHOR:
        anchor = tl.minimum((pos // n_gram + 1) * n_gram - 1, seq_len - 1)
        pooled = _load_rows(raw_ptr, seq * seq_len + anchor, lanes, row_ok, num_experts)
    else:
        pooled = own
    return pooled, count


@triton.jit
def _pooled_features(raw_ptr, summary_ptr, seq_state_ptr, valid_ptr, rows, row_ok, lanes, num_tokens, num_experts,
                     seq_len, n_gram, HAS_MASK: tl.constexpr, REP: tl.constexpr, WINDOW: tl.constexpr,
                     ANCHOR: tl.constexpr):
    """Pooled u and v of `rows` from the raw features (2, tokens, E) and their sequence summaries, and
    the window counts."""
    pos = rows % seq_len
    seq = rows // seq_len
    u, count = _pooled(raw_ptr, summary_ptr, seq_state_ptr, valid_ptr, rows, pos, seq, row_ok, lanes,
                       num_experts, seq_len, n_gram, HAS_MASK, REP, WINDOW, ANCHOR)
    v, _ = _pooled(raw_ptr + num_tokens * num_experts, summary_ptr + (num_tokens // seq_len) * num_experts,
                   seq_state_ptr, valid_ptr, rows, pos, seq, row_ok, lanes, num_experts, seq_len, n_gram, HAS_MASK,
                   REP, WINDOW, ANCHOR)
    return u, v, count


@triton.jit
def _top(probs, lanes, lane_ok, count):
    """The `count` largest probabilities of each row: (chosen 0/1, the count-th value, its index)."""
    work = tl.where(lane_ok[None, :], probs, -1.0)
    chosen = tl.zeros(probs.shape, tl.int32)
    value = tl.zeros((probs.shape[0],), tl.float32)
    index = tl.zeros((probs.shape[0],), tl.int32)
    for _ in range(0, count):
        value = tl.max(work, axis=1)
        index = tl.argmax(work, axis=1).to(tl.int32)
        hit = lanes[None, :] == index[:, None]
        chosen = tl.where(hit, 1, chosen)
        work = tl.where(hit, -2.0, work)
    return chosen, value, index


@triton.jit
def _mixing_weights(probs, lanes, lane_ok, top_k, max_kept, theta, tau, SELECTION: tl.constexpr):
    """Step 9 of the semantics: (weights, selected as 0/1)."""
    if SELECTION == 0:
        cutoff = theta * tl.max(probs, axis=1)
        selected = ((probs >= cutoff[:, None]) & lane_ok[None, :]).to(tl.int32)
        gated = probs * tl.sigmoid((probs - cutoff[:, None]) / tau)
        weights = gated / (tl.sum(gated, axis=1) + _WEIGHT_EPS)[:, None]
    elif SELECTION == 1:
        selected, kth, _ = _top(probs, lanes, lane_ok, top_k)
        gated = probs * tl.sigmoid((probs - kth[:, None]) / tau)
        weights = gated / (tl.sum(gated, axis=1) + _WEIGHT_EPS)[:, None]
    else:
        if SELECTION == 2:
            selected, _, _ = _top(probs, lanes, lane_ok, top_k)
        else:
            largest, _, _ = _top(probs, lanes, lane_ok, max_kept)
            cutoff = theta * tl.max(probs, axis=1)
            selected = tl.where(probs >= cutoff[:, None], largest, 0)
        kept = tl.where(selected != 0, probs, 0.0)
        weights = kept / tl.maximum(tl.sum(kept, axis=1), _WEIGHT_EPS)[:, None]
    return tl.where(lane_ok[None, :], weights, 0.0), selected


@triton.jit
def _mixing_weights_backward(dweights, probs, weights, selected, lanes, lane_ok, top_k, theta, tau,
                             SELECTION: tl.constexpr):
    """d(probs) from d(weights), recomputing the masks of `_mixing_weights`."""
    if SELECTION <= 1:
        if SELECTION == 0:
            largest = tl.max(tl.where(lane_ok[None, :], probs, -1.0), axis=1)
            cutoff = theta * largest
        else:
            _, cutoff, kth_index = _top(probs, lanes, lane_ok, top_k)
        gate = tl.sigmoid((probs - cutoff[:, None]) / tau)
        total = tl.sum(probs * gate, axis=1) + _WEIGHT_EPS
        dgated = (dweights - tl.sum(dweights * weights, axis=1)[:, None]) / total[:, None]
        gate_slope = gate * (1.0 - gate) / tau
        dprobs = dgated * (gate + probs * gate_slope)
        dcutoff = -tl.sum(tl.where(lane_ok[None, :], dgated * probs * gate_slope, 0.0), axis=1)
        if SELECTION == 0:
            # cutoff = theta * max: the max's gradient is split evenly between tied maxima (torch.amax).
            ties = (probs == largest[:, None]) & lane_ok[None, :]
            share = theta * dcutoff / tl.sum(ties.to(tl.float32), axis=1)
            dprobs += tl.where(ties, share[:, None], 0.0)
        else:
            dprobs += tl.where(lanes[None, :] == kth_index[:, None], dcutoff[:, None], 0.0)
    else:
        total = tl.maximum(tl.sum(tl.where(selected != 0, probs, 0.0), axis=1), _WEIGHT_EPS)
        dkept = (dweights - tl.sum(dweights * weights, axis=1)[:, None]) / total[:, None]
        dprobs = tl.where(selected != 0, dkept, 0.0)
    return tl.where(lane_ok[None, :], dprobs, 0.0)


@triton.jit
def _cosine_backward(dfeature_hat, feature):
    """Back through feature / max(||feature||, eps): the norm takes gradient only above eps."""
    norm = tl.sqrt(tl.sum(feature * feature, axis=1))
    scale = tl.maximum(norm, _NORM_EPS)
    along = tl.sum(dfeature_hat * feature, axis=1) / (scale * scale * scale)  # scale = norm where it is used
    along = tl.where(norm >= _NORM_EPS, along, 0.0)
    return dfeature_hat / scale[:, None] - along[:, None] * feature


@triton.jit
def maxabs_scales(absmax_ptr, num_blocks):
    """The batch-wide max |u| and max |v| from per-block maxima (the same value in every program:
    a max does not depend on its order)."""
    u_max = tl.load(absmax_ptr)
    v_max = tl.load(absmax_ptr + 1)
    for block in range(1, num_blocks):
        u_max = tl.maximum(u_max, tl.load(absmax_ptr + block * 2))
        v_max = tl.maximum(v_max, tl.load(absmax_ptr + block * 2 + 1))
    return u_max, v_max


@triton.jit
def route_rows(u, v, jitter_ptr, rows, lanes, row_ok, num_experts, u_scale, v_scale, top_k, max_kept,
               temperature, gamma_routing, theta, tau,
               HAS_JITTER: tl.constexpr, MAXABS: tl.constexpr, SELECTION: tl.constexpr):
    """Steps 5-9 for rows of pooled features u, v: (probs, weights, selected 0/1)."""
    lane_ok = lanes < num_experts
    if MAXABS:
        u_hat = u / u_scale
        v_hat = v / v_scale
    else:
        u_hat = u / tl.maximum(tl.sqrt(tl.sum(u * u, axis=1)), _NORM_EPS)[:, None]
        v_hat = v / tl.maximum(tl.sqrt(tl.sum(v * v, axis=1)), _NORM_EPS)[:, None]
    logits = ((1.0 - gamma_routing) * u_hat + gamma_routing * v_hat) / temperature
    if HAS_JITTER:
        logits = logits * _load_rows(jitter_ptr, rows, lanes, row_ok, num_experts)
    logits = tl.where(lane_ok[None, :], logits, float("-inf"))
    exps = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = exps / tl.sum(exps, axis=1)[:, None]
    weights, selected = _mixing_weights(probs, lanes, lane_ok, top_k, max_kept, theta, tau, SELECTION)
    return probs, weights, selected


@triton.jit
def store_route(features_ptr, selected_ptr, stats_ptr, block, u, v, probs, weights, selected, valid,
                rows, lanes, row_ok, num_tokens, num_experts, HIST_LANES: tl.constexpr):
    """The routing state for the backward (`features` (4, tokens, E): pooled u, pooled v, probs,
    weights; `selected` (tokens, E) int8) and this block's partial statistics over its valid rows."""
    plane = num_tokens * num_experts
    _store_rows(features_ptr, u, rows, lanes, row_ok, num_experts)
    _store_rows(features_ptr + plane, v, rows, lanes, row_ok, num_experts)
    _store_rows(features_ptr + 2 * plane, probs, rows, lanes, row_ok, num_experts)
    _store_rows(features_ptr + 3 * plane, weights, rows, lanes, row_ok, num_experts)
    _store_rows(selected_ptr, selected.to(tl.int8), rows, lanes, row_ok, num_experts)
    LANES: tl.constexpr = u.shape[1]
    width = 2 * LANES + HIST_LANES + 1
    base = stats_ptr + block * width
    tl.store(base + lanes, tl.sum(tl.where(valid[:, None], probs, 0.0), axis=0))
    tl.store(base + LANES + lanes, tl.sum(tl.where(valid[:, None], selected, 0), axis=0).to(tl.float32))
    bins = tl.arange(0, HIST_LANES)
    per_row = tl.sum(selected, axis=1)
    hits = valid[:, None] & (per_row[:, None] == bins[None, :])
    tl.store(base + 2 * LANES + bins, tl.sum(hits.to(tl.float32), axis=0))
    tl.store(base + 2 * LANES + HIST_LANES, tl.sum(valid.to(tl.float32), axis=0))


@triton.jit
def finish_statistics(partials_ptr, num_blocks, importance_ptr, kl_ptr, stats_ptr, histogram_ptr, num_experts,
                      LANES: tl.constexpr, HIST_LANES: tl.constexpr):
    """Sums the blocks' partial statistics in block order and writes importance, kl_uniform, the
    statistics vector [load, active_experts, valid tokens, usage (E)] and the histogram. The formulas
    are `lime_kernels.reference.balance_statistics`'."""
    lanes = tl.arange(0, LANES)
    bins = tl.arange(0, HIST_LANES)
    lane_ok = lanes < num_experts
    width = 2 * LANES + HIST_LANES + 1
    probs_sum = tl.zeros((LANES,), tl.float32)
    counts = tl.zeros((LANES,), tl.float32)
    histogram = tl.zeros((HIST_LANES,), tl.float32)
    num_valid = 0.0
    for block in range(0, num_blocks):
        base = partials_ptr + block * width
        probs_sum += tl.load(base + lanes)
        counts += tl.load(base + LANES + lanes)
        histogram += tl.load(base + 2 * LANES + bins)
        num_valid += tl.load(base + 2 * LANES + HIST_LANES)
    experts = tl.sum(lane_ok.to(tl.float32), axis=0)  # E, as a tensor even when E is specialized to 1
    valid_clamped = tl.maximum(num_valid, 1.0)
    mean_probs = tl.where(lane_ok, probs_sum / valid_clamped, 0.0)
    has_tokens = num_valid > 0.0  # without a valid token every statistic is 0, as in the reference
    importance = tl.where(has_tokens, experts * tl.sum(mean_probs * mean_probs, axis=0) - 1.0, 0.0)
    log_terms = tl.log(tl.maximum(mean_probs, _LOG_EPS)) + tl.log(experts)
    kl_uniform = tl.sum(tl.where(lane_ok, mean_probs * log_terms, 0.0), axis=0)
    total_count = tl.sum(counts, axis=0)
    share = counts / tl.maximum(total_count, 1.0)
    load = tl.where(has_tokens, experts * tl.sum(share * share, axis=0) - 1.0, 0.0)
    tl.store(importance_ptr, importance)
    tl.store(kl_ptr, kl_uniform)
    tl.store(stats_ptr + 0, load)
    tl.store(stats_ptr + 1, total_count / valid_clamped)
    tl.store(stats_ptr + 2, num_valid)
    tl.store(stats_ptr + 3 + lanes, mean_probs, mask=lane_ok)
    tl.store(histogram_ptr + bins, histogram.to(tl.int64), mask=bins <= num_experts)


@triton.jit
def route_rows_backward(dweights, stats_ptr, dimportance_ptr, dkl_ptr, valid, u, v, probs, weights, selected,
                        jitter_ptr, rows, lanes, row_ok, num_experts, u_scale, v_scale, top_k, temperature,
                        gamma_routing, theta, tau, HAS_JITTER: tl.constexpr, HAS_DIMPORTANCE: tl.constexpr,
                        HAS_DKL: tl.constexpr, MAXABS: tl.constexpr, SELECTION: tl.constexpr):
    """Back through steps 5-9 (and the statistics) for rows: (du, dv) w.r.t. the pooled features,
    and for maxabs the rows' sums of d(u_hat) * u and d(v_hat) * v (the batch-wide max's gradient)."""
    lane_ok = lanes < num_experts
    dprobs = _mixing_weights_backward(dweights, probs, weights, selected, lanes, lane_ok, top_k, theta, tau,
                                      SELECTION)
    if HAS_DIMPORTANCE or HAS_DKL:
        # importance = E sum(p^2) - 1 and kl = sum(p (log max(p, eps) + log E)), p = probs_sum / valid.
        experts = tl.sum(lane_ok.to(tl.float32), axis=0)
        mean_probs = tl.load(stats_ptr + 3 + lanes, mask=lane_ok, other=0.0)
        valid_clamped = tl.maximum(tl.load(stats_ptr + 2), 1.0)
        dmean = tl.zeros(mean_probs.shape, tl.float32)
        if HAS_DIMPORTANCE:
            dmean += tl.load(dimportance_ptr) * 2.0 * experts * mean_probs
        if HAS_DKL:
            dlog = tl.log(tl.maximum(mean_probs, _LOG_EPS)) + tl.log(experts) + (mean_probs >= _LOG_EPS).to(tl.float32)
            dmean += tl.load(dkl_ptr) * dlog
        dprobs += tl.where(valid[:, None] & lane_ok[None, :], (dmean / valid_clamped)[None, :], 0.0)
    dlogits = probs * (dprobs - tl.sum(dprobs * probs, axis=1)[:, None])
    if HAS_JITTER:
        dlogits = dlogits * _load_rows(jitter_ptr, rows, lanes, row_ok, num_experts)
    du_hat = (1.0 - gamma_routing) / temperature * dlogits
    dv_hat = gamma_routing / temperature * dlogits
    if MAXABS:
        du = du_hat / u_scale
        dv = dv_hat / v_scale
        u_along = tl.sum(tl.sum(du_hat * u, axis=1), axis=0)
        v_along = tl.sum(tl.sum(dv_hat * v, axis=1), axis=0)
    else:
        du = _cosine_backward(du_hat, u)
        dv = _cosine_backward(dv_hat, v)
        u_along = 0.0
        v_along = 0.0
    return du, dv, u_along, v_along


@triton.jit
def _max_grad_coefficients(scales_ptr, max_partials_ptr, num_max_blocks, tie_partials_ptr, num_tie_blocks):
    """For maxabs: d(max) / (number of tied maxima) for u and v, from per-block partial sums of
    d(hat) * pooled and of ties (every program sums them in the same order). scales = [u scale,
    v scale, u max, v max]; d(max) = -sum(d(hat) * pooled) / scale^2 where max >= eps (the clamp
    passes no gradient below)."""
    u_along = 0.0
    v_along = 0.0
    for block in range(0, num_max_blocks):
        u_along += tl.load(max_partials_ptr + block * 2)
        v_along += tl.load(max_partials_ptr + block * 2 + 1)
    u_ties = 0.0
    v_ties = 0.0
    for block in range(0, num_tie_blocks):
        u_ties += tl.load(tie_partials_ptr + block * 2)
        v_ties += tl.load(tie_partials_ptr + block * 2 + 1)
    u_scale = tl.load(scales_ptr)
    v_scale = tl.load(scales_ptr + 1)
    u_max = tl.load(scales_ptr + 2)
    v_max = tl.load(scales_ptr + 3)
    u_coefficient = tl.where(u_max >= _NORM_EPS, -u_along / (u_scale * u_scale), 0.0) / tl.maximum(u_ties, 1.0)
    v_coefficient = tl.where(v_max >= _NORM_EPS, -v_along / (v_scale * v_scale), 0.0) / tl.maximum(v_ties, 1.0)
    return u_coefficient, v_coefficient, u_max, v_max


@triton.jit
def _max_grad_terms(which, scales_ptr, max_partials_ptr, num_max_blocks, tie_partials_ptr, num_tie_blocks,
                    MAXABS: tl.constexpr):
    """(max, coefficient) of `_max_grad_coefficients` for u (which = 0) or v; zeros for cosine."""
    largest = 0.0
    coefficient = 0.0
    if MAXABS:
        u_coefficient, v_coefficient, u_max, v_max = _max_grad_coefficients(
            scales_ptr, max_partials_ptr, num_max_blocks, tie_partials_ptr, num_tie_blocks)
        largest = tl.where(which == 0, u_max, v_max)
        coefficient = tl.where(which == 0, u_coefficient, v_coefficient)
    return largest, coefficient


@triton.jit
def _total_grad(dpooled_ptr, pooled_ptr, rows, lanes, row_ok, num_experts, largest, coefficient,
                MAXABS: tl.constexpr):
    """d(pooled features) including, for maxabs, the batch-wide max's share at its arg-max entries."""
    grad = _load_rows(dpooled_ptr, rows, lanes, row_ok, num_experts)
    if MAXABS:
        pooled = _load_rows(pooled_ptr, rows, lanes, row_ok, num_experts)
        sign = tl.where(pooled > 0, 1.0, tl.where(pooled < 0, -1.0, 0.0))
        grad += tl.where(tl.abs(pooled) == largest, coefficient * sign, 0.0)
    return grad


# --- kernels ---------------------------------------------------------------------------------------


@triton.jit
def _sequence_summary_kernel(
    raw_ptr, valid_ptr, summary_ptr, seq_state_ptr,
    num_tokens, num_experts, seq_len,
    BLOCK_T: tl.constexpr, LANES: tl.constexpr, HAS_MASK: tl.constexpr, REP: tl.constexpr,
):
    """Per sequence and feature (program axis 1: u, v): the mean over valid tokens (REP 1) or the last
    valid token (REP 2). seq_state[seq] = (number of valid tokens, position of the last valid token or -1)."""
    seq = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)
    raw = raw_ptr + which.to(tl.int64) * num_tokens * num_experts
    lanes = tl.arange(0, LANES)
    # Per-row partial sums, reduced once after the loop.
    total = tl.zeros((BLOCK_T, LANES), tl.float32)
    count = tl.zeros((BLOCK_T,), tl.float32)
    last = tl.full((BLOCK_T,), -1, tl.int32)
    for start in range(0, seq_len, BLOCK_T):
        pos = start + tl.arange(0, BLOCK_T)
        rows = seq * seq_len + pos
        valid = valid_rows(valid_ptr, rows, pos < seq_len, HAS_MASK)
        if REP == 1:
            total += _load_rows(raw, rows, lanes, valid, num_experts)
        count += valid.to(tl.float32)
        last = tl.maximum(last, tl.where(valid, pos, -1))
    count = tl.sum(count, axis=0)
    last = tl.max(last, axis=0)
    lane_ok = lanes < num_experts
    if REP == 1:
        summary = tl.sum(total, axis=0) / tl.maximum(count, 1.0)
    else:
        source = seq * seq_len + tl.maximum(last, 0)
        summary = tl.load(raw + source * num_experts + lanes, mask=lane_ok, other=0.0)
    num_seqs = num_tokens // seq_len
    tl.store(summary_ptr + (which * num_seqs + seq) * num_experts + lanes, summary, mask=lane_ok)
    if which == 0:
        tl.store(seq_state_ptr + seq * 2, count)
        tl.store(seq_state_ptr + seq * 2 + 1, last.to(tl.float32))


@triton.jit
def _pooled_absmax_kernel(
    raw_ptr, valid_ptr, summary_ptr, seq_state_ptr, absmax_ptr,
    num_tokens, num_experts, seq_len, n_gram,
    BLOCK_T: tl.constexpr, LANES: tl.constexpr, HAS_MASK: tl.constexpr,
    REP: tl.constexpr, WINDOW: tl.constexpr, ANCHOR: tl.constexpr,
):
    """Per block: max |pooled feature| over every token (padding included) and expert, for u and v."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    lanes = tl.arange(0, LANES)
    row_ok = rows < num_tokens
    u, v, _ = _pooled_features(raw_ptr, summary_ptr, seq_state_ptr, valid_ptr, rows, row_ok, lanes, num_tokens,
                               num_experts, seq_len, n_gram, HAS_MASK, REP, WINDOW, ANCHOR)
    tl.store(absmax_ptr + pid * 2, tl.max(tl.max(tl.abs(u), axis=1), axis=0))
    tl.store(absmax_ptr + pid * 2 + 1, tl.max(tl.max(tl.abs(v), axis=1), axis=0))


@triton.jit
def _routing_forward_kernel(
    raw_ptr, valid_ptr, summary_ptr, seq_state_ptr, jitter_ptr, absmax_ptr,
    features_ptr, selected_ptr, window_count_ptr, scales_ptr, ties_ptr, stats_ptr,
    num_tokens, num_experts, seq_len, n_gram, top_k, max_kept, num_absmax_blocks,
    temperature, gamma_routing, theta, tau,
    BLOCK_T: tl.constexpr, LANES: tl.constexpr, HIST_LANES: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_JITTER: tl.constexpr, REP: tl.constexpr, WINDOW: tl.constexpr, ANCHOR: tl.constexpr,
    MAXABS: tl.constexpr, SELECTION: tl.constexpr,
):
    """Pooling (n-gram window or anchor, or the sequence summary), then steps 5-9, for one block."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    lanes = tl.arange(0, LANES)
    row_ok = rows < num_tokens
    lane_ok = lanes < num_experts
    u, v, count = _pooled_features(raw_ptr, summary_ptr, seq_state_ptr, valid_ptr, rows, row_ok, lanes, num_tokens,
                                   num_experts, seq_len, n_gram, HAS_MASK, REP, WINDOW, ANCHOR)
    if WINDOW:
        tl.store(window_count_ptr + rows, count, mask=row_ok)
    u_scale = 1.0
    v_scale = 1.0
    if MAXABS:
        u_max, v_max = maxabs_scales(absmax_ptr, num_absmax_blocks)
        u_scale = tl.maximum(u_max, _NORM_EPS)
        v_scale = tl.maximum(v_max, _NORM_EPS)
        if pid == 0:
            tl.store(scales_ptr, u_scale)
            tl.store(scales_ptr + 1, v_scale)
            tl.store(scales_ptr + 2, u_max)
            tl.store(scales_ptr + 3, v_max)
        # Tied maxima share the max's gradient (torch.amax): count them per block.
        tile_ok = row_ok[:, None] & lane_ok[None, :]
        tl.store(ties_ptr + pid * 2, tl.sum(tl.sum((tile_ok & (tl.abs(u) == u_max)).to(tl.float32), axis=1), axis=0))
        tl.store(ties_ptr + pid * 2 + 1,
                 tl.sum(tl.sum((tile_ok & (tl.abs(v) == v_max)).to(tl.float32), axis=1), axis=0))
    probs, weights, selected = route_rows(u, v, jitter_ptr, rows, lanes, row_ok, num_experts, u_scale, v_scale,
                                          top_k, max_kept, temperature, gamma_routing, theta, tau,
                                          HAS_JITTER, MAXABS, SELECTION)
    valid = valid_rows(valid_ptr, rows, row_ok, HAS_MASK)
    store_route(features_ptr, selected_ptr, stats_ptr, pid, u, v, probs, weights, selected, valid, rows, lanes,
                row_ok, num_tokens, num_experts, HIST_LANES)


@triton.jit
def _pooling_backward_kernel(
    dpooled_ptr, features_ptr, window_count_ptr, valid_ptr, scales_ptr, max_partials_ptr, ties_ptr, draw_ptr,
    num_tokens, num_experts, seq_len, n_gram, num_max_blocks, num_tie_blocks,
    BLOCK_T: tl.constexpr, LANES: tl.constexpr, HAS_MASK: tl.constexpr,
    WINDOW: tl.constexpr, ANCHOR: tl.constexpr, MAXABS: tl.constexpr,
):
    """Token representations: d(raw features) from d(pooled features), as a gather; program axis 1
    is u or v."""
    pid = tl.program_id(0)
    which = tl.program_id(1)
    offset_uv = which.to(tl.int64) * num_tokens * num_experts
    dpooled = dpooled_ptr + offset_uv
    pooled = features_ptr + offset_uv  # features[0] = pooled u, features[1] = pooled v
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    lanes = tl.arange(0, LANES)
    row_ok = rows < num_tokens
    pos = rows % seq_len
    largest, coefficient = _max_grad_terms(which, scales_ptr, max_partials_ptr, num_max_blocks, ties_ptr,
                                           num_tie_blocks, MAXABS)
    if WINDOW:
        # A valid token s feeds the windows of the valid tokens t = s .. s+n-1 of its sequence.
        total = tl.zeros((BLOCK_T, LANES), tl.float32)
        for offset in range(0, n_gram):
            target_ok = valid_rows(valid_ptr, rows + offset, row_ok & (pos + offset < seq_len), HAS_MASK)
            count = tl.load(window_count_ptr + rows + offset, mask=target_ok, other=1.0)
            grad = _total_grad(dpooled, pooled, rows + offset, lanes, target_ok, num_experts, largest, coefficient,
                               MAXABS)
            total += grad / count[:, None]
        valid = valid_rows(valid_ptr, rows, row_ok, HAS_MASK)
        own = _total_grad(dpooled, pooled, rows, lanes, row_ok, num_experts, largest, coefficient, MAXABS)
        draw = tl.where(valid[:, None], total, own)
    elif ANCHOR:
        # An anchor (the last position of its group) feeds every token of its group.
        group_start = pos - pos % n_gram
        anchor = tl.minimum(group_start + n_gram - 1, seq_len - 1)
        is_anchor = row_ok & (pos == anchor)
        draw = tl.zeros((BLOCK_T, LANES), tl.float32)
        for offset in range(0, n_gram):
            member_ok = is_anchor & (group_start + offset <= anchor)
            draw += _total_grad(dpooled, pooled, rows - pos + group_start + offset, lanes, member_ok, num_experts,
                                largest, coefficient, MAXABS)
    else:
        draw = _total_grad(dpooled, pooled, rows, lanes, row_ok, num_experts, largest, coefficient, MAXABS)
    _store_rows(draw_ptr + offset_uv, draw, rows, lanes, row_ok, num_experts)


@triton.jit
def _sequence_summary_backward_kernel(
    dpooled_ptr, features_ptr, valid_ptr, seq_state_ptr, scales_ptr, max_partials_ptr, ties_ptr, draw_ptr,
    num_tokens, num_experts, seq_len, num_max_blocks, num_tie_blocks,
    BLOCK_T: tl.constexpr, LANES: tl.constexpr, HAS_MASK: tl.constexpr, REP: tl.constexpr,
    MAXABS: tl.constexpr,
):
    """rep_mode mean / last: every token of a sequence with a valid token took its summary; program
    axis 1 is u or v."""
    seq = tl.program_id(0).to(tl.int64)
    which = tl.program_id(1)
    offset_uv = which.to(tl.int64) * num_tokens * num_experts
    dpooled = dpooled_ptr + offset_uv
    pooled = features_ptr + offset_uv
    lanes = tl.arange(0, LANES)
    largest, coefficient = _max_grad_terms(which, scales_ptr, max_partials_ptr, num_max_blocks, ties_ptr,
                                           num_tie_blocks, MAXABS)
    count = tl.load(seq_state_ptr + seq * 2)
    last = tl.load(seq_state_ptr + seq * 2 + 1).to(tl.int64)
    dsummary = tl.zeros((LANES,), tl.float32)
    for start in range(0, seq_len, BLOCK_T):
        pos = start + tl.arange(0, BLOCK_T)
        grad = _total_grad(dpooled, pooled, seq * seq_len + pos, lanes, pos < seq_len, num_experts, largest,
                           coefficient, MAXABS)
        dsummary += tl.sum(grad, axis=0)
    for start in range(0, seq_len, BLOCK_T):
        pos = start + tl.arange(0, BLOCK_T)
        rows = seq * seq_len + pos
        row_ok = pos < seq_len
        if REP == 1:
            valid = valid_rows(valid_ptr, rows, row_ok, HAS_MASK)
            share = tl.where(valid[:, None], (dsummary / tl.maximum(count, 1.0))[None, :], 0.0)
        else:
            share = tl.where((pos == last)[:, None], dsummary[None, :], 0.0)
        if count > 0:
            draw = share
        else:
            draw = _total_grad(dpooled, pooled, rows, lanes, row_ok, num_experts, largest, coefficient, MAXABS)
        _store_rows(draw_ptr + offset_uv, draw, rows, lanes, row_ok, num_experts)


# --- launchers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoutingConfig:
    """The routing options as the kernels take them."""

    num_experts: int
    seq_len: int
    rep: int
    n_gram: int
    window: bool
    anchor: bool
    maxabs: bool
    selection: int
    top_k: int
    temperature: float
    gamma_routing: float
    theta: float
    tau: float

    # Derived values are computed once per config (the launchers read them many times per step, and
    # `fused_lime_linear` reuses one config across calls). cached_property writes the instance's
    # __dict__ directly, which a frozen dataclass allows.
    @functools.cached_property
    def lanes(self) -> int:
        return dot_width(self.num_experts)

    @functools.cached_property
    def max_kept(self) -> int:
        return min(2 * self.top_k, self.num_experts)

    @functools.cached_property
    def layouts(self) -> dict:
        """`state_layout`'s results by number of tokens."""
        return {}

    @functools.cached_property
    def per_token(self) -> bool:
        """Routing reads each token's own features only (no pooling, no batch-wide max): the stages
        around it (projection, backward pass over dout) route their own rows inline."""
        return self.rep == 0 and not self.window and not self.anchor and not self.maxabs

    @functools.cached_property
    def pooled(self) -> bool:
        """The backward needs a pass back through the pooling or the batch-wide max."""
        return not self.per_token

    def kernel_options(self) -> dict:
        return dict(temperature=self.temperature, gamma_routing=self.gamma_routing, theta=self.theta, tau=self.tau)


def state_layout(num_tokens: int, config: RoutingConfig) -> dict:
    """Sizes of the parts of the packed `extra` tensor, each present only where the options use it
    (so that every entry is written): window counts (one per token), per-sequence state (two per
    sequence: valid count, last valid position), maxabs scales (u scale, v scale, u max, v max) and
    tie counts of the maxima (two per routing block). Computed once per config and number of tokens:
    the same dict is returned again, and nothing may change it."""
    concrete = type(num_tokens) is int  # not a symbolic size (torch.compile's dynamic shapes): a dict key
    layouts = config.layouts
    layout = layouts.get(num_tokens) if concrete else None
    if layout is None:
        num_blocks = cdiv(num_tokens, routing_rows(config.lanes))
        layout = dict(
            window_count=num_tokens if config.window else 0,
            seq_state=2 * (num_tokens // config.seq_len) if config.rep != 0 else 0,
            scales=4 if config.maxabs else 0,
            ties=2 * num_blocks if config.maxabs else 0,
        )
        if concrete:
            if len(layouts) >= 64:  # bounded, for inputs of ever new sizes
                layouts.clear()
            layouts[num_tokens] = layout
    return layout


@dataclass
class RoutingState:
    """What the forward leaves for the backward, as three packed tensors whose shapes do not depend
    on the options (so the custom op has one signature):

    - `features` (4, tokens, E) float32: pooled u, pooled v, probs, weights;
    - `selected` (tokens, E) int8: the hard selection (0/1);
    - `extra` float32: see `state_layout`.
    """

    features: torch.Tensor
    selected: torch.Tensor
    extra: torch.Tensor
    layout: dict

    @staticmethod
    def allocate(num_tokens: int, config: RoutingConfig, device) -> "RoutingState":
        layout = state_layout(num_tokens, config)
        return RoutingState(
            torch.empty(4, num_tokens, config.num_experts, device=device, dtype=torch.float32),
            torch.empty(num_tokens, config.num_experts, device=device, dtype=torch.int8),
            torch.empty(sum(layout.values()), device=device, dtype=torch.float32),
            layout,
        )

    def part(self, name: str) -> torch.Tensor:
        """A part of `extra`; an absent one (unused by these options) gives `features`, any real
        tensor, as the kernels' pointer (they do not read it)."""
        start = 0
        for key, size in self.layout.items():
            if key == name:
                return self.extra[start : start + size] if size else self.features
            start += size
        raise KeyError(name)

    @property
    def weights(self) -> torch.Tensor:
        return self.features[3]


def _pooling_options(config: RoutingConfig) -> dict:
    return dict(REP=config.rep, WINDOW=config.window, ANCHOR=config.anchor)


def route_pooled(raw: torch.Tensor, valid, jitter, state: RoutingState, stat_partials: torch.Tensor,
                 config: RoutingConfig) -> None:
    """Routing from the raw features `raw` (2, tokens, E) when it needs other tokens (pooling or the
    maxabs router): fills `state` and the per-block partial statistics."""
    _, num_tokens, num_experts = raw.shape
    device = raw.device
    lanes = config.lanes
    block_t = routing_rows(lanes)
    num_blocks = cdiv(num_tokens, block_t)
    num_seqs = num_tokens // config.seq_len
    common = dict(BLOCK_T=block_t, LANES=lanes, HAS_MASK=valid is not None, num_warps=ROUTING_WARPS)
    valid_arg = valid if valid is not None else raw
    summaries = raw  # any tensor: unused without a summary
    if config.rep != 0:
        summaries = torch.empty(2, num_seqs, num_experts, device=device, dtype=torch.float32)
        launch(_sequence_summary_kernel, (num_seqs, 2), raw, valid_arg, summaries, state.part("seq_state"),
               num_tokens, num_experts, config.seq_len, REP=config.rep, **common,
               traffic=lambda: ([raw, valid], [summaries, state.part("seq_state")], 0))
    absmax = raw
    if config.maxabs:
        rows = absmax_rows(lanes)
        absmax = torch.empty(cdiv(num_tokens, rows), 2, device=device, dtype=torch.float32)
        launch(_pooled_absmax_kernel, (absmax.shape[0],), raw, valid_arg, summaries, state.part("seq_state"), absmax,
               num_tokens, num_experts, config.seq_len, config.n_gram, **_pooling_options(config),
               **dict(common, BLOCK_T=rows, num_warps=4), traffic=lambda: ([raw, valid], [absmax], 0))
    launch(_routing_forward_kernel, (num_blocks,),
           raw, valid_arg, summaries, state.part("seq_state"), jitter if jitter is not None else raw, absmax,
           state.features, state.selected, state.part("window_count"), state.part("scales"), state.part("ties"),
           stat_partials,
           num_tokens, num_experts, config.seq_len, config.n_gram, config.top_k, config.max_kept, absmax.shape[0],
           HIST_LANES=histogram_lanes(num_experts), HAS_JITTER=jitter is not None, MAXABS=config.maxabs,
           SELECTION=config.selection, **_pooling_options(config), **common, **config.kernel_options(),
           maxnreg=ROUTING_FORWARD_REGISTERS,
           traffic=lambda: ([raw, valid, jitter], [state.features, state.selected, stat_partials,
                                                   state.part("window_count") if config.window else None], 0))


def pooling_backward(dpooled: torch.Tensor, max_partials: torch.Tensor, valid, state: RoutingState,
                     config: RoutingConfig) -> torch.Tensor:
    """d(raw features) (2, tokens, E) from d(pooled features) (2, tokens, E), through the n-gram
    window or anchor, the sequence summary and the maxabs router's batch-wide max."""
    _, num_tokens, num_experts = dpooled.shape
    lanes = config.lanes
    block_t = routing_rows(lanes)
    common = dict(BLOCK_T=block_t, LANES=lanes, HAS_MASK=valid is not None, MAXABS=config.maxabs,
                  num_warps=ROUTING_WARPS)
    valid_arg = valid if valid is not None else dpooled
    draw = torch.empty_like(dpooled)

    def traffic():
        return [dpooled, state.features[:2] if config.maxabs else None, valid], [draw], 0

    if max_partials is None:  # no maxabs router: nothing reads the max's partial sums
        max_partials = dpooled
    maxabs_args = (state.part("scales"), max_partials, state.part("ties"))
    maxabs_sizes = (max_partials.shape[0] if config.maxabs else 0, state.part("ties").numel() // 2)
    if config.rep != 0:
        launch(_sequence_summary_backward_kernel, (num_tokens // config.seq_len, 2),
               dpooled, state.features, valid_arg, state.part("seq_state"), *maxabs_args, draw,
               num_tokens, num_experts, config.seq_len, *maxabs_sizes, REP=config.rep, **common,
               traffic=traffic)
    else:
        launch(_pooling_backward_kernel, (cdiv(num_tokens, block_t), 2),
               dpooled, state.features, state.part("window_count"), valid_arg, *maxabs_args, draw,
               num_tokens, num_experts, config.seq_len, config.n_gram, *maxabs_sizes,
               WINDOW=config.window, ANCHOR=config.anchor, **common, traffic=traffic)
    return draw


def statistics_partials(num_tokens: int, block_rows: int, config: RoutingConfig, device) -> torch.Tensor:
    """The per-block partial statistics of the routing pass over blocks of `block_rows` tokens."""
    num_blocks = cdiv(num_tokens, block_rows)
    return torch.empty(num_blocks, statistics_width(config.lanes, config.num_experts), device=device,
                       dtype=torch.float32)


def statistics_length(num_experts: int) -> int:
    return STAT_USAGE + num_experts


__all__ = [
    "REP_CODES",
    "RoutingConfig",
    "RoutingState",
    "pooling_backward",
    "route_pooled",
    "routing_rows",
    "statistics_length",
    "statistics_partials",
]
