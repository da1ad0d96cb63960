"""The modulated up projection: one pass over the `[tokens, Dout]` output, forward and backward.

Forward (in place over the frozen output): `out = base + (s * z B^T) * (w P + g p_shared)` on valid
rows, `out = base` on the others. The `[tokens, Dout]` delta and modulation are rebuilt per tile
from `z (tokens, r)` and `w (tokens, E)` with rank-r and rank-E multiply-adds, never stored.
(`tl.dot` would need r and E padded to 16; at r = 2 and E = 4 the multiply-adds do 6 steps, not 32.)

Backward: one pass over `dout`, rebuilding the same tiles, gives per-tile partial sums of
`dz`, `dw` (reduced over Dout) and of `dB`, `dP`, `sum_n d(mod)` (reduced over tokens); a sum
over the tiles finishes them (deterministic), or atomics accumulate them directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl



@triton.jit
def _delta_and_modulation(z_ptr, b_ptr, w_ptr, p_ptr, shared_ptr, gamma_ptr, rows, cols, row_ok, col_ok,
                          out_features, rank, num_experts, scaling, HAS_SHARED: tl.constexpr):
    # Runtime loops over the rank and the experts: unrolling them (static_range) compiles for
    # minutes at rank 128 and buys little, each step being a full-tile multiply-add anyway.
    delta = tl.zeros((rows.shape[0], cols.shape[0]), tl.float32)
    for k in range(0, rank):
        z_k = tl.load(z_ptr + rows * rank + k, mask=row_ok, other=0.0)
        b_k = tl.load(b_ptr + cols * rank + k, mask=col_ok, other=0.0).to(tl.float32)
        delta += z_k[:, None] * b_k[None, :]
    modulation = tl.zeros((rows.shape[0], cols.shape[0]), tl.float32)
    for e in range(0, num_experts):
        w_e = tl.load(w_ptr + rows * num_experts + e, mask=row_ok, other=0.0)
        p_e = tl.load(p_ptr + e * out_features + cols, mask=col_ok, other=0.0).to(tl.float32)
        modulation += w_e[:, None] * p_e[None, :]
    if HAS_SHARED:
        shared = tl.load(shared_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        modulation += tl.load(gamma_ptr).to(tl.float32) * shared[None, :]
    return scaling * delta, modulation


@triton.jit
def _modulation_forward_kernel(
    base_ptr, out_ptr, z_ptr, b_ptr, w_ptr, p_ptr, shared_ptr, gamma_ptr, valid_ptr,
    num_tokens, out_features, rank, num_experts, scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SHARED: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_tokens
    col_ok = cols < out_features
    delta, modulation = _delta_and_modulation(z_ptr, b_ptr, w_ptr, p_ptr, shared_ptr, gamma_ptr, rows, cols,
                                              row_ok, col_ok, out_features, rank, num_experts, scaling, HAS_SHARED)
    offsets = rows[:, None] * out_features + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    base = tl.load(base_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    out = base + delta * modulation
    if HAS_MASK:
        valid = tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0
        out = tl.where(valid[:, None], out, base)  # exactly the frozen output: base round-trips
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _modulation_backward_kernel(
    dout_ptr, z_ptr, b_ptr, w_ptr, p_ptr, shared_ptr, gamma_ptr, valid_ptr,
    dz_ptr, dw_ptr, db_ptr, dp_ptr, dcol_ptr,
    num_tokens, out_features, rank, num_experts, scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SHARED: tl.constexpr,
    INPUT_GRADS: tl.constexpr, PARAM_GRADS: tl.constexpr, ATOMIC: tl.constexpr,
):
    """Partial sums of one (token block, channel block) tile.

    INPUT_GRADS: dz (tokens, r) and dw (tokens, E), reduced over this tile's channels, at
    [channel block] (deterministic) or accumulated atomically. PARAM_GRADS: dB (Dout, r), dP (E, Dout)
    and dcol (Dout,) = sum over tokens of d(mod), reduced over this tile's tokens, at [token block].
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_tokens
    col_ok = cols < out_features
    delta, modulation = _delta_and_modulation(z_ptr, b_ptr, w_ptr, p_ptr, shared_ptr, gamma_ptr, rows, cols,
                                              row_ok, col_ok, out_features, rank, num_experts, scaling, HAS_SHARED)
    active = row_ok
    if HAS_MASK:
        active = active & (tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0)
    dout = tl.load(dout_ptr + rows[:, None] * out_features + cols[None, :],
                   mask=active[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    ddelta = dout * modulation
    dmodulation = dout * delta

    if INPUT_GRADS:
        if ATOMIC:
            dz_base = dz_ptr
            dw_base = dw_ptr
        else:
            dz_base = dz_ptr + pid_n.to(tl.int64) * num_tokens * rank
            dw_base = dw_ptr + pid_n.to(tl.int64) * num_tokens * num_experts
        for k in range(0, rank):
            b_k = tl.load(b_ptr + cols * rank + k, mask=col_ok, other=0.0).to(tl.float32)
            dz_k = scaling * tl.sum(ddelta * b_k[None, :], axis=1)
            if ATOMIC:
                tl.atomic_add(dz_base + rows * rank + k, dz_k, mask=row_ok)
            else:
                tl.store(dz_base + rows * rank + k, dz_k, mask=row_ok)
        for e in range(0, num_experts):
            p_e = tl.load(p_ptr + e * out_features + cols, mask=col_ok, other=0.0).to(tl.float32)
            dw_e = tl.sum(dmodulation * p_e[None, :], axis=1)
            if ATOMIC:
                tl.atomic_add(dw_base + rows * num_experts + e, dw_e, mask=row_ok)
            else:
                tl.store(dw_base + rows * num_experts + e, dw_e, mask=row_ok)
    if PARAM_GRADS:
        if ATOMIC:
            db_base = db_ptr
            dp_base = dp_ptr
            dcol_base = dcol_ptr
        else:
            db_base = db_ptr + pid_m.to(tl.int64) * out_features * rank
            dp_base = dp_ptr + pid_m.to(tl.int64) * num_experts * out_features
            dcol_base = dcol_ptr + pid_m.to(tl.int64) * out_features
        for k in range(0, rank):
            z_k = tl.load(z_ptr + rows * rank + k, mask=row_ok, other=0.0)
            db_k = scaling * tl.sum(ddelta * z_k[:, None], axis=0)
            if ATOMIC:
                tl.atomic_add(db_base + cols * rank + k, db_k, mask=col_ok)
            else:
                tl.store(db_base + cols * rank + k, db_k, mask=col_ok)
        for e in range(0, num_experts):
            w_e = tl.load(w_ptr + rows * num_experts + e, mask=row_ok, other=0.0)
            dp_e = tl.sum(dmodulation * w_e[:, None], axis=0)
            if ATOMIC:
                tl.atomic_add(dp_base + e * out_features + cols, dp_e, mask=col_ok)
            else:
                tl.store(dp_base + e * out_features + cols, dp_e, mask=col_ok)
        dcol = tl.sum(dmodulation, axis=0)
        if ATOMIC:
            tl.atomic_add(dcol_base + cols, dcol, mask=col_ok)
        else:
            tl.store(dcol_base + cols, dcol, mask=col_ok)


# Tile and warps chosen so that no build spills registers on sm_80 / sm_90 (compile_check).
BLOCKS = dict(BLOCK_M=64, BLOCK_N=64, num_warps=8)


def modulation_forward(base, z, B, weights, LiMEs, LiME_shared, gamma, valid, scaling: float) -> torch.Tensor:
    """Writes `out` over `base` (which the caller owns) and returns it."""
    num_tokens, out_features = base.shape
    rank, num_experts = z.shape[1], weights.shape[1]
    grid = (triton.cdiv(num_tokens, BLOCKS["BLOCK_M"]), triton.cdiv(out_features, BLOCKS["BLOCK_N"]))
    has_shared = LiME_shared is not None
    _modulation_forward_kernel[grid](
        base, base, z, B, weights, LiMEs, LiME_shared if has_shared else LiMEs, gamma if has_shared else LiMEs,
        valid if valid is not None else base,
        num_tokens, out_features, rank, num_experts, float(scaling),
        HAS_MASK=valid is not None, HAS_SHARED=has_shared, **BLOCKS,
    )
    return base


def modulation_backward(
    dout, z, B, weights, LiMEs, LiME_shared, gamma, valid, scaling: float,
    input_grads: bool, param_grads: bool, deterministic: bool,
):
    """Returns (dz, dweights, dB, dLiMEs, dcol) in float32; dz and dB include the scaling, dcol is
    the sum over valid tokens of d(mod) (so dLiME_shared = gamma * dcol, dgamma = dcol . p_shared).
    Entries not asked for are None."""
    num_tokens, out_features = dout.shape
    rank, num_experts = z.shape[1], weights.shape[1]
    row_blocks, col_blocks = triton.cdiv(num_tokens, BLOCKS["BLOCK_M"]), triton.cdiv(out_features, BLOCKS["BLOCK_N"])
    device = dout.device

    def buffer(*shape, blocks):
        if deterministic:
            return torch.empty(blocks, *shape, device=device, dtype=torch.float32)
        return torch.zeros(*shape, device=device, dtype=torch.float32)

    dz = buffer(num_tokens, rank, blocks=col_blocks) if input_grads else None
    dw = buffer(num_tokens, num_experts, blocks=col_blocks) if input_grads else None
    dB = buffer(out_features, rank, blocks=row_blocks) if param_grads else None
    dP = buffer(num_experts, out_features, blocks=row_blocks) if param_grads else None
    dcol = buffer(out_features, blocks=row_blocks) if param_grads else None
    has_shared = LiME_shared is not None
    placeholder = z
    _modulation_backward_kernel[(row_blocks, col_blocks)](
        dout, z, B, weights, LiMEs, LiME_shared if has_shared else LiMEs, gamma if has_shared else LiMEs,
        valid if valid is not None else dout,
        *(t if t is not None else placeholder for t in (dz, dw, dB, dP, dcol)),
        num_tokens, out_features, rank, num_experts, float(scaling),
        HAS_MASK=valid is not None, HAS_SHARED=has_shared, INPUT_GRADS=input_grads, PARAM_GRADS=param_grads,
        ATOMIC=not deterministic, **BLOCKS,
    )
    if deterministic:
        dz, dw, dB, dP, dcol = (t.sum(dim=0) if t is not None else None for t in (dz, dw, dB, dP, dcol))
    return dz, dw, dB, dP, dcol
