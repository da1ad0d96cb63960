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

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .fused import modulation, projection, routing
from .layer import triton_interpreting

TRITON_TYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16", "u8": "*u8", "i8": "*i8"}
FLOAT_ARGS = {"scaling", "temperature", "gamma_routing", "theta", "tau"}
PRECISION = {"fp32": "ieee", "bf16": "tf32", "fp16": "tf32"}
ACTIVATIONS = ["bf16", "fp32", "fp16"]
PARAMETERS = ["fp32", "bf16", "fp16"]
LANES = [2, 4, 8, 16, 32, 64]
DOT_WIDTHS = [16, 32, 64, 128]


@dataclass
class KernelSpec:
    """One kernel: its pointer arguments' kinds ('act', 'param' or a fixed type), its fixed
    constexprs, its axes (name -> values, the first being the baseline), and `blocks`: the block
    sizes and warps its launcher picks for a variant (the same function the launcher calls)."""

    name: str
    kernel: object
    pointers: Dict[str, str]
    fixed: Dict[str, object]
    axes: Dict[str, list] = field(default_factory=dict)
    blocks: Callable[[Dict[str, object]], Dict[str, int]] = lambda variant: {}

    def variants(self, exhaustive: bool) -> List[Dict[str, object]]:
        baseline = {axis: values[0] for axis, values in self.axes.items()}
        if exhaustive:
            return [dict(zip(self.axes, combo)) for combo in itertools.product(*self.axes.values())]
        out = [baseline]
        for axis, values in self.axes.items():
            out += [{**baseline, axis: value} for value in values[1:]]
        return out

    def source(self, variant: Dict[str, object]) -> Tuple[ASTSource, str, int]:
        """(source, label, num_warps) of one build."""
        act, param = variant.get("act", "fp32"), variant.get("param", "fp32")
        constexprs = dict(self.fixed)
        constexprs.update({k: v for k, v in variant.items() if k not in ("act", "param")})
        blocks = dict(self.blocks(constexprs))
        num_warps = blocks.pop("num_warps", 4)
        constexprs.update(blocks)
        if "PRECISION" in self.kernel.arg_names:
            constexprs["PRECISION"] = PRECISION[act]
        signature = {}
        for param_spec in self.kernel.params:
            arg = param_spec.name
            if param_spec.is_constexpr:
                signature[arg] = "constexpr"
            elif arg.endswith("_ptr"):
                kind = self.pointers.get(arg, "fp32")
                signature[arg] = TRITON_TYPES[{"act": act, "param": param}.get(kind, kind)]
            else:
                signature[arg] = "fp32" if arg in FLOAT_ARGS else "i32"
        label = ", ".join(f"{k}={v}" for k, v in variant.items())
        return ASTSource(fn=self.kernel, signature=signature, constexprs=constexprs), label, num_warps


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
                                spec.axes if not specs else {k: v[:1] for k, v in spec.axes.items()}, spec.blocks))
    return specs


