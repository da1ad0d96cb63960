"""What one training step of one layer costs each provider, accounted from the code that runs.

    PYTHONPATH=. python -m benchmarks.cost_model [--shapes 7b-q ...] [--measured results.csv] [--out DIR]

For each provider (frozen-linear, lime-fused, peft-lora, moe-lora) and layer shape, one forward and
backward (bf16 activations, the training defaults) runs under `lime_kernels.accounting.account(
compute=False)`: nothing is computed, every ATen operator and Triton launch is recorded with the bytes
it moves and its FLOPs (ATen operators: their tensor inputs and outputs, once each; Triton launches:
what each launcher states from the tensors it passes). Each launch is then given an H100 time:

    time = max(bytes / HBM bandwidth, FLOPs / bf16 dense peak) + a fixed cost per launch

and the provider's step time is their sum. Ratios to frozen-linear and to peft-lora follow; with
`--measured`, the ratios a GPU run of `benchmarks/run.py` (or `benchmarks.gpu_report`) measured are
printed beside them. The model ignores caches (L2 reuse between kernels), overlap between kernels and
GEMM efficiency below peak, so its ratios are a floor for the memory-bound extras: the launch list,
bytes and FLOPs are exact for the code as written.

Also here: `host_overhead`, the host time of a training step with the device work taken away (Triton
kernels not started, tensors tiny), its ATen and Triton launches and its host synchronizations.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from providers import build_layer  # noqa: E402

from lime_kernels.accounting import Account, account  # noqa: E402
from lime_kernels.fused.common import record_launches  # noqa: E402

# H100 SXM: HBM3 bandwidth, dense bf16 tensor-core peak, and a fixed cost per launch (launch latency
# and the tail of a short kernel).
HBM_BYTES_PER_SECOND = 3.35e12
BF16_FLOPS_PER_SECOND = 790e12
LAUNCH_SECONDS = 3e-6

PROVIDERS = ("frozen-linear", "lime-fused", "peft-lora", "moe-lora")
# name: (tokens, in_features, out_features); LLaVA-OneVision-7B's language model (Qwen2-7B) and 0.5B.
SHAPES = {
    "7b-q": (8192, 3584, 3584),
    "7b-kv": (8192, 3584, 512),
    "7b-up": (8192, 3584, 18944),
    "7b-down": (8192, 18944, 3584),
    "0.5b-q": (8192, 896, 896),
    "0.5b-kv": (8192, 896, 128),
}
# (rank, experts): the README's LiME default and a larger setting.
SETTINGS = ((2, 4), (16, 8))


@dataclass(frozen=True)
class Cost:
    provider: str
    shape: str
    rank: int
    experts: int
    launches: int
    bytes_moved: int
    flops: int
    seconds: float
    host_syncs: int


def launch_seconds(bytes_moved: int, flops: int) -> float:
    return max(bytes_moved / HBM_BYTES_PER_SECOND, flops / BF16_FLOPS_PER_SECOND) + LAUNCH_SECONDS


def modelled(recorded: Account) -> tuple:
    """(launches, bytes, FLOPs, seconds) of the launching operators and Triton kernels in `recorded`."""
    items = [(op.bytes_read + op.bytes_written, op.flops) for op in recorded.ops if op.launches]
    items += [(launch.bytes_read + launch.bytes_written, launch.flops) for launch in recorded.launches]
    return (len(items), sum(b for b, _ in items), sum(f for _, f in items),
            sum(launch_seconds(b, f) for b, f in items))


def _forward(layer: nn.Module, x: torch.Tensor):
    """The layer's outputs that take a gradient in training: its output, and LiME's balance terms."""
    out = layer(x)
    stats = getattr(layer, "last_stats", None)
    return [out] if stats is None else [out, stats.importance, stats.kl_uniform]


def _step(layer: nn.Module, x: torch.Tensor, dout: torch.Tensor, balance_grad: torch.Tensor) -> None:
    outputs = _forward(layer, x)
    torch.autograd.backward(outputs, [dout] + [balance_grad] * (len(outputs) - 1))


def account_step(provider: str, tokens: int, d_in: int, d_out: int, rank: int, experts: int) -> Account:
    """The operators and launches of one training step (forward, then backward from a given dout and
    weight 1 on the balance terms), accounted without computing (bf16)."""
    with account(compute=False):
        linear = nn.Linear(d_in, d_out, bias=False, dtype=torch.bfloat16)
        layer = build_layer(provider, linear, rank=rank, experts=experts, n_gram=1)
        x = torch.empty(1, tokens, d_in, dtype=torch.bfloat16, requires_grad=True)
        dout = torch.empty(1, tokens, d_out, dtype=torch.bfloat16)
    with account(compute=False) as forward:
        outputs = _forward(layer, x)
    with account(compute=False):
        grads = [dout] + [torch.ones_like(term) for term in outputs[1:]]
    with account(compute=False) as backward:
        torch.autograd.backward(outputs, grads)
    return Account(forward.ops + backward.ops, forward.launches + backward.launches)


def cost(provider: str, shape: str, rank: int, experts: int) -> Cost:
    tokens, d_in, d_out = SHAPES[shape]
    recorded = account_step(provider, tokens, d_in, d_out, rank, experts)
    launches, bytes_moved, flops, seconds = modelled(recorded)
    return Cost(provider, shape, rank, experts, launches, bytes_moved, flops, seconds, len(recorded.host_syncs))


def host_overhead(provider: str, repeats: int = 200, warmup: int = 20) -> Dict[str, float]:
    """Host time (µs) of one training step with the device work taken away (16 tokens, 64 features,
    Triton kernels not started, one CPU thread), and its launches and host synchronizations (counted);
    and of one decoding call (eval mode, no autograd, one token). The best of `repeats` runs estimates
    the cost on an idle machine (other load only adds to it); the median is reported beside it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _host_overhead(provider, repeats, warmup)
    finally:
        torch.set_num_threads(threads)


