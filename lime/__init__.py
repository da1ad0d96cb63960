"""LiME: Lightweight Mixture of Experts for parameter-efficient multi-task fine-tuning.

`apply_peft` wraps a model's layers with LiME (`lime_kernels`); the helpers read and steer every
wrapped layer of a model at once; `LiMETrainer` trains it; `save_adapter` / `load_adapter` ship it; `remove_lime` gives the base model back.
"""

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
from .trainer import LiMEArguments, LiMETrainer

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
