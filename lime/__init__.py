"""LiME: Lightweight Mixture of Experts for parameter-efficient multi-task fine-tuning.

`apply_peft` wraps a model's linear layers with `lime_kernels.LiMELinear`; the helpers below
read and steer every wrapped layer of a model at once.
"""

from .balance import clear_aux, compute_balance_loss, get_expert_usage_stats
from .config import LiMEConfig
from .injection import apply_peft, lime_layers
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
    "LiMEConfig",
    "apply_peft",
    "clear_aux",
    "compute_balance_loss",
    "get_expert_usage_stats",
    "lime_layers",
    "lime_summary",
    "print_lime_summary",
    "set_auto_topk",
    "set_gamma_routing",
    "set_jitter",
    "set_soft_topk",
    "set_sparse_mode",
    "set_temperature",
    "set_track_aux",
]
