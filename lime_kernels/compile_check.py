"""Compile every fused kernel for real GPU targets on a machine without a GPU.

    python -m lime_kernels.compile_check [--arch 80 90] [--exhaustive] [--jobs N]

Triton's interpreter runs kernels on the CPU but enforces none of the GPU's rules (`tl.dot` shapes,
types, register and shared-memory limits); `triton.compile` for `GPUTarget("cuda", arch, 32)` does,
and runs here. For each kernel the default checks a covering set of its specializations: a
baseline, then every other value of every constexpr option and of the activation and parameter
dtypes, one at a time (`--exhaustive`: every combination, which takes hours). For each build it
prints registers, spilled bytes and shared memory (from `ptxas -v`), and it exits non-zero if any
build fails or spills.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .fused import finish, modulation, projection, routing
from .layer import triton_interpreting

TRITON_TYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16", "u8": "*u8", "i8": "*i8", "i32": "*i32",
                "i64": "*i64"}
FLOAT_ARGS = {"scaling", "temperature", "gamma_routing", "theta", "tau"}
PRECISION = {"fp32": "ieee", "bf16": "tf32", "fp16": "tf32"}
ACT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ACTIVATIONS = ["bf16", "fp32", "fp16"]
PARAMETERS = ["fp32", "bf16", "fp16"]
LANES = [16, 32, 64]
DOT_WIDTHS = [16, 32, 64, 128]
# Integer arguments that real shapes make multiples of 16 (hidden sizes, strides, 8,192 tokens): the
# `aligned` builds mark them, and every pointer, divisible by 16, as Triton's launcher does for them.
SHAPE_ARGS = {"num_tokens", "in_features", "out_features", "stride_x", "stride_frozen", "stride_out", "stride_w_out",
              "tokens_per_split"}


@dataclass
class KernelSpec:
    """One kernel: its pointer arguments' kinds ('act', 'param' or a fixed type), its fixed
    constexprs, its axes (name -> values, the first being the baseline), `blocks`: the block sizes,
    warps and register limit its launcher picks for a variant and activation dtype (the same function
    the launcher calls; None for a variant the launcher never starts), and the compile `options` its
    launcher passes (`enable_fp_fusion`)."""

    name: str
    kernel: object
    pointers: Dict[str, str]
    fixed: Dict[str, object]
    axes: Dict[str, list] = field(default_factory=dict)
    blocks: Callable[[Dict[str, object], str], Dict[str, int]] = lambda constexprs, act: {}
    options: Dict[str, object] = field(default_factory=dict)

    def baseline(self) -> Dict[str, object]:
        return {axis: values[0] for axis, values in {"aligned": [False, True], **self.axes}.items()}

    def variants(self, exhaustive: bool) -> List[Dict[str, object]]:
        axes = {"aligned": [False, True], **self.axes}
        baseline = self.baseline()
        if exhaustive:
            return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())]
        out = [baseline]
        for axis, values in axes.items():
            out += [{**baseline, axis: value} for value in values[1:]]
        return out

    def _blocks(self, variant: Dict[str, object]):
        constexprs = dict(self.fixed)
        constexprs.update({k: v for k, v in variant.items() if k not in ("act", "param", "aligned")})
        return constexprs, self.blocks(constexprs, variant.get("act", "fp32"))

    def launched(self, variant: Dict[str, object]) -> bool:
        return self._blocks(variant)[1] is not None

    def source(self, variant: Dict[str, object]) -> Tuple[ASTSource, str, Dict[str, object]]:
        """(source, label, compile options) of one build."""
        act, param = variant.get("act", "fp32"), variant.get("param", "fp32")
        aligned = variant.get("aligned", False)
        constexprs, blocks = self._blocks(variant)
        blocks = dict(blocks)
        # Launch options among the blocks (num_warps, a register limit) are compile options here too.
        options = {key: blocks.pop(key) for key in ("num_warps", "maxnreg") if key in blocks}
        options = {"num_warps": 4, **options, **self.options}
        constexprs.update(blocks)
        if "PRECISION" in self.kernel.arg_names:
            constexprs["PRECISION"] = PRECISION[act]
        signature = {}
        attrs = {}
        for index, param_spec in enumerate(self.kernel.params):
            arg = param_spec.name
            if param_spec.is_constexpr:
                signature[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                kind = self.pointers.get(arg, "fp32")
                signature[arg] = TRITON_TYPES[{"act": act, "param": param}.get(kind, kind)]
                if aligned:
                    attrs[(index,)] = [["tt.divisibility", 16]]
            else:
                signature[arg] = "fp32" if arg in FLOAT_ARGS else "i32"
                if aligned and arg in SHAPE_ARGS:
                    attrs[(index,)] = [["tt.divisibility", 16]]
        label = ", ".join(f"{k}={v}" for k, v in variant.items())
        return ASTSource(fn=self.kernel, signature=signature, constexprs=constexprs, attrs=attrs), label, options


POOLING = [dict(REP=0, WINDOW=False, ANCHOR=False), dict(REP=0, WINDOW=True, ANCHOR=False),
           dict(REP=0, WINDOW=False, ANCHOR=True), dict(REP=1, WINDOW=False, ANCHOR=False),
           dict(REP=2, WINDOW=False, ANCHOR=False)]


def _pooling_axes(spec: KernelSpec) -> List[KernelSpec]:
    """The pooling modes change three constexprs together: one spec per mode."""
    specs = []
    for mode in POOLING:
        label = {0: "token", 1: "mean", 2: "last"}[mode["REP"]] + ("-window" if mode["WINDOW"] else "") + (
            "-anchor" if mode["ANCHOR"] else "")
        specs.append(KernelSpec(f"{spec.name}[{label}]", spec.kernel, spec.pointers, {**spec.fixed, **mode},
                                spec.axes if not specs else {k: v[:1] for k, v in spec.axes.items()}, spec.blocks,
                                spec.options))
    return specs


NO_CONTRACTION = {"enable_fp_fusion": False}


def kernel_specs() -> List[KernelSpec]:
    routing_ptrs = {"valid_ptr": "u8", "selected_ptr": "i8"}
    # The parameter gradients (and gamma) have the parameters' dtype.
    grad_ptrs = {name: "param" for name in ("gamma_ptr", "da_ptr", "db_ptr", "dp_ptr", "dshared_ptr", "dgamma_ptr",
                                            "dscale_ptr")}

    def routing_blocks(constexprs, act):
        return dict(BLOCK_T=routing.routing_rows(constexprs["LANES"]), num_warps=routing.ROUTING_WARPS)

    def routing_forward_blocks(constexprs, act):
        return dict(routing_blocks(constexprs, act), HIST_LANES=routing.histogram_lanes(constexprs["LANES"]))

    def project_blocks(constexprs, act):
        # A configuration with E = LANES experts and rank = RANK_DOT, routed per token, at a long input.
        config = routing.RoutingConfig(constexprs["LANES"], 1, 0, 1, False, False, False, 0, 1, 1.0, 0.5, 0.5, 0.5)
        if constexprs["ROUTE"] != projection.routes_inline(config, constexprs["RANK_DOT"]):
            return None  # the launcher routes these widths in the routing kernel instead
        return dict(projection.projection_blocks(65536, constexprs["RANK_DOT"], config, ACT_DTYPES[act]),
                    HIST_LANES=routing.histogram_lanes(constexprs["LANES"]))

    def forward_blocks(constexprs, act):
        return dict(modulation.FORWARD_BLOCKS, HIST_LANES=routing.histogram_lanes(constexprs["LANES"]))

    selection_axes = dict(SELECTION=[0, 1, 2, 3], HAS_MASK=[True, False], HAS_JITTER=[True, False], LANES=LANES)
    specs = [
        KernelSpec("project", projection._project_kernel,
                   {"x_ptr": "act", "a_ptr": "param", "b_ptr": "param", "frozen_ptr": "act", "bias_ptr": "act",
                    **routing_ptrs}, {},
                   dict(act=ACTIVATIONS, param=PARAMETERS, ROUTE=[True, False], HAS_A=[True, False],
                        HAS_SCALE=[False, True], HAS_BIAS=[False, True], RANK_DOT=DOT_WIDTHS, **selection_axes),
                   project_blocks, NO_CONTRACTION),
        KernelSpec("sequence_summary", routing._sequence_summary_kernel, routing_ptrs, {},
                   dict(REP=[1, 2], HAS_MASK=[True, False], LANES=LANES), routing_blocks),
        *_pooling_axes(KernelSpec("pooled_absmax", routing._pooled_absmax_kernel, routing_ptrs, {},
                                  dict(HAS_MASK=[True, False], LANES=LANES),
                                  lambda c, act: dict(BLOCK_T=routing.absmax_rows(c["LANES"]), num_warps=4))),
        *_pooling_axes(KernelSpec("routing_forward", routing._routing_forward_kernel, routing_ptrs, {},
                                  dict(MAXABS=[False, True], **selection_axes), routing_forward_blocks,
                                  {"maxnreg": routing.ROUTING_FORWARD_REGISTERS})),
        KernelSpec("pooling_backward", routing._pooling_backward_kernel, routing_ptrs, {},
                   dict(WINDOW=[True, False], ANCHOR=[False, True], MAXABS=[False, True], HAS_MASK=[True, False],
                        LANES=LANES), routing_blocks),
        KernelSpec("sequence_summary_backward", routing._sequence_summary_backward_kernel, routing_ptrs, {},
                   dict(REP=[1, 2], MAXABS=[False, True], HAS_MASK=[True, False], LANES=LANES), routing_blocks),
        KernelSpec("modulation_forward", modulation._modulation_forward_kernel,
                   {"frozen_ptr": "act", "out_ptr": "act", "b_ptr": "param", "p_ptr": "param", "shared_ptr": "param",
                    "gamma_ptr": "param", "valid_ptr": "u8", "bias_ptr": "act", "histogram_ptr": "i64"}, {},
                   dict(act=ACTIVATIONS, param=PARAMETERS, HAS_MASK=[True, False], HAS_SHARED=[True, False],
                        HAS_SCALE=[False, True], HAS_BIAS=[False, True], RANK_DOT=DOT_WIDTHS, LANES=LANES),
                   forward_blocks, NO_CONTRACTION),
        KernelSpec("modulation_backward", modulation._modulation_backward_kernel,
                   {"dout_ptr": "act", "b_ptr": "param", "p_ptr": "param", "shared_ptr": "param", "gamma_ptr": "param",
                    "frozen_ptr": "act", "counters_ptr": "i32", **routing_ptrs}, {},
                   dict(act=ACTIVATIONS, param=PARAMETERS, PARTIALS=[True, False], ROUTING=[True, False],
                        HAS_SHARED=[True, False], HAS_SCALE=[False, True], HAS_DIMPORTANCE=[True, False],
                        HAS_DKL=[True, False], MAXABS=[False, True], RANK_DOT=DOT_WIDTHS, **selection_axes),
                   lambda c, act: modulation.backward_blocks(c["RANK_DOT"], c["LANES"], ACT_DTYPES[act])),
        KernelSpec("input_grad", projection._input_grad_kernel,
                   {"dout_ptr": "act", "x_ptr": "act", "w_ptr": "act", "a_ptr": "param", "b_ptr": "param",
                    "frozen_ptr": "act", "dx_ptr": "act", "dxa_ptr": "act", "counters_ptr": "i32", **grad_ptrs}, {},
                   dict(act=ACTIVATIONS, param=PARAMETERS, ROUTED_INTO_DX=[True, False], ADAPTER_INTO_DX=[True, False],
                        ADAPTER_GRAD=[False, True], HAS_DA=[True, False], ROUTING_PARTIALS=[True, False],
                        HAS_SCALE=[False, True], FINISH=[True, False], NEED_B=[True, False], NEED_P=[True, False],
                        NEED_SHARED=[True, False], NEED_GAMMA=[True, False], NEED_SCALE=[False, True],
                        RANK_DOT=DOT_WIDTHS, ROUTED_DOT=DOT_WIDTHS, LANES=LANES),
                   lambda c, act: projection.input_grad_blocks(c["RANK_DOT"], c["ROUTED_DOT"], c["LANES"],
                                                               ACT_DTYPES[act])),
        KernelSpec("finish", finish._finish_kernel, grad_ptrs, {},
                   dict(param=PARAMETERS, NEED_B=[True, False], NEED_P=[True, False], NEED_SHARED=[True, False],
                        NEED_GAMMA=[True, False], NEED_SCALE=[False, True], HAS_SCALE=[False, True],
                        RANK_DOT=DOT_WIDTHS, LANES=LANES),
                   lambda c, act: finish.finish_blocks(c["RANK_DOT"])),
    ]
    return specs


def _ptxas() -> str:
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    path = bundled if os.path.exists(bundled) else shutil.which("ptxas")
    if path is None:
        raise SystemExit("compile_check: no ptxas found (neither Triton's bundled one nor on PATH)")
    return path


def _resources(ptx: str, arch: int) -> Tuple[int, int]:
    """(registers, spilled bytes) as ptxas -v reports them."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
    try:
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        result = subprocess.run([_ptxas(), "-v", f"--gpu-name={gpu}", handle.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True)
    finally:
        os.unlink(handle.name)
    registers = max(int(m) for m in re.findall(r"Used (\d+) registers", result.stderr))
    spills = sum(int(m) for m in re.findall(r"(\d+) bytes spill (?:stores|loads)", result.stderr))
    return registers, spills


def _build(job) -> Tuple[str, str, int, str]:
    """Compile one (spec index, variant, arch); returns (name, label, arch, report or error)."""
    spec_index, variant, arch = job
    spec = kernel_specs()[spec_index]
    source, label, options = spec.source(variant)
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
        registers, spills = _resources(compiled.asm["ptx"], arch)
    except Exception as error:  # reported, counted as a failure, and the run exits non-zero
        return spec.name, label, arch, f"FAILED: {type(error).__name__}: {str(error).strip().splitlines()[-1]}"
    status = "SPILLS" if spills else "ok"
    return spec.name, label, arch, (f"{status}: {registers} registers, {spills} spilled bytes, "
                                    f"{compiled.metadata.shared} bytes shared, {compiled.metadata.num_warps} warps")


def _ptx(spec_index: int, variant: Dict[str, object], arch: int, options: Dict[str, object] = None) -> str:
    """The PTX of one build, with its launcher's compile options (and `options` over them)."""
    source, _, spec_options = kernel_specs()[spec_index].source(variant)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={**spec_options, **(options or {})})
    return compiled.asm["ptx"]


