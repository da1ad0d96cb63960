"""The skinny passes over the input side: forward, one pass over `x` for the adapter's down projection
`z = x A^T` and the routing features; backward, one pass for the input gradient's low-rank part and
`dA = dz^T x`.

Forward (`project`, one program per block of tokens): `z` (float32), then the routed channels of the
frozen output `u = base'[:, :E]` (read from the frozen GEMM's output: DoRA's scale and bias, or
SliceFine's bias, applied here and rounded as the reference holds base') and of the adapter's output
`v = s z B[:E]^T` (times DoRA's scale). With per-token routing the same program routes its rows and
writes the routing state; otherwise it writes `u, v` for the pooling kernels of `routing.py`.

Backward (`input_grads`, programs over (Din blocks, token splits)): with `du, dv` (the routing's
gradients w.r.t. `u, v`) and `dz` (the modulation backward's), `dz_total = dz + s (dv scale) B[:E]`;
the input gradient's low-rank part `du W[:E] + dz_total A` (minus `dout W[:sliced]` for SliceFine's
frozen-out rows), to which the caller adds `dout W` with cuBLAS; `dA` as per-split partial sums; and
the routing's own contributions to `dB[:E]` and DoRA's `dscale[:E]`, also per split.

Every `tl.dot` here multiplies float32 operands: exact float32 for float32 activations, TF32 for
bf16/fp16 ones (`dot_precision`); the small routing products are always exact float32.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .common import cdiv, dot_precision, dot_width, launch, next_power_of_2, strided_rows_bytes
from .finish import Finishing, arrive_last, finish_columns, finish_gamma, finish_inputs
from .routing import RoutingConfig, RoutingState, histogram_lanes, route_rows, routing_rows, store_route, valid_rows


@triton.jit
def routed_frozen(frozen_ptr, scale_ptr, bias_ptr, rows, lanes, row_ok, num_experts, sliced_rows, stride_frozen,
                  HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """u = base'[:, :E] in float32, rounded to the activation dtype as the reference holds base'."""
    lane_ok = lanes < num_experts
    frozen = tl.load(frozen_ptr + rows[:, None] * stride_frozen + lanes[None, :],
                     mask=row_ok[:, None] & lane_ok[None, :], other=0.0)
    head = frozen.to(tl.float32)
    bias = tl.zeros(lanes.shape, tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + lanes, mask=lane_ok, other=0.0).to(tl.float32)
    if HAS_SCALE:
        # Two roundings, as the reference's `scale * base + bias` (launched without FMA contraction).
        head = head * tl.load(scale_ptr + lanes, mask=lane_ok, other=0.0)[None, :]
        head = head + bias[None, :]
        head = head.to(frozen.dtype).to(tl.float32)
    else:
        head = tl.where((lanes < sliced_rows)[None, :], bias[None, :], head)
    return head


@triton.jit
def adapted_features(z, b_ptr, scale_ptr, lanes, ranks, num_experts, rank, scaling, HAS_SCALE: tl.constexpr):
    """v = s z B[:E]^T (times DoRA's scale), exact float32."""
    lane_ok = lanes < num_experts
    b_head = tl.load(b_ptr + lanes[:, None] * rank + ranks[None, :],
                     mask=lane_ok[:, None] & (ranks[None, :] < rank), other=0.0).to(tl.float32)
    v = scaling * tl.dot(z, tl.trans(b_head), input_precision="ieee")
    if HAS_SCALE:
        v = v * tl.load(scale_ptr + lanes, mask=lane_ok, other=0.0)[None, :]
    return v


@triton.jit
def _project_kernel(
    x_ptr, a_ptr, z_in_ptr, b_ptr, frozen_ptr, scale_ptr, bias_ptr, valid_ptr, jitter_ptr,
    z_ptr, raw_ptr, features_ptr, selected_ptr, stats_ptr,
    num_tokens, in_features, rank, num_experts, sliced_rows, top_k, max_kept, stride_x, stride_frozen,
    scaling, temperature, gamma_routing, theta, tau,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, RANK_DOT: tl.constexpr, LANES: tl.constexpr,
    HIST_LANES: tl.constexpr, PRECISION: tl.constexpr, HAS_A: tl.constexpr, HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_JITTER: tl.constexpr, ROUTE: tl.constexpr,
    SELECTION: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    ranks = tl.arange(0, RANK_DOT)
    lanes = tl.arange(0, LANES)
    row_ok = rows < num_tokens
    rank_ok = ranks < rank
    if HAS_A:
        z = tl.zeros((BLOCK_T, RANK_DOT), tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < in_features
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0)
            a = tl.load(a_ptr + ranks[:, None] * in_features + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :],
                        other=0.0)
            z = tl.dot(x.to(tl.float32), tl.trans(a.to(tl.float32)), z, input_precision=PRECISION)
        tl.store(z_ptr + rows[:, None] * rank + ranks[None, :], z, mask=row_ok[:, None] & rank_ok[None, :])
    else:
        z = tl.load(z_in_ptr + rows[:, None] * rank + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :],
                    other=0.0).to(tl.float32)
    u = routed_frozen(frozen_ptr, scale_ptr, bias_ptr, rows, lanes, row_ok, num_experts, sliced_rows, stride_frozen,
                      HAS_SCALE, HAS_BIAS)
    v = adapted_features(z, b_ptr, scale_ptr, lanes, ranks, num_experts, rank, scaling, HAS_SCALE)
    if ROUTE:
        probs, weights, selected = route_rows(u, v, jitter_ptr, rows, lanes, row_ok, num_experts, 1.0, 1.0, top_k,
                                              max_kept, temperature, gamma_routing, theta, tau, HAS_JITTER, False,
                                              SELECTION)
        valid = valid_rows(valid_ptr, rows, row_ok, HAS_MASK)
        store_route(features_ptr, selected_ptr, stats_ptr, pid, u, v, probs, weights, selected, valid, rows, lanes,
                    row_ok, num_tokens, num_experts, HIST_LANES)
    else:
        mask = row_ok[:, None] & (lanes[None, :] < num_experts)
        offsets = rows[:, None] * num_experts + lanes[None, :]
        tl.store(raw_ptr + offsets, u, mask=mask)
        tl.store(raw_ptr + num_tokens * num_experts + offsets, v, mask=mask)


