"""Rank-r projections over the input: the adapter's down projection `z = x A^T`, its weight gradient
`dA = dz^T x`, and the low-rank part of the input gradient `dx += du W[:E] + dz A`.

All accumulate in float32 whatever the activation dtype. `tl.dot` needs every dimension >= 16, so
the rank and the expert count are padded (masked loads) to at least 16.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import dot_precision, dot_width


@triton.jit
def _down_projection_kernel(
    x_ptr, a_ptr, z_ptr,
    num_tokens, in_features, rank,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, RANK_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    """z[m, :rank] = sum_k x[m, k] * A[:rank, k], one block of BLOCK_M tokens per program."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, RANK_DOT)
    row_ok = rows < num_tokens
    acc = tl.zeros((BLOCK_M, RANK_DOT), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < in_features
        x = tl.load(x_ptr + rows[:, None] * in_features + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        a = tl.load(a_ptr + ranks[:, None] * in_features + cols[None, :], mask=(ranks[:, None] < rank) & col_ok[None, :], other=0.0)
        acc = tl.dot(x.to(tl.float32), tl.trans(a.to(tl.float32)), acc, input_precision=PRECISION)
    tl.store(z_ptr + rows[:, None] * rank + ranks[None, :], acc, mask=row_ok[:, None] & (ranks[None, :] < rank))


@triton.jit
def _down_projection_grad_kernel(
    x_ptr, dz_ptr, out_ptr,
    num_tokens, in_features, rank, tokens_per_split,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, RANK_DOT: tl.constexpr, PRECISION: tl.constexpr,
    ATOMIC: tl.constexpr,
):
    """dA[:rank, k] over one split of the tokens: a partial sum per split (or an atomic add)."""
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, RANK_DOT)
    col_ok = cols < in_features
    acc = tl.zeros((RANK_DOT, BLOCK_K), dtype=tl.float32)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, num_tokens)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < end
        dz = tl.load(dz_ptr + rows[:, None] * rank + ranks[None, :], mask=row_ok[:, None] & (ranks[None, :] < rank), other=0.0)
        x = tl.load(x_ptr + rows[:, None] * in_features + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(dz), x.to(tl.float32), acc, input_precision=PRECISION)
    target = ranks[:, None] * in_features + cols[None, :]
    mask = (ranks[:, None] < rank) & col_ok[None, :]
    if ATOMIC:
        tl.atomic_add(out_ptr + target, acc, mask=mask)
    else:
        tl.store(out_ptr + split * rank * in_features + target, acc, mask=mask)


