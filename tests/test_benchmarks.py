"""The benchmarks run on the CPU from a fresh clone: CSV, plots, summary, and the pytest-benchmark file."""

import csv
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_cpu_benchmark_writes_the_csv_the_plots_and_the_summary(tmp_path):
    out = tmp_path / "results"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--quick", "--device", "cpu",
                             "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(out / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for column in ("benchmark", "provider", "mode", "metric", "unit", "shape", "tokens", "rank", "experts", "p50",
                   "p20", "p80", "device", "torch", "triton", "commit"):
        assert column in rows[0]
    providers = {r["provider"] for r in rows}
    assert providers == {"frozen-linear", "lime-cpu", "lime-reference", "peft-lora", "moe-lora"}, "no lime-fused on the CPU"
    times = [r for r in rows if r["metric"] == "time"]
    assert {r["mode"] for r in times} == {"forward", "backward", "full"}
    assert all(float(r["p20"]) <= float(r["p50"]) <= float(r["p80"]) for r in times)
    assert {r["benchmark"] for r in rows} == {"projections", "grid", "train-step", "decode", "generate"}
    generate = {(r["provider"], r["mode"]): float(r["p50"]) for r in rows if r["benchmark"] == "generate"}
    assert set(generate) == {(p, m) for p in providers for m in ("eager", "compiled")} and min(generate.values()) > 0
    steps = {(r["provider"], r["mode"], r["metric"]): float(r["p50"]) for r in rows if r["benchmark"] == "train-step"}
    for provider in providers - {"frozen-linear"}:
        assert steps[provider, "eager", "samples_per_second"] > 0 and steps[provider, "compiled", "samples_per_second"] > 0
        assert steps[provider, "eager", "operators_forward"] > 0 and steps[provider, "eager", "operators_backward"] > 0
        assert steps[provider, "compiled", "graph_breaks"] == 0, provider
    layer_operators = {(r["provider"], r["mode"]) for r in rows if r["metric"] == "operators"}
    assert layer_operators == {(p, m) for p in providers for m in ("forward", "backward")}
    assert {int(r["tokens"]) for r in rows if r["benchmark"] == "decode"} == {1, 16}
    assert (out / "projections.png").read_bytes()[:4] == b"\x89PNG" and (out / "grid.png").exists()
    summary = (out / "summary.md").read_text()
    assert "time / frozen-linear" in summary and "| lime-reference |" in summary and "samples/s" in summary
    assert "## Decode-sized calls" in summary and "## Generation" in summary
    assert "compiled samples/s" in summary and "graph breaks" in summary and "operators, forward + backward" in summary
    assert summary in result.stdout, "the summary is printed last"
    assert "Not run here: lime-fused: needs a CUDA device." in summary


def test_run_writes_each_row_to_the_csv_as_it_is_measured(tmp_path, monkeypatch):
    """A run stopped after its layer sweeps has their rows on disk already."""
    import pytest

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import run as bench

    tiny = dict(shapes=[("tiny", 16, 24)], tokens=[8], ranks=[2], experts=[4], n_grams=[1])
    monkeypatch.setattr(bench, "plan", lambda quick, device: dict(projections=tiny, grid=tiny, repeats=2, warmup=1))

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "train_step_sweep", stopped)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--device", "cpu", "--out", str(tmp_path)])
    with open(tmp_path / "results.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    providers = {"frozen-linear", "lime-cpu", "lime-reference", "peft-lora", "moe-lora"}
    assert {(r["benchmark"], r["provider"]) for r in rows} == {(b, p) for b in ("projections", "grid") for p in providers}
    assert len(rows) == 2 * len(providers) * 8 and not (tmp_path / "summary.md").exists()


def test_interleaved_timing_runs_every_step_once_a_round_from_a_rotating_start(monkeypatch):
    """`interleaved_ms` warms every step up untimed, then runs `rounds` rounds of every step once, round i
    starting at step i, and gives each step the percentiles of its own timed runs. The steps run on a fake
    clock: a warm-up run takes 1 s, a timed run of step k takes k ms more in each round."""
    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import measure

    clock, calls = [0.0], []

    def step(name, milliseconds):
        def run():
            calls.append(name)
            timed_runs = calls[2 * 3:].count(name)  # after two warm-up rounds of three steps
            clock[0] += milliseconds * timed_runs / 1e3 if timed_runs else 1.0
        return run

    monkeypatch.setattr(measure.time, "perf_counter", lambda: clock[0])
    timings = measure.interleaved_ms({"a": step("a", 1), "b": step("b", 2), "c": step("c", 3)},
                                     torch.device("cpu"), rounds=5, warmup=2)
    assert calls[:6] == ["a", "b", "c", "a", "b", "c"]
    rounds = [calls[6 + 3 * i:9 + 3 * i] for i in range(5)]
    assert len(calls) == 6 + 3 * 5 and all(sorted(one) == ["a", "b", "c"] for one in rounds)
    assert [one[0] for one in rounds] == ["a", "b", "c", "a", "b"]
    # step k's timed runs took k, 2k, ..., 5k ms: median 3k, 20th and 80th percentiles 1.8k and 4.2k
    for name, k in (("a", 1), ("b", 2), ("c", 3)):
        assert timings[name] == pytest.approx({"p50": 3 * k, "p20": 1.8 * k, "p80": 4.2 * k})
    assert set(timings) == {"a", "b", "c"}


def test_pytest_benchmark_file_runs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                             os.path.join(ROOT, "benchmarks", "test_layers.py")], capture_output=True, text=True,
                            cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "10 passed" in result.stdout  # 5 providers (no lime-fused on the CPU) x 2 n-gram sizes