@triton.jit
def _input_grad_kernel(
    dout_ptr, x_ptr, w_ptr, a_ptr, b_ptr, z_ptr, dz_ptr, draw_ptr, scale_ptr, frozen_ptr,
    dx_ptr, dxa_ptr, da_partials_ptr, routing_partials_ptr,
    partials_ptr, dgamma_partials_ptr, gamma_ptr, counters_ptr, da_ptr, db_ptr, dp_ptr, dshared_ptr, dgamma_ptr,
    dscale_ptr,
    num_tokens, in_features, out_features, rank, num_experts, sliced_rows, tokens_per_split,
    stride_x, stride_w_out, stride_w_in, stride_frozen, scaling, num_splits, num_dgamma_blocks,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, RANK_DOT: tl.constexpr, ROUTED_DOT: tl.constexpr,
    LANES: tl.constexpr, PRECISION: tl.constexpr, ROUTED_INTO_DX: tl.constexpr, ADAPTER_INTO_DX: tl.constexpr,
    ADAPTER_GRAD: tl.constexpr, HAS_DA: tl.constexpr, ROUTING_PARTIALS: tl.constexpr, HAS_SCALE: tl.constexpr,
    FINISH: tl.constexpr, FINISH_BLOCK_N: tl.constexpr, NEED_B: tl.constexpr, NEED_P: tl.constexpr,
    NEED_SHARED: tl.constexpr, NEED_GAMMA: tl.constexpr, NEED_SCALE: tl.constexpr,
):
    """Over one block of input columns and one split of the tokens.

    dx (ROUTED_INTO_DX / ADAPTER_INTO_DX) = g W[:routed] + dz_total A, g = du (scaled) on the routed
    channels and -dout on SliceFine's first `sliced_rows`; ADAPTER_GRAD writes dz_total A to dxa (the
    adapter read another input); HAS_DA: dA partial sums over this split's tokens; ROUTING_PARTIALS
    (programs of the first column block): sums of dv z (for dB[:E]) and of du frozen + dv v/scale (for
    DoRA's dscale[:E]) over this split's tokens. FINISH: the last program of each column block to be
    done sums its block's partials into the parameter gradients (`finish.py`; `num_splits` and
    `num_dgamma_blocks` count the pass over dout's partial sums).
    """
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < in_features
    ranks = tl.arange(0, RANK_DOT)
    rank_ok = ranks < rank
    lanes = tl.arange(0, LANES)
    lane_ok = lanes < num_experts
    routed = tl.arange(0, ROUTED_DOT)
    plane = num_tokens * num_experts
    # B[:E] (E, r) and DoRA's scale on the routed channels, for dz_total.
    b_head = tl.load(b_ptr + lanes[:, None] * rank + ranks[None, :], mask=lane_ok[:, None] & rank_ok[None, :],
                     other=0.0).to(tl.float32)
    lane_scale = tl.full((LANES,), 1.0, tl.float32)
    routed_scale = tl.full((ROUTED_DOT,), 1.0, tl.float32)
    if HAS_SCALE:
        lane_scale = tl.load(scale_ptr + lanes, mask=lane_ok, other=0.0)
        routed_scale = tl.load(scale_ptr + routed, mask=routed < num_experts, other=0.0)
    routed_limit = tl.maximum(num_experts, sliced_rows)
    da = tl.zeros((RANK_DOT, BLOCK_K), tl.float32)
    db_head = tl.zeros((LANES, RANK_DOT), tl.float32)
    dscale_head = tl.zeros((LANES,), tl.float32)
    first_columns = pid_k == 0
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, num_tokens)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < end
        dz = tl.load(dz_ptr + rows[:, None] * rank + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :],
                     other=0.0)
        dv = tl.load(draw_ptr + plane + rows[:, None] * num_experts + lanes[None, :],
                     mask=row_ok[:, None] & lane_ok[None, :], other=0.0)
        dz_total = dz + scaling * tl.dot(dv * lane_scale[None, :], b_head, input_precision="ieee")
        if ROUTING_PARTIALS:
            if first_columns:
                z = tl.load(z_ptr + rows[:, None] * rank + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :],
                            other=0.0)
                db_head += tl.dot(tl.trans(dv * lane_scale[None, :]), z, input_precision="ieee")
                if HAS_SCALE:
                    du = tl.load(draw_ptr + rows[:, None] * num_experts + lanes[None, :],
                                 mask=row_ok[:, None] & lane_ok[None, :], other=0.0)
                    frozen = tl.load(frozen_ptr + rows[:, None] * stride_frozen + lanes[None, :],
                                     mask=row_ok[:, None] & lane_ok[None, :], other=0.0).to(tl.float32)
                    v_unscaled = scaling * tl.dot(z, tl.trans(b_head), input_precision="ieee")
                    dscale_head += tl.sum(du * frozen + dv * v_unscaled, axis=0)
        tile_mask = row_ok[:, None] & col_ok[None, :]
        if ROUTED_INTO_DX or ADAPTER_INTO_DX:
            dx = tl.zeros((BLOCK_M, BLOCK_K), tl.float32)
            if ROUTED_INTO_DX:
                du_routed = tl.load(draw_ptr + rows[:, None] * num_experts + routed[None, :],
                                    mask=row_ok[:, None] & (routed[None, :] < num_experts), other=0.0)
                g = du_routed * routed_scale[None, :]
                sliced = (routed < sliced_rows)[None, :]
                dout_head = tl.load(dout_ptr + rows[:, None] * out_features + routed[None, :],
                                    mask=row_ok[:, None] & sliced, other=0.0).to(tl.float32)
                g = tl.where(sliced, -dout_head, g)
                w = tl.load(w_ptr + routed[:, None] * stride_w_out + cols[None, :] * stride_w_in,
                            mask=(routed[:, None] < routed_limit) & col_ok[None, :], other=0.0)
                dx = tl.dot(g, w.to(tl.float32), dx, input_precision=PRECISION)
            if ADAPTER_INTO_DX:
                a = tl.load(a_ptr + ranks[:, None] * in_features + cols[None, :],
                            mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
                dx = tl.dot(dz_total, a.to(tl.float32), dx, input_precision=PRECISION)
            tl.store(dx_ptr + rows[:, None] * in_features + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=tile_mask)
        if ADAPTER_GRAD:
            a = tl.load(a_ptr + ranks[:, None] * in_features + cols[None, :],
                        mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
            dxa = tl.dot(dz_total, a.to(tl.float32), input_precision=PRECISION)
            tl.store(dxa_ptr + rows[:, None] * in_features + cols[None, :], dxa.to(dxa_ptr.dtype.element_ty),
                     mask=tile_mask)
        if HAS_DA:
            x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=tile_mask, other=0.0)
            da = tl.dot(tl.trans(dz_total), x.to(tl.float32), da, input_precision=PRECISION)
    if HAS_DA:
        tl.store(da_partials_ptr + split.to(tl.int64) * rank * in_features + ranks[:, None] * in_features
                 + cols[None, :], da, mask=rank_ok[:, None] & col_ok[None, :])
    if ROUTING_PARTIALS:
        if first_columns:
            # Per split: (E, r) sums of dv z, then E sums for DoRA's dscale.
            width = num_experts * rank + num_experts
            base = routing_partials_ptr + split.to(tl.int64) * width
            tl.store(base + lanes[:, None] * rank + ranks[None, :], db_head, mask=lane_ok[:, None] & rank_ok[None, :])
            tl.store(base + num_experts * rank + lanes, dscale_head, mask=lane_ok)
    if FINISH:
        splits = tl.num_programs(1)
        if arrive_last(counters_ptr, pid_k, splits):
            if HAS_DA:
                finish_inputs(pid_k, da_partials_ptr, da_ptr, in_features, rank, splits, BLOCK_K, RANK_DOT)
            if NEED_B or NEED_P or NEED_SHARED or NEED_SCALE:
                # Dout blocks dealt round the column blocks: block 0, with the routed rows, to column
                # block 0, the one whose programs wrote the routing's partials.
                for block in range(pid_k, tl.cdiv(out_features, FINISH_BLOCK_N), tl.num_programs(0)):
                    finish_columns(block, partials_ptr, routing_partials_ptr, db_ptr, dp_ptr, dshared_ptr, dscale_ptr,
                                   gamma_ptr, out_features, rank, num_experts, num_splits, splits, scaling,
                                   FINISH_BLOCK_N, RANK_DOT, LANES, NEED_B, NEED_P, NEED_SHARED, NEED_SCALE,
                                   ROUTING_PARTIALS, HAS_SCALE)
            if NEED_GAMMA:
                if pid_k == 0:
                    finish_gamma(dgamma_partials_ptr, dgamma_ptr, num_dgamma_blocks)


# --- launchers -------------------------------------------------------------------------------------

def input_grad_blocks(rank: int, routed: int, lanes: int, activation: torch.dtype) -> dict:
    """The input-side backward pass: BLOCK_K input columns per program, a split's tokens in BLOCK_M
    steps, FINISH_BLOCK_N Dout columns per finishing step, and an explicit register limit: no spills
    on sm_80 / sm_90 under Triton 3.6 or 3.8 (compile_check builds what this picks). Without the limit
    ptxas builds some variants at 96-128 registers and spills 40-60 bytes; with 192 a Triton 3.6 build
    still spills, with 255 none does (147-254 registers). 64-column finishing steps spill too."""
    widest = max(dot_width(rank), dot_width(routed))
    if widest >= 128:
        return dict(BLOCK_M=16, BLOCK_K=16, FINISH_BLOCK_N=32, num_warps=8, maxnreg=255)
    if widest >= 64:
        return dict(BLOCK_M=32, BLOCK_K=32, FINISH_BLOCK_N=32, num_warps=8, maxnreg=255)
    return dict(BLOCK_M=16, BLOCK_K=32, FINISH_BLOCK_N=32, num_warps=4, maxnreg=255)


def routes_inline(config: RoutingConfig, rank: int) -> bool:
    """Whether the projection kernel routes its own rows: routing per token, with tiles that fit in
    registers beside the projection's (no spills on sm_80 / sm_90 for these widths)."""
    return config.per_token and (config.lanes == 16 or dot_width(rank) == 16)


def projection_blocks(num_tokens: int, rank: int, config: RoutingConfig, activation: torch.dtype) -> dict:
    """Tokens per program, input columns per step and warps of the forward projection: no spills on
    sm_80 / sm_90 (see `python -m lime_kernels.compile_check`). The column step is fixed by the
    shape, so z's reduction order is too; the token block (which cannot change results) shrinks for
    short inputs so that the GPU still gets many programs, and is the routing block when it routes."""
    rank_dot = dot_width(rank)
    if rank_dot >= 128:
        rows, step, warps = 16, 32, 8
    elif rank_dot == 64:
        rows, step, warps = 32, 32, 4
    else:
        rows, step, warps = 64, 32 if activation == torch.float32 or config.lanes >= 32 else 64, 4
    if routes_inline(config, rank):
        rows = min(rows, routing_rows(config.lanes))
    else:
        rows = min(rows, max(16, next_power_of_2(cdiv(num_tokens, 256))))
    return dict(BLOCK_T=rows, BLOCK_K=step, num_warps=warps)


@functools.lru_cache(maxsize=1024)
def routing_block_rows(num_tokens: int, rank: int, config: RoutingConfig, activation: torch.dtype) -> int:
    """Tokens per block of whichever kernel routes (and writes the per-block partial statistics)."""
    if routes_inline(config, rank):
        return projection_blocks(num_tokens, rank, config, activation)["BLOCK_T"]
    return routing_rows(config.lanes)


@functools.lru_cache(maxsize=1024)
def _project_plan(num_tokens: int, rank: int, config: RoutingConfig, activation: torch.dtype, has_a: bool,
                  has_scale: bool, has_bias: bool, has_mask: bool, has_jitter: bool):
    """(grid, routes inline, constexpr options) of the projection."""
    blocks = projection_blocks(num_tokens, rank, config, activation)
    route = routes_inline(config, rank)
    return (cdiv(num_tokens, blocks["BLOCK_T"]),), route, dict(
        RANK_DOT=dot_width(rank), LANES=config.lanes, HIST_LANES=histogram_lanes(config.num_experts),
        PRECISION=dot_precision(activation), HAS_A=has_a, HAS_SCALE=has_scale, HAS_BIAS=has_bias,
        HAS_MASK=has_mask, HAS_JITTER=has_jitter, ROUTE=route, SELECTION=config.selection, enable_fp_fusion=False,
        **blocks, **config.kernel_options())


def project(x: Optional[torch.Tensor], A: Optional[torch.Tensor], z_given: Optional[torch.Tensor], B: torch.Tensor,
            frozen: torch.Tensor, channel_scale, bias, sliced_rows: int, valid, jitter, state: RoutingState,
            stat_partials: torch.Tensor, scaling: float, config: RoutingConfig):
    """Returns (z (tokens, r) float32, raw features (2, tokens, E) or None when routed here)."""
    num_tokens = frozen.shape[0]
    rank = B.shape[1]
    num_experts = config.num_experts
    device = frozen.device
    has_a = z_given is None
    grid, route, options = _project_plan(num_tokens, rank, config, x.dtype if has_a else frozen.dtype, has_a,
                                         channel_scale is not None, bias is not None, valid is not None,
                                         jitter is not None)
    z = torch.empty(num_tokens, rank, device=device, dtype=torch.float32) if has_a else z_given
    raw = None if route else torch.empty(2, num_tokens, num_experts, device=device, dtype=torch.float32)
    in_features = x.shape[1] if has_a else 0
    any_tensor = frozen
    launch(
        _project_kernel, grid,
        x if has_a else any_tensor, A if has_a else any_tensor, any_tensor if has_a else z_given, B, frozen,
        channel_scale if channel_scale is not None else any_tensor, bias if bias is not None else any_tensor,
        valid if valid is not None else any_tensor, jitter if jitter is not None else any_tensor,
        z, raw if raw is not None else any_tensor, state.features, state.selected, stat_partials,
        num_tokens, in_features, rank, num_experts, sliced_rows, config.top_k, config.max_kept,
        x.stride(0) if has_a else 0, frozen.stride(0), float(scaling),
        traffic=lambda: ([x if has_a else z_given, A, num_experts * rank * B.element_size(), valid, jitter,
                          strided_rows_bytes(num_tokens, num_experts * frozen.element_size())],
                         [z if has_a else None, raw] + ([state.features, state.selected, stat_partials] if route
                                                        else []),
                         2 * num_tokens * in_features * rank),
        **options,
    )
    return z, raw


def token_splits(num_tokens: int, column_blocks: int, block_m: int, partial_bytes_per_split: int,
                 budget_bytes: int) -> int:
    """How many token splits reduce a [tokens, ...] pass into per-split partial sums: enough programs
    to fill a large GPU (~512 with the column blocks), at least 4 blocks of tokens per split, and
    partial sums within `budget_bytes`. A function of the shape only, so results are repeatable."""
    by_occupancy = cdiv(512, max(1, column_blocks))
    by_length = max(1, num_tokens // (4 * block_m))
    by_memory = max(1, budget_bytes // max(1, partial_bytes_per_split))
    return max(1, min(by_occupancy, by_length, by_memory))


@functools.lru_cache(maxsize=1024)
def _input_grad_plan(num_tokens: int, in_features: int, rank: int, num_experts: int, routed_width: int,
                     activation: torch.dtype, routed_into_dx: bool, adapter_into_dx: bool, adapter_grad: bool,
                     has_scale: bool, needs: Optional[tuple], budget_bytes: int):
    """(grid, tokens per split, constexpr options) of the input-gradient kernel; `needs`: which
    parameter gradients it finishes (`ParameterGrads.needs`), or None."""
    need_A, need_B, need_P, need_shared, need_gamma, need_scale = needs if needs is not None else (False,) * 6
    routing_partials = need_B or need_scale
    blocks = input_grad_blocks(rank, routed_width, dot_width(num_experts), activation)
    writes_columns = routed_into_dx or adapter_grad or need_A
    column_blocks = cdiv(in_features, blocks["BLOCK_K"]) if writes_columns else 1
    splits = token_splits(num_tokens, column_blocks, blocks["BLOCK_M"], 4 * (rank * in_features + num_experts * rank
                                                                           + num_experts), budget_bytes)
    tokens_per_split = cdiv(cdiv(num_tokens, splits), blocks["BLOCK_M"]) * blocks["BLOCK_M"]
    return (column_blocks, cdiv(num_tokens, tokens_per_split)), tokens_per_split, dict(
        RANK_DOT=dot_width(rank), ROUTED_DOT=dot_width(routed_width), LANES=dot_width(num_experts),
        PRECISION=dot_precision(activation), ROUTED_INTO_DX=routed_into_dx,
        ADAPTER_INTO_DX=routed_into_dx and adapter_into_dx, ADAPTER_GRAD=adapter_grad, HAS_DA=need_A,
        ROUTING_PARTIALS=routing_partials, HAS_SCALE=has_scale, FINISH=needs is not None, NEED_B=need_B,
        NEED_P=need_P, NEED_SHARED=need_shared, NEED_GAMMA=need_gamma, NEED_SCALE=need_scale, **blocks)


def input_grads(dout, x_adapter, weight, A, B, z, dz, draw, channel_scale, frozen, sliced_rows: int,
                scaling: float, *, routed_into_dx: Optional[torch.Tensor], adapter_into_dx: bool,
                adapter_grad: Optional[torch.Tensor], finishing: Optional[Finishing], budget_bytes: int) -> None:
    """Runs `_input_grad_kernel`: writes `routed_into_dx` (the dx to write, or None), `adapter_grad`
    (the adapter input's gradient, or None) and, with `finishing`, the parameter gradients in
    `finishing.grads` (its dA from this pass's partial sums, the others from the pass over dout's)."""
    num_tokens, rank = dz.shape
    num_experts = draw.shape[2]
    out_features = dout.shape[1]
    # Without an input (prompt tuning: z given) only the routing's partial sums are computed.
    in_features = x_adapter.shape[1] if x_adapter is not None else weight.shape[1] if weight is not None else 0
    device = dz.device
    activation = (routed_into_dx if routed_into_dx is not None else
                  adapter_grad if adapter_grad is not None else x_adapter if x_adapter is not None else dout).dtype
    routed_width = max(num_experts, sliced_rows)
    grads = finishing.grads if finishing is not None else None
    needs = grads.needs() if grads is not None else None
    grid, tokens_per_split, options = _input_grad_plan(
        num_tokens, in_features, rank, num_experts, routed_width, activation, routed_into_dx is not None,
        adapter_into_dx, adapter_grad is not None, channel_scale is not None, needs, budget_bytes)
    splits = grid[1]
    need_A = options["HAS_DA"]
    da_partials = torch.empty(splits, rank, in_features, device=device, dtype=torch.float32) if need_A else None
    routing_out = (torch.empty(splits, num_experts * rank + num_experts, device=device, dtype=torch.float32)
                   if options["ROUTING_PARTIALS"] else None)
    if finishing is not None and grid[0] > finishing.counters.numel():
        raise ValueError(f"input_grads: {grid[0]} column blocks but {finishing.counters.numel()} arrival counters")
    any_tensor = dz

    def arg(tensor):
        return tensor if tensor is not None else any_tensor

    partials, dgamma_partials = (finishing.partials, finishing.dgamma_partials) if finishing else (None, None)
    w = arg(weight)
    launch(
        _input_grad_kernel, grid,
        dout, arg(x_adapter), w, arg(A), B, z, dz, draw, arg(channel_scale), arg(frozen), arg(routed_into_dx),
        arg(adapter_grad), arg(da_partials), arg(routing_out),
        arg(partials), arg(dgamma_partials), arg(finishing.gamma if finishing else None),
        arg(finishing.counters if finishing else None), *(arg(grad) for grad in (grads or (None,) * 6)),
        num_tokens, in_features, out_features, rank, num_experts, sliced_rows, tokens_per_split,
        x_adapter.stride(0) if x_adapter is not None else 0, w.stride(0) if weight is not None else 0,
        w.stride(1) if weight is not None else 0, frozen.stride(0) if frozen is not None else 0, float(scaling),
        0 if partials is None else partials.shape[0], 0 if dgamma_partials is None else dgamma_partials.shape[0],
        # The finishing programs read back this launch's partial sums and the pass over dout's.
        traffic=lambda: (
            [dz, draw, x_adapter if need_A else None, z if routing_out is not None else None,
             strided_rows_bytes(num_tokens, sliced_rows * dout.element_size()) if sliced_rows else None,
             routed_width * in_features * weight.element_size()
             if weight is not None and routed_into_dx is not None else None,
             da_partials, routing_out, partials, dgamma_partials],
            [routed_into_dx, adapter_grad, da_partials, routing_out, *(grads or ())],
            2 * num_tokens * in_features * (rank * (int(adapter_into_dx) + int(adapter_grad is not None) + int(need_A))
                                            + routed_width * int(routed_into_dx is not None))),
        **options,
    )


__all__ = ["input_grads", "project", "projection_blocks", "routes_inline", "routing_block_rows", "token_splits"]