def kernel_specs() -> List[KernelSpec]:
    routing_ptrs = {"valid_ptr": "u8", "selected_ptr": "i8"}

    def routing_blocks(constexprs):
        return routing.routing_blocks(constexprs["E_PAD"])

    def projection_blocks(constexprs):
        return projection.projection_blocks(max(constexprs.get("RANK_DOT", 16), constexprs.get("EXPERT_DOT", 16)))

    def modulation_forward_blocks(constexprs):
        return modulation.FORWARD_BLOCKS

    def modulation_backward_blocks(constexprs):
        return modulation.BACKWARD_BLOCKS

    specs = [
        KernelSpec("down_projection", projection._down_projection_kernel, {"x_ptr": "act", "a_ptr": "param"}, {},
                   dict(act=ACTIVATIONS, param=PARAMETERS, RANK_DOT=DOT_WIDTHS), projection_blocks),
        KernelSpec("down_projection_grad", projection._down_projection_grad_kernel, {"x_ptr": "act"}, {},
                   dict(act=ACTIVATIONS, RANK_DOT=DOT_WIDTHS, ATOMIC=[False, True]), projection_blocks),
        KernelSpec("low_rank_input_grad", projection._low_rank_input_grad_kernel,
                   {"dx_ptr": "act", "w_ptr": "act", "a_ptr": "param"}, {},
                   dict(act=ACTIVATIONS, param=PARAMETERS, EXPERT_DOT=DOT_WIDTHS[:3], RANK_DOT=DOT_WIDTHS,
                        HAS_ROUTED=[True, False], HAS_ADAPTER=[True, False]),
                   projection_blocks),
        KernelSpec("sequence_summary", routing._sequence_summary_kernel, routing_ptrs, {},
                   dict(REP=[1, 2], HAS_MASK=[True, False], E_PAD=LANES), routing_blocks),
        *_pooling_axes(KernelSpec("pooled_absmax", routing._pooled_absmax_kernel, routing_ptrs, {},
                                  dict(HAS_MASK=[True, False], E_PAD=LANES), routing_blocks)),
        *_pooling_axes(KernelSpec("routing_forward", routing._routing_forward_kernel, routing_ptrs, {},
                                  dict(SELECTION=[0, 1, 2, 3], MAXABS=[False, True], HAS_MASK=[True, False],
                                       HAS_JITTER=[True, False], E_PAD=LANES), routing_blocks)),
        KernelSpec("routing_backward", routing._routing_backward_kernel, routing_ptrs, {},
                   dict(SELECTION=[0, 1, 2, 3], MAXABS=[False, True], HAS_MASK=[True, False],
                        HAS_JITTER=[True, False], HAS_DPROBS_SUM=[True, False], E_PAD=LANES), routing_blocks),
        KernelSpec("pooling_backward", routing._pooling_backward_kernel, routing_ptrs, {},
                   dict(WINDOW=[True, False], ANCHOR=[False, True], MAXABS=[False, True], WHICH=[0, 1],
                        HAS_MASK=[True, False], E_PAD=LANES), routing_blocks),
        KernelSpec("sequence_summary_backward", routing._sequence_summary_backward_kernel, routing_ptrs, {},
                   dict(REP=[1, 2], MAXABS=[False, True], WHICH=[0, 1], HAS_MASK=[True, False], E_PAD=LANES),
                   routing_blocks),
        KernelSpec("modulation_forward", modulation._modulation_forward_kernel,
                   {"base_ptr": "act", "out_ptr": "act", "b_ptr": "param", "p_ptr": "param", "shared_ptr": "param",
                    "gamma_ptr": "param", "valid_ptr": "u8", "bias_ptr": "act"}, {},
                   dict(act=ACTIVATIONS, param=PARAMETERS, HAS_MASK=[True, False], HAS_SHARED=[True, False],
                        HAS_SCALE=[False, True], HAS_BIAS=[False, True]),
                   modulation_forward_blocks),
        KernelSpec("modulation_backward", modulation._modulation_backward_kernel,
                   {"dout_ptr": "act", "b_ptr": "param", "p_ptr": "param", "shared_ptr": "param", "gamma_ptr": "param",
                    "valid_ptr": "u8", "base_ptr": "act"}, {},
                   dict(act=ACTIVATIONS, param=PARAMETERS, HAS_MASK=[True, False], HAS_SHARED=[True, False],
                        HAS_SCALE=[False, True], INPUT_GRADS=[True, False], PARAM_GRADS=[True, False],
                        ATOMIC=[False, True]),
                   modulation_backward_blocks),
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
    source, label, num_warps = spec.source(variant)
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        registers, spills = _resources(compiled.asm["ptx"], arch)
    except Exception as error:  # reported, counted as a failure, and the run exits non-zero
        return spec.name, label, arch, f"FAILED: {type(error).__name__}: {str(error).strip().splitlines()[-1]}"
    status = "SPILLS" if spills else "ok"
    return spec.name, label, arch, (f"{status}: {registers} registers, {spills} spilled bytes, "
                                    f"{compiled.metadata.shared} bytes shared, {compiled.metadata.num_warps} warps")


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
            for variant in spec.variants(args.exhaustive) for arch in args.arch]
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
    print(f"{len(jobs) - failures}/{len(jobs)} builds ok in {time.time() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
