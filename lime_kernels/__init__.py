"""The compute of LiME: the PyTorch reference path, the fused Triton path (`lime_kernels.fused`,
imported on first use) and the drop-in layers for every PEFT variant."""

from .embedding import LiMEEmbedding
from .layer import (
    LINEAR_VARIANTS,
    LiMEDoRALinear,
    LiMELinear,
    LiMELoRAFALinear,
    LiMEModule,
    LiMESliceFineLinear,
)
from .options import AdapterOptions, RoutingOptions
from .prompt import LiMEPromptEncoder
from .reference import RoutingStats, dora_magnitude, lime_linear, route_and_modulate, sample_jitter

__all__ = [
    "AdapterOptions",
    "LINEAR_VARIANTS",
    "LiMEDoRALinear",
    "LiMEEmbedding",
    "LiMELinear",
    "LiMELoRAFALinear",
    "LiMEModule",
    "LiMEPromptEncoder",
    "LiMESliceFineLinear",
    "RoutingOptions",
    "RoutingStats",
    "dora_magnitude",
    "lime_linear",
    "route_and_modulate",
    "sample_jitter",
]
