"""Layer benchmark: one LiME layer (fused on CUDA, reference) against the frozen linear (the floor)
and HF PEFT's LoRA.

Forward+backward time (median and 20th/80th percentiles) and, on CUDA, peak memory, measured in
one process on one device, written as CSV rows. Ratios to `frozen-linear` are what to read.

    python benchmarks/layer.py --device cpu --tokens 512 --d-in 1024 --d-out 1024 --out results.csv
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from lime_kernels import LiMELinear


def _time(step: Callable[[], None], device: torch.device, repeats: int, warmup: int) -> List[float]:
    for _ in range(warmup):
        step()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            step()
            samples.append((time.perf_counter() - begin) * 1e3)
    return samples


def providers(d_in: int, d_out: int, rank: int, experts: int, n_gram: int, dtype, device) -> Dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    linear = torch.nn.Linear(d_in, d_out, dtype=dtype, device=device).requires_grad_(False)
    def lime(backend):
        layer = LiMELinear(linear, num_experts=experts, rank=rank, n_gram=n_gram, auto_topk=True, backend=backend)
        with torch.no_grad():
            layer.B.normal_(0, 0.02)  # B = 0 at init would make the routing degenerate
        return layer.train()

    config = LoraConfig(r=rank, lora_alpha=16, target_modules=["linear"])
    lora = PeftLoraLinear(linear, "default", config, r=rank, lora_alpha=16).to(device).train()
    chosen = {"frozen-linear": linear}
    if device.type == "cuda":
        chosen["lime-fused"] = lime("triton")
    chosen.update({"lime-reference": lime("reference"), "peft-lora": lora})
    return chosen


def measure(args) -> List[Dict]:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    rows = []
    for name, module in providers(args.d_in, args.d_out, args.rank, args.experts, args.n_gram, dtype, device).items():
        x = torch.randn(args.batch, args.tokens // args.batch, args.d_in, dtype=dtype, device=device, requires_grad=True)
        grad = torch.randn(args.batch, args.tokens // args.batch, args.d_out, dtype=dtype, device=device)

        def step():
            module(x).backward(grad)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        samples = sorted(_time(step, device, args.repeats, args.warmup))
        quantiles = statistics.quantiles(samples, n=10)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
        rows.append(dict(
            provider=name, mode="forward+backward", tokens=args.tokens, d_in=args.d_in, d_out=args.d_out,
            rank=args.rank, experts=args.experts, n_gram=args.n_gram, dtype=args.dtype, device=str(device),
            p50_ms=statistics.median(samples), p20_ms=quantiles[1], p80_ms=quantiles[7], peak_mib=peak,
            torch=torch.__version__,
        ))
    floor = rows[0]["p50_ms"]
    for row in rows:
        row["ratio_to_frozen"] = row["p50_ms"] / floor
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--d-in", type=int, default=1024)
    parser.add_argument("--d-out", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--n-gram", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None, help="CSV file to write (default: print only)")
    args = parser.parse_args(argv)
    if args.tokens % args.batch:
        parser.error(f"--tokens ({args.tokens}) must be a multiple of --batch ({args.batch})")
    rows = measure(args)
    writer = csv.DictWriter(open(args.out, "w", newline="") if args.out else sys.stdout, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    for row in rows:
        print(f"{row['provider']:>15}: p50 {row['p50_ms']:8.3f} ms  x{row['ratio_to_frozen']:.2f} of frozen-linear", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