def _host_overhead(provider: str, repeats: int, warmup: int) -> Dict[str, float]:
    torch.manual_seed(0)
    with record_launches(execute=False, keep=False):  # no kernel runs: a fused layer is built on any device
        layer = build_layer(provider, nn.Linear(64, 64), rank=2, experts=4, n_gram=1)
    x = torch.randn(1, 16, 64, requires_grad=True)
    dout = torch.randn(1, 16, 64)
    balance_grad = torch.ones(())  # the balance terms' weight, made once as a training loop's loss would
    with record_launches(execute=False), account() as recorded:
        _step(layer, x, dout, balance_grad)
    # Timed without collecting launch records: a real call does not build them.
    with record_launches(execute=False, keep=False):
        for _ in range(warmup):
            _step(layer, x, dout, balance_grad)
        step = _timed(lambda: _step(layer, x, dout, balance_grad), repeats)
        layer.eval()
        token = torch.randn(1, 1, 64)
        with torch.no_grad():
            for _ in range(warmup):
                layer(token)
            decode = _timed(lambda: layer(token), repeats)
    return dict(host_us=step[0], host_us_median=step[1], decode_us=decode[0], decode_us_median=decode[1],
                launches=recorded.kernel_launches, host_syncs=len(recorded.host_syncs))


