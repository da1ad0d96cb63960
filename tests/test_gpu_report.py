"""`python -m benchmarks.gpu_report`, checked without a GPU: the smoke run of every step (tiny shapes,
CPU, Triton's interpreter) with the packages the GPU machine lacks made unimportable, a run killed in
the middle of a step, the folder's transfer limits, the pytest rows and time box, the parity comparison
and the summary's verdicts."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_report  # noqa: E402
from report_files import MAX_FILE_BYTES, MAX_FILES, ReportDir  # noqa: E402

MISSING_ON_THE_GPU_MACHINE = ("datasets", "av", "bitsandbytes")


def _smoke_command(out, *extra):
    return [sys.executable, "-m", "benchmarks.gpu_report", "--out", str(out), "--smoke", *extra]


def _smoke_environment(tmp_path):
    """The interpreter for the subprocess only, and a sitecustomize that makes the packages the GPU
    machine's image lacks unimportable (as if not installed), for it and for its pytest child."""
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in MISSING_ON_THE_GPU_MACHINE))
    return dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(shim), ROOT]), PYTHONUNBUFFERED="1")


def _rows(out):
    """Every line of results.jsonl parsed on its own (a torn line fails here)."""
    text = (out / "results.jsonl").read_text()
    assert text.endswith("\n"), "the last row is incomplete"
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("smoke")
    out = tmp_path / "report"
    result = subprocess.run(_smoke_command(out), capture_output=True, text=True, cwd=ROOT,
                            env=_smoke_environment(tmp_path), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, _rows(out), result.stdout


def test_smoke_runs_every_step_without_the_packages_the_gpu_machine_lacks(smoke):
    out, rows, stdout = smoke
    env = next(r for r in rows if r["kind"] == "env")
    assert set(MISSING_ON_THE_GPU_MACHINE) <= set(env["absent_packages"]), "the shim was not active"
    assert env["triton_interpret"] == "1" and env["triton_cache_dir"].endswith(os.path.join("build", "triton-cache"))
    ends = {r["step"]: r["status"] for r in rows if r["kind"] == "step-end"}
    assert ends == dict.fromkeys(gpu_report.STEPS, "done"), [r.get("error") for r in rows if r["kind"] == "step-end"]

    parity = [r for r in rows if r["kind"] == "parity"]
    assert len(parity) == len(gpu_report.VARIANTS) * len(gpu_report.ROUTERS) * len(gpu_report.PRECISIONS)
    assert all(r["status"] in ("pass", "fail", "error") for r in parity)
    float32 = [r for r in parity if r["precision"] == "float32"]
    assert all(r["status"] == "pass" for r in float32), [(r["variant"], r["router"], r.get("failed")) for r in float32]
    lora = next(r for r in float32 if r["variant"] == "lora")
    gradients = {"grad x", "grad A", "grad B", "grad LiMEs", "grad LiME_shared", "grad gamma"}
    assert {"output", "importance", "kl_uniform"} | gradients <= set(lora["errors"])

    sessions = {r["session"]: r for r in rows if r["kind"] == "test-session"}
    assert sessions["gpu"]["status"] in ("no-tests", "passed")  # gpu tests are skipped without CUDA
    assert sessions["rest"]["status"] == "passed"
    tests = [r for r in rows if r["kind"] == "test" and r["session"] == "rest"]
    assert [r["outcome"] for r in tests] == ["passed"] and gpu_report.SMOKE_TESTS in tests[0]["nodeid"]

    headline = [r for r in rows if r["step"] == "headline" and r["kind"] == "measurement"]
    providers = ("frozen-linear", "lime-fused", "lime-reference", "peft-lora", "moe-lora")
    assert {(r["provider"], r["mode"]) for r in headline if r["metric"] == "time"} == {
        (p, m) for p in providers for m in ("forward", "backward", "full")}
    assert all(0 < r["p20"] <= r["p50"] <= r["p80"] for r in headline if r["metric"] == "time")
    syncs = {r["provider"]: r for r in rows if r["kind"] == "host-syncs"}
    assert set(syncs) == set(providers) and all(r["count"] is None and "not measured" in r["note"]
                                                for r in syncs.values())
    profiles = {r["provider"]: r for r in rows if r["kind"] == "profile"}
    assert set(profiles) == set(providers) and all(r["host_ms"] > 0 for r in profiles.values())
    assert any(r["kind"] == "profile-op" and r["provider"] == "lime-fused" for r in rows)
    tuned = [r for r in rows if r["kind"] == "tuning"]
    assert sorted((r["kernel"], gpu_report.tuning_label(r["options"])) for r in tuned) == sorted(
        (kernel, label) for kernel in gpu_report.SMOKE_TUNING["kernels"]
        for label in ("num_warps=4, num_stages=1", "maxnreg=128"))
    # The interpreter ignores launch options: every candidate must give the launchers' results.
    assert all(r["identical"] and r["device_us"] is None for r in tuned)
    benchmarks = {r["benchmark"] for r in rows if r["step"] == "sweeps" and r["kind"] == "measurement"}
    assert benchmarks == {"grid", "train-step", "decode", "generate", "projections"}
    assert {r["provider"] for r in rows if r.get("benchmark") == "generate"} == {"frozen-linear", "lime-fused"}

    summary = (out / "summary.md").read_text()
    for heading in ("## Targets", "## Steps", "## Parity", "## Tests", "## Headline", "## Profile", "## Tuning",
                    "## Sweeps", "## Not run"):
        assert heading in summary
    assert "n/a (CPU smoke)" in summary and "**Smoke run**" in summary
    assert summary in stdout, "the summary is printed last"


def test_report_folder_stays_within_the_transfer_limits(smoke, tmp_path):
    out, _, _ = smoke
    entries = os.listdir(out)
    assert len(entries) <= MAX_FILES and sorted(entries) == sorted(
        ["results.jsonl", "summary.md", "pytest.log", "profile.txt"])
    assert all(os.path.isfile(out / name) and os.path.getsize(out / name) < MAX_FILE_BYTES for name in entries)

    # Past its cap a file stops growing, and says so.
    report = ReportDir(str(tmp_path / "capped"), "run", time.time(), cap_bytes=20_000)
    for index in range(500):
        report.row("sweeps", "measurement", index=index, padding="x" * 100)
    lines = (tmp_path / "capped" / "results.jsonl").read_text().splitlines()
    assert os.path.getsize(tmp_path / "capped" / "results.jsonl") <= 20_000
    rows = [json.loads(line) for line in lines]
    assert rows[-1]["kind"] == "rows-dropped" and report.dropped_rows == 500 - (len(rows) - 1)
    assert [r["index"] for r in rows[:-1]] == list(range(len(rows) - 1))
    for _ in range(300):
        report.append_text("pytest.log", "y" * 100 + "\n")
    log = (tmp_path / "capped" / "pytest.log").read_text()
    assert len(log.encode()) <= 20_000 and log.endswith("[pytest.log truncated at its size cap]\n")


def test_a_run_killed_mid_step_keeps_the_finished_steps_rows(tmp_path):
    out = tmp_path / "report"
    process = subprocess.Popen(_smoke_command(out), cwd=ROOT, env=_smoke_environment(tmp_path),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        # Killed once the parity step has written a case: env finished, parity in progress.
        while not ((out / "results.jsonl").exists() and '"kind": "parity"' in (out / "results.jsonl").read_text()):
            assert process.poll() is None and time.monotonic() < deadline, "the run ended before its parity step"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the group is gone if the run ended by itself
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    rows = _rows(out)
    assert [r["kind"] for r in rows if r["step"] == "env"] == ["step-start", "env", "step-end"]
    assert next(r for r in rows if r["kind"] == "env")["device"] == "cpu"
    parity = [r for r in rows if r["step"] == "parity"]
    assert parity[0]["kind"] == "step-start" and "step-end" not in [r["kind"] for r in parity]
    assert all(r["status"] in ("pass", "fail", "error") and "errors" in r or "error" in r for r in parity[1:])
    assert not any(r["kind"] == "run-end" for r in rows)
    summary = (out / "summary.md").read_text()  # written after the env step
    assert "| env | done |" in summary and "## Parity" in summary


def test_pytest_rows_and_the_session_time_box(tmp_path):
    (tmp_path / "test_probe.py").write_text(
        "import time\n\nimport pytest\n\n\n"
        "def test_passes():\n    assert True\n\n\n"
        "def test_fails():\n    value = 1\n    assert value == 2, 'the marker message'\n\n\n"
        "@pytest.mark.skip(reason='the skip reason')\ndef test_skipped():\n    pass\n\n\n"
        "def test_hangs():\n    time.sleep(120)\n")
    report = ReportDir(str(tmp_path / "report"), "run", time.time())
    start = time.monotonic()
    session = gpu_report.run_pytest_session(report, "probe", [str(tmp_path / "test_probe.py")], timeout=12)
    assert time.monotonic() - start < 60 and session["status"] == "timeout"
    rows = _rows(tmp_path / "report")
    tests = {r["nodeid"].split("::")[1]: r for r in rows if r["kind"] == "test"}
    assert set(tests) == {"test_passes", "test_fails", "test_skipped"}, "finished tests keep their rows"
    assert tests["test_passes"]["outcome"] == "passed" and tests["test_skipped"]["message"].endswith("the skip reason")
    assert tests["test_fails"]["outcome"] == "failed" and "the marker message" in tests["test_fails"]["message"]
    assert "assert 1 == 2" in tests["test_fails"]["message"]
    started = [r["nodeid"] for r in rows if r["kind"] == "test-start"]
    assert started[-1].endswith("test_hangs") and rows[-1]["kind"] == "test-session"
    assert next(r for r in rows if r["kind"] == "test-collection")["collected"] == 4
    summary = "\n".join(gpu_report._tests_section(rows))
    assert "test_fails" in summary and "Stopped during" in summary and "test_hangs" in summary
    assert "the marker message" in (tmp_path / "report" / "pytest.log").read_text()


def test_parity_comparison_flags_every_difference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the pair's fused layer is built (not run) on CPU
    torch.manual_seed(0)
    reference, _ = gpu_report.parity_pair("dora", "maxabs", torch.float32, torch.device("cpu"), gpu_report.SMOKE_PARITY,
                                          seed=3)
    x = torch.randn(2, 13, 40)
    mask = torch.ones(2, 13, dtype=torch.long)
    expected = gpu_report.forward_backward(reference, x, mask, autocast=False, seed=5)
    same = gpu_report.forward_backward(reference, x, mask, autocast=False, seed=5)
    result = gpu_report.compare(expected, same, torch.float32)
    assert result["status"] == "pass" and max(result["errors"].values()) == 0.0
    assert {"output", "grad x", "grad m", "grad B", "grad A"} <= set(result["errors"])

    with torch.no_grad():
        reference.LiMEs.add_(1e-2)
    moved = gpu_report.forward_backward(reference, x, mask, autocast=False, seed=5)
    result = gpu_report.compare(expected, moved, torch.float32)
    assert result["status"] == "fail" and "output" in result["failed"] and result["errors"]["output"] > 2e-4

    broken = dict(same, **{"grad B": same["grad B"] * float("nan")})
    del broken["grad m"]
    result = gpu_report.compare(expected, broken, torch.float32)
    assert result["failed"] == ["grad B"] and result["problems"] == ["grad m: missing in the fused layer"]


def _row(step, kind, **fields):
    return dict(run="r", t=1.0, step=step, kind=kind, **fields)


def test_summary_verdicts_against_the_targets():
    def timing(provider, p50, mode="full", metric="time"):
        return _row("headline", "measurement", benchmark="headline", provider=provider, mode=mode, metric=metric,
                    unit="ms", shape="7b-q_proj 3584x3584", tokens=8192, rank=2, experts=4, n_gram=1, dtype="bfloat16",
                    p50=p50, p20=p50, p80=p50)

    rows = [_row("run", "run-start", budget_s=540, smoke=False),
            _row("env", "env", device="cuda", gpu="NVIDIA H100", commit="abc"),
            timing("frozen-linear", 1.0), timing("lime-fused", 1.12), timing("lime-reference", 4.0),
            timing("peft-lora", 1.3), timing("lime-fused", 900.0, "full", "peak_memory"),
            timing("peft-lora", 1000.0, "full", "peak_memory"),
            _row("headline", "host-syncs", provider="lime-fused", count=3, where={"lime_kernels/x.py:1": 3}),
            _row("profile", "profile", provider="lime-fused", launches=11, host_ms=0.9),
            _row("profile", "profile", provider="frozen-linear", launches=1, host_ms=0.1)]
    targets = "\n".join(gpu_report._targets(rows, smoke=False))
    lines = {line.split(" | ")[0] + " " + line.split(" | ")[1]: line for line in targets.splitlines()[2:]}
    assert lines["| fused forward+backward / frozen linear issue 13"].endswith("| 1.120 | pass |")
    assert lines["| fused forward+backward / frozen linear issue 3"].endswith("| 1.120 | **FAIL** |")
    assert lines["| fused forward+backward / PEFT LoRA issue 13"].endswith("| 0.862 | **FAIL** |")
    assert lines["| fused peak memory / PEFT LoRA issue 3"].endswith("| 0.900 | pass |")
    assert lines["| reference / fused forward+backward issue 3"].endswith("| 3.571 | pass |")
    assert lines["| fused kernel launches per forward+backward issue 13"].endswith("| 11 | **FAIL** |")
    assert lines["| host syncs in a fused training step issue 13"].endswith("| 3 | **FAIL** |")
    assert lines["| fused host time / frozen host time issue 13"].endswith("| 9.000 | **FAIL** |")
    assert "| not measured |" in lines["| fused saved activations / PEFT LoRA -"]
    on_the_bound = rows + [_row("headline", "host-syncs", provider="lime-fused", count=0, where={}),
                           _row("profile", "profile", provider="lime-fused", launches=8, host_ms=0.3)]
    targets = "\n".join(gpu_report._targets(on_the_bound, smoke=False))
    assert "| host syncs in a fused training step | issue 13 | <= 0 | 0 | pass |" in targets
    assert "| fused kernel launches per forward+backward | issue 13 | <= 8 | 8 | pass |" in targets
    assert "| fused host time / frozen host time | issue 13 | <= 3.0 | 3.000 | pass |" in targets
    summary = gpu_report.summarize_report(rows, "r")
    assert "NVIDIA H100" in summary and "lime_kernels/x.py:1" in summary and "still running (or killed)" in summary


def test_tuning_summary_picks_the_fastest_candidate_that_keeps_the_results():
    def candidate(kernel, options, device_us, identical):
        return _row("tuning", "tuning", kernel=kernel, options=options, device_us=device_us, baseline_us=40.0,
                    identical=identical)

    rows = [_row("tuning", "tuning-baseline", kernel="_input_grad_kernel", device_us=40.0),
            _row("tuning", "tuning-baseline", kernel="_project_kernel", device_us=20.0),
            candidate("_input_grad_kernel", dict(num_warps=8, num_stages=2), 30.0, False),  # faster, changes results
            candidate("_input_grad_kernel", dict(num_warps=4, num_stages=2), 37.0, True),
            candidate("_input_grad_kernel", dict(maxnreg=168), 36.0, True),
            _row("tuning", "error", kernel="_input_grad_kernel", options=dict(maxnreg=128), error="OutOfResources"),
            candidate("_project_kernel", dict(num_warps=4, num_stages=1), 25.0, True)]
    lines = {line.split(" | ")[0]: line for line in gpu_report._tuning_section(rows) if line.startswith("| _")}
    assert lines["| _input_grad_kernel"] == (
        "| _input_grad_kernel | 40.0 | maxnreg=168 | 36.0 | 0.900 | 3 | num_warps=8, num_stages=2 | 1 |")
    assert lines["| _project_kernel"] == (
        "| _project_kernel | 20.0 | num_warps=4, num_stages=1 | 25.0 | 1.250 | 1 | none | 0 |")
    assert gpu_report._tuning_section([]) == ["No tuning."]


def test_each_step_ends_at_its_box_and_a_failing_step_does_not_end_the_run(tmp_path, monkeypatch):
    report = ReportDir(str(tmp_path / "report"), "run", time.time())
    setup = gpu_report.Setup(smoke=True, device=torch.device("cpu"), dtype=torch.float32, report=report, commit="",
                             budget=10.0, headline={}, parity={}, tuning={}, sweeps={})

    def cooperative(setup, box):
        for index in range(1000):
            box.check(f"{1000 - index} of 1000 units")
            time.sleep(0.01)

    def stuck(setup, box):
        time.sleep(60)  # no checkpoint: SIGALRM ends it GRACE seconds after its box

    def broken(setup, box):
        raise RuntimeError("a bug in the step")

    monkeypatch.setattr(gpu_report, "GRACE", 1.0)
    monkeypatch.setattr(gpu_report, "STEP_FUNCTIONS", dict(parity=cooperative, tests=stuck, headline=broken))
    previous = signal.signal(signal.SIGALRM, gpu_report._raise(gpu_report.StepTimeout))
    try:
        start = time.monotonic()
        assert gpu_report.run_step(setup, "parity", 0.5) == "out-of-time"
        assert gpu_report.run_step(setup, "tests", 0.5) == "timeout"
        assert gpu_report.run_step(setup, "headline", 5.0) == "error"
        assert time.monotonic() - start < 10
    finally:
        signal.signal(signal.SIGALRM, previous)
    rows = _rows(tmp_path / "report")
    not_run = next(r for r in rows if r["kind"] == "not-run")
    assert not_run["step"] == "parity" and not_run["reason"] == "time" and "of 1000 units" in not_run["what"]
    ends = {r["step"]: r for r in rows if r["kind"] == "step-end"}
    assert "without reaching a checkpoint" in ends["tests"]["error"] and ends["tests"]["seconds"] < 3
    assert "RuntimeError: a bug in the step" in ends["headline"]["error"]
