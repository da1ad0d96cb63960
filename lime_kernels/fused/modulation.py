"""The modulated up projection over the `[tokens, Dout]` output: the forward epilogue and the two
backward passes over `dout`.

Per tile, `delta = s z B^T` and `mod = w P + g p_shared` are rebuilt with two `tl.dot`s of width r and
E (never stored), and:
- forward (`modulation_forward`): `out = base' + delta * mod` on valid rows, `base'` on the others,
  written over the frozen GEMM's output (or into a new tensor), with DoRA's scale and bias or
  SliceFine's bias applied to base' in the same pass. Its first program also finishes the routing
  statistics (`routing.finish_statistics`).
- backward, one launch over `dout` (`modulation_backward`) with two kinds of programs:
  - token blocks (`_token_block_backward`): with `D = dout` on valid rows (times DoRA's scale),
    `dz = s (D mod) B` and `dw = s (D delta) P^T` reduced over all of Dout inside one program (no
    partial sums), then the routing backward of those rows (`routing.route_rows_backward`), and per
    block the sum of `s (D delta) p_shared` (for d gamma);
  - column blocks (`_column_block_partials`): `s (D mod)^T z` (dB), `s (D delta)^T w` (dP), the column
    sums of `s D delta` (d p_shared), and DoRA's `sum dout base + s D delta mod / scale`, per split of
    the tokens: a bounded number of partial sums, summed in a fixed order by the input pass's last
    programs (`finish.py`) together with dA's and the routing's partials. Program 0 zeroes the input
    pass's arrival counters, which launches after this pass.
  Neither kind reads what the other writes, so they share the launch: the column programs fill the GPU
  beside the token programs (tokens / 64 of them, under one wave on an H100 at 8,192 tokens).
So every reduction runs in an order fixed by the shape: gradients are bit-for-bit repeatable.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .common import cdiv, dot_precision, dot_width, launch
from .finish import zero_counters
from .projection import token_splits
from .routing import (
    RoutingConfig,
    RoutingState,
    finish_statistics,
    histogram_lanes,
    route_rows_backward,
    valid_rows,
)


@triton.jit
def _delta_and_modulation(z, w, b_ptr, p_ptr, shared_ptr, gamma_ptr, cols, col_ok, ranks, lanes, out_features, rank,
                          num_experts, PRECISION: tl.constexpr, HAS_SHARED: tl.constexpr):
    """A tile's `z B^T` (without the scaling) and `w P + g p_shared`, from z (rows, r) and w (rows, E)."""
    b = tl.load(b_ptr + cols[:, None] * rank + ranks[None, :], mask=col_ok[:, None] & (ranks[None, :] < rank),
                other=0.0).to(tl.float32)
    p = tl.load(p_ptr + lanes[:, None] * out_features + cols[None, :],
                mask=(lanes[:, None] < num_experts) & col_ok[None, :], other=0.0).to(tl.float32)
    delta = tl.dot(z, tl.trans(b), input_precision=PRECISION)
    modulation = tl.dot(w, p, input_precision=PRECISION)
    shared = tl.zeros(cols.shape, tl.float32)
    if HAS_SHARED:
        shared = tl.load(shared_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        modulation += tl.load(gamma_ptr).to(tl.float32) * shared[None, :]
    return delta, modulation, b, p, shared


@triton.jit
def _row_inputs(z_ptr, weights_ptr, rows, row_ok, ranks, lanes, rank, num_experts):
    z = tl.load(z_ptr + rows[:, None] * rank + ranks[None, :], mask=row_ok[:, None] & (ranks[None, :] < rank),
                other=0.0).to(tl.float32)
    w = tl.load(weights_ptr + rows[:, None] * num_experts + lanes[None, :],
                mask=row_ok[:, None] & (lanes[None, :] < num_experts), other=0.0)
    return z, w


@triton.jit
def _modulation_forward_kernel(
    frozen_ptr, out_ptr, z_ptr, b_ptr, p_ptr, shared_ptr, gamma_ptr, valid_ptr, scale_ptr, bias_ptr, weights_ptr,
    stat_partials_ptr, importance_ptr, kl_ptr, stats_ptr, histogram_ptr,
    num_tokens, out_features, rank, num_experts, sliced_rows, num_stat_blocks, stride_frozen, stride_out, scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RANK_DOT: tl.constexpr, LANES: tl.constexpr,
    HIST_LANES: tl.constexpr, PRECISION: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SHARED: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, RANK_DOT)
    lanes = tl.arange(0, LANES)
    row_ok = rows < num_tokens
    col_ok = cols < out_features
    z, w = _row_inputs(z_ptr, weights_ptr, rows, row_ok, ranks, lanes, rank, num_experts)
    delta, modulation, _, _, _ = _delta_and_modulation(z, w, b_ptr, p_ptr, shared_ptr, gamma_ptr, cols, col_ok, ranks,
                                                       lanes, out_features, rank, num_experts, PRECISION, HAS_SHARED)
    delta = scaling * delta
    mask = row_ok[:, None] & col_ok[None, :]
    frozen = tl.load(frozen_ptr + rows[:, None] * stride_frozen + cols[None, :], mask=mask, other=0.0)
    base = frozen.to(tl.float32)
    bias = tl.zeros(cols.shape, tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_SCALE:
        # base' = scale * base + bias, rounded as the reference holds it (launched without FMA contraction).
        scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
        base = base * scale[None, :]
        base = base + bias[None, :]
        base = base.to(frozen.dtype).to(tl.float32)
        delta = delta * scale[None, :]
    else:
        base = tl.where((cols < sliced_rows)[None, :], bias[None, :], base)
    out = base + delta * modulation
    if HAS_MASK:
        valid = tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0
        out = tl.where(valid[:, None], out, base)  # exactly the frozen output: it round-trips
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    if (pid_m == 0) & (pid_n == 0):
        finish_statistics(stat_partials_ptr, num_stat_blocks, importance_ptr, kl_ptr, stats_ptr, histogram_ptr,
                          num_experts, LANES, HIST_LANES)


@triton.jit
def _token_block_backward(
    pid, dout_ptr, z_ptr, b_ptr, p_ptr, shared_ptr, gamma_ptr, valid_ptr, scale_ptr, features_ptr, selected_ptr,
    jitter_ptr, stats_ptr, dimportance_ptr, dkl_ptr, scales_ptr,
    dz_ptr, dpooled_ptr, dgamma_partials_ptr, max_partials_ptr,
    num_tokens, out_features, rank, num_experts, top_k, scaling, temperature, gamma_routing, theta, tau,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RANK_DOT: tl.constexpr, LANES: tl.constexpr,
    PRECISION: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SHARED: tl.constexpr, HAS_SCALE: tl.constexpr,
    ROUTING: tl.constexpr, HAS_JITTER: tl.constexpr, HAS_DIMPORTANCE: tl.constexpr, HAS_DKL: tl.constexpr,
    MAXABS: tl.constexpr, SELECTION: tl.constexpr,
):
    """Token block `pid` over all of Dout: dz, and with ROUTING the gradients w.r.t. the pooled
    routing features (the raw ones when routing is per token)."""
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, RANK_DOT)
    lanes = tl.arange(0, LANES)
    row_ok = rows < num_tokens
    plane = num_tokens * num_experts
    z, w = _row_inputs(z_ptr, features_ptr + 3 * plane, rows, row_ok, ranks, lanes, rank, num_experts)
    active = valid_rows(valid_ptr, rows, row_ok, HAS_MASK)
    dz = tl.zeros((BLOCK_M, RANK_DOT), tl.float32)
    dw = tl.zeros((BLOCK_M, LANES), tl.float32)
    dgamma = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, out_features, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < out_features
        delta, modulation, b, p, shared = _delta_and_modulation(z, w, b_ptr, p_ptr, shared_ptr, gamma_ptr, cols,
                                                                col_ok, ranks, lanes, out_features, rank,
                                                                num_experts, PRECISION, HAS_SHARED)
        d = tl.load(dout_ptr + rows[:, None] * out_features + cols[None, :],
                    mask=active[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        if HAS_SCALE:
            d = d * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
        dz = tl.dot(d * modulation, b, dz, input_precision=PRECISION)
        d_delta = d * delta
        dw = tl.dot(d_delta, tl.trans(p), dw, input_precision=PRECISION)
        if HAS_SHARED:
            dgamma += tl.sum(d_delta * shared[None, :], axis=1)
    dz = scaling * dz
    tl.store(dz_ptr + rows[:, None] * rank + ranks[None, :], dz, mask=row_ok[:, None] & (ranks[None, :] < rank))
    if HAS_SHARED:
        tl.store(dgamma_partials_ptr + pid, scaling * tl.sum(dgamma, axis=0))
    if ROUTING:
        dw = scaling * dw
        lane_ok = lanes < num_experts
        tile = row_ok[:, None] & lane_ok[None, :]
        offsets = rows[:, None] * num_experts + lanes[None, :]
        u = tl.load(features_ptr + offsets, mask=tile, other=0.0)
        v = tl.load(features_ptr + plane + offsets, mask=tile, other=0.0)
        probs = tl.load(features_ptr + 2 * plane + offsets, mask=tile, other=0.0)
        selected = tl.load(selected_ptr + offsets, mask=tile, other=0).to(tl.int32)
        u_scale = 1.0
        v_scale = 1.0
        if MAXABS:
            u_scale = tl.load(scales_ptr)
            v_scale = tl.load(scales_ptr + 1)
        du, dv, u_along, v_along = route_rows_backward(
            dw, stats_ptr, dimportance_ptr, dkl_ptr, active, u, v, probs, w, selected, jitter_ptr, rows, lanes, row_ok,
            num_experts, u_scale, v_scale, top_k, temperature, gamma_routing, theta, tau, HAS_JITTER,
            HAS_DIMPORTANCE, HAS_DKL, MAXABS, SELECTION)
        tl.store(dpooled_ptr + offsets, du, mask=tile)
        tl.store(dpooled_ptr + plane + offsets, dv, mask=tile)
        if MAXABS:
            tl.store(max_partials_ptr + pid * 2, u_along)
            tl.store(max_partials_ptr + pid * 2 + 1, v_along)


@triton.jit
def _column_block_partials(
    pid_n, split, dout_ptr, z_ptr, b_ptr, p_ptr, shared_ptr, gamma_ptr, valid_ptr, scale_ptr, frozen_ptr,
    weights_ptr, partials_ptr,
    num_tokens, out_features, rank, num_experts, tokens_per_split, stride_frozen,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RANK_DOT: tl.constexpr, LANES: tl.constexpr,
    PRECISION: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SHARED: tl.constexpr, HAS_SCALE: tl.constexpr,
):
    """Column block `pid_n` over token split `split`. Partials (splits, Dout, r + E + 3), without the
    scaling: (D mod)^T z | (D delta)^T w | sum D delta | DoRA: sum dout base, sum D' delta mod (D'
    without the scale)."""
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < out_features
    ranks = tl.arange(0, RANK_DOT)
    lanes = tl.arange(0, LANES)
    db = tl.zeros((BLOCK_N, RANK_DOT), tl.float32)
    dp = tl.zeros((BLOCK_N, LANES), tl.float32)
    dcol = tl.zeros((BLOCK_N,), tl.float32)
    dscale_frozen = tl.zeros((BLOCK_N,), tl.float32)
    dscale_modulated = tl.zeros((BLOCK_N,), tl.float32)
    scale = tl.full((BLOCK_N,), 1.0, tl.float32)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, num_tokens)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < end
        z, w = _row_inputs(z_ptr, weights_ptr, rows, row_ok, ranks, lanes, rank, num_experts)
        delta, modulation, _, _, _ = _delta_and_modulation(z, w, b_ptr, p_ptr, shared_ptr, gamma_ptr, cols, col_ok,
                                                           ranks, lanes, out_features, rank, num_experts, PRECISION,
                                                           HAS_SHARED)
        active = valid_rows(valid_ptr, rows, row_ok, HAS_MASK)
        tile = row_ok[:, None] & col_ok[None, :]
        dout = tl.load(dout_ptr + rows[:, None] * out_features + cols[None, :], mask=tile, other=0.0).to(tl.float32)
        d = tl.where(active[:, None], dout, 0.0)
        if HAS_SCALE:
            frozen = tl.load(frozen_ptr + rows[:, None] * stride_frozen + cols[None, :], mask=tile,
                             other=0.0).to(tl.float32)
            dscale_frozen += tl.sum(dout * frozen, axis=0)
            dscale_modulated += tl.sum(d * delta * modulation, axis=0)
            d = d * scale[None, :]
        db = tl.dot(tl.trans(d * modulation), z, db, input_precision=PRECISION)
        d_delta = d * delta
        dp = tl.dot(tl.trans(d_delta), w, dp, input_precision=PRECISION)
        dcol += tl.sum(d_delta, axis=0)
    width = rank + num_experts + 3
    base = partials_ptr + split.to(tl.int64) * out_features * width + cols.to(tl.int64) * width
    tl.store(base[:, None] + ranks[None, :], db, mask=col_ok[:, None] & (ranks[None, :] < rank))
    tl.store(base[:, None] + rank + lanes[None, :], dp, mask=col_ok[:, None] & (lanes[None, :] < num_experts))
    tl.store(base + rank + num_experts, dcol, mask=col_ok)
    if HAS_SCALE:
        tl.store(base + rank + num_experts + 1, dscale_frozen, mask=col_ok)
        tl.store(base + rank + num_experts + 2, dscale_modulated, mask=col_ok)


@triton.jit
def _modulation_backward_kernel(
    dout_ptr, z_ptr, b_ptr, p_ptr, shared_ptr, gamma_ptr, valid_ptr, scale_ptr, frozen_ptr, features_ptr,
    selected_ptr, jitter_ptr, stats_ptr, dimportance_ptr, dkl_ptr, scales_ptr,
    dz_ptr, dpooled_ptr, dgamma_partials_ptr, max_partials_ptr, partials_ptr, counters_ptr,
    num_tokens, out_features, rank, num_experts, top_k, num_token_blocks, column_blocks, tokens_per_split,
    num_counters, stride_frozen, scaling, temperature, gamma_routing, theta, tau,
    ROW_BLOCK_M: tl.constexpr, ROW_BLOCK_N: tl.constexpr, COL_BLOCK_M: tl.constexpr, COL_BLOCK_N: tl.constexpr,
    RANK_DOT: tl.constexpr, LANES: tl.constexpr, PRECISION: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SHARED: tl.constexpr, HAS_SCALE: tl.constexpr, ROUTING: tl.constexpr, HAS_JITTER: tl.constexpr,
    HAS_DIMPORTANCE: tl.constexpr, HAS_DKL: tl.constexpr, MAXABS: tl.constexpr, SELECTION: tl.constexpr,
    PARTIALS: tl.constexpr,
):
    """Both passes over dout in one launch: programs [0, num_token_blocks) take a block of tokens
    each (`_token_block_backward`), the next ones (with PARTIALS) a block of columns over a split of
    the tokens each (`_column_block_partials`). Neither reads what the other writes; the column
    programs fill the GPU beside the few, long token programs."""
    pid = tl.program_id(0)
    if pid == 0:
        zero_counters(counters_ptr, num_counters, 128)
    # The routing weights `w` are the fourth plane of the saved features.
    weights_ptr = features_ptr + 3 * num_tokens * num_experts
    if pid < num_token_blocks:
        _token_block_backward(
            pid, dout_ptr, z_ptr, b_ptr, p_ptr, shared_ptr, gamma_ptr, valid_ptr, scale_ptr, features_ptr,
            selected_ptr, jitter_ptr, stats_ptr, dimportance_ptr, dkl_ptr, scales_ptr,
            dz_ptr, dpooled_ptr, dgamma_partials_ptr, max_partials_ptr,
            num_tokens, out_features, rank, num_experts, top_k, scaling, temperature, gamma_routing, theta, tau,
            ROW_BLOCK_M, ROW_BLOCK_N, RANK_DOT, LANES, PRECISION, HAS_MASK, HAS_SHARED, HAS_SCALE, ROUTING,
            HAS_JITTER, HAS_DIMPORTANCE, HAS_DKL, MAXABS, SELECTION)
    else:
        if PARTIALS:
            column_program = pid - num_token_blocks
            _column_block_partials(
                column_program % column_blocks, column_program // column_blocks, dout_ptr, z_ptr, b_ptr, p_ptr,
                shared_ptr, gamma_ptr, valid_ptr, scale_ptr, frozen_ptr, weights_ptr, partials_ptr,
                num_tokens, out_features, rank, num_experts, tokens_per_split, stride_frozen,
                COL_BLOCK_M, COL_BLOCK_N, RANK_DOT, LANES, PRECISION, HAS_MASK, HAS_SHARED, HAS_SCALE)


# --- launchers -------------------------------------------------------------------------------------

# Tiles and warps: chosen per shape so that no build spills registers on sm_80 / sm_90 (see
# `python -m lime_kernels.compile_check`, which builds what these functions pick). They are
# functions of the shape only, so every reduction's order, and the gradients' bits, repeat.
FORWARD_BLOCKS = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4)


def backward_blocks(rank: int, lanes: int, activation: torch.dtype) -> dict:
    """The pass over dout: ROW_BLOCK_M tokens per token-block program (all of Dout in ROW_BLOCK_N
    steps), COL_BLOCK_N columns per column-block program (its split's tokens in COL_BLOCK_M steps), and
    one num_warps for both roles (they share a launch). Chosen so that no build spills on sm_80 /
    sm_90 under Triton 3.6 and 3.8: the shared kernel takes the larger register need of the two roles,
    and ptxas's allocation of it moves with the tiles in ways only a build shows."""
    if activation == torch.float32:
        return dict(ROW_BLOCK_M=16, ROW_BLOCK_N=32, COL_BLOCK_M=16, COL_BLOCK_N=32, num_warps=4)
    if dot_width(rank) >= 64:
        return dict(ROW_BLOCK_M=16, ROW_BLOCK_N=16, COL_BLOCK_M=32, COL_BLOCK_N=32, num_warps=8)
    if lanes >= 32:
        return dict(ROW_BLOCK_M=16, ROW_BLOCK_N=32, COL_BLOCK_M=16, COL_BLOCK_N=32, num_warps=4)
    return dict(ROW_BLOCK_M=64, ROW_BLOCK_N=32, COL_BLOCK_M=16, COL_BLOCK_N=32, num_warps=8)


@functools.lru_cache(maxsize=1024)
def _forward_plan(num_tokens: int, out_features: int, rank: int, num_experts: int, activation: torch.dtype,
                  has_mask: bool, has_shared: bool, has_scale: bool, has_bias: bool):
    """(grid, constexpr options) of the forward epilogue."""
    grid = (cdiv(num_tokens, FORWARD_BLOCKS["BLOCK_M"]), cdiv(out_features, FORWARD_BLOCKS["BLOCK_N"]))
    return grid, dict(
        RANK_DOT=dot_width(rank), LANES=dot_width(num_experts), HIST_LANES=histogram_lanes(num_experts),
        PRECISION=dot_precision(activation), HAS_MASK=has_mask, HAS_SHARED=has_shared, HAS_SCALE=has_scale,
        HAS_BIAS=has_bias, enable_fp_fusion=False, **FORWARD_BLOCKS)


def modulation_forward(frozen, out, z, B, weights, LiMEs, LiME_shared, gamma, valid, scaling: float,
                       stat_partials, importance, kl_uniform, stats, histogram, channel_scale=None, bias=None,
                       sliced_rows: int = 0) -> None:
    """Writes `out` (which may be `frozen` itself) and finishes the statistics into `importance`,
    `kl_uniform`, `stats`, `histogram`.

    With `channel_scale` (DoRA), `frozen` is the product without bias and base' = `scale * frozen +
    bias`; otherwise its first `sliced_rows` channels become the bias (SliceFine).
    """
    num_tokens, out_features = frozen.shape
    rank, num_experts = z.shape[1], LiMEs.shape[0]
    has_shared = LiME_shared is not None
    grid, options = _forward_plan(num_tokens, out_features, rank, num_experts, frozen.dtype, valid is not None,
                                  has_shared, channel_scale is not None, bias is not None)
    launch(
        _modulation_forward_kernel, grid,
        frozen, out, z, B, LiMEs, LiME_shared if has_shared else LiMEs, gamma if has_shared else LiMEs,
        valid if valid is not None else frozen, channel_scale if channel_scale is not None else LiMEs,
        bias if bias is not None else LiMEs, weights, stat_partials, importance, kl_uniform, stats, histogram,
        num_tokens, out_features, rank, num_experts, int(sliced_rows), stat_partials.shape[0], frozen.stride(0),
        out.stride(0), float(scaling),
        traffic=lambda: ([frozen, z, weights, B, LiMEs, LiME_shared, valid, channel_scale, stat_partials],
                         [out, importance, kl_uniform, stats, histogram],
                         2 * num_tokens * out_features * (rank + num_experts + 1)),
        **options,
    )


class _BackwardPlan(NamedTuple):
    """The pass over dout's grid (token-block programs, then column blocks x splits) and options."""

    token_blocks: int
    column_blocks: int  # 0 without the parameter partials
    splits: int
    tokens_per_split: int
    width: int  # of a partial-sum row: r + E + 3
    options: dict  # constexpr options


@functools.lru_cache(maxsize=1024)
def _backward_plan(num_tokens: int, out_features: int, rank: int, config: RoutingConfig, activation: torch.dtype,
                   routing: bool, partials: bool, has_mask: bool, has_shared: bool, has_scale: bool,
                   has_jitter: bool, has_dimportance: bool, has_dkl: bool, budget_bytes: int) -> _BackwardPlan:
    blocks = backward_blocks(rank, config.lanes, activation)
    token_blocks = cdiv(num_tokens, blocks["ROW_BLOCK_M"])
    width = rank + config.num_experts + 3
    column_blocks = splits = tokens_per_split = 0
    if partials:
        column_blocks = cdiv(out_features, blocks["COL_BLOCK_N"])
        splits = token_splits(num_tokens, column_blocks, blocks["COL_BLOCK_M"], 4 * out_features * width,
                              budget_bytes)
        tokens_per_split = cdiv(cdiv(num_tokens, splits), blocks["COL_BLOCK_M"]) * blocks["COL_BLOCK_M"]
        splits = cdiv(num_tokens, tokens_per_split)
    options = dict(
        RANK_DOT=dot_width(rank), LANES=config.lanes, PRECISION=dot_precision(activation), HAS_MASK=has_mask,
        HAS_SHARED=has_shared, HAS_SCALE=has_scale, ROUTING=routing, HAS_JITTER=has_jitter,
        HAS_DIMPORTANCE=has_dimportance, HAS_DKL=has_dkl, MAXABS=config.maxabs, SELECTION=config.selection,
        PARTIALS=partials, **blocks, **config.kernel_options())
    return _BackwardPlan(token_blocks, column_blocks, splits, tokens_per_split, width, options)


def modulation_backward(dout, z, B, LiMEs, LiME_shared, gamma, valid, channel_scale, frozen, state: RoutingState,
                        jitter, stats, dimportance, dkl, scaling: float, config: RoutingConfig, routing: bool,
                        partials: bool, budget_bytes: int, counters: Optional[torch.Tensor] = None):
    """Both passes over dout, one launch, which also zeroes `counters` (the input pass's). Returns (dz
    (tokens, r), d(pooled features) (2, tokens, E) or None, d gamma partials per token block or None,
    maxabs partial sums per block or None, parameter partial sums (splits, Dout, r + E + 3) for dB,
    dLiMEs, dLiME_shared and DoRA's dscale, or None without `partials`), all float32; dz includes the
    scaling. The partial sums take at most `budget_bytes`; `frozen` is DoRA's frozen product (else None)."""
    num_tokens, out_features = dout.shape
    rank, num_experts = z.shape[1], config.num_experts
    device = dout.device
    has_shared = LiME_shared is not None
    has_scale = channel_scale is not None
    plan = _backward_plan(num_tokens, out_features, rank, config, dout.dtype, routing, partials, valid is not None,
                          has_shared, has_scale, jitter is not None, dimportance is not None, dkl is not None,
                          budget_bytes)
    dz = torch.empty(num_tokens, rank, device=device, dtype=torch.float32)
    dpooled = torch.empty(2, num_tokens, num_experts, device=device, dtype=torch.float32) if routing else None
    dgamma_partials = torch.empty(plan.token_blocks, device=device, dtype=torch.float32) if has_shared else None
    max_partials = (torch.empty(plan.token_blocks, 2, device=device, dtype=torch.float32)
                    if routing and config.maxabs else None)
    parameter_partials = (torch.empty(plan.splits, out_features, plan.width, device=device, dtype=torch.float32)
                          if partials else None)
    # DoRA's frozen product: only the column programs read it.
    dora_frozen = frozen if has_scale and partials else None

    def arg(tensor):  # absent tensors' pointers (never read)
        return tensor if tensor is not None else dz

    launch(
        _modulation_backward_kernel, (plan.token_blocks + plan.column_blocks * plan.splits,),
        dout, z, B, LiMEs, arg(LiME_shared), arg(gamma), arg(valid), arg(channel_scale),
        dout if dora_frozen is None else dora_frozen, state.features, state.selected, arg(jitter), stats,
        arg(dimportance), arg(dkl), state.part("scales"), dz, arg(dpooled), arg(dgamma_partials), arg(max_partials),
        arg(parameter_partials), arg(counters),
        num_tokens, out_features, rank, num_experts, config.top_k, plan.token_blocks, max(plan.column_blocks, 1),
        plan.tokens_per_split, 0 if counters is None else counters.numel(),
        0 if dora_frozen is None else dora_frozen.stride(0), float(scaling),
        # The token programs read dout once, the column programs once more.
        traffic=lambda: ([dout, dout if partials else None, dora_frozen, z,
                          state.features if routing else state.weights, state.selected if routing else None, jitter,
                          valid],
                         [dz, dpooled, dgamma_partials, max_partials, parameter_partials, counters],
                         2 * num_tokens * out_features * 2 * (dot_width(rank) + config.lanes) * (1 + int(partials))),
        **plan.options,
    )
    return dz, dpooled, dgamma_partials, max_partials, parameter_partials


__all__ = ["modulation_backward", "modulation_forward"]