def _fma_count(job) -> int:
    """Fused multiply-adds (`fma.rn.f32`) in the PTX of one build, with the given compile options."""
    spec_index, variant, arch, options = job
    return _ptx(spec_index, variant, arch, options).count("fma.rn.f32")


def contraction_checks(arch: int, kernels) -> List[Tuple[str, Callable[[Sequence[int]], bool], list]]:
    """DoRA's `scale * base + bias` must round twice, as the reference does: in the kernels that
    compute it (launched with `enable_fp_fusion=False`), HAS_SCALE adds no `fma.rn.f32`; built with
    contraction allowed, it does (so the check can see a contraction)."""
    checks = []
    for index, spec in enumerate(kernel_specs()):
        if spec.options.get("enable_fp_fusion", True) or "HAS_SCALE" not in spec.axes:
            continue
        if kernels is not None and not any(k in spec.name for k in kernels):
            continue
        for act in ("fp32", "bf16"):
            variant = {**spec.baseline(), "act": act, "HAS_BIAS": True}
            builds = [(index, {**variant, "HAS_SCALE": scale}, arch, {"enable_fp_fusion": fusion})
                      for fusion in (False, True) for scale in (False, True)]
            checks.append((f"{spec.name} [act={act}]", lambda counts: counts[0] == counts[1] and counts[3] > counts[2],
                           builds))
    return checks


