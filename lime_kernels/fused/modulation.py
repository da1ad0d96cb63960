"""The modulated up projection: one pass over the `[tokens, Dout]` output, forward and backward.

Forward (in place over the frozen output, or into a new tensor): `out = base + (s * z B^T) *
(w P + g p_shared)` on valid rows, `out = base` on the others; DoRA's per-channel scale and the
bias, or SliceFine's sliced channels, enter the frozen output `base` in the same pass. The `[tokens, Dout]` delta and modulation are rebuilt per tile
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
def _frozen_tile(base_ptr, scale_ptr, bias_ptr, offsets, mask, cols, col_ok, sliced_rows,
                 OUT_DTYPE: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The frozen output base' of a tile, in float32 but rounded to the output dtype as the
    reference holds it: DoRA's `scale * base + bias`, or SliceFine's bias on its first channels."""
    frozen = tl.load(base_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        frozen = frozen * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
        if HAS_BIAS:
            frozen += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        frozen = frozen.to(OUT_DTYPE).to(tl.float32)
    else:
        kept = tl.zeros((cols.shape[0],), tl.float32)
        if HAS_BIAS:
            kept = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        frozen = tl.where((cols < sliced_rows)[None, :], kept[None, :], frozen)
    return frozen


@triton.jit
def _modulation_forward_kernel(
    base_ptr, out_ptr, z_ptr, b_ptr, w_ptr, p_ptr, shared_ptr, gamma_ptr, valid_ptr, scale_ptr, bias_ptr,
    num_tokens, out_features, rank, num_experts, sliced_rows, scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SHARED: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_tokens
    col_ok = cols < out_features
    delta, modulation = _delta_and_modulation(z_ptr, b_ptr, w_ptr, p_ptr, shared_ptr, gamma_ptr, rows, cols,
                                              row_ok, col_ok, out_features, rank, num_experts, scaling, HAS_SHARED)
    if HAS_SCALE:
        delta = delta * tl.load(scale_ptr + cols, mask=col_ok, other=0.0)[None, :]
    offsets = rows[:, None] * out_features + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    frozen = _frozen_tile(base_ptr, scale_ptr, bias_ptr, offsets, mask, cols, col_ok, sliced_rows,
                          out_ptr.dtype.element_ty, HAS_SCALE, HAS_BIAS)
    out = frozen + delta * modulation
    if HAS_MASK:
        valid = tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0
        out = tl.where(valid[:, None], out, frozen)  # exactly the frozen output: it round-trips
    tl.store(out_ptr + offsets, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _modulation_backward_kernel(
    dout_ptr, z_ptr, b_ptr, w_ptr, p_ptr, shared_ptr, gamma_ptr, valid_ptr, scale_ptr, base_ptr,
    dz_ptr, dw_ptr, db_ptr, dp_ptr, dcol_ptr, dscale_ptr,
    num_tokens, out_features, rank, num_experts, scaling,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SHARED: tl.constexpr,
    HAS_SCALE: tl.constexpr, INPUT_GRADS: tl.constexpr, PARAM_GRADS: tl.constexpr, ATOMIC: tl.constexpr,
):
    """Partial sums of one (token block, channel block) tile.

    INPUT_GRADS: dz (tokens, r) and dw (tokens, E), reduced over this tile's channels, at
    [channel block] (deterministic) or accumulated atomically. PARAM_GRADS: dB (Dout, r), dP (E, Dout),
    dcol (Dout,) = sum over tokens of d(mod), and with DoRA's scale dscale (Dout,), reduced over this
    tile's tokens, at [token block].
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < num_tokens
    col_ok = cols < out_features
    delta, modulation = _delta_and_modulation(z_ptr, b_ptr, w_ptr, p_ptr, shared_ptr, gamma_ptr, rows, cols,
                                              row_ok, col_ok, out_features, rank, num_experts, scaling, HAS_SHARED)
    offsets = rows[:, None] * out_features + cols[None, :]
    active = row_ok
    if HAS_MASK:
        active = active & (tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0)
    dout = tl.load(dout_ptr + offsets, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    dout_valid = tl.where(active[:, None], dout, 0.0)
    if HAS_SCALE:
        # out = scale * (base + delta * mod) + bias on valid rows, scale * base + bias elsewhere.
        scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
        ddelta = dout_valid * modulation * scale[None, :]
        dmodulation = dout_valid * delta * scale[None, :]
    else:
        ddelta = dout_valid * modulation
        dmodulation = dout_valid * delta

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
            dscale_base = dscale_ptr
        else:
            db_base = db_ptr + pid_m.to(tl.int64) * out_features * rank
            dp_base = dp_ptr + pid_m.to(tl.int64) * num_experts * out_features
            dcol_base = dcol_ptr + pid_m.to(tl.int64) * out_features
            dscale_base = dscale_ptr + pid_m.to(tl.int64) * out_features
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
        if HAS_SCALE:
            base = tl.load(base_ptr + offsets, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            dscale = tl.sum(dout * base + dout_valid * delta * modulation, axis=0)
            if ATOMIC:
                tl.atomic_add(dscale_base + cols, dscale, mask=col_ok)
            else:
                tl.store(dscale_base + cols, dscale, mask=col_ok)


# Tiles and warps chosen so that no build spills registers on sm_80 / sm_90 (compile_check).
FORWARD_BLOCKS = dict(BLOCK_M=32, BLOCK_N=64, num_warps=4)
BACKWARD_BLOCKS = dict(BLOCK_M=64, BLOCK_N=64, num_warps=8)


def modulation_forward(base, out, z, B, weights, LiMEs, LiME_shared, gamma, valid, scaling: float,
                       channel_scale=None, bias=None, sliced_rows: int = 0) -> torch.Tensor:
    """Writes `out` (which may be `base` itself) from the frozen output `base`; returns `out`.

    With `channel_scale` (DoRA), `base` is the product without bias and the frozen output is
    `scale * base + bias`; otherwise its first `sliced_rows` channels become the bias (SliceFine).
    """
    num_tokens, out_features = base.shape
    rank, num_experts = z.shape[1], weights.shape[1]
    grid = (triton.cdiv(num_tokens, FORWARD_BLOCKS["BLOCK_M"]), triton.cdiv(out_features, FORWARD_BLOCKS["BLOCK_N"]))
    has_shared = LiME_shared is not None
    _modulation_forward_kernel[grid](
        base, out, z, B, weights, LiMEs, LiME_shared if has_shared else LiMEs, gamma if has_shared else LiMEs,
        valid if valid is not None else base, channel_scale if channel_scale is not None else LiMEs,
        bias if bias is not None else LiMEs,
        num_tokens, out_features, rank, num_experts, int(sliced_rows), float(scaling),
        HAS_MASK=valid is not None, HAS_SHARED=has_shared, HAS_SCALE=channel_scale is not None,
        HAS_BIAS=bias is not None, **FORWARD_BLOCKS,
    )
    return out


def modulation_backward(
    dout, z, B, weights, LiMEs, LiME_shared, gamma, valid, scaling: float,
    input_grads: bool, param_grads: bool, deterministic: bool, channel_scale=None, base=None,
):
    """Returns (dz, dweights, dB, dLiMEs, dcol, dscale) in float32; dz and dB include the scaling,
    dcol is the sum over valid tokens of d(mod) (dLiME_shared = gamma * dcol, dgamma = dcol . p_shared),
    dscale (with DoRA's `channel_scale`; `base` is then the saved product without bias) covers the
    modulated output. Entries not asked for are None."""
    num_tokens, out_features = dout.shape
    rank, num_experts = z.shape[1], weights.shape[1]
    row_blocks = triton.cdiv(num_tokens, BACKWARD_BLOCKS["BLOCK_M"])
    col_blocks = triton.cdiv(out_features, BACKWARD_BLOCKS["BLOCK_N"])
    device = dout.device
    has_scale = channel_scale is not None

    def buffer(*shape, blocks):
        if deterministic:
            return torch.empty(blocks, *shape, device=device, dtype=torch.float32)
        return torch.zeros(*shape, device=device, dtype=torch.float32)

    dz = buffer(num_tokens, rank, blocks=col_blocks) if input_grads else None
    dw = buffer(num_tokens, num_experts, blocks=col_blocks) if input_grads else None
    dB = buffer(out_features, rank, blocks=row_blocks) if param_grads else None
    dP = buffer(num_experts, out_features, blocks=row_blocks) if param_grads else None
    dcol = buffer(out_features, blocks=row_blocks) if param_grads else None
    dscale = buffer(out_features, blocks=row_blocks) if param_grads and has_scale else None
    has_shared = LiME_shared is not None
    placeholder = z
    _modulation_backward_kernel[(row_blocks, col_blocks)](
        dout, z, B, weights, LiMEs, LiME_shared if has_shared else LiMEs, gamma if has_shared else LiMEs,
        valid if valid is not None else dout, channel_scale if has_scale else LiMEs,
        base if has_scale else dout,
        *(t if t is not None else placeholder for t in (dz, dw, dB, dP, dcol, dscale)),
        num_tokens, out_features, rank, num_experts, float(scaling),
        HAS_MASK=valid is not None, HAS_SHARED=has_shared, HAS_SCALE=has_scale, INPUT_GRADS=input_grads,
        PARAM_GRADS=param_grads, ATOMIC=not deterministic, **BACKWARD_BLOCKS,
    )
    if deterministic:
        return tuple(t.sum(dim=0) if t is not None else None for t in (dz, dw, dB, dP, dcol, dscale))
    return dz, dw, dB, dP, dcol, dscale