def _timed(call, repeats: int) -> tuple:
    """(best, median) wall time of `call` in µs over `repeats` runs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    times.sort()
    return 1e6 * times[0], 1e6 * times[len(times) // 2]


def read_measured(path: str) -> Dict[tuple, float]:
    """Measured forward+backward p50 times from a benchmark CSV: {(provider, Din, Dout, tokens, r, E): ms}."""
    measured = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("mode") != "full" or row.get("metric") != "time":
                continue
            dims = row["shape"].split()[-1].split("x")
            key = (row["provider"], int(dims[0]), int(dims[1]), int(row["tokens"]), int(row["rank"]),
                   int(row["experts"]))
            measured[key] = float(row["p50"])
    return measured


def report(shapes: Sequence[str], measured: Optional[Dict[tuple, float]] = None) -> str:
    lines = ["| shape | r, E | provider | launches | GB moved | TFLOP | model µs | / frozen | / peft-lora | "
             "measured / frozen | host syncs |", "|:--|:--|:--|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for shape in shapes:
        tokens, d_in, d_out = SHAPES[shape]
        for rank, experts in SETTINGS:
            costs = {provider: cost(provider, shape, rank, experts) for provider in PROVIDERS}
            for provider, item in costs.items():
                measured_ratio = "-"
                if measured:
                    mine = measured.get((provider, d_in, d_out, tokens, rank, experts))
                    floor = measured.get(("frozen-linear", d_in, d_out, tokens, rank, experts))
                    if mine and floor:
                        measured_ratio = f"{mine / floor:.3f}"
                lines.append(
                    f"| {shape} {tokens}x{d_in}->{d_out} | {rank}, {experts} | {provider} | {item.launches} | "
                    f"{item.bytes_moved / 1e9:.3f} | {item.flops / 1e12:.3f} | {1e6 * item.seconds:.0f} | "
                    f"{item.seconds / costs['frozen-linear'].seconds:.3f} | "
                    f"{item.seconds / costs['peft-lora'].seconds:.3f} | {measured_ratio} | {item.host_syncs} |")
    return "\n".join(lines)


# (tokens, Din, Dout, rank, experts): the largest layer of the 7B model at 64K tokens, then the 7B and 0.5B
# shapes whose workspace share is largest.
WORKSPACE_SHAPES = [(65536, 3584, 18944, 16, 8), (8192, 3584, 3584, 2, 4), (8192, 3584, 512, 2, 4),
                    (8192, 18944, 3584, 16, 8), (8192, 896, 128, 2, 4)]


def backward_workspace(tokens: int, d_in: int, d_out: int, rank: int, experts: int):
    """(bytes the fused backward allocates besides the gradients it returns, bytes of dout, of x),
    accounted without computing anything (kernels and GEMMs not run), bf16 activations."""
    from lime_kernels.fused import fused_lime_linear, fused_statistics
    from lime_kernels.options import RoutingOptions

    x = torch.empty(1, tokens, d_in, dtype=torch.bfloat16).requires_grad_(True)
    weight = torch.empty(d_out, d_in, dtype=torch.bfloat16)
    parameters = [torch.empty(rank, d_in), torch.empty(d_out, rank), torch.empty(experts, d_out), torch.empty(d_out),
                  torch.empty(1)]
    for parameter in parameters:
        parameter.requires_grad_(True)
    A, B, P, shared, gamma = parameters
    with account(compute=False):
        result = fused_lime_linear(x=x, adapter_input=None, weight=weight, bias=None, base=None, A=A, B=B, LiMEs=P,
                                   LiME_shared=shared, gamma=gamma, options=RoutingOptions(num_experts=experts),
                                   scaling=2.0, valid=None, jitter=None)
        stats = fused_statistics(result, "full")
        dout = torch.empty_like(result.out)
    with account(compute=False) as backward:
        torch.autograd.backward((result.out, stats.importance), (dout, torch.ones(())))
    gradients = sum(t.numel() * t.element_size() for t in [x] + parameters)
    return backward.bytes_allocated - gradients, dout.numel() * dout.element_size(), x.numel() * x.element_size()


def workspace_report() -> str:
    lines = ["| tokens x Din -> Dout, r, E | backward workspace | / dout | / x |", "|:--|--:|--:|--:|"]
    for tokens, d_in, d_out, rank, experts in WORKSPACE_SHAPES:
        workspace, dout_bytes, x_bytes = backward_workspace(tokens, d_in, d_out, rank, experts)
        lines.append(f"| {tokens:,} x {d_in:,} -> {d_out:,}, {rank}, {experts} | {workspace / 2**20:.1f} MiB | "
                     f"{100 * workspace / dout_bytes:.2f}% | {100 * workspace / x_bytes:.2f}% |")
    return "\n".join(lines)


def host_report() -> str:
    rows = {provider: host_overhead(provider) for provider in ("frozen-linear", "lime-fused", "peft-lora")}
    floor = rows["frozen-linear"]
    lines = ["| provider | host µs per step (best) | median | best / frozen-linear's | launches | host syncs | "
             "decoding call µs (best) | median | best / frozen-linear's |",
             "|:--|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for provider, row in rows.items():
        lines.append(f"| {provider} | {row['host_us']:.0f} | {row['host_us_median']:.0f} | "
                     f"{row['host_us'] / floor['host_us']:.2f} | {row['launches']} | {row['host_syncs']} | "
                     f"{row['decode_us']:.0f} | {row['decode_us_median']:.0f} | "
                     f"{row['decode_us'] / floor['decode_us']:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cost_model", description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--measured", default=None, help="a results.csv of benchmarks/run.py to compare with")
    parser.add_argument("--out", default=None, help="also write cost_model.md here")
    parser.add_argument("--skip-host", action="store_true", help="leave out the host-overhead measurement")
    args = parser.parse_args(argv)
    measured = read_measured(args.measured) if args.measured else None
    text = "## Modelled H100 cost of one training step (forward + backward) per layer\n\n" + report(args.shapes,
                                                                                               measured)
    text += "\n\n## Fused backward workspace (bf16 activations, accounted)\n\n" + workspace_report()
    if not args.skip_host:
        text += ("\n\n## Host time per training step and per decoding call, device work excluded "
                 "(this machine's CPU)\n\n" + host_report())
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "cost_model.md"), "w") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

