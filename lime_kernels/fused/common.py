"""Small helpers shared by the fused kernels' launchers."""

from __future__ import annotations

import torch
import triton


def dot_width(size: int) -> int:
    """A `tl.dot` dimension for `size` values: a power of two, at least 16 (padding is masked)."""
    return max(16, triton.next_power_of_2(size))


def lane_width(size: int) -> int:
    """A register-tile width for `size` values (experts): a power of two, at least 2."""
    return max(2, triton.next_power_of_2(size))


def dot_precision(activation_dtype: torch.dtype) -> str:
    """float32 activations get exact float32 products; bf16/fp16 ones (which TF32 holds exactly)
    use TF32 tensor cores, whose rounding of the float32 operands is below the activations' own."""
    return "ieee" if activation_dtype == torch.float32 else "tf32"
