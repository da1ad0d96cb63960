"""LiME: Lightweight Mixture of Experts for parameter-efficient multi-task fine-tuning.

`apply_peft` wraps a model's layers with LiME (`lime_kernels`); the helpers read and steer every
wrapped layer of a model at once; `LiMETrainer` trains it; `save_adapter` / `load_adapter` ship it; `remove_lime` gives the base model back.

`LiMETrainer` and `LiMEArguments` are imported on first use: transformers' Trainer pulls in peft and
bitsandbytes (seconds of import), which `import lime` and `lime --help` do not need.
"""

import logging

from .adapter import load_adapter, save_adapter
from .balance import clear_aux, compute_balance_loss, get_expert_usage_stats
from .config import LiMEConfig
from .injection import apply_peft, lime_layers, remove_lime
from .summary import lime_summary, print_lime_summary
from .switches import (
    set_auto_topk,
    set_gamma_routing,
    set_jitter,
    set_soft_topk,
    set_sparse_mode,
    set_temperature,
    set_track_aux,
)

__all__ = [
    "LiMEArguments",
    "LiMEConfig",
    "LiMETrainer",
    "apply_peft",
    "clear_aux",
    "compute_balance_loss",
    "get_expert_usage_stats",
    "lime_layers",
    "lime_summary",
    "load_adapter",
    "print_lime_summary",
    "remove_lime",
    "save_adapter",
    "set_auto_topk",
    "set_gamma_routing",
    "set_jitter",
    "set_soft_topk",
    "set_sparse_mode",
    "set_temperature",
    "set_track_aux",
]

_LAZY = {"LiMEArguments": "trainer", "LiMETrainer": "trainer"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _HubKernelNotice(logging.Filter):
    """Drops one bitsandbytes warning: on CPUs with AVX512-BF16, importing bitsandbytes (which peft, and
    so transformers' Trainer, imports) tries to fetch an optional 4-bit CPU kernel from the Hugging Face
    hub and, offline or from an unverified publisher, always fails and says so on stderr; bitsandbytes
    then runs its own CPU kernel. Every other bitsandbytes message passes."""

    NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.NOTICE)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_HubKernelNotice())
