"""`python -m lime_kernels.cpu`: build (or find built) the C++ routing operators; exit 1 with the reason if they cannot be."""

from . import unavailable_reason

reason = unavailable_reason()
if reason is not None:
    raise SystemExit(f"lime_kernels.cpu: {reason}")
print("lime_kernels.cpu: the C++ routing operators are built and loaded")
