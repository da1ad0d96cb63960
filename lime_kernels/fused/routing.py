"""Zero-parameter routing on `[tokens, E]` features, forward and backward, in Triton.

Stages (each one kernel over blocks of tokens, E padded to a power of two of lanes):
- `_sequence_summary_kernel` (rep_mode mean / last): one program per sequence;
- `_pooled_absmax_kernel` (router maxabs): the batch-wide max |feature| needs a reduction first;
- `_routing_forward_kernel`: representation (n-gram window / anchor / summary), normalization,
  blend, temperature, jitter, softmax, mixing weights, and per-block partial sums for the statistics;
- `_routing_backward_kernel`: back through the weights, softmax, jitter, blend and normalization;
- `_pooling_backward_kernel` / `_sequence_summary_backward_kernel`: back through the representation.

Codes (constexpr): REP 0 = token, 1 = mean, 2 = last; SELECTION 0 = dense AutoTop-K, 1 = dense soft
top-k, 2 = hard top-k (dense or sparse), 3 = sparse AutoTop-K. Ties in a top-k choice go to the
lowest expert index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ..reference import NORM_EPS, WEIGHT_EPS
from .common import lane_width

# The reference's clamps, as compile-time constants of the kernels.
_NORM_EPS: tl.constexpr = tl.constexpr(NORM_EPS)
_WEIGHT_EPS: tl.constexpr = tl.constexpr(WEIGHT_EPS)

REP_CODES = {"token": 0, "mean": 1, "last": 2}
AUTO_DENSE, SOFT_DENSE, HARD, AUTO_SPARSE = 0, 1, 2, 3

def routing_blocks(lanes: int) -> dict:
    """Tokens per program for `lanes` experts: [tokens, lanes] float32 tiles stay in registers
    without spilling on sm_80 / sm_90 (see `python -m lime_kernels.compile_check`)."""
    return dict(BLOCK_T=min(64, max(16, 1024 // lanes)), num_warps=4)


def selection_code(auto_topk: bool, soft_topk: bool, sparse_mode: bool) -> int:
    if auto_topk:
        return AUTO_SPARSE if sparse_mode else AUTO_DENSE
    return SOFT_DENSE if soft_topk and not sparse_mode else HARD


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
def _valid_rows(valid_ptr, rows, row_ok, HAS_MASK: tl.constexpr):
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
        valid = _valid_rows(valid_ptr, rows, row_ok, HAS_MASK)
        total = tl.zeros(own.shape, tl.float32)
        count = tl.zeros(rows.shape, tl.float32)
        for offset in range(0, n_gram):
            source_ok = row_ok & (pos >= offset)
            source_ok = _valid_rows(valid_ptr, rows - offset, source_ok, HAS_MASK)
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


# --- kernels ---------------------------------------------------------------------------------------


@triton.jit
def _sequence_summary_kernel(
    u_raw_ptr, v_raw_ptr, valid_ptr, u_summary_ptr, v_summary_ptr, seq_state_ptr,
    num_experts, seq_len,
    BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, HAS_MASK: tl.constexpr, REP: tl.constexpr,
):
    """Per sequence: the mean over valid tokens (REP 1) or the last valid token (REP 2).

    seq_state[seq] = (number of valid tokens, position of the last valid token or -1).
    """
    seq = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, E_PAD)
    # Per-row partial sums, reduced once after the loop.
    u_total = tl.zeros((BLOCK_T, E_PAD), tl.float32)
    v_total = tl.zeros((BLOCK_T, E_PAD), tl.float32)
    count = tl.zeros((BLOCK_T,), tl.float32)
    last = tl.full((BLOCK_T,), -1, tl.int32)
    for start in range(0, seq_len, BLOCK_T):
        pos = start + tl.arange(0, BLOCK_T)
        rows = seq * seq_len + pos
        valid = _valid_rows(valid_ptr, rows, pos < seq_len, HAS_MASK)
        if REP == 1:
            u_total += _load_rows(u_raw_ptr, rows, lanes, valid, num_experts)
            v_total += _load_rows(v_raw_ptr, rows, lanes, valid, num_experts)
        count += valid.to(tl.float32)
        last = tl.maximum(last, tl.where(valid, pos, -1))
    count = tl.sum(count, axis=0)
    last = tl.max(last, axis=0)
    lane_ok = lanes < num_experts
    if REP == 1:
        u_summary = tl.sum(u_total, axis=0) / tl.maximum(count, 1.0)
        v_summary = tl.sum(v_total, axis=0) / tl.maximum(count, 1.0)
    else:
        source = seq * seq_len + tl.maximum(last, 0)
        u_summary = tl.load(u_raw_ptr + source * num_experts + lanes, mask=lane_ok, other=0.0)
        v_summary = tl.load(v_raw_ptr + source * num_experts + lanes, mask=lane_ok, other=0.0)
    tl.store(u_summary_ptr + seq * num_experts + lanes, u_summary, mask=lane_ok)
    tl.store(v_summary_ptr + seq * num_experts + lanes, v_summary, mask=lane_ok)
    tl.store(seq_state_ptr + seq * 2, count)
    tl.store(seq_state_ptr + seq * 2 + 1, last.to(tl.float32))


@triton.jit
def _pooled_absmax_kernel(
    u_raw_ptr, v_raw_ptr, valid_ptr, u_summary_ptr, v_summary_ptr, seq_state_ptr, partial_ptr,
    num_tokens, num_experts, seq_len, n_gram,
    BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, HAS_MASK: tl.constexpr,
    REP: tl.constexpr, WINDOW: tl.constexpr, ANCHOR: tl.constexpr,
):
    """Per block: max |pooled feature| over every token (padding included) and expert, for u and v."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    lanes = tl.arange(0, E_PAD)
    row_ok = rows < num_tokens
    pos = rows % seq_len
    seq = rows // seq_len
    u, _ = _pooled(u_raw_ptr, u_summary_ptr, seq_state_ptr, valid_ptr, rows, pos, seq, row_ok, lanes,
                   num_experts, seq_len, n_gram, HAS_MASK, REP, WINDOW, ANCHOR)
    v, _ = _pooled(v_raw_ptr, v_summary_ptr, seq_state_ptr, valid_ptr, rows, pos, seq, row_ok, lanes,
                   num_experts, seq_len, n_gram, HAS_MASK, REP, WINDOW, ANCHOR)
    tl.store(partial_ptr + pid * 2, tl.max(tl.max(tl.abs(u), axis=1), axis=0))
    tl.store(partial_ptr + pid * 2 + 1, tl.max(tl.max(tl.abs(v), axis=1), axis=0))


