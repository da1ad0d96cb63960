"""LiME's adapter, routing and modulation as one C++ operator each way on the CPU (`routing.cpp`).

On small layers (LLaVA-OneVision-0.5B's 896-wide projections, every decoding step) LiME's cost on the CPU
is host time: the eager reference path dispatches about 40 ATen operators forward and 70 backward per layer,
where a LoRA needs 14 and 25. `torch.ops.lime_cpu.lora_route_modulate` (the adapter's products, routing and
modulation) and `torch.ops.lime_cpu.route_modulate` (routing and modulation of a given delta), with their
backwards, compute those steps per token in one pass over the output. Their autograd nodes are made in C++ (an
Autograd kernel for each forward operator, whose backward calls the backward operator), not in Python;
`lime_kernels.eager` calls them (backend 'cpu', what 'auto' takes for CPU inputs).

The extension is compiled with the machine's C++ compiler (`torch.utils.cpp_extension.load`, cached under
`TORCH_EXTENSIONS_DIR` per source, about 20 s once) when a layer that may use it is created; `make test`
builds it first (`python -m lime_kernels.cpu`). Where it cannot be built, `unavailable_reason()` says why:
`backend='cpu'` then raises with that reason, and `backend='auto'` warns once and runs the reference path.

Every operator has a fake (meta) implementation, so `torch.compile` can trace a call of it as an opaque call (the
layers themselves trace the reference under torch.compile: `eager._traces_reference`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from typing import Optional

import torch

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "routing.cpp")
_LOCK = threading.Lock()
_state = {"tried": False, "reason": None}


def _ninja_on_path() -> Optional[str]:
    """Why ninja (which `cpp_extension.load` requires) cannot be found, or None. The `ninja` wheel's binary
    lies in the venv's bin folder, which is not on PATH when the venv's python runs unactivated: it is added."""
    if shutil.which("ninja") is not None:
        return None
    try:
        import ninja
    except ImportError:
        return "ninja is not installed (pip install ninja)"
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return None


def _extension_name() -> str:
    """The build's name, keyed by the source: clones with the same source share one build, and clones with
    different ones (a branch beside main) keep theirs instead of rebuilding over each other."""
    with open(_SOURCE, "rb") as source:
        return "lime_cpu_routing_" + hashlib.sha256(source.read()).hexdigest()[:12]


def _build() -> Optional[str]:
    """Compile and load the extension; why it failed, or None."""
    if os.environ.get("LIME_CPU_KERNEL", "1") == "0":
        return "the environment sets LIME_CPU_KERNEL=0"
    reason = _ninja_on_path()
    if reason is not None:
        return reason
    # Importing cpp_extension on a machine without CUDA logs that no CUDA runtime was found: irrelevant to a CPU
    # build, and it would print in every process that loads the operators.
    extension_log = logging.getLogger("torch.utils.cpp_extension")
    level = extension_log.level
    extension_log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        extension_log.setLevel(level)
    try:
        cpp_extension.load(name=_extension_name(), sources=[_SOURCE], extra_cflags=["-O3", "-fopenmp"],
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except (RuntimeError, OSError, ImportError) as error:  # a compiler error, no compiler, or a failed dlopen
        first_lines = "\n".join(str(error).strip().splitlines()[:6])
        return f"the C++ extension lime_kernels/cpu/routing.cpp did not build: {first_lines}"
    _register_fakes()
    return None


def unavailable_reason() -> Optional[str]:
    """None when the operators are loaded (building them on the first call), else why they cannot be. After the
    first call a plain read (every layer call asks; torch.compile traces it as a constant)."""
    if not _state["tried"]:
        with _LOCK:
            if not _state["tried"]:
                _state["reason"] = _build()
                _state["tried"] = True
    return _state["reason"]


def available() -> bool:
    return unavailable_reason() is None


def _register_fakes() -> None:
    """Shapes and dtypes of the operators' outputs without running them (torch.compile, meta tensors), as the
    C++ gives them: outputs in the shape and dtype of their inputs, intermediates in the compute dtype."""

    def compute_dtype(*tensors):
        return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32

    @torch.library.register_fake("lime_cpu::route_modulate")
    def _(base, delta, frozen, adapted, experts, shared, gamma, valid, jitter, *options):
        return torch.empty_like(base), base.new_empty((*base.shape[:-1], experts.shape[0]),
                                                      dtype=compute_dtype(base, delta, experts, shared))

    @torch.library.register_fake("lime_cpu::route_modulate_backward")
    def _(grad_out, grad_probs, base, delta, frozen, adapted, experts, shared, gamma, valid, jitter, maxabs, selection,
          top_k, max_kept, theta, tau, frozen_coef, adapted_coef, needs_base, needs_delta, needs_features,
          needs_experts, needs_shared):
        dtype = compute_dtype(base, delta, experts, shared)

        def none():  # one empty tensor per output not asked for: outputs never alias
            return base.new_empty((0,), dtype=dtype)

        pooled = frozen is not None and needs_features
        with_shared = shared is not None and needs_shared
        return (torch.empty_like(base) if needs_base else none(),
                delta.new_empty(delta.shape, dtype=dtype) if needs_delta else none(),
                frozen.new_empty(frozen.shape, dtype=dtype) if pooled else none(),
                adapted.new_empty(adapted.shape, dtype=dtype) if pooled else none(),
                torch.empty_like(experts) if needs_experts else none(),
                torch.empty_like(shared) if with_shared else none(),
                torch.empty_like(gamma) if with_shared else none())

    @torch.library.register_fake("lime_cpu::lora_route_modulate")
    def _(x, base, A, B, scaling, experts, shared, gamma, valid, jitter, *options):
        projection = compute_dtype(x, A, B)
        delta = x.new_empty((*x.shape[:-1], B.shape[0]), dtype=projection)
        return (torch.empty_like(base), base.new_empty((*base.shape[:-1], experts.shape[0]),
                                                       dtype=compute_dtype(base, delta, experts, shared)),
                x.new_empty((x.numel() // x.shape[-1], A.shape[0]), dtype=projection), delta)

    @torch.library.register_fake("lime_cpu::lora_route_modulate_backward")
    def _(grad_out, grad_probs, x, projected, A, B, scaling, base, delta, experts, shared, gamma, valid, jitter, maxabs,
          selection, top_k, max_kept, theta, tau, frozen_coef, adapted_coef, needs_base, needs_x, needs_A, needs_B,
          needs_experts, needs_shared):
        routed_dtype = compute_dtype(base, delta, experts, shared)

        def routed():  # what the routing's backward leaves out, in its dtype (one tensor each)
            return projected.new_empty((0,), dtype=routed_dtype)

        def projection():  # what the adapter's backward leaves out
            return projected.new_empty((0,))

        with_shared = shared is not None and needs_shared
        return (torch.empty_like(base) if needs_base else routed(), torch.empty_like(x) if needs_x else projection(),
                torch.empty_like(A) if needs_A else projection(), torch.empty_like(B) if needs_B else projection(),
                torch.empty_like(experts) if needs_experts else routed(),
                torch.empty_like(shared) if with_shared else routed(),
                torch.empty_like(gamma) if with_shared else routed())
