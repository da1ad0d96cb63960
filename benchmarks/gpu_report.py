"""One command that turns a short GPU window into verified numbers:

    PYTHONPATH=. python3 -m benchmarks.gpu_report --out DIR [--budget SECONDS] [--only STEP ...] [--smoke]
                                                          [--commit HASH]

Runs the most valuable checks first, each step time-boxed inside the budget (default 540 s), and appends
every result to DIR/results.jsonl the moment it is known, so a kill loses only the step in progress:
  env       the GPU (name, memory, SMs, L2, driver), torch/Triton/transformers/peft versions, the commit;
  parity    fused vs reference layers with the same parameters, one forward+backward per variant (lora,
            dora, lora_fa, slicefine) and router (cosine, maxabs) in float32, bfloat16, float16 and under
            torch.autocast(bfloat16) over float32 weights: the relative error of the output, the routing
            statistics and every gradient against the bounds of tests/test_fused.py;
  tests     tests/test_fused.py natively in a subprocess: the `gpu`-marked tests, then the rest while the
            step's time lasts; one row per test as it finishes (failures with their short traceback);
  headline  the 7B q_proj (3584 x 3584, 8,192 tokens, bf16, r = 2, E = 4) forward, backward and
            forward+backward of frozen-linear, lime-fused, lime-reference, peft-lora and moe-lora (CUDA
            events, L2 flushed, p20/p50/p80), peak memory, saved activations, host syncs in a training step;
  profile   one forward+backward per provider under torch.profiler: per-kernel time and launches, host time;
  tuning    each fused kernel of the headline training step relaunched with other num_warps / num_stages /
            register limits: its device time, and whether the step's results stay bit for bit the same;
  sweeps    benchmarks/run.py's grid, train-step, decode and projections sweeps for whatever time is left.
DIR/summary.md (rewritten after every step) gives the headline ratios against the targets of issues 3 and
13, what passed, what failed and what did not run. `env` runs whatever `--only` says. At most 8 files in DIR
(results.jsonl, summary.md, pytest.log, profile.txt), each under 16 MiB. Triton's compiled kernels are
cached in build/triton-cache (TRITON_CACHE_DIR, unless set), so a second command on the machine reuses them.
`--smoke` runs every step on tiny shapes on the CPU under Triton's interpreter (how CI checks this file).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

# torch imports no Triton; the benchmark modules (and with them lime, transformers and Triton) are
# imported inside the steps, after main() has set TRITON_INTERPRET and TRITON_CACHE_DIR.
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from report_files import PROFILE, PYTEST_LOG, RESULTS, SUMMARY, ReportDir, limit_problems, read_rows  # noqa: E402

STEPS = ("env", "parity", "tests", "headline", "profile", "tuning", "sweeps")
ALWAYS = ("env",)
DEFAULT_BUDGET = 540.0
# Each step's box in seconds of the default budget (scaled with --budget, except env's: a fixed cost);
# the sweeps get what is left.
SHARES = {"env": 15.0, "parity": 100.0, "tests": 150.0, "headline": 90.0, "profile": 45.0, "tuning": 60.0}
UNSCALED = ("env",)
SUMMARY_RESERVE = 5.0  # kept back at the end for the last summary
GRACE = 10.0  # how long a step may run past its box before SIGALRM interrupts it (it stops at checkpoints)
MIN_BOX = 2.0
MAX_TRACEBACK = 4000

VARIANTS = ("lora", "dora", "lora_fa", "slicefine")
ROUTERS = ("cosine", "maxabs")
PRECISIONS = ("float32", "bfloat16", "float16", "autocast-bfloat16")
TEST_FILE = "tests/test_fused.py"
# The one test the smoke runs of the non-`gpu` tests (the interpreter is too slow for the file).
SMOKE_TESTS = "test_fused_respects_which_inputs_need_gradients"
PYTEST_STATUS = {0: "passed", 1: "failed", 2: "interrupted", 3: "internal-error", 4: "usage-error", 5: "no-tests"}
SMOKE_SWEEP_PROVIDERS = ("frozen-linear", "lime-fused")
SWEEP_ORDER = ("grid", "train-step", "decode", "projections")  # the issues' targets first, the widest last

HEADLINE = dict(shape=("7b-q_proj", 3584, 3584), tokens=8192, rank=2, experts=4, n_gram=1, repeats=100, warmup=10,
                host_runs=20)
PARITY = dict(d_in=256, d_out=384, batch=2, seq=160)  # 320 tokens: several token blocks and dA splits
SMOKE_HEADLINE = dict(shape=("tiny", 48, 64), tokens=32, rank=2, experts=4, n_gram=1, repeats=2, warmup=1,
                      host_runs=2)
SMOKE_PARITY = dict(d_in=40, d_out=70, batch=2, seq=13)
# The fused kernels of a training step (the default options' four), the launch options tried for each
# (every num_warps x num_stages pair, then register limits with the launcher's warps and stages), and
# the profiled steps per candidate.
TUNING = dict(kernels=("_input_grad_kernel", "_modulation_backward_kernel", "_modulation_forward_kernel",
                       "_project_kernel"), warps=(4, 8), stages=(1, 2, 3, 4), registers=(128, 168, 255), calls=5)
SMOKE_TUNING = dict(kernels=("_input_grad_kernel", "_project_kernel"), warps=(4,), stages=(1,), registers=(128,),
                    calls=1)
SMOKE_SWEEPS = {
    "grid": dict(shapes=[("tiny", 48, 64)], tokens=[16], ranks=[2], experts=[4], n_grams=[1]),
    "projections": dict(shapes=[("tiny-wide", 48, 96)], tokens=[16], ranks=[8], experts=[4], n_grams=[1]),
    "decode": dict(shape=("tiny", 48, 64), tokens=[1, 4], rank=2, experts=4, prompt=4, new_tokens=1,
                   generate_repeats=2, call_repeats=2),
    "repeats": 2, "warmup": 1, "model": "tiny", "batch": 1, "seq": 8, "steps": 2,
}


class OutOfTime(BaseException):
    """A step's box ran out at a checkpoint; the message says what did not run. A BaseException, so
    that the per-case error handlers inside a step record errors but let this through."""


class StepTimeout(BaseException):
    """SIGALRM: the step ran GRACE seconds past its box without reaching a checkpoint."""


class Terminated(BaseException):
    """SIGTERM (the command's own time limit): the run records it and writes the summary."""


class Box:
    """A step's time box: checkpoints call `check` before each unit of work."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def check(self, remaining: str, need: float = 0.0) -> None:
        """Raises OutOfTime(`remaining`) once fewer than `need` seconds are left."""
        if self.left() <= need:
            raise OutOfTime(remaining)


@dataclass
class Setup:
    smoke: bool
    device: torch.device
    dtype: torch.dtype  # the activations of the timings
    report: ReportDir
    commit: str
    budget: float
    headline: Dict
    parity: Dict
    tuning: Dict
    sweeps: Dict

    @property
    def versions(self) -> Dict[str, str]:
        """What every measurement row carries (as in benchmarks/run.py's CSV)."""
        import run as bench

        return bench._versions(self.device, self.commit)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _tail(text: str, limit: int = MAX_TRACEBACK) -> str:
    return text[-limit:]


# --- step 1: env ------------------------------------------------------------------------------------


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver() -> Dict:
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20)
    except (FileNotFoundError, subprocess.TimeoutExpired) as error:
        return dict(driver=None, driver_error=f"nvidia-smi: {error}")
    if result.returncode != 0:
        return dict(driver=None, driver_error=f"nvidia-smi exited {result.returncode}: {_tail(result.stderr, 300)}")
    return dict(driver=result.stdout.strip().splitlines()[0])


def _git_dirty() -> Optional[bool]:
    try:
        result = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, cwd=ROOT, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    return bool(result.stdout.strip()) if result.returncode == 0 else None


def step_env(setup: Setup, box: Box) -> None:
    device = setup.device
    fields = dict(device=device.type, python=platform.python_version(), platform=platform.platform(),
                  commit=setup.commit or None, uncommitted_changes=_git_dirty(),
                  cuda=torch.version.cuda, smoke=setup.smoke, budget_s=setup.budget,
                  triton_interpret=os.environ.get("TRITON_INTERPRET"),
                  triton_cache_dir=os.environ.get("TRITON_CACHE_DIR"),
                  absent_packages=[name for name in ("datasets", "av", "bitsandbytes", "peft")
                                   if importlib.util.find_spec(name) is None])
    fields.update({name: _version(name) for name in ("torch", "triton", "transformers", "peft", "accelerate",
                                                      "numpy")})
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        fields.update(gpu=properties.name, memory_gib=round(properties.total_memory / 2**30, 2),
                      sm_count=properties.multi_processor_count, capability=f"{properties.major}.{properties.minor}",
                      l2_cache_mib=round(properties.L2_cache_size / 2**20, 1), **_driver())
    else:
        fields.update(gpu=None, cpu_count=os.cpu_count())
    setup.report.row("env", "env", **fields)
    print(f"env: {fields.get('gpu') or 'cpu'}, torch {fields['torch']}, triton {fields['triton']}, "
          f"commit {fields['commit'] or 'unknown'}", flush=True)


# --- step 2: native parity smoke ------------------------------------------------------------------------


def parity_pair(variant: str, router: str, dtype: torch.dtype, device: torch.device, shape: Dict, seed: int):
    """A reference layer and a fused layer of `variant` with the same parameters (a state dict copy),
    `B` (zero at init), DoRA's `m`, SliceFine's rows and `gamma` moved off their initial values."""
    from lime_kernels import LiMEDoRALinear, LiMELinear, LiMELoRAFALinear, LiMESliceFineLinear

    classes = dict(lora=LiMELinear, dora=LiMEDoRALinear, lora_fa=LiMELoRAFALinear, slicefine=LiMESliceFineLinear)
    options = dict(num_experts=4, rank=2, router=router, jitter_noise=0.2)  # otherwise the layers' defaults
    torch.manual_seed(seed)
    reference = classes[variant](nn.Linear(shape["d_in"], shape["d_out"], device=device, dtype=dtype),
                                 backend="reference", **options)
    fused = classes[variant](nn.Linear(shape["d_in"], shape["d_out"], device=device, dtype=dtype),
                             backend="triton", **options)
    with torch.no_grad():
        torch.manual_seed(seed + 1)
        for name, parameter in reference.named_parameters():
            if name in ("B", "m", "part_T", "gamma"):
                parameter.add_(0.3 * torch.randn_like(parameter))
    fused.load_state_dict(reference.state_dict())
    return reference, fused


def forward_backward(layer: nn.Module, x: torch.Tensor, mask: torch.Tensor, autocast: bool, seed: int) -> Dict:
    """One training forward (under bf16 autocast if asked) and backward of a loss that reaches the output
    and the routing statistics; returns the output, the statistics and every gradient by name."""
    layer.train()
    for parameter in layer.parameters():
        parameter.grad = None
    inputs = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same jitter for both layers
    with torch.autocast(x.device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
        out = layer(inputs, attention_mask=mask)
    stats = layer.last_stats
    torch.manual_seed(seed + 1)
    loss = (out.float() * torch.randn(out.shape, device=out.device)).sum()
    (loss + 0.3 * stats.importance + 0.7 * stats.kl_uniform).backward()
    tensors = {"output": out.detach(), "importance": stats.importance.detach().reshape(-1),
               "kl_uniform": stats.kl_uniform.detach().reshape(-1), "grad x": inputs.grad}
    tensors.update({f"grad {name}": parameter.grad for name, parameter in layer.named_parameters()
                    if parameter.requires_grad})
    return tensors


def compare(reference: Dict, candidate: Dict, dtype: torch.dtype) -> Dict:
    """Each tensor's relative error (lime_kernels.testing, as tests/test_fused.py bounds it), the names
    over the bound (a NaN error included) and the problems that make an error meaningless."""
    from lime_kernels.testing import TOLERANCE, relative_error

    errors, problems = {}, []
    for name in sorted(set(reference) | set(candidate), key=lambda n: (not n.startswith("output"), n)):
        expected, actual = reference.get(name), candidate.get(name)
        if expected is None or actual is None:
            problems.append(f"{name}: missing in the {'reference' if expected is None else 'fused'} layer")
        elif actual.shape != expected.shape or actual.dtype != expected.dtype:
            problems.append(f"{name}: fused {tuple(actual.shape)} {actual.dtype}, reference "
                            f"{tuple(expected.shape)} {expected.dtype}")
        else:
            floor = 1.0 if name in ("importance", "kl_uniform") else 1e-6  # statistics: absolute errors
            errors[name] = relative_error(actual, expected, dtype, floor)
    failed = [name for name, error in errors.items() if not error <= TOLERANCE[dtype]]
    return dict(errors=errors, tolerance=TOLERANCE[dtype], failed=failed, problems=problems,
                status="pass" if not failed and not problems else "fail")


def parity_case(variant: str, router: str, precision: str, device: torch.device, shape: Dict, seed: int) -> Dict:
    autocast = precision.startswith("autocast-")
    dtype = torch.float32 if autocast else getattr(torch, precision)
    reference, fused = parity_pair(variant, router, dtype, device, shape, seed)
    torch.manual_seed(seed + 2)
    x = torch.randn(shape["batch"], shape["seq"], shape["d_in"], device=device, dtype=dtype)
    mask = torch.ones(shape["batch"], shape["seq"], dtype=torch.long, device=device)
    mask[-1, : shape["seq"] // 3] = 0  # left padding in the last sequence
    expected = forward_backward(reference, x, mask, autocast, seed)
    actual = forward_backward(fused, x, mask, autocast, seed)
    return compare(expected, actual, torch.bfloat16 if autocast else dtype)


def step_parity(setup: Setup, box: Box) -> None:
    cases = list(itertools.product(VARIANTS, ROUTERS, PRECISIONS))
    shape = setup.parity
    counts = Counter()
    for index, (variant, router, precision) in enumerate(cases):
        box.check(f"parity: {len(cases) - index} of {len(cases)} cases, from {variant}/{router}/{precision}")
        start = time.monotonic()
        try:
            fields = parity_case(variant, router, precision, setup.device, shape, seed=index)
        except Exception as error:  # recorded as the case's result; the other cases still run
            fields = dict(status="error", error=f"{type(error).__name__}: {error}"[:500],
                          traceback=_tail(traceback.format_exc()))
        counts[fields["status"]] += 1
        setup.report.row("parity", "parity", variant=variant, router=router, precision=precision,
                         tokens=shape["batch"] * shape["seq"], shape=f"{shape['d_in']}x{shape['d_out']}",
                         seconds=round(time.monotonic() - start, 3), **fields)
    print(f"parity: {dict(counts)}", flush=True)


# --- step 3: the GPU-only tests and the rest of tests/test_fused.py ----------------------------------


def _stop(process: subprocess.Popen) -> None:
    """Ends the pytest process group: SIGINT (pytest then prints its failures' tracebacks), SIGTERM
    5 s later, SIGKILL 5 s after that."""
    for sig, wait in ((signal.SIGINT, 5), (signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_pytest_session(report: ReportDir, session: str, args: List[str], timeout: float) -> Dict:
    """`python -m pytest ARGS` in a subprocess (its own process group), ended after `timeout` seconds.
    The plugin `pytest_rows` appends one row per test as it finishes; this appends the session's row
    (exit status, seconds, the output's tail) and copies the output to pytest.log."""
    command = [sys.executable, "-m", "pytest", *args, "-p", "pytest_rows", "-p", "no:cacheprovider", "-q",
               "--tb=short"]
    paths = [ROOT, HERE] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1",
               LIME_REPORT=json.dumps(dict(dir=report.path, run=report.run, start=report.start, session=session)))
    report.append_text(PYTEST_LOG, f"\n===== {session} session: {' '.join(command[1:])}\n")
    tail = deque(maxlen=300)
    start = time.monotonic()
    # SIGINT back to its default in the child: a background job (`make test &`) ignores it, the child
    # would inherit that, and then never print its failures when stopped.
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, errors="replace", start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def pump():
        for line in process.stdout:
            tail.append(line)
            report.append_text(PYTEST_LOG, line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    status = None
    try:
        process.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        status = "timeout"
    except BaseException:
        status = "interrupted"
        raise
    finally:
        if process.poll() is None:
            _stop(process)
        reader.join(timeout=10)
        status = status or PYTEST_STATUS.get(process.returncode, "error")
        fields = dict(session=session, command=" ".join(command[1:]), exit_code=process.returncode, status=status,
                      seconds=round(time.monotonic() - start, 2), output_tail=_tail("".join(tail), 3000))
        report.row("tests", "test-session", **fields)
    print(f"tests ({session}): {status} in {fields['seconds']} s", flush=True)
    return fields


def step_tests(setup: Setup, box: Box) -> None:
    free_memory(setup.device)  # the tests need the GPU memory this process cached
    sessions = [("gpu", [TEST_FILE, "-m", "gpu"]),
                ("rest", [TEST_FILE, "-m", "not gpu"] + (["-k", SMOKE_TESTS] if setup.smoke else []))]
    for index, (session, args) in enumerate(sessions):
        box.check("tests: the " + " and ".join(name for name, _ in sessions[index:]) + " session(s)", need=10.0)
        run_pytest_session(setup.report, session, args, box.left())


# --- step 4: headline timing, memory and host syncs -------------------------------------------------


def _headline_layer(provider: str, setup: Setup):
    from providers import build_layer

    h = setup.headline
    _, d_in, d_out = h["shape"]
    torch.manual_seed(0)
    layer = build_layer(provider, nn.Linear(d_in, d_out, device=setup.device, dtype=setup.dtype), h["rank"],
                        h["experts"], h["n_gram"])
    x = torch.randn(4, h["tokens"] // 4, d_in, device=setup.device, dtype=setup.dtype, requires_grad=True)
    grad = torch.randn(4, h["tokens"] // 4, d_out, device=setup.device, dtype=setup.dtype)
    return layer, x, grad


def _providers(setup: Setup, step: str, model: bool = False) -> List[str]:
    """The providers that run here; a `not-run` row for each that cannot. The smoke's sweeps run the
    fused provider (and the frozen baseline) only: the others' sweep paths are run.py's own CPU test."""
    from providers import LAYER_PROVIDERS, MODEL_PROVIDERS, available

    # lime-cpu (the C++ CPU operators) has no place in a GPU report, the smoke's CPU run included.
    providers = [p for p in (MODEL_PROVIDERS if model else LAYER_PROVIDERS) if p != "lime-cpu"]
    runnable, skipped = available(providers, setup.device, interpreter=setup.smoke)
    for reason in skipped:
        setup.report.row(step, "not-run", what=reason, reason="unavailable")
    if setup.smoke and step == "sweeps":
        left_out = [p for p in runnable if p not in SMOKE_SWEEP_PROVIDERS]
        runnable = [p for p in runnable if p in SMOKE_SWEEP_PROVIDERS]
        setup.report.row(step, "not-run", what=f"sweeps ({'models' if model else 'layers'}): {', '.join(left_out)}",
                         reason="smoke: the fused provider's paths only")
    return runnable


def host_syncs(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, device: torch.device) -> Dict:
    """Device-to-host synchronizations in one training step (forward, LiME's balance loss, backward,
    AdamW), counted with `torch.cuda.set_sync_debug_mode("warn")` after one warm-up step; each with the
    file and line that caused it."""
    import lime
    from lime_kernels import LiMEModule

    parameters = [p for p in layer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4) if parameters else None

    def step():
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        loss = (layer(x).float() * grad.float()).sum()
        if isinstance(layer, LiMEModule):
            loss = loss + lime.compute_balance_loss(layer)
        loss.backward()
        if optimizer is not None:
            optimizer.step()

    step()
    if device.type != "cuda":
        return dict(count=None, note="not measured on the CPU: torch.cuda.set_sync_debug_mode needs a CUDA device")
    synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    synchronize(device)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    where = Counter(f"{os.path.relpath(w.filename, ROOT)}:{w.lineno}" for w in syncs)
    return dict(count=len(syncs), where=dict(where.most_common(20)))


def step_headline(setup: Setup, box: Box) -> None:
    import run as bench

    h, report = setup.headline, setup.report
    providers = _providers(setup, "headline")
    sweep = dict(shapes=[h["shape"]], tokens=[h["tokens"]], ranks=[h["rank"]], experts=[h["experts"]],
                 n_grams=[h["n_gram"]])
    versions = setup.versions

    def record(rows):
        for row in rows:
            report.row("headline", "measurement", **row)

    for index, provider in enumerate(providers):
        box.check(f"headline timing: {', '.join(providers[index:])}; host syncs: every provider")
        try:
            bench.layer_sweep("headline", sweep, [provider], setup.device, setup.dtype, h["repeats"], h["warmup"],
                              versions, on_rows=record)
        except Exception as error:
            report.row("headline", "error", provider=provider, what="timing",
                       error=f"{type(error).__name__}: {error}"[:500], traceback=_tail(traceback.format_exc()))
        free_memory(setup.device)
    for index, provider in enumerate(providers):
        box.check(f"headline host syncs: {', '.join(providers[index:])}")
        try:
            layer, x, grad = _headline_layer(provider, setup)
            fields = host_syncs(layer, x, grad, setup.device)
        except Exception as error:
            fields = dict(count=None, error=f"{type(error).__name__}: {error}"[:500],
                          traceback=_tail(traceback.format_exc()))
        report.row("headline", "host-syncs", provider=provider, **fields)
        free_memory(setup.device)
    print("headline: done", flush=True)


# --- step 5: profile ------------------------------------------------------------------------------


def cuda_kernels(profiler) -> Tuple[Counter, Counter, int]:
    """(launches, device us) of each CUDA kernel in a finished profile, by name, and the number of
    memory copies and sets (counted apart)."""
    from torch.autograd import DeviceType

    calls, device_us, memory_ops = Counter(), Counter(), 0
    for event in profiler.events():
        if event.device_type != DeviceType.CUDA:
            continue
        if event.name.startswith(("Memcpy", "Memset")):
            memory_ops += 1
        else:
            calls[event.name] += 1
            device_us[event.name] += event.time_range.elapsed_us()
    return calls, device_us, memory_ops


def profile_provider(layer, x, grad, device: torch.device, host_runs: int):
    """Host time of forward+backward (enqueue only: the device is idle at the start of each run), then
    one forward+backward under torch.profiler: per-kernel launches and device time (CUDA), or the top
    operators by CPU time (CPU). Returns (summary fields, per-kernel rows, the profiler's table)."""
    from torch.profiler import ProfilerActivity, profile

    def step():
        layer(x).backward(grad)

    for _ in range(3):
        step()
    host = []
    for _ in range(host_runs):
        synchronize(device)
        start = time.perf_counter()
        step()
        host.append((time.perf_counter() - start) * 1e3)
    synchronize(device)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        step()
        synchronize(device)
    fields = dict(host_ms=statistics.median(host), host_runs=host_runs)
    rows = []
    if cuda:
        calls, device_us, memory_ops = cuda_kernels(profiler)
        fields.update(launches=sum(calls.values()), memory_ops=memory_ops,
                      device_ms=round(sum(device_us.values()) / 1e3, 4))
        rows = [dict(kind="profile-kernel", name=name[:300], calls=calls[name], device_us=round(device_us[name], 2))
                for name, _ in device_us.most_common()]
        table = profiler.key_averages().table(sort_by="self_device_time_total", row_limit=30)
    else:
        fields.update(launches=None, memory_ops=None, device_ms=None,
                      note="no CUDA kernels on the CPU: the top operators by CPU time instead")
        averages = sorted(profiler.key_averages(), key=lambda a: -a.self_cpu_time_total)[:15]
        rows = [dict(kind="profile-op", name=a.key[:300], calls=a.count, self_cpu_us=round(a.self_cpu_time_total, 2))
                for a in averages]
        table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    return fields, rows, table


def step_profile(setup: Setup, box: Box) -> None:
    report = setup.report
    providers = _providers(setup, "profile")
    for index, provider in enumerate(providers):
        box.check(f"profile: {', '.join(providers[index:])}")
        try:
            layer, x, grad = _headline_layer(provider, setup)
            fields, rows, table = profile_provider(layer, x, grad, setup.device, setup.headline["host_runs"])
        except Exception as error:
            report.row("profile", "error", provider=provider, error=f"{type(error).__name__}: {error}"[:500],
                       traceback=_tail(traceback.format_exc()))
            continue
        finally:
            free_memory(setup.device)
        report.row("profile", "profile", provider=provider, **fields)
        for row in rows:
            report.row("profile", row.pop("kind"), provider=provider, **row)
        report.append_text(PROFILE, f"===== {provider}: one forward+backward, {setup.headline['shape'][0]}, "
                                    f"{setup.headline['tokens']} tokens, {setup.dtype}\n{table}\n")
    print("profile: done", flush=True)


# --- step 6: tuning ---------------------------------------------------------------------------------


def kernel_device_us(step: Callable[[], object], device: torch.device, calls: int) -> Dict[str, float]:
    """Mean device time (us) per launch of each CUDA kernel over `calls` runs of `step`, by name."""
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for _ in range(calls):
            step()
        synchronize(device)
    launches, device_us, _ = cuda_kernels(profiler)
    return {name: device_us[name] / launches[name] for name in device_us}


def _device_us_of(times: Dict[str, float], kernel: str) -> Optional[float]:
    """The kernel's time (a Triton kernel's CUDA name is its function's name), or None without it."""
    return round(times[kernel], 2) if kernel in times else None


def tuning_label(options: Dict) -> str:
    return ", ".join(f"{name}={value}" for name, value in options.items())


def step_tuning(setup: Setup, box: Box) -> None:
    """Each fused kernel of a training step of the headline layer, relaunched with other num_warps /
    num_stages / maxnreg (`launch_overrides`): its device time per launch and whether the step's output,
    statistics and gradients stay bit for bit those of the launchers' own options. A faster candidate
    that keeps the results is one to pin in the launcher; one that changes them is not (the
    deterministic mode must stay reproducible across machines)."""
    from lime_kernels.fused.common import launch_overrides

    report, tuning = setup.report, setup.tuning
    cuda = setup.device.type == "cuda"
    layer, x, _ = _headline_layer("lime-fused", setup)

    def step():  # the parity step's training step (output, statistics, every gradient), and the usage
        results = forward_backward(layer, x, None, autocast=False, seed=0)
        results["usage"] = layer.last_stats.usage
        return results

    baseline = step()  # also builds the launchers' own variants
    times = kernel_device_us(step, setup.device, tuning["calls"]) if cuda else {}
    kernels = sorted(tuning["kernels"], key=lambda kernel: -(_device_us_of(times, kernel) or 0.0))
    for kernel in kernels:
        report.row("tuning", "tuning-baseline", kernel=kernel, device_us=_device_us_of(times, kernel))
    candidates = [(kernel, dict(num_warps=warps, num_stages=stages)) for kernel in kernels
                  for warps in tuning["warps"] for stages in tuning["stages"]]
    candidates += [(kernel, dict(maxnreg=registers)) for kernel in kernels for registers in tuning["registers"]]
    for index, (kernel, options) in enumerate(candidates):
        box.check(f"tuning: {len(candidates) - index} of {len(candidates)} candidates, from {kernel} "
                  f"{tuning_label(options)}")
        fields = dict(kernel=kernel, options=options)
        try:
            with launch_overrides({kernel: options}) as applied:
                results = step()
                candidate_times = kernel_device_us(step, setup.device, tuning["calls"]) if cuda else {}
            if kernel not in applied:
                raise RuntimeError(f"{kernel} did not launch in a training step of the headline layer")
            identical = all(torch.equal(results[name], expected) for name, expected in baseline.items())
            report.row("tuning", "tuning", **fields, device_us=_device_us_of(candidate_times, kernel),
                       baseline_us=_device_us_of(times, kernel), identical=identical)
        except Exception as error:  # e.g. a variant out of shared memory: recorded, the next one runs
            report.row("tuning", "error", what="tuning candidate", **fields,
                       error=f"{type(error).__name__}: {error}"[:500], traceback=_tail(traceback.format_exc()))
        free_memory(setup.device)
    print("tuning: done", flush=True)


# --- step 7: sweeps ---------------------------------------------------------------------------------


def _planned(name: str, settings: Dict, layer_providers: List[str], model_providers: List[str]) -> int:
    """How many measurements (calls of on_rows) sweep `name` makes when it runs to the end."""
    import run as bench

    modes = len(bench.MODES)  # eager and compiled
    if name == "train-step":
        return modes * len(model_providers)
    if name == "decode":
        return len(settings["decode"]["tokens"]) * len(layer_providers) + modes * (1 + len(model_providers))
    sweep = settings[name]
    return math.prod(len(sweep[key]) for key in ("shapes", "tokens", "ranks", "experts", "n_grams")) * len(
        layer_providers)


def step_sweeps(setup: Setup, box: Box) -> None:
    import run as bench

    report, settings, device, dtype = setup.report, setup.sweeps, setup.device, setup.dtype
    layer_providers = _providers(setup, "sweeps")
    model_providers = _providers(setup, "sweeps", model=True)
    versions = setup.versions
    measured = Counter()
    current = {}

    def record(rows):
        for row in rows:
            report.row("sweeps", "measurement", **row)
        measured[current["name"]] += 1
        box.check("")

    runners: Dict[str, Callable[[], object]] = {
        "grid": lambda: bench.layer_sweep("grid", settings["grid"], layer_providers, device, dtype,
                                          settings["repeats"], settings["warmup"], versions, on_rows=record),
        "train-step": lambda: bench.train_step_sweep(settings, model_providers, device, dtype, versions,
                                                     on_rows=record),
        "decode": lambda: bench.decode_sweep(settings, layer_providers, model_providers, device, dtype, versions,
                                             on_rows=record),
        "projections": lambda: bench.layer_sweep("projections", settings["projections"], layer_providers, device,
                                                 dtype, settings["repeats"], settings["warmup"], versions,
                                                 on_rows=record),
    }
    for index, name in enumerate(SWEEP_ORDER):
        current["name"] = name
        try:
            box.check("")
            runners[name]()
        except OutOfTime:
            planned = _planned(name, settings, layer_providers, model_providers)
            rest = ", ".join(SWEEP_ORDER[index + 1:])
            done = f"{name} complete" if measured[name] == planned else \
                f"{name} stopped after {measured[name]} of {planned} measurements"
            raise OutOfTime(f"sweeps: {done}" + (f"; {rest} not started" if rest else "")) from None
        except Exception as error:  # recorded; the next sweep still runs
            report.row("sweeps", "error", sweep=name, error=f"{type(error).__name__}: {error}"[:500],
                       traceback=_tail(traceback.format_exc()))
        free_memory(device)
        print(f"sweeps: {name} done ({measured[name]} measurements)", flush=True)


# --- step 8: summary ------------------------------------------------------------------------------


def _number(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def _first_line(text: Optional[str]) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return (lines[-1] if lines else "")[:240]


def _targets(rows: List[Dict], smoke: bool) -> List[str]:
    headline = {(r["provider"], r["mode"], r["metric"]): r.get("p50") for r in rows
                if r["step"] == "headline" and r["kind"] == "measurement"}
    profiles = {r["provider"]: r for r in rows if r["kind"] == "profile"}
    syncs = {r["provider"]: r for r in rows if r["kind"] == "host-syncs"}

    def ratio(numerator, denominator):
        if numerator is None or denominator is None or not denominator:
            return None
        return numerator / denominator

    full = {provider: headline.get((provider, "full", "time")) for provider in
            ("frozen-linear", "lime-fused", "lime-reference", "peft-lora")}
    memory = {provider: headline.get((provider, "full", "peak_memory")) for provider in ("lime-fused", "peft-lora")}
    saved = {provider: headline.get((provider, "forward", "saved_activations")) for provider in
             ("lime-fused", "peft-lora")}
    fused_profile, frozen_profile = profiles.get("lime-fused", {}), profiles.get("frozen-linear", {})
    checks = [
        ("fused forward+backward / frozen linear", "issue 13", "<=", 1.15,
         ratio(full["lime-fused"], full["frozen-linear"])),
        ("fused forward+backward / frozen linear", "issue 3", "<=", 1.10,
         ratio(full["lime-fused"], full["frozen-linear"])),
        ("fused forward+backward / PEFT LoRA", "issue 13", "<=", 0.80, ratio(full["lime-fused"], full["peft-lora"])),
        ("fused peak memory / PEFT LoRA", "issue 3", "<=", 1.00, ratio(memory["lime-fused"], memory["peft-lora"])),
        ("fused saved activations / PEFT LoRA", "-", None, None, ratio(saved["lime-fused"], saved["peft-lora"])),
        ("reference / fused forward+backward", "issue 3", ">=", 3.0,
         ratio(full["lime-reference"], full["lime-fused"])),
        ("fused kernel launches per forward+backward", "issue 13", "<=", 8, fused_profile.get("launches")),
        ("host syncs in a fused training step", "issue 13", "<=", 0, syncs.get("lime-fused", {}).get("count")),
        ("fused host time / frozen host time", "issue 13", "<=", 3.0,
         ratio(fused_profile.get("host_ms"), frozen_profile.get("host_ms"))),
    ]
    lines = ["| measure | target | bound | measured | verdict |", "|:--|:--|--:|--:|:--|"]
    for name, source, comparison, bound, value in checks:
        if value is None:
            verdict = "not measured"
        elif comparison is None:
            verdict = "(no target)"
        elif smoke:
            verdict = "n/a (CPU smoke)"
        else:
            verdict = "pass" if (value <= bound if comparison == "<=" else value >= bound) else "**FAIL**"
        shown = _number(value, 3) if isinstance(value, float) else _number(value)
        lines.append(f"| {name} | {source} | {comparison or ''} {bound if bound is not None else ''} | {shown} "
                     f"| {verdict} |")
    return lines


def _parity_section(rows: List[Dict]) -> List[str]:
    cases = [r for r in rows if r["kind"] == "parity"]
    if not cases:
        return ["No parity case ran."]
    counts = Counter(r["status"] for r in cases)
    lines = [f"{len(cases)} cases: {counts['pass']} pass, {counts['fail']} fail, {counts['error']} error "
             "(cell: the largest error relative to its bound, or what failed).", "",
             "| variant | router | " + " | ".join(PRECISIONS) + " |", "|:--|:--|" + ":--|" * len(PRECISIONS)]
    table = {(r["variant"], r["router"], r["precision"]): r for r in cases}
    for variant, router in itertools.product(VARIANTS, ROUTERS):
        cells = []
        for precision in PRECISIONS:
            case = table.get((variant, router, precision))
            if case is None:
                cells.append("not run")
            elif case["status"] == "error":
                cells.append(f"ERROR {case['error'][:80]}")
            else:
                worst = max(case["errors"].items(), key=lambda item: math.inf if item[1] is None else item[1],
                            default=("-", None))
                relative = "nan" if worst[1] is None else f"{worst[1] / case['tolerance']:.2f}"
                label = "pass" if case["status"] == "pass" else "FAIL " + ", ".join(case["failed"] + case["problems"])
                cells.append(f"{label} ({worst[0]} {relative})")
        lines.append(f"| {variant} | {router} | " + " | ".join(cells) + " |")
    return lines


def _tests_section(rows: List[Dict]) -> List[str]:
    sessions = [r for r in rows if r["kind"] == "test-session"]
    tests = [r for r in rows if r["kind"] == "test"]
    if not sessions and not tests:
        return ["No test session ran."]
    lines = ["| session | status | collected | passed | failed | errors | skipped | not finished | seconds |",
             "|:--|:--|--:|--:|--:|--:|--:|--:|--:|"]
    failures, in_progress = [], []
    for session in dict.fromkeys(r["session"] for r in sessions + tests):
        mine = [r for r in tests if r["session"] == session]
        outcomes = Counter(r["outcome"] for r in mine)
        collected = sum(r["collected"] for r in rows if r["kind"] == "test-collection" and r["session"] == session)
        finished = {r["nodeid"] for r in mine}
        started = [r["nodeid"] for r in rows if r["kind"] == "test-start" and r["session"] == session]
        in_progress += [f"{session}: {nodeid}" for nodeid in started if nodeid not in finished]
        end = next((r for r in sessions if r["session"] == session), {})
        lines.append(f"| {session} | {end.get('status', 'running')} | {collected} | {outcomes['passed']} | "
                     f"{outcomes['failed']} | {outcomes['error']} | {outcomes['skipped']} | "
                     f"{max(collected - len(finished), 0)} | {_number(end.get('seconds'), 1)} |")
        failures += [f"- `{r['nodeid']}` ({r['outcome']}): {_first_line(r.get('message'))}" for r in mine
                     if r["outcome"] in ("failed", "error", "xpassed")]
        if end.get("status") not in (None, "passed", "failed", "no-tests", "timeout"):
            failures.append(f"- the {session} session ended `{end.get('status')}`: "
                            f"{_first_line(end.get('output_tail'))}")
    errors = [f"- collecting `{r['nodeid']}`: {_first_line(r['message'])}" for r in rows
              if r["kind"] == "test-collection-error"]
    if failures or errors:
        lines += ["", "Failures (the full short tracebacks are in results.jsonl and pytest.log):", *errors, *failures]
    if in_progress:
        lines += ["", "Stopped during: " + "; ".join(f"`{name}`" for name in in_progress)]
    return lines


def _headline_section(rows: List[Dict]) -> List[str]:
    measured = [r for r in rows if r["step"] == "headline" and r["kind"] == "measurement"]
    if not measured:
        return ["No headline measurement."]
    first = measured[0]
    values = {(r["provider"], r["mode"], r["metric"]): r for r in measured}
    syncs = {r["provider"]: r for r in rows if r["kind"] == "host-syncs"}
    lines = [f"{first['shape']}, {first['tokens']} tokens, {first['dtype']}, r = {first['rank']}, "
             f"E = {first['experts']}, n-gram {first['n_gram']}; times in ms, p50 (p20-p80).", "",
             "| provider | forward | backward | forward+backward | peak MiB | saved MiB | trainable | host syncs |",
             "|:--|--:|--:|--:|--:|--:|--:|--:|"]
    for provider in dict.fromkeys(r["provider"] for r in measured):
        def time_cell(mode):
            row = values.get((provider, mode, "time"))
            return "-" if row is None else f"{_number(row['p50'])} ({_number(row['p20'])}-{_number(row['p80'])})"

        def value(mode, metric, digits=1):
            row = values.get((provider, mode, metric))
            return "-" if row is None else _number(row["p50"], digits)

        sync = syncs.get(provider, {})
        sync_cell = _number(sync.get("count")) if sync.get("count") is not None else (
            "not measured" if "note" in sync else ("error" if "error" in sync else "-"))
        lines.append(f"| {provider} | {time_cell('forward')} | {time_cell('backward')} | {time_cell('full')} | "
                     f"{value('full', 'peak_memory')} | {value('forward', 'saved_activations')} | "
                     f"{value('-', 'trainable_parameters', 0)} | {sync_cell} |")
    where = {p: r["where"] for p, r in syncs.items() if r.get("where")}
    if where:
        lines += ["", "Host syncs by place: " + "; ".join(f"{p}: {w}" for p, w in where.items())]
    return lines


def _profile_section(rows: List[Dict]) -> List[str]:
    profiles = [r for r in rows if r["kind"] == "profile"]
    if not profiles:
        return ["No profile."]
    lines = ["| provider | kernel launches | memory ops | device ms | host ms |", "|:--|--:|--:|--:|--:|"]
    lines += [f"| {r['provider']} | {_number(r.get('launches'))} | {_number(r.get('memory_ops'))} | "
              f"{_number(r.get('device_ms'))} | {_number(r.get('host_ms'))} |" for r in profiles]
    kernels = [r for r in rows if r["kind"] == "profile-kernel" and r["provider"] == "lime-fused"]
    if kernels:
        lines += ["", "lime-fused's kernels (device us, calls):"]
        lines += [f"- {r['device_us']:.1f} us x{r['calls']}: `{r['name'][:120]}`" for r in kernels[:15]]
    if any(r.get("note") for r in profiles):
        lines += ["", profiles[0]["note"] + "."]
    return lines


def _tuning_section(rows: List[Dict]) -> List[str]:
    baselines = {r["kernel"]: r.get("device_us") for r in rows if r["kind"] == "tuning-baseline"}
    tried = [r for r in rows if r["kind"] == "tuning"]
    if not baselines:
        return ["No tuning."]
    failed = Counter(r["kernel"] for r in rows if r["step"] == "tuning" and r["kind"] == "error")
    lines = ["Device us per launch; each candidate overrides the launcher's options named; a candidate that "
             "changes the results is never a choice.", "",
             "| kernel | launchers' options | fastest candidate with the same results | its us | / launchers' | "
             "candidates run | changed the results | failed to run |", "|:--|--:|:--|--:|--:|--:|:--|--:|"]
    for kernel, baseline in baselines.items():
        mine = [r for r in tried if r["kernel"] == kernel]
        same = [r for r in mine if r["identical"] and r.get("device_us") is not None]
        best = min(same, key=lambda r: r["device_us"], default=None)
        changed = "; ".join(tuning_label(r["options"]) for r in mine if not r["identical"]) or "none"
        ratio = best["device_us"] / baseline if best is not None and baseline else None
        choice = "-" if best is None else tuning_label(best["options"])
        lines.append(f"| {kernel} | {_number(baseline, 1)} | {choice} | "
                     f"{_number(None if best is None else best['device_us'], 1)} | {_number(ratio)} | {len(mine)} | "
                     f"{changed} | {failed[kernel]} |")
    return lines


def _sweeps_section(rows: List[Dict]) -> List[str]:
    import run as bench

    measured = [{key: (math.nan if value is None else value) for key, value in r.items()} for r in rows
                if r["step"] == "sweeps" and r["kind"] == "measurement"]
    if not measured:
        return ["No sweep measurement."]
    counts = Counter(r["benchmark"] for r in measured)
    providers = list(dict.fromkeys(r["provider"] for r in measured if r["benchmark"] in ("grid", "projections")))
    text = bench.summarize(measured, providers, [])
    return ["Rows: " + ", ".join(f"{name} {count}" for name, count in counts.items()) + ".", "",
            text.replace("\n## ", "\n### ").replace("## ", "### ", 1).rstrip()]


def summarize_report(rows: List[Dict], run: str) -> str:
    """summary.md from the rows of run `run` in results.jsonl."""
    earlier = len({r["run"] for r in rows} - {run})
    rows = [r for r in rows if r["run"] == run]
    env = next((r for r in rows if r["kind"] == "env"), {})
    start = next((r for r in rows if r["kind"] == "run-start"), {})
    end = next((r for r in rows if r["kind"] == "run-end"), None)
    smoke = bool(start.get("smoke"))
    device = env.get("gpu") or env.get("device") or "unknown device"
    lines = [f"# GPU report: {device}, run {run}", ""]
    if smoke:
        lines += ["**Smoke run** (`--smoke`): tiny shapes on the CPU under Triton's interpreter. It checks that "
                  "every step runs; its numbers say nothing about speed.", ""]
    lines += [f"Commit {env.get('commit') or 'unknown (no .git here and no --commit)'}"
              + (" with uncommitted changes" if env.get("uncommitted_changes") else "")
              + f"; torch {env.get('torch')}, Triton {env.get('triton')}, transformers {env.get('transformers')}, "
              f"peft {env.get('peft')}; CUDA {env.get('cuda')}, driver {env.get('driver')}; "
              f"{env.get('sm_count', '-')} SMs, {env.get('memory_gib', '-')} GiB. Budget {start.get('budget_s')} s; "
              + (f"finished `{end['status']}` after {end['t']:.0f} s." if end else
                 f"still running (or killed) at {rows[-1]['t']:.0f} s." if rows else "no rows."), ""]
    if earlier:
        lines += [f"results.jsonl also holds {earlier} earlier run(s), not summarized here.", ""]
    lines += ["## Targets (the headline shape)", "", *_targets(rows, smoke), ""]
    steps = {}
    for r in rows:
        if r["kind"] == "step-start":
            steps[r["step"]] = dict(status="running", box=r["box_s"], seconds=None)
        elif r["kind"] == "step-end":
            steps[r["step"]].update(status=r["status"], seconds=r["seconds"], error=r.get("error"))
    lines += ["## Steps", "", "| step | status | seconds | box (s) |", "|:--|:--|--:|--:|"]
    lines += [f"| {name} | {s['status']} | {_number(s['seconds'], 1)} | {_number(s['box'], 0)} |"
              for name, s in steps.items()]
    lines += [f"- {name}: `{_first_line(s['error'])}`" for name, s in steps.items() if s.get("error")]
    errors = [r for r in rows if r["kind"] == "error"]
    lines += [f"- {r['step']} {r.get('provider') or r.get('sweep') or ''}: `{r['error'][:200]}`" for r in errors]
    lines += ["", "## Parity (fused vs reference, one forward+backward)", "", *_parity_section(rows), "",
              f"## Tests ({TEST_FILE}, natively)", "", *_tests_section(rows), "",
              "## Headline", "", *_headline_section(rows), "",
              "## Profile (one forward+backward of the headline layer)", "", *_profile_section(rows), "",
              "## Tuning (the fused kernels' launch options, headline training step)", "", *_tuning_section(rows),
              "",
              "## Sweeps", "", *_sweeps_section(rows), ""]
    not_run = [r for r in rows if r["kind"] == "not-run"]
    lines += ["## Not run", ""]
    lines += [f"- {r['what']} ({r['reason']})" for r in not_run] or ["Everything selected ran."]
    dropped = [r for r in rows if r["kind"] == "rows-dropped"]
    if dropped or (end and end.get("problems")):
        lines += ["", f"File limits: {dropped[0]['note'] if dropped else ''} {'; '.join(end.get('problems') or [])}"]
    return "\n".join(lines) + "\n"


def write_summary(report: ReportDir) -> str:
    rows = list(read_rows(report.file(RESULTS)))
    try:
        text = summarize_report(rows, report.run)
    except Exception:  # the rows are intact; say in the summary why it could not be made from them
        report.row("summary", "error", error=_tail(traceback.format_exc()))
        text = f"# GPU report, run {report.run}\n\nThe summary failed (a bug in gpu_report):\n\n```\n" \
               f"{_tail(traceback.format_exc())}\n```\n\nEvery result is in results.jsonl.\n"
    report.write_text(SUMMARY, text)
    return text


# --- the run ----------------------------------------------------------------------------------------


STEP_FUNCTIONS = dict(env=step_env, parity=step_parity, tests=step_tests, headline=step_headline,
                      profile=step_profile, tuning=step_tuning, sweeps=step_sweeps)


def run_step(setup: Setup, name: str, seconds: float) -> str:
    """Runs step `name` in a box of `seconds` (SIGALRM GRACE seconds later); records its start, its end
    and what its box left out; returns its status."""
    report = setup.report
    report.row(name, "step-start", box_s=round(seconds, 1))
    print(f"== {name} (box {seconds:.0f} s)", flush=True)
    start, status, fields = time.monotonic(), "done", {}
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds + GRACE)
        try:
            STEP_FUNCTIONS[name](setup, Box(seconds))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except OutOfTime as stop:
        status = "out-of-time"
        report.row(name, "not-run", what=str(stop), reason="time")
    except StepTimeout:
        status = "timeout"
        fields["error"] = f"interrupted {GRACE:.0f} s after its box without reaching a checkpoint"
    except Terminated:
        report.row(name, "step-end", status="terminated", seconds=round(time.monotonic() - start, 2))
        raise
    except Exception:  # a bug or an unexpected failure of this step: recorded, and the next step runs
        status = "error"
        fields["error"] = _tail(traceback.format_exc())
    report.row(name, "step-end", status=status, seconds=round(time.monotonic() - start, 2), **fields)
    free_memory(setup.device)
    return status


def _raise(exception):
    def handler(signum, frame):
        raise exception()

    return handler


def make_setup(args, report: ReportDir) -> Setup:
    import run as bench

    device = torch.device("cpu" if args.smoke else "cuda")
    settings = SMOKE_SWEEPS if args.smoke else dict(bench.plan(False, device), repeats=30, warmup=5, steps=10)
    return Setup(smoke=args.smoke, device=device, dtype=torch.float32 if args.smoke else torch.bfloat16,
                 report=report, commit=args.commit or bench.git_commit(), budget=args.budget,
                 headline=SMOKE_HEADLINE if args.smoke else HEADLINE, parity=SMOKE_PARITY if args.smoke else PARITY,
                 tuning=SMOKE_TUNING if args.smoke else TUNING, sweeps=settings)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_report", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[4:]))
    parser.add_argument("--out", required=True, help="the report folder (created; rows are appended)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for all the steps")
    parser.add_argument("--only", nargs="+", choices=STEPS, metavar="STEP",
                        help=f"run only these steps (of {', '.join(STEPS)}; env always runs)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    parser.add_argument("--commit", default="", help="the commit measured, where the tree has no .git")
    args = parser.parse_args(argv)
    if not args.budget > 0:
        parser.error(f"--budget must be a positive number of seconds; got {args.budget}")
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        parser.error("no CUDA device here: --smoke runs every step on the CPU under Triton's interpreter")
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(ROOT, "build", "triton-cache"))

    start = time.time()
    run = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(start))
    report = ReportDir(args.out, run, start)
    deadline = time.monotonic() + args.budget
    signal.signal(signal.SIGALRM, _raise(StepTimeout))
    signal.signal(signal.SIGTERM, _raise(Terminated))
    selected = [name for name in STEPS if name in ALWAYS or not args.only or name in args.only]
    report.row("run", "run-start", argv=sys.argv[1:] if argv is None else list(argv), budget_s=args.budget,
               smoke=args.smoke, steps=selected)
    status = "done"
    try:
        setup = make_setup(args, report)
    except Exception:  # e.g. a module the benchmarks import is missing: nothing can run, say why
        report.row("run", "error", error=_tail(traceback.format_exc()))
        report.row("run", "run-end", status="error", seconds=round(time.time() - start, 1))
        print(write_summary(report), file=sys.stderr, flush=True)
        return 1
    try:
        scale = args.budget / DEFAULT_BUDGET
        for name in STEPS:
            if name not in selected:
                report.row(name, "not-run", what=f"{name}: the whole step", reason="not selected by --only")
                continue
            left = deadline - time.monotonic() - SUMMARY_RESERVE - GRACE
            share = SHARES.get(name, math.inf) * (1.0 if name in UNSCALED else scale)
            seconds = min(share, left)
            if seconds < MIN_BOX:
                report.row(name, "not-run", what=f"{name}: the whole step", reason="time")
                continue
            run_step(setup, name, seconds)
            write_summary(report)
    except Terminated:
        status = "terminated"
    report.row("run", "run-end", status=status, seconds=round(time.time() - start, 1),
               dropped_rows=report.dropped_rows, problems=limit_problems(args.out))
    print(write_summary(report), flush=True)
    print(f"wrote {os.path.join(args.out, RESULTS)} and {os.path.join(args.out, SUMMARY)}", flush=True)
    return 0 if status == "done" else 143


if __name__ == "__main__":
    sys.exit(main())
