"""The compute of LiME: the PyTorch reference path and the drop-in `LiMELinear` layer."""

from .layer import LiMELinear
from .options import AdapterOptions, RoutingOptions
from .reference import RoutingStats, lime_linear, route_and_modulate, sample_jitter

__all__ = [
    "AdapterOptions",
    "LiMELinear",
    "RoutingOptions",
    "RoutingStats",
    "lime_linear",
    "route_and_modulate",
    "sample_jitter",
]
