"""The parameter gradients from the backward's partial sums, each summed in a fixed order (split by
split) and written in its parameter's dtype: dB, dLiMEs, dLiME_shared and DoRA's dscale per block of
Dout columns (the pass over dout's per-split partials, plus the routing's contributions to the first E
rows from the input pass's), dA per block of Din columns (the input pass's), d gamma.

Where it runs:
- normally inside the input pass (`projection._input_grad_kernel` with FINISH), so that it costs no
  launch of its own: each program, once its partial sums are stored, arrives at its column block's
  counter; the last of a block's programs to arrive sums that block's dA and a share of the Dout
  blocks. The first column block's programs are the ones that write the routing's partials, so its
  last program takes Dout block 0 (which holds the first E rows) and d gamma. The pass over dout
  zeroes the counters before (stream order), so nothing persists between calls.
- in `_finish_kernel`, its own launch, when there is no input pass (only LiMEs, the shared vector or
  gamma train, nothing upstream of the routing needs a gradient).

Whichever program arrives last, the sums run in the same order: gradients stay bit-for-bit repeatable.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .common import cdiv, dot_width, launch


@triton.jit
def arrive_last(counters_ptr, block, arrivals):
    """Whether this program is the last of `arrivals` to reach `block`'s counter. The barrier puts
    every thread's stores of this program before the (single-thread, acquire-release) atomic that
    publishes them; the last arrival's acquire makes the others' stores visible to it."""
    tl.debug_barrier()
    arrived = tl.atomic_add(counters_ptr + block, 1, sem="acq_rel", scope="gpu")
    return arrived == arrivals - 1


@triton.jit
def zero_counters(counters_ptr, num_counters, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    for start in range(0, num_counters, BLOCK):
        tl.store(counters_ptr + start + offsets, tl.zeros((BLOCK,), tl.int32), mask=start + offsets < num_counters)


@triton.jit
def finish_columns(
    block, partials_ptr, routing_partials_ptr, db_ptr, dp_ptr, dshared_ptr, dscale_ptr, gamma_ptr,
    out_features, rank, num_experts, num_splits, num_routing_splits, scaling,
    BLOCK_N: tl.constexpr, RANK_DOT: tl.constexpr, LANES: tl.constexpr, NEED_B: tl.constexpr, NEED_P: tl.constexpr,
    NEED_SHARED: tl.constexpr, NEED_SCALE: tl.constexpr, ROUTING_PARTIALS: tl.constexpr, HAS_SCALE: tl.constexpr,
):
    """dB, dLiMEs, dLiME_shared, dscale of Dout columns [block * BLOCK_N, +BLOCK_N). The loads bypass
    L1 (`.cg`): the routing's partials may come from other programs of the same launch."""
    ranks = tl.arange(0, RANK_DOT)
    lanes = tl.arange(0, LANES)
    rank_ok = ranks < rank
    lane_ok = lanes < num_experts
    cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < out_features
    width = rank + num_experts + 3
    db = tl.zeros((BLOCK_N, RANK_DOT), tl.float32)
    dp = tl.zeros((BLOCK_N, LANES), tl.float32)
    dcol = tl.zeros((BLOCK_N,), tl.float32)
    dscale_frozen = tl.zeros((BLOCK_N,), tl.float32)
    dscale_modulated = tl.zeros((BLOCK_N,), tl.float32)
    for split in range(0, num_splits):
        base = partials_ptr + split * out_features * width + cols.to(tl.int64) * width
        db += tl.load(base[:, None] + ranks[None, :], mask=col_ok[:, None] & rank_ok[None, :], other=0.0,
                      cache_modifier=".cg")
        dp += tl.load(base[:, None] + rank + lanes[None, :], mask=col_ok[:, None] & lane_ok[None, :], other=0.0,
                      cache_modifier=".cg")
        dcol += tl.load(base + rank + num_experts, mask=col_ok, other=0.0, cache_modifier=".cg")
        if HAS_SCALE:
            dscale_frozen += tl.load(base + rank + num_experts + 1, mask=col_ok, other=0.0, cache_modifier=".cg")
            dscale_modulated += tl.load(base + rank + num_experts + 2, mask=col_ok, other=0.0, cache_modifier=".cg")
    # The routing's contributions through u, v = base'[:, :E], delta'[:, :E].
    routed = cols < num_experts
    routing_db = tl.zeros((BLOCK_N, RANK_DOT), tl.float32)
    routing_dscale = tl.zeros((BLOCK_N,), tl.float32)
    if ROUTING_PARTIALS:
        routing_width = num_experts * rank + num_experts
        for split in range(0, num_routing_splits):
            base = routing_partials_ptr + split * routing_width
            routing_db += tl.load(base + cols[:, None] * rank + ranks[None, :],
                                  mask=routed[:, None] & rank_ok[None, :], other=0.0, cache_modifier=".cg")
            routing_dscale += tl.load(base + num_experts * rank + cols, mask=routed, other=0.0, cache_modifier=".cg")
    if NEED_B:
        tl.store(db_ptr + cols[:, None] * rank + ranks[None, :],
                 (scaling * (db + routing_db)).to(db_ptr.dtype.element_ty), mask=col_ok[:, None] & rank_ok[None, :])
    if NEED_P:
        tl.store(dp_ptr + lanes[None, :] * out_features + cols[:, None], (scaling * dp).to(dp_ptr.dtype.element_ty),
                 mask=col_ok[:, None] & lane_ok[None, :])
    if NEED_SHARED:
        gamma = tl.load(gamma_ptr).to(tl.float32)
        tl.store(dshared_ptr + cols, (gamma * scaling * dcol).to(dshared_ptr.dtype.element_ty), mask=col_ok)
    if NEED_SCALE:
        # d(scale): the frozen product everywhere, the modulation on valid rows (summed with D' = dout,
        # without the scale), and the routed channels' share.
        dscale = dscale_frozen + scaling * dscale_modulated + routing_dscale
        tl.store(dscale_ptr + cols, dscale.to(dscale_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def finish_inputs(block, da_partials_ptr, da_ptr, in_features, rank, num_splits, BLOCK_K: tl.constexpr,
                  RANK_DOT: tl.constexpr):
    """dA of Din columns [block * BLOCK_K, +BLOCK_K) (loads bypass L1, as above)."""
    ranks = tl.arange(0, RANK_DOT)
    inputs = block * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (ranks < rank)[:, None] & (inputs < in_features)[None, :]
    da = tl.zeros((RANK_DOT, BLOCK_K), tl.float32)
    for split in range(0, num_splits):
        da += tl.load(da_partials_ptr + split * rank * in_features + ranks[:, None] * in_features + inputs[None, :],
                      mask=mask, other=0.0, cache_modifier=".cg")
    tl.store(da_ptr + ranks[:, None] * in_features + inputs[None, :], da.to(da_ptr.dtype.element_ty), mask=mask)


@triton.jit
def finish_gamma(dgamma_partials_ptr, dgamma_ptr, num_blocks):
    total = 0.0
    for block in range(0, num_blocks):
        total += tl.load(dgamma_partials_ptr + block)
    tl.store(dgamma_ptr, total.to(dgamma_ptr.dtype.element_ty))


@triton.jit
def _finish_kernel(
    partials_ptr, dgamma_partials_ptr, gamma_ptr, db_ptr, dp_ptr, dshared_ptr, dgamma_ptr, dscale_ptr,
    out_features, rank, num_experts, num_splits, num_dgamma_blocks, scaling,
    BLOCK_N: tl.constexpr, RANK_DOT: tl.constexpr, LANES: tl.constexpr, NEED_B: tl.constexpr, NEED_P: tl.constexpr,
    NEED_SHARED: tl.constexpr, NEED_GAMMA: tl.constexpr, NEED_SCALE: tl.constexpr, HAS_SCALE: tl.constexpr,
):
    """Without an input pass: one block of Dout columns per program; program 0 also d gamma."""
    pid = tl.program_id(0)
    if NEED_B or NEED_P or NEED_SHARED or NEED_SCALE:
        finish_columns(pid, partials_ptr, partials_ptr, db_ptr, dp_ptr, dshared_ptr, dscale_ptr, gamma_ptr,
                       out_features, rank, num_experts, num_splits, 0, scaling, BLOCK_N, RANK_DOT, LANES, NEED_B,
                       NEED_P, NEED_SHARED, NEED_SCALE, False, HAS_SCALE)
    if NEED_GAMMA:
        if pid == 0:
            finish_gamma(dgamma_partials_ptr, dgamma_ptr, num_dgamma_blocks)


# --- host side -------------------------------------------------------------------------------------

# Arrival counters: one per block of input columns of the input pass, whose blocks are at least this wide.
NARROWEST_INPUT_BLOCK = 16


def finish_blocks(rank: int) -> dict:
    """The finishing kernel's block of Dout columns ((BLOCK_N, r) tiles of at most 2,048 values) and warps."""
    return dict(BLOCK_N=max(16, min(64, 2048 // dot_width(rank))), num_warps=4)


def arrival_counters(in_features: int, device) -> torch.Tensor:
    """Counters for the input pass's column blocks (uninitialized: the pass over dout zeroes them)."""
    return torch.empty(max(1, cdiv(in_features, NARROWEST_INPUT_BLOCK)), device=device, dtype=torch.int32)


class ParameterGrads(NamedTuple):
    """The parameter gradients a backward returns (None where not asked for)."""

    A: Optional[torch.Tensor]
    B: Optional[torch.Tensor]
    LiMEs: Optional[torch.Tensor]
    LiME_shared: Optional[torch.Tensor]
    gamma: Optional[torch.Tensor]
    channel_scale: Optional[torch.Tensor]

    def needs(self) -> tuple:
        """Which gradients are asked for (the launchers' plans take these flags)."""
        return tuple(grad is not None for grad in self)


def empty_grads(A, B, LiMEs, LiME_shared, gamma, channel_scale, need_A: bool, need_B: bool, need_P: bool,
                need_shared: bool, need_gamma: bool, need_scale: bool) -> ParameterGrads:
    def grad_like(parameter, need):
        return torch.empty_like(parameter, memory_format=torch.contiguous_format) if need else None

    return ParameterGrads(grad_like(A, need_A), grad_like(B, need_B), grad_like(LiMEs, need_P),
                          grad_like(LiME_shared, need_shared), grad_like(gamma, need_gamma),
                          grad_like(channel_scale, need_scale))


class Finishing(NamedTuple):
    """What the input pass needs to finish the gradients: the pass over dout's partial sums, the
    counters it zeroed, the gradients to write, gamma (for dLiME_shared)."""

    partials: Optional[torch.Tensor]
    dgamma_partials: Optional[torch.Tensor]
    counters: torch.Tensor
    grads: ParameterGrads
    gamma: Optional[torch.Tensor]


@functools.lru_cache(maxsize=1024)
def _finish_plan(out_features: int, rank: int, num_experts: int, needs: tuple, has_scale: bool):
    """(grid, constexpr options) of the finishing kernel; `needs` as `ParameterGrads.needs` (no dA)."""
    _, need_B, need_P, need_shared, need_gamma, need_scale = needs
    blocks = finish_blocks(rank)
    return (cdiv(out_features, blocks["BLOCK_N"]),), dict(
        RANK_DOT=dot_width(rank), LANES=dot_width(num_experts), NEED_B=need_B, NEED_P=need_P, NEED_SHARED=need_shared,
        NEED_GAMMA=need_gamma, NEED_SCALE=need_scale, HAS_SCALE=has_scale, **blocks)


def finish_parameter_grads(partials: Optional[torch.Tensor], dgamma_partials: Optional[torch.Tensor],
                           grads: ParameterGrads, *, gamma, out_features: int, rank: int, num_experts: int,
                           has_scale: bool, scaling: float) -> None:
    """Writes `grads` (dB, dLiMEs, dLiME_shared, dgamma, dscale; no dA: there is no input pass) from
    the pass over dout's partial sums, in one launch."""
    grid, options = _finish_plan(out_features, rank, num_experts, grads.needs(), has_scale)
    # Absent tensors' pointers (never read): one of this call's partial sums.
    placeholder = partials if partials is not None else dgamma_partials

    def arg(tensor):
        return tensor if tensor is not None else placeholder

    launch(
        _finish_kernel, grid,
        arg(partials), arg(dgamma_partials), arg(gamma), arg(grads.B), arg(grads.LiMEs), arg(grads.LiME_shared),
        arg(grads.gamma), arg(grads.channel_scale),
        out_features, rank, num_experts, 0 if partials is None else partials.shape[0],
        0 if dgamma_partials is None else dgamma_partials.shape[0], float(scaling),
        traffic=lambda: ([partials, dgamma_partials], list(grads), 0),
        **options,
    )


__all__ = ["Finishing", "ParameterGrads", "arrival_counters", "empty_grads", "finish_parameter_grads"]
