"""How the fused path is compared with the reference path: one relative error per tensor and its bound
per activation dtype. Shared by `tests/test_fused.py` and `benchmarks/gpu_report.py`, so the native
parity smoke on a GPU applies exactly the bounds the test suite does."""

from __future__ import annotations

import torch

# Relative error bounds: float32 is compared entry by entry (max |diff| / max |reference|); bf16 and
# fp16 by norms, since a near-tie can flip one token's hard choice after a rounding difference.
TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def relative_error(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, floor: float = 1e-6) -> float:
    """The error `assert_close` bounds by `TOLERANCE[dtype]`; `dtype` is the activation dtype the two
    were computed in. `floor`: the smallest scale errors are relative to (1 for the statistics:
    importance and KL are small differences of O(1) terms, so their error is absolute)."""
    if dtype not in TOLERANCE:
        raise ValueError(f"dtype must be one of {sorted(map(str, TOLERANCE))}; got dtype={dtype}")
    actual, expected = actual.double(), expected.double()
    if dtype == torch.float32:
        error = (actual - expected).abs().max() / expected.abs().max().clamp_min(floor)
    else:
        error = (actual - expected).norm() / expected.norm().clamp_min(floor)
    return error.item()


def assert_close(name: str, actual, expected, dtype: torch.dtype, floor: float = 1e-6) -> None:
    """Raises an AssertionError naming `name`, the error, its bound and the worst entry when `actual`
    (fused) is missing, differs in shape or dtype, or is further from `expected` (reference) than
    `TOLERANCE[dtype]` (a NaN error fails)."""
    assert actual is not None and expected is not None, f"{name}: a gradient is missing"
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, f"{name}: {actual.shape}/{actual.dtype}"
    error = relative_error(actual, expected, dtype, floor)
    if not error <= TOLERANCE[dtype]:  # NaN fails too
        difference = (actual.double() - expected.double()).abs()
        worst = difference.argmax()
        raise AssertionError(
            f"{name}: relative error {error:.2e} > {TOLERANCE[dtype]:.0e}; worst at flat index {worst.item()}: "
            f"fused {actual.flatten()[worst].item():.6e}, reference {expected.flatten()[worst].item():.6e}"
        )