def test_moe_lora_baseline_equals_a_per_token_loop():
    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from moe_lora import MoELoRALinear

    torch.manual_seed(0)
    layer = MoELoRALinear(torch.nn.Linear(12, 10), num_experts=4, rank=3, alpha=6.0, top_k=2)
    with torch.no_grad():
        layer.B.normal_()
    x = torch.randn(2, 5, 12)
    expected = torch.empty(2, 5, 10)
    for b in range(2):
        for t in range(5):
            token = x[b, t]
            logits = layer.router(token)
            chosen = sorted(range(4), key=lambda e: -logits[e].item())[:2]
            gates = torch.softmax(logits[chosen], dim=0)
            # expert e's adapter: rows e*r..(e+1)*r of the stacked A, the same columns of the stacked B
            experts = [(layer.A[3 * e:3 * e + 3], layer.B[:, 3 * e:3 * e + 3]) for e in chosen]
            delta = sum(g * (B_e @ (A_e @ token)) for g, (A_e, B_e) in zip(gates, experts))
            expected[b, t] = layer.linear(token) + 2.0 * delta
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer(x).sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0 and layer.linear.weight.grad is None


def test_cost_model_matches_a_hand_count_of_the_fused_layer():
    """The 7B q_proj (8,192 tokens, 3,584 -> 3,584, bf16, r = 2, E = 4): the accounted launches, bytes
    and FLOPs of one fused training step against a count by hand. With P = one [tokens, 3,584] bf16
    pass and W the weight: forward: jitter draw, frozen GEMM (x, W, out: 2P + W), projection (x: P),
    epilogue (frozen in, out: 2P); backward: one launch over dout by token blocks (dout: P) and column
    blocks (dout: P), input pass (x in, dx out: 2P; it also finishes the parameter gradients), cuBLAS
    dx += dout W (dout, W, dx in and out: 3P + W): 12P + 2W in 7 launches, plus [tokens, r], [tokens, E]
    and parameter-sized traffic (under 2%); two GEMMs
    of 2 x 8,192 x 3,584^2 FLOPs plus the rank-16 tensor-core products that rebuild delta and mod in the
    epilogue and the two backward passes (under 5%). The frozen linear alone: two GEMMs, 4P + 2W."""
    sys.path.insert(0, ROOT)
    from benchmarks.cost_model import account_step, modelled

    tokens, features = 8192, 3584
    P, W = tokens * features * 2, features * features * 2
    gemm = 2 * tokens * features * features
    launches, moved, flops, _ = modelled(account_step("lime-fused", tokens, features, features, 2, 4))
    assert launches == 7
    assert abs(moved - (12 * P + 2 * W)) / (12 * P + 2 * W) < 0.02, moved / (12 * P + 2 * W)
    assert 2 * gemm <= flops < 1.05 * 2 * gemm
    launches, moved, flops, _ = modelled(account_step("frozen-linear", tokens, features, features, 2, 4))
    assert (launches, moved, flops) == (2, 4 * P + 2 * W, 2 * gemm)