@triton.jit
def _routing_forward_kernel(
    u_raw_ptr, v_raw_ptr, valid_ptr, u_summary_ptr, v_summary_ptr, seq_state_ptr, jitter_ptr, scale_ptr,
    u_ptr, v_ptr, window_count_ptr, probs_ptr, weights_ptr, selected_ptr,
    probs_sum_ptr, selected_sum_ptr, valid_sum_ptr, ties_ptr,
    num_tokens, num_experts, seq_len, n_gram, top_k, max_kept,
    temperature, gamma_routing, theta, tau,
    BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, HAS_MASK: tl.constexpr, HAS_JITTER: tl.constexpr,
    REP: tl.constexpr, WINDOW: tl.constexpr, ANCHOR: tl.constexpr, MAXABS: tl.constexpr,
    SELECTION: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    lanes = tl.arange(0, E_PAD)
    row_ok = rows < num_tokens
    lane_ok = lanes < num_experts
    pos = rows % seq_len
    seq = rows // seq_len
    u, count = _pooled(u_raw_ptr, u_summary_ptr, seq_state_ptr, valid_ptr, rows, pos, seq, row_ok, lanes,
                       num_experts, seq_len, n_gram, HAS_MASK, REP, WINDOW, ANCHOR)
    v, _ = _pooled(v_raw_ptr, v_summary_ptr, seq_state_ptr, valid_ptr, rows, pos, seq, row_ok, lanes,
                   num_experts, seq_len, n_gram, HAS_MASK, REP, WINDOW, ANCHOR)
    _store_rows(u_ptr, u, rows, lanes, row_ok, num_experts)
    _store_rows(v_ptr, v, rows, lanes, row_ok, num_experts)
    if WINDOW:
        tl.store(window_count_ptr + rows, count, mask=row_ok)

    if MAXABS:
        # scale = [u scale, v scale, u max|.|, v max|.|]: the scales are the maxima clamped at eps.
        u_hat = u / tl.load(scale_ptr)
        v_hat = v / tl.load(scale_ptr + 1)
        tile_ok = row_ok[:, None] & lane_ok[None, :]
        u_ties = tl.sum(tl.sum((tile_ok & (tl.abs(u) == tl.load(scale_ptr + 2))).to(tl.float32), axis=1), axis=0)
        v_ties = tl.sum(tl.sum((tile_ok & (tl.abs(v) == tl.load(scale_ptr + 3))).to(tl.float32), axis=1), axis=0)
        tl.store(ties_ptr + pid * 2, u_ties)
        tl.store(ties_ptr + pid * 2 + 1, v_ties)
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
    _store_rows(probs_ptr, probs, rows, lanes, row_ok, num_experts)
    _store_rows(weights_ptr, weights, rows, lanes, row_ok, num_experts)
    _store_rows(selected_ptr, selected.to(tl.int8), rows, lanes, row_ok, num_experts)

    valid = _valid_rows(valid_ptr, rows, row_ok, HAS_MASK)
    tl.store(probs_sum_ptr + pid * E_PAD + lanes, tl.sum(tl.where(valid[:, None], probs, 0.0), axis=0))
    tl.store(selected_sum_ptr + pid * E_PAD + lanes,
             tl.sum(tl.where(valid[:, None], selected, 0), axis=0).to(tl.float32))
    tl.store(valid_sum_ptr + pid, tl.sum(valid.to(tl.float32), axis=0))


@triton.jit
def _routing_backward_kernel(
    dweights_ptr, dprobs_sum_ptr, u_ptr, v_ptr, probs_ptr, weights_ptr, selected_ptr, valid_ptr,
    jitter_ptr, scale_ptr,
    du_ptr, dv_ptr, scale_grad_ptr,
    num_tokens, num_experts, top_k, temperature, gamma_routing, theta, tau,
    BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, HAS_MASK: tl.constexpr, HAS_JITTER: tl.constexpr,
    HAS_DPROBS_SUM: tl.constexpr, MAXABS: tl.constexpr, SELECTION: tl.constexpr,
):
    """Gradients w.r.t. the pooled features (before normalization); for maxabs, per-block partial
    sums of d(u_hat) * u for the gradient of the batch-wide scale."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    lanes = tl.arange(0, E_PAD)
    row_ok = rows < num_tokens
    lane_ok = lanes < num_experts
    probs = _load_rows(probs_ptr, rows, lanes, row_ok, num_experts)
    weights = _load_rows(weights_ptr, rows, lanes, row_ok, num_experts)
    selected = _load_rows(selected_ptr, rows, lanes, row_ok, num_experts).to(tl.int32)
    dweights = _load_rows(dweights_ptr, rows, lanes, row_ok, num_experts)
    dprobs = _mixing_weights_backward(dweights, probs, weights, selected, lanes, lane_ok, top_k, theta, tau, SELECTION)
    if HAS_DPROBS_SUM:
        valid = _valid_rows(valid_ptr, rows, row_ok, HAS_MASK)
        dprobs += tl.where(valid[:, None], tl.load(dprobs_sum_ptr + lanes, mask=lane_ok, other=0.0)[None, :], 0.0)
    dlogits = probs * (dprobs - tl.sum(dprobs * probs, axis=1)[:, None])
    if HAS_JITTER:
        dlogits = dlogits * _load_rows(jitter_ptr, rows, lanes, row_ok, num_experts)
    du_hat = (1.0 - gamma_routing) / temperature * dlogits
    dv_hat = gamma_routing / temperature * dlogits
    u = _load_rows(u_ptr, rows, lanes, row_ok, num_experts)
    v = _load_rows(v_ptr, rows, lanes, row_ok, num_experts)
    if MAXABS:
        du = du_hat / tl.load(scale_ptr)
        dv = dv_hat / tl.load(scale_ptr + 1)
        tl.store(scale_grad_ptr + pid * 2, tl.sum(tl.sum(du_hat * u, axis=1), axis=0))
        tl.store(scale_grad_ptr + pid * 2 + 1, tl.sum(tl.sum(dv_hat * v, axis=1), axis=0))
    else:
        du = _cosine_backward(du_hat, u)
        dv = _cosine_backward(dv_hat, v)
    _store_rows(du_ptr, du, rows, lanes, row_ok, num_experts)
    _store_rows(dv_ptr, dv, rows, lanes, row_ok, num_experts)


@triton.jit
def _cosine_backward(dfeature_hat, feature):
    """Back through feature / max(||feature||, eps): the norm takes gradient only above eps."""
    norm = tl.sqrt(tl.sum(feature * feature, axis=1))
    scale = tl.maximum(norm, _NORM_EPS)
    along = tl.sum(dfeature_hat * feature, axis=1) / (scale * scale * scale)  # scale = norm where it is used
    along = tl.where(norm >= _NORM_EPS, along, 0.0)
    return dfeature_hat / scale[:, None] - along[:, None] * feature


@triton.jit
def _total_grad(dpooled_ptr, pooled_ptr, scale_ptr, rows, lanes, row_ok, num_experts, WHICH: tl.constexpr,
                MAXABS: tl.constexpr):
    """d(pooled features) including, for maxabs, the batch-wide max's share at its arg-max entries.

    scale_ptr (maxabs) = [u scale, v scale, u max, v max, u coefficient, v coefficient]; the
    coefficient is d(max) / (number of tied maxima).
    """
    grad = _load_rows(dpooled_ptr, rows, lanes, row_ok, num_experts)
    if MAXABS:
        pooled = _load_rows(pooled_ptr, rows, lanes, row_ok, num_experts)
        largest = tl.load(scale_ptr + 2 + WHICH)
        coefficient = tl.load(scale_ptr + 4 + WHICH)
        sign = tl.where(pooled > 0, 1.0, tl.where(pooled < 0, -1.0, 0.0))
        grad += tl.where(tl.abs(pooled) == largest, coefficient * sign, 0.0)
    return grad


@triton.jit
def _pooling_backward_kernel(
    dpooled_ptr, pooled_ptr, window_count_ptr, valid_ptr, scale_ptr, draw_ptr,
    num_tokens, num_experts, seq_len, n_gram,
    BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, HAS_MASK: tl.constexpr,
    WINDOW: tl.constexpr, ANCHOR: tl.constexpr, MAXABS: tl.constexpr, WHICH: tl.constexpr,
):
    """Token representations: d(raw features) from d(pooled features), as a gather."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    lanes = tl.arange(0, E_PAD)
    row_ok = rows < num_tokens
    pos = rows % seq_len
    if WINDOW:
        # A valid token s feeds the windows of the valid tokens t = s .. s+n-1 of its sequence.
        total = tl.zeros((BLOCK_T, E_PAD), tl.float32)
        for offset in range(0, n_gram):
            target_ok = _valid_rows(valid_ptr, rows + offset, row_ok & (pos + offset < seq_len), HAS_MASK)
            count = tl.load(window_count_ptr + rows + offset, mask=target_ok, other=1.0)
            grad = _total_grad(dpooled_ptr, pooled_ptr, scale_ptr, rows + offset, lanes, target_ok,
                               num_experts, WHICH, MAXABS)
            total += grad / count[:, None]
        valid = _valid_rows(valid_ptr, rows, row_ok, HAS_MASK)
        own = _total_grad(dpooled_ptr, pooled_ptr, scale_ptr, rows, lanes, row_ok, num_experts, WHICH, MAXABS)
        draw = tl.where(valid[:, None], total, own)
    elif ANCHOR:
        # An anchor (the last position of its group) feeds every token of its group.
        group_start = pos - pos % n_gram
        anchor = tl.minimum(group_start + n_gram - 1, seq_len - 1)
        is_anchor = row_ok & (pos == anchor)
        draw = tl.zeros((BLOCK_T, E_PAD), tl.float32)
        for offset in range(0, n_gram):
            member_ok = is_anchor & (group_start + offset <= anchor)
            draw += _total_grad(dpooled_ptr, pooled_ptr, scale_ptr, rows - pos + group_start + offset, lanes,
                                member_ok, num_experts, WHICH, MAXABS)
    else:
        draw = _total_grad(dpooled_ptr, pooled_ptr, scale_ptr, rows, lanes, row_ok, num_experts, WHICH, MAXABS)
    _store_rows(draw_ptr, draw, rows, lanes, row_ok, num_experts)


@triton.jit
def _sequence_summary_backward_kernel(
    dpooled_ptr, pooled_ptr, valid_ptr, seq_state_ptr, scale_ptr, draw_ptr,
    num_experts, seq_len,
    BLOCK_T: tl.constexpr, E_PAD: tl.constexpr, HAS_MASK: tl.constexpr, REP: tl.constexpr,
    MAXABS: tl.constexpr, WHICH: tl.constexpr,
):
    """rep_mode mean / last: every token of a sequence with a valid token took its summary."""
    seq = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, E_PAD)
    count = tl.load(seq_state_ptr + seq * 2)
    last = tl.load(seq_state_ptr + seq * 2 + 1).to(tl.int64)
    dsummary = tl.zeros((E_PAD,), tl.float32)
    for start in range(0, seq_len, BLOCK_T):
        pos = start + tl.arange(0, BLOCK_T)
        grad = _total_grad(dpooled_ptr, pooled_ptr, scale_ptr, seq * seq_len + pos, lanes, pos < seq_len,
                           num_experts, WHICH, MAXABS)
        dsummary += tl.sum(grad, axis=0)
    for start in range(0, seq_len, BLOCK_T):
        pos = start + tl.arange(0, BLOCK_T)
        rows = seq * seq_len + pos
        row_ok = pos < seq_len
        if REP == 1:
            valid = _valid_rows(valid_ptr, rows, row_ok, HAS_MASK)
            share = tl.where(valid[:, None], (dsummary / tl.maximum(count, 1.0))[None, :], 0.0)
        else:
            share = tl.where((pos == last)[:, None], dsummary[None, :], 0.0)
        if count > 0:
            draw = share
        else:
            draw = _total_grad(dpooled_ptr, pooled_ptr, scale_ptr, rows, lanes, row_ok, num_experts, WHICH, MAXABS)
        _store_rows(draw_ptr, draw, rows, lanes, row_ok, num_experts)


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

    @property
    def lanes(self) -> int:
        return lane_width(self.num_experts)

    @property
    def max_kept(self) -> int:
        return min(2 * self.top_k, self.num_experts)


