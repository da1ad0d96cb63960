"""The fused Triton path of the LiME layer (imported on first use: it needs Triton)."""

from .op import fused_lime_linear

__all__ = ["fused_lime_linear"]
