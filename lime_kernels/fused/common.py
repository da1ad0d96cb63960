"""What the fused kernels' launchers share: tile widths, the `tl.dot` precision, the device guard,
and `launch`, the one place every Triton kernel starts from.

`launch` lets the launches be counted and their memory traffic accounted for
(`benchmarks/cost_model.py`, the host-overhead benchmark): each launcher states the bytes its kernel
reads and writes and the FLOPs it does, computed from the tensors it passes, in a `traffic` function
that only a recorder calls (a real call pays nothing for it). Inside `record_launches(execute=False)`
the kernels are not run at all (only recorded).

The launchers' plans (block sizes, grids, splits, constexpr options) are pure functions of the shapes
and options, cached with `functools.lru_cache`: a training step reuses them instead of redoing the
arithmetic on every launch.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch


def cdiv(numerator: int, denominator: int) -> int:
    """Ceiling division on the host (plain Python: `triton.cdiv` costs a JIT dispatch per call)."""
    return -(-numerator // denominator)


def next_power_of_2(size: int) -> int:
    return 1 << max(0, size - 1).bit_length()


def dot_width(size: int) -> int:
    """A `tl.dot` dimension for `size` values: a power of two, at least 16 (padding is masked).
    (One expression: the launchers call it some thirty times per training step.)"""
    return 1 << max(4, (size - 1).bit_length())


def dot_precision(activation_dtype: torch.dtype) -> str:
    """float32 activations get exact float32 products; bf16/fp16 ones (which TF32 holds exactly)
    use TF32 tensor cores, whose rounding of the float32 operands is below the activations' own."""
    return "ieee" if activation_dtype == torch.float32 else "tf32"


def on_device_of(tensor: torch.Tensor):
    """Triton launches on the *current* CUDA device and its current stream: make that the tensor's
    device (a layer on cuda:1 under device_map), keeping the caller's stream on it."""
    if tensor.is_cuda:
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


# --- launches ----------------------------------------------------------------------------------------


class Launch(NamedTuple):
    """One kernel launch: the bytes it moves to and from global memory and its FLOPs. (A named
    tuple: recorded on every launch, and a frozen dataclass takes several times longer to build.)"""

    name: str
    grid: tuple
    bytes_read: int
    bytes_written: int
    flops: int


Traffic = Union[torch.Tensor, int, None]


def traffic_bytes(items: Iterable[Traffic]) -> int:
    """Bytes of the given tensors (their elements, once each) plus explicit byte counts."""
    total = 0
    for item in items:
        if item is not None:
            total += item if type(item) is int else int(item) if isinstance(item, int) else item.nbytes
    return total


def strided_rows_bytes(num_rows: int, row_bytes: int) -> int:
    """Bytes moved when reading `row_bytes` from each of `num_rows` rows far apart: whole 32-byte sectors."""
    return num_rows * cdiv(row_bytes, 32) * 32


class _Recorder:
    def __init__(self, execute: bool, keep: bool):
        self.execute = execute
        self.keep = keep
        self.launches: List[Launch] = []


_recorders: List[_Recorder] = []
_kernels_running = [0]
# Launch options a tuning run may set per kernel (`launch_overrides`): how far loads run ahead of use
# (num_stages), the register limit per thread (maxnreg: spills against occupancy), and how many warps
# share a program (num_warps, which may move a reduction between threads: the tuning run compares the
# results bit for bit). Block sizes are not among them: they shape the grid, the workspace and the
# reductions' order, which the launchers' plans decide.
TUNABLE_OPTIONS = ("num_warps", "num_stages", "maxnreg")
_overrides: Dict[str, dict] = {}
_overridden: List[set] = []


def kernel_name(kernel) -> str:
    """A Triton kernel's function name (the name the profiler shows)."""
    return getattr(kernel, "fn", kernel).__name__


def kernels_execute() -> bool:
    """False while a `record_launches(execute=False)` block is open (launches are only recorded)."""
    return all(recorder.execute for recorder in _recorders)


def kernel_running() -> bool:
    """Whether a Triton kernel is executing (under the interpreter, its own tensor operations are not
    the caller's)."""
    return _kernels_running[0] > 0


@contextlib.contextmanager
def record_launches(execute: bool = True, keep: bool = True):
    """Collect every kernel launch made inside the block (a list of `Launch`); with `execute=False`
    the kernels are not started (for accounting on any device, and host-time measurements); with
    `keep=False` nothing is collected either (a host-time measurement then times only what a real
    call does besides Triton's own launcher)."""
    recorder = _Recorder(execute, keep)
    _recorders.append(recorder)
    try:
        yield recorder.launches
    finally:
        _recorders.remove(recorder)


@contextlib.contextmanager
def launch_overrides(overrides: Dict[str, dict]):
    """Inside the block, the kernels named in `overrides` (`{kernel name: {option: value}}`, options
    from TUNABLE_OPTIONS) launch with those options in place of their launchers'. Yields the set of
    the names that launched with an override, so a caller can tell a name that never launched."""
    for name, options in overrides.items():
        refused = sorted(set(options) - set(TUNABLE_OPTIONS))
        if refused:
            raise ValueError(f"launch_overrides: {name}: cannot override {', '.join(refused)} (tunable: "
                             f"{', '.join(TUNABLE_OPTIONS)}; block sizes are the launchers' to choose)")
    previous = dict(_overrides)
    applied: set = set()
    _overrides.update(overrides)
    _overridden.append(applied)
    try:
        yield applied
    finally:
        _overridden.remove(applied)
        _overrides.clear()
        _overrides.update(previous)


# What a launch moves and computes: (tensors and byte counts read, those written, FLOPs).
TrafficFunction = Callable[[], Tuple[Sequence[Traffic], Sequence[Traffic], int]]


def launch(kernel, grid: Sequence[int], *args, traffic: Optional[TrafficFunction] = None, **options) -> None:
    """Start `kernel` over `grid` (an empty grid starts nothing) and report it to the recorders, with
    what `traffic()` returns (called only when a recorder keeps the launch)."""
    if 0 in grid:
        return
    if _recorders:
        record = None
        execute = True
        for recorder in _recorders:
            if recorder.keep:
                if record is None:
                    reads, writes, flops = traffic() if traffic is not None else ((), (), 0)
                    record = Launch(kernel_name(kernel), tuple(map(int, grid)),
                                    traffic_bytes(reads), traffic_bytes(writes), int(flops))
                recorder.launches.append(record)
            execute = execute and recorder.execute
        if not execute:
            return
    if _overrides:
        name = kernel_name(kernel)
        if name in _overrides:
            options = {**options, **_overrides[name]}
            for applied in _overridden:
                applied.add(name)
    _kernels_running[0] += 1
    try:
        kernel[grid](*args, **options)
    finally:
        _kernels_running[0] -= 1


__all__ = [
    "Launch",
    "TUNABLE_OPTIONS",
    "dot_precision",
    "dot_width",
    "kernel_name",
    "launch",
    "launch_overrides",
    "on_device_of",
    "record_launches",
    "strided_rows_bytes",
    "traffic_bytes",
]