@dataclass
class RoutingState:
    """What the forward leaves for the backward, as views of three packed tensors whose shapes do not
    depend on the options (so the custom op has one signature):

    - `features` (4, tokens, E) float32: pooled u, pooled v, probs, weights;
    - `selected` (tokens, E) int8: the hard selection (0/1);
    - `extra` (tokens + 2 * sequences + 6,) float32: the window count of each token (window n-gram),
      (valid count, last valid position) of each sequence (mean / last), and for maxabs
      [u scale, v scale, u max, v max, u ties, v ties] (the ties become d(max)/ties in the backward).
    """

    features: torch.Tensor
    selected: torch.Tensor
    extra: torch.Tensor

    @staticmethod
    def allocate(num_tokens: int, num_experts: int, num_seqs: int, device) -> "RoutingState":
        return RoutingState(
            torch.empty(4, num_tokens, num_experts, device=device, dtype=torch.float32),
            torch.empty(num_tokens, num_experts, device=device, dtype=torch.int8),
            torch.zeros(num_tokens + 2 * num_seqs + 6, device=device, dtype=torch.float32),
        )

    @property
    def u(self) -> torch.Tensor:
        return self.features[0]

    @property
    def v(self) -> torch.Tensor:
        return self.features[1]

    @property
    def probs(self) -> torch.Tensor:
        return self.features[2]

    @property
    def weights(self) -> torch.Tensor:
        return self.features[3]

    @property
    def window_count(self) -> torch.Tensor:
        return self.extra[: self.features.shape[1]]

    @property
    def seq_state(self) -> torch.Tensor:
        return self.extra[self.features.shape[1] : -6]

    @property
    def scales(self) -> torch.Tensor:
        return self.extra[-6:]


