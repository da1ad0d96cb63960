"""The fused Triton path of the LiME layer (imported on first use: it needs Triton)."""

from .op import FusedResult, fused_lime_linear, fused_statistics

__all__ = ["FusedResult", "fused_lime_linear", "fused_statistics"]
