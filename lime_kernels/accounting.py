"""What a call costs, counted from the code that runs: every ATen operator it dispatches and every
Triton kernel it launches.

`account()` records, for the code run inside it, the ATen operators (`OpRecord`: whether each
launches a kernel, whether it synchronizes the host with the device, the bytes of its tensor inputs
and outputs, its FLOPs) and the Triton launches (`lime_kernels.fused.common.Launch`: the bytes and
FLOPs each launcher states from the tensors it passes). With `compute=False` nothing is computed:
operators run on meta tensors to get their outputs' shapes (outputs are uninitialized), and Triton
kernels are not started, so a 7B-sized layer can be accounted for on a CPU in milliseconds. The
custom ops `lime::fused_lime*` are followed into their Python implementations, so their own ATen
operators and launches are counted too.

Used by the tests (no host synchronization, no zero-filled gradient, bounded workspace) and by
`benchmarks/cost_model.py`. `graph_host_syncs` reads the same operators out of a graph that
torch.compile traced.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only

# Operators that copy a value to the host or size their output by the data: a host synchronization
# on a GPU (on the CPU they are simply counted).
SYNC_OPS = {
    "aten::_local_scalar_dense", "aten::nonzero", "aten::nonzero_static", "aten::masked_select", "aten::bincount",
    "aten::unique", "aten::_unique", "aten::_unique2", "aten::unique_consecutive", "aten::unique_dim",
    "aten::repeat_interleave", "aten::is_nonzero", "aten::equal", "aten::item", "aten::masked_scatter",
    "aten::histc", "aten::tolist",
}
# Operators that only allocate memory, and those that only describe tensors: no kernel.
ALLOCATION_OPS = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty",
                  "aten::new_empty_strided"}
METADATA_OPS = {"aten::lift_fresh", "aten::_unsafe_view", "aten::_reshape_alias", "aten::sym_size", "aten::sym_stride", "aten::sym_numel",
                "aten::sym_storage_offset", "aten::is_same_size", "aten::_has_compatible_shallow_copy_type"}
# Operators that fill a tensor with a constant (a zero-filled gradient, say).
FILL_OPS = {"aten::zeros", "aten::zeros_like", "aten::new_zeros", "aten::zero_", "aten::fill_", "aten::full",
            "aten::full_like", "aten::new_full", "aten::ones", "aten::ones_like", "aten::new_ones"}
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_", "aten::addbmm", "aten::linear"}


@dataclass(frozen=True)
class OpRecord:
    """One dispatched ATen operator."""

    name: str
    launches: bool
    syncs: bool
    bytes_read: int
    bytes_written: int
    bytes_allocated: int  # new memory an allocation operator (empty, empty_like, ...) hands out
    flops: int
    output_shapes: Tuple[Tuple[int, ...], ...]


@dataclass
class Account:
    ops: List[OpRecord] = field(default_factory=list)
    launches: list = field(default_factory=list)  # lime_kernels.fused.common.Launch

    @property
    def kernel_launches(self) -> int:
        """ATen operators that launch a kernel, plus Triton launches."""
        return sum(op.launches for op in self.ops) + len(self.launches)

    @property
    def bytes_allocated(self) -> int:
        """Memory handed out by allocation operators (the upper bound of what the block holds at once)."""
        return sum(op.bytes_allocated for op in self.ops)

    @property
    def host_syncs(self) -> List[str]:
        return [op.name for op in self.ops if op.syncs]

    def named(self, names) -> List[OpRecord]:
        return [op for op in self.ops if op.name in names]


def _tensors(tree) -> List[torch.Tensor]:
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _matmul_flops(name: str, args) -> int:
    tensors = _tensors(args)
    if name == "aten::linear":
        x, weight = tensors[:2]
        return 2 * x.numel() * weight.shape[0]
    if name in ("aten::mm",):
        a, b = tensors[:2]
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    if name in ("aten::addmm", "aten::addmm_"):
        a, b = tensors[1:3]
        return 2 * a.shape[0] * a.shape[1] * b.shape[1]
    if name in ("aten::bmm",):
        a, b = tensors[:2]
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if name in ("aten::baddbmm", "aten::addbmm"):
        a, b = tensors[1:3]
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    return 0


def _is_inplace(func) -> bool:
    schema = func._schema
    return bool(schema.returns) and schema.arguments and schema.arguments[0].alias_info is not None and \
        schema.arguments[0].alias_info.is_write


class _Recorder(TorchDispatchMode):
    def __init__(self, account: Account, compute: bool):
        super().__init__()
        self.account = account
        self.compute = compute

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        from .fused.common import kernel_running

        if kernel_running():  # the Triton interpreter's own copies, inside a launch already counted
            return func(*args, **kwargs)
        if func.namespace == "lime":
            # Follow the custom op into its Python implementation, recording what it runs.
            from .fused.op import IMPLEMENTATIONS

            with self:
                return IMPLEMENTATIONS[name](*args, **kwargs)
        view = func.is_view or name in ALLOCATION_OPS or name in METADATA_OPS or name == "aten::detach"
        syncs = name in SYNC_OPS or (name in ("aten::_to_copy", "aten::copy_") and self._crosses_devices(args, kwargs))
        if self.compute or view or syncs:
            out = func(*args, **kwargs)
        else:
            out = self._dry(func, args, kwargs)
        inputs = _tensors((args, kwargs))
        outputs = _tensors(out)
        self.account.ops.append(OpRecord(
            name=name, launches=not view and not syncs, syncs=syncs,
            bytes_read=0 if view else _nbytes(inputs), bytes_written=0 if view else _nbytes(outputs),
            bytes_allocated=_nbytes(outputs) if name in ALLOCATION_OPS else 0,
            flops=_matmul_flops(name, args) if name in MATMUL_OPS else 0,
            output_shapes=tuple(tuple(t.shape) for t in outputs),
        ))
        return out

    @staticmethod
    def _crosses_devices(args, kwargs) -> bool:
        devices = {t.device for t in _tensors((args, kwargs))}
        target = kwargs.get("device")
        if target is not None:
            devices.add(torch.device(target))
        return len(devices) > 1

    @staticmethod
    def _dry(func, args, kwargs):
        """The operator's outputs, uninitialized, from its meta implementation."""
        meta_args, meta_kwargs = tree_map_only(torch.Tensor, lambda t: t.to("meta"), (args, kwargs))
        meta_kwargs = tree_map_only(torch.device, lambda _: torch.device("meta"), meta_kwargs)
        meta_out = func(*meta_args, **meta_kwargs)
        if _is_inplace(func):
            return args[0]
        device = next((t.device for t in _tensors((args, kwargs))), torch.device("cpu"))
        return tree_map_only(torch.Tensor, lambda m: torch.empty_strided(m.shape, m.stride(), dtype=m.dtype,
                                                                         device=device), meta_out)


def graph_host_syncs(graph: torch.fx.GraphModule) -> List[str]:
    """The operators of `SYNC_OPS` that a traced graph calls (torch.compile's, or the forward or backward
    graph AOTAutograd derives from it), its subgraphs included (checkpointed regions, say). A compiled
    graph runs outside `account()` (torch.compile does not run under a recording dispatch mode), so it
    is read instead of recorded."""
    return [node.target._schema.name for module in graph.modules() if isinstance(module, torch.fx.GraphModule)
            for node in module.graph.nodes
            if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and node.target._schema.name in SYNC_OPS]


@contextlib.contextmanager
def account(compute: bool = True):
    """Record the ATen operators and Triton launches of the block into an `Account`; with
    `compute=False` compute nothing (outputs are uninitialized)."""
    from .fused.common import record_launches

    result = Account()
    with record_launches(execute=compute) as launches, _Recorder(result, compute):
        yield result
    result.launches = list(launches)


__all__ = ["ALLOCATION_OPS", "Account", "FILL_OPS", "OpRecord", "SYNC_OPS", "account", "graph_host_syncs"]