def routing_forward(u_raw, v_raw, valid, jitter, config: RoutingConfig):
    """Returns (state, probs_sum (E), selection_counts (E), num_valid ())."""
    num_tokens, num_experts = u_raw.shape
    device = u_raw.device
    blocks = routing_blocks(config.lanes)
    num_blocks = triton.cdiv(num_tokens, blocks["BLOCK_T"])
    num_seqs = num_tokens // config.seq_len
    common = dict(E_PAD=config.lanes, HAS_MASK=valid is not None, **blocks)
    valid_arg = valid if valid is not None else u_raw  # unused pointers get any real tensor
    state = RoutingState.allocate(num_tokens, num_experts, num_seqs, device)

    summaries = (u_raw, v_raw)
    if config.rep != 0:
        summaries = (torch.empty(num_seqs, num_experts, device=device, dtype=torch.float32),
                     torch.empty(num_seqs, num_experts, device=device, dtype=torch.float32))
        _sequence_summary_kernel[(num_seqs,)](
            u_raw, v_raw, valid_arg, summaries[0], summaries[1], state.seq_state, num_experts, config.seq_len,
            REP=config.rep, **common,
        )
    pooling = dict(REP=config.rep, WINDOW=config.window, ANCHOR=config.anchor)
    if config.maxabs:
        partial = torch.empty(num_blocks, 2, device=device, dtype=torch.float32)
        _pooled_absmax_kernel[(num_blocks,)](
            u_raw, v_raw, valid_arg, summaries[0], summaries[1], state.seq_state, partial,
            num_tokens, num_experts, config.seq_len, config.n_gram, **pooling, **common,
        )
        largest = partial.amax(dim=0)
        state.scales[:2] = largest.clamp_min(NORM_EPS)
        state.scales[2:4] = largest

    probs_sum = torch.empty(num_blocks, config.lanes, device=device, dtype=torch.float32)
    selected_sum = torch.empty(num_blocks, config.lanes, device=device, dtype=torch.float32)
    valid_sum = torch.empty(num_blocks, device=device, dtype=torch.float32)
    ties = torch.empty(num_blocks, 2, device=device, dtype=torch.float32)
    _routing_forward_kernel[(num_blocks,)](
        u_raw, v_raw, valid_arg, summaries[0], summaries[1], state.seq_state, jitter if jitter is not None else u_raw,
        state.scales, state.u, state.v, state.window_count, state.probs, state.weights, state.selected,
        probs_sum, selected_sum, valid_sum, ties,
        num_tokens, num_experts, config.seq_len, config.n_gram, config.top_k, config.max_kept,
        config.temperature, config.gamma_routing, config.theta, config.tau,
        HAS_JITTER=jitter is not None, MAXABS=config.maxabs, SELECTION=config.selection, **pooling, **common,
    )
    if config.maxabs:
        state.scales[4:] = ties.sum(dim=0)
    return state, probs_sum.sum(dim=0)[:num_experts], selected_sum.sum(dim=0)[:num_experts], valid_sum.sum()


