"""Timing and memory of one step, the same way for every provider."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch


def _timed_calls(calls: Sequence[Callable[[], None]], device: torch.device) -> List[float]:
    """Milliseconds of each of `calls`, run in order: CUDA events on a GPU (L2 cache cleared before each
    call, as `triton.testing.do_bench` does, so small layers are not timed from a warm cache), wall clock
    on the CPU."""
    if device.type == "cuda":
        l2_flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in calls]
        torch.cuda.synchronize()
        for call, (start, end) in zip(calls, events):
            l2_flush.zero_()
            start.record()
            call()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]
    samples = []
    for call in calls:
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def _percentiles(samples: List[float]) -> Dict[str, float]:
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return {"p50": statistics.median(samples), "p20": deciles[1], "p80": deciles[7]}


def time_ms(step: Callable[[], None], device: torch.device, repeats: int, warmup: int) -> Dict[str, float]:
    """Median, 20th and 80th percentile of `step` in milliseconds over `repeats` runs after `warmup`
    runs, each timed by `_timed_calls` (CUDA events after an L2 flush on a GPU, wall clock on the CPU)."""
    for _ in range(warmup):
        step()
    return _percentiles(_timed_calls([step] * repeats, device))


def interleaved_ms(steps: Dict[str, Callable[[], None]], device: torch.device, rounds: int,
                   warmup: int) -> Dict[str, Dict[str, float]]:
    """`time_ms` of each of `steps` (by name), measured together: `warmup` untimed rounds, then `rounds`
    rounds that each run every step once, each run timed as `time_ms` times it.

    Timed one after another, each step would see the machine as it was in its own minutes: on a shared
    machine the speed drifts (by 20% between minutes on a busy CPU host) and the drift would go into the
    ratios between the steps, which are what a comparison of providers reports. Interleaved, every step
    meets the same drift. Round i starts at step i (mod the number of steps), so that no step always runs
    first, right after the previous round's last one."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    order = [names[(first + offset) % len(names)] for first in range(rounds) for offset in range(len(names))]
    samples: Dict[str, List[float]] = {name: [] for name in names}
    for name, sample in zip(order, _timed_calls([steps[name] for name in order], device)):
        samples[name].append(sample)
    return {name: _percentiles(samples[name]) for name in names}


def peak_memory_mib(step: Callable[[], None], device: torch.device) -> float:
    """Peak CUDA memory allocated by `step` beyond what was allocated before it (NaN on the CPU,
    where PyTorch keeps no such counter: read `saved_mib` there)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def saved_mib(forward: Callable[[], torch.Tensor]) -> float:
    """MiB of the tensors autograd saves for backward during `forward` (distinct storages): the
    activation memory a training step holds, on any device."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(storages.values()) / 2**20