def arrival_ordered(ptx: str) -> bool:
    """Whether a kernel's arrival at a counter is ordered as `finish.arrive_last` needs: a CTA barrier
    between its last global store and the single-thread acquire-release atomic (so the atomic publishes
    every thread's stores), and another between the atomic and the first L1-bypassing load (so every
    thread reads after the acquire)."""
    lines = [line.strip() for line in ptx.splitlines()]
    atomics = [i for i, line in enumerate(lines) if "atom.global.gpu.acq_rel.add" in line]
    if len(atomics) != 1 or not lines[atomics[0]].startswith("@"):
        return False
    atomic = atomics[0]
    stores = [i for i in range(atomic) if "st.global" in lines[i]]
    loads = [i for i in range(atomic, len(lines)) if "ld.global.cg" in lines[i]]
    if not stores or not loads:
        return False
    return (any(lines[i].startswith("bar.sync") for i in range(stores[-1], atomic))
            and any(lines[i].startswith("bar.sync") for i in range(atomic, loads[0])))


def _arrival_order(job) -> bool:
    return arrival_ordered(_ptx(*job))


def arrival_jobs(archs: Sequence[int], kernels) -> list:
    """The input pass with FINISH (its baseline), for each architecture."""
    return [(index, spec.baseline(), arch) for index, spec in enumerate(kernel_specs())
            if spec.name == "input_grad" and (kernels is None or any(k in spec.name for k in kernels))
            for arch in archs]


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lime_kernels.compile_check", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    parser.add_argument("--exhaustive", action="store_true", help="every combination of every axis (very long)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    parser.add_argument("--kernels", nargs="+", default=None, help="only kernels whose name contains one of these")
    args = parser.parse_args(argv)
    if triton_interpreting():
        parser.error("unset TRITON_INTERPRET: the check compiles for real GPU targets")
    jobs = [(index, variant, arch) for index, spec in enumerate(kernel_specs())
            if args.kernels is None or any(k in spec.name for k in args.kernels)
            for variant in spec.variants(args.exhaustive) if spec.launched(variant) for arch in args.arch]
    if not jobs:
        parser.error(f"no kernel matches --kernels {' '.join(args.kernels)}")
    print(f"compiling {len(jobs)} kernel builds for sm_{', sm_'.join(map(str, args.arch))} "
          f"(Triton {triton.__version__}, ptxas {_ptxas()})", flush=True)
    start = time.time()
    failures = 0
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for name, label, arch, report in pool.map(_build, jobs):
            failures += not report.startswith("ok")
            print(f"sm_{arch} {name} [{label}]: {report}", flush=True)
        checks = contraction_checks(max(args.arch), args.kernels)
        for name, passes, builds in checks:
            counts = list(pool.map(_fma_count, builds))
            ok = passes(counts)
            failures += not ok
            print(f"sm_{max(args.arch)} {name} no FMA contraction of DoRA's scale and bias: {'ok' if ok else 'FAILED'} "
                  f"(fma.rn.f32 without / with HAS_SCALE: {counts[0]} / {counts[1]}; contraction allowed: "
                  f"{counts[2]} / {counts[3]})", flush=True)
        arrivals = arrival_jobs(args.arch, args.kernels)
        for (_, variant, arch), ok in zip(arrivals, pool.map(_arrival_order, arrivals)):
            failures += not ok
            print(f"sm_{arch} input_grad [FINISH={variant['FINISH']}] barrier, acq_rel atomic, barrier around the "
                  f"arrival: {'ok' if ok else 'FAILED'}", flush=True)
    total = len(jobs) + len(checks) + len(arrivals)
    print(f"{total - failures}/{total} builds and checks ok in {time.time() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