def routing_backward(dweights, dprobs_sum: Optional[torch.Tensor], valid, jitter, state: RoutingState, config: RoutingConfig):
    """Returns (du_raw, dv_raw): gradients w.r.t. base[:, :E] and delta[:, :E]."""
    num_tokens, num_experts = dweights.shape
    blocks = routing_blocks(config.lanes)
    num_blocks = triton.cdiv(num_tokens, blocks["BLOCK_T"])
    common = dict(E_PAD=config.lanes, HAS_MASK=valid is not None, **blocks)
    valid_arg = valid if valid is not None else dweights
    du_pooled = torch.empty_like(dweights)
    dv_pooled = torch.empty_like(dweights)
    scale_grad = torch.empty(num_blocks, 2, device=dweights.device, dtype=torch.float32)
    _routing_backward_kernel[(num_blocks,)](
        dweights, dprobs_sum if dprobs_sum is not None else dweights, state.u, state.v, state.probs,
        state.weights, state.selected, valid_arg, jitter if jitter is not None else dweights, state.scales,
        du_pooled, dv_pooled, scale_grad,
        num_tokens, num_experts, config.top_k, config.temperature, config.gamma_routing, config.theta, config.tau,
        HAS_JITTER=jitter is not None, HAS_DPROBS_SUM=dprobs_sum is not None, MAXABS=config.maxabs,
        SELECTION=config.selection, **common,
    )
    scales = state.scales
    if config.maxabs:
        # d(max) = -sum(d(hat) * pooled) / scale^2 where max >= eps (the clamp passes no gradient
        # below), split between the tied maxima: coefficient = d(max) / ties.
        scales = scales.clone()
        dmax = -scale_grad.sum(dim=0) / scales[:2].square()
        dmax = torch.where(scales[2:4] >= NORM_EPS, dmax, torch.zeros_like(dmax))
        scales[4:] = dmax / scales[4:].clamp_min(1.0)

    draws = []
    for which, (dpooled, pooled) in enumerate(((du_pooled, state.u), (dv_pooled, state.v))):
        draw = torch.empty_like(dpooled)
        if config.rep != 0:
            _sequence_summary_backward_kernel[(num_tokens // config.seq_len,)](
                dpooled, pooled, valid_arg, state.seq_state, scales, draw, num_experts, config.seq_len,
                REP=config.rep, MAXABS=config.maxabs, WHICH=which, **common,
            )
        else:
            _pooling_backward_kernel[(num_blocks,)](
                dpooled, pooled, state.window_count, valid_arg, scales, draw,
                num_tokens, num_experts, config.seq_len, config.n_gram,
                WINDOW=config.window, ANCHOR=config.anchor, MAXABS=config.maxabs, WHICH=which, **common,
            )
        draws.append(draw)
    return draws[0], draws[1]


__all__ = ["REP_CODES", "RoutingConfig", "RoutingState", "routing_backward", "routing_forward", "selection_code"]