@triton.jit
def _low_rank_input_grad_kernel(
    dx_ptr, du_ptr, w_ptr, dz_ptr, a_ptr,
    num_tokens, in_features, num_experts, rank,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EXPERT_DOT: tl.constexpr, RANK_DOT: tl.constexpr,
    HAS_ROUTED: tl.constexpr, HAS_ADAPTER: tl.constexpr, PRECISION: tl.constexpr,
):
    """dx = du @ W[:E] + dz @ A: the routed channels' and the adapter's paths to the input."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < num_tokens
    col_ok = cols < in_features
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    if HAS_ROUTED:
        experts = tl.arange(0, EXPERT_DOT)
        du = tl.load(du_ptr + rows[:, None] * num_experts + experts[None, :],
                     mask=row_ok[:, None] & (experts[None, :] < num_experts), other=0.0)
        w = tl.load(w_ptr + experts[:, None] * in_features + cols[None, :],
                    mask=(experts[:, None] < num_experts) & col_ok[None, :], other=0.0)
        acc = tl.dot(du, w.to(tl.float32), acc, input_precision=PRECISION)
    if HAS_ADAPTER:
        ranks = tl.arange(0, RANK_DOT)
        dz = tl.load(dz_ptr + rows[:, None] * rank + ranks[None, :], mask=row_ok[:, None] & (ranks[None, :] < rank), other=0.0)
        a = tl.load(a_ptr + ranks[:, None] * in_features + cols[None, :], mask=(ranks[:, None] < rank) & col_ok[None, :], other=0.0)
        acc = tl.dot(dz, a.to(tl.float32), acc, input_precision=PRECISION)
    offsets = rows[:, None] * in_features + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    tl.store(dx_ptr + offsets, acc.to(dx_ptr.dtype.element_ty), mask=mask)


def projection_blocks(width: int) -> dict:
    """Block sizes and warps for a rank (or expert count) padded to `width`: chosen so that no build
    spills registers on sm_80 / sm_90 (see `python -m lime_kernels.compile_check`)."""
    return dict(BLOCK_M=64, BLOCK_K=32, num_warps=4 if width <= 32 else 8)


def down_projection(x: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """`z = x @ A.T` in float32: x `(N, Din)` any float dtype, A `(r, Din)`."""
    num_tokens, in_features = x.shape
    rank = A.shape[0]
    z = torch.empty(num_tokens, rank, device=x.device, dtype=torch.float32)
    blocks = projection_blocks(dot_width(rank))
    grid = (triton.cdiv(num_tokens, blocks["BLOCK_M"]),)
    _down_projection_kernel[grid](
        x, A, z, num_tokens, in_features, rank, RANK_DOT=dot_width(rank), PRECISION=dot_precision(x.dtype), **blocks,
    )
    return z


def down_projection_grad(x: torch.Tensor, dz: torch.Tensor, deterministic: bool) -> torch.Tensor:
    """`dA = dz.T @ x` in float32 `(r, Din)`: per-split partial sums then a sum, or atomics."""
    num_tokens, in_features = x.shape
    rank = dz.shape[1]
    blocks = projection_blocks(dot_width(rank))
    block_m = blocks["BLOCK_M"]
    splits = max(1, min(64, triton.cdiv(num_tokens, 4 * block_m)))
    tokens_per_split = triton.cdiv(triton.cdiv(num_tokens, splits), block_m) * block_m
    splits = triton.cdiv(num_tokens, tokens_per_split)
    if deterministic:
        out = torch.empty(splits, rank, in_features, device=x.device, dtype=torch.float32)
    else:
        out = torch.zeros(rank, in_features, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(in_features, blocks["BLOCK_K"]), splits)
    _down_projection_grad_kernel[grid](
        x, dz, out, num_tokens, in_features, rank, tokens_per_split,
        RANK_DOT=dot_width(rank), PRECISION=dot_precision(x.dtype), ATOMIC=not deterministic, **blocks,
    )
    return out.sum(dim=0) if deterministic else out


def low_rank_input_grad(
    dx: torch.Tensor,
    du: Optional[torch.Tensor],
    weight: torch.Tensor,
    dz: Optional[torch.Tensor],
    A: Optional[torch.Tensor],
) -> torch.Tensor:
    """`dx = du @ weight[:E] + dz @ A`, written into `dx` (its dtype); du or dz may be absent."""
    num_tokens, in_features = dx.shape
    num_experts = du.shape[1] if du is not None else 1
    rank = dz.shape[1] if dz is not None else 1
    blocks = projection_blocks(max(dot_width(num_experts), dot_width(rank)))
    grid = (triton.cdiv(num_tokens, blocks["BLOCK_M"]), triton.cdiv(in_features, blocks["BLOCK_K"]))
    _low_rank_input_grad_kernel[grid](
        dx, du if du is not None else dx, weight, dz if dz is not None else dx, A if A is not None else dx,
        num_tokens, in_features, num_experts, rank,
        EXPERT_DOT=dot_width(num_experts), RANK_DOT=dot_width(rank), HAS_ROUTED=du is not None,
        HAS_ADAPTER=dz is not None, PRECISION=dot_precision(dx.dtype), **blocks,
    )
    return dx
