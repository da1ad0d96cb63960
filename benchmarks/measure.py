"""Timing and memory of one step, the same way for every provider."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict

import torch


def time_ms(step: Callable[[], None], device: torch.device, repeats: int, warmup: int) -> Dict[str, float]:
    """Median, 20th and 80th percentile of `step` in milliseconds over `repeats` runs after `warmup`
    runs: CUDA events on a GPU (L2 cache cleared before each run, as `triton.testing.do_bench` does, so
    small layers are not timed from a warm cache), wall clock on the CPU."""
    for _ in range(warmup):
        step()
    samples = []
    if device.type == "cuda":
        l2_flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        torch.cuda.synchronize()
        for start, end in events:
            l2_flush.zero_()
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        samples = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            samples.append((time.perf_counter() - start) * 1e3)
    deciles = statistics.quantiles(samples, n=10, method="inclusive")
    return {"p50": statistics.median(samples), "p20": deciles[1], "p80": deciles[7]}


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