def test_cost_model_and_host_overhead_report(tmp_path):
    """`python -m benchmarks.cost_model` prints and writes both tables (its numbers are not asserted:
    they are the report)."""
    result = subprocess.run([sys.executable, "-m", "benchmarks.cost_model", "--shapes", "0.5b-q", "--out",
                             str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={**os.environ, "PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / "cost_model.md").read_text()
    assert "| 0.5b-q 8192x896->896 | 2, 4 | lime-fused |" in text and "| lime-fused |" in text.split("## Host")[1]


def test_launch_computes_its_traffic_only_for_a_recorder_that_keeps_it():
    """`launch` calls the launcher's `traffic` function only when a recorder keeps the launch (a real
    call, or a host-time run, pays nothing for the accounting), and records what it returns; an empty
    grid starts and records nothing."""
    import torch

    sys.path.insert(0, ROOT)
    from lime_kernels.fused.common import launch, record_launches

    started = []

    def fake_kernel():  # stands for a Triton JITFunction: kernel[grid](*args, **options)
        pass

    class Launchable:
        fn = fake_kernel

        def __getitem__(self, grid):
            return lambda *args, **options: started.append((grid, args, options))

    calls = []

    def traffic():
        calls.append(1)
        return [torch.zeros(4, dtype=torch.float32), 100], [torch.zeros(2, dtype=torch.float64)], 7

    kernel = Launchable()
    with record_launches(execute=False, keep=False) as kept:
        launch(kernel, (3,), "argument", traffic=traffic, OPTION=1)
    assert calls == [] and kept == [] and started == []
    with record_launches(execute=False) as kept:
        launch(kernel, (3, 2), traffic=traffic)
        launch(kernel, (0, 2), traffic=traffic)
    assert calls == [1] and started == []
    assert [(r.name, r.grid, r.bytes_read, r.bytes_written, r.flops) for r in kept] == [
        ("fake_kernel", (3, 2), 116, 16, 7)]
    launch(kernel, (5,), "argument", traffic=traffic, OPTION=1)  # no recorder: started, traffic not called
    assert calls == [1] and started == [((5,), ("argument",), {"OPTION": 1})]


def test_launch_overrides_replace_only_the_tunable_options_of_the_named_kernel():
    """`launch_overrides` (the GPU report's tuning step) changes num_warps / num_stages of the kernels it
    names, inside its block only, says which of them launched, and refuses block sizes."""
    sys.path.insert(0, ROOT)
    from lime_kernels.fused.common import launch, launch_overrides

    started = []

    def tuned_kernel():
        pass

    def other_kernel():
        pass

    def launchable(function):
        class Launchable:
            fn = function

            def __getitem__(self, grid):
                return lambda *args, **options: started.append((function.__name__, options))

        return Launchable()

    tuned, other = launchable(tuned_kernel), launchable(other_kernel)
    with launch_overrides({"tuned_kernel": dict(num_warps=8, num_stages=2), "absent_kernel": dict(num_stages=1)}) \
            as applied:
        launch(tuned, (1,), BLOCK=16, num_warps=4)
        launch(other, (1,), BLOCK=16, num_warps=4)
    launch(tuned, (1,), BLOCK=16, num_warps=4)
    assert applied == {"tuned_kernel"}
    assert started == [("tuned_kernel", dict(BLOCK=16, num_warps=8, num_stages=2)),
                       ("other_kernel", dict(BLOCK=16, num_warps=4)), ("tuned_kernel", dict(BLOCK=16, num_warps=4))]
    with pytest.raises(ValueError, match="tuned_kernel: cannot override BLOCK"):
        with launch_overrides({"tuned_kernel": dict(BLOCK=32, num_warps=8)}):
            pass


def test_host_gap_reports_every_experiment_and_restores_what_it_replaced(tmp_path):
    """`benchmarks.host_gap` (the README's "Where the host decides" experiments), eager parts, 2 rounds: every
    variant gets a row, the ratio columns divide by the right baseline, and the stand-in's replacement of
    `eager.lime_linear` ends with its calls."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from benchmarks import host_gap

    from lime_kernels import eager

    original = eager.lime_linear
    assert host_gap.main(["--rounds", "10", "--skip-compiled", "--out", str(tmp_path)]) == 0
    assert eager.lime_linear is original
    lines = (tmp_path / "host_gap.md").read_text().splitlines()[2:]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    variants = {(row[0], row[1]) for row in cells}
    assert variants == {(experiment, variant) for experiment in ("layer, eager",)
                        for variant in ("moe-lora", "peft-lora", "lime-reference", "lime-cpu")} | {
        (experiment, variant) for experiment in ("tiny LLaVA-OneVision training step, eager",
                                                 "tiny LLaVA-OneVision generation (4 tokens), eager")
        for variant in ("peft-lora", "moe-lora", "lime-reference", "lime-cpu",
                        "lime-reference, one-operator routing (stand-in)")}
    for row in cells:
        assert float(row[2]) > 0
        if row[1] == "moe-lora":
            assert row[4] == "1.000"
        if row[1] == "peft-lora":
            assert row[5] == "1.000"


def test_the_stand_in_routing_trains_the_adapter_it_replaces_the_routing_of():
    """The one-operator stand-in keeps the adapter's products: its A and B gradients are those of
    `base + (s x A^T B^T) * LiMEs[0]` written out with autograd."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from benchmarks.host_gap import _OneOperatorRouting

    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    base = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    A = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    B = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    LiMEs = torch.randn(3, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *t: _OneOperatorRouting.apply(*t, LiMEs, 2.0), (x, base, A, B))
    expected = base + ((x @ A.t()) * 2.0 @ B.t()) * LiMEs[0]
    assert torch.allclose(_OneOperatorRouting.apply(x, base, A, B, LiMEs, 2.0), expected)
