"""Frozen weights of the base layers as plain floating `(out_features, in_features)` tensors:
bitsandbytes' quantized layers dequantized, GPT-2's `Conv1D` as a transposed view.

bitsandbytes computes a quantized layer's output with its own kernels; LiME needs the weight itself
only for DoRA's row norms (and refuses SliceFine on quantized layers).
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

from .bases import is_conv1d


def frozen_weight(linear: nn.Linear) -> torch.Tensor:
    """The layer's weight `(out_features, in_features)`: the parameter itself for a float layer,
    a transposed view (no copy) for a `Conv1D`, a dequantized copy for bitsandbytes' 4-bit and 8-bit layers."""
    if is_conv1d(linear):
        return linear.weight.t()
    weight = linear.weight
    # Only consult bitsandbytes if the weight already is one of its types (it is imported then).
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None or weight.dtype.is_floating_point:
        return weight
    if isinstance(weight, bnb.nn.Params4bit):
        if weight.quant_state is None:
            raise ValueError(f"{type(linear).__name__}: the 4-bit weight is not quantized yet (move the layer to its device first)")
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    if isinstance(weight, bnb.nn.Int8Params):
        # The row scales sit on the parameter, or, once the layer has run, in its matmul state.
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = getattr(getattr(linear, "state", None), "SCB", None)
        if scales is None:
            raise ValueError(f"{type(linear).__name__}: the 8-bit weight has no scales (SCB) yet")
        return weight.data.float() * scales.float().unsqueeze(1) / 127.0
    raise ValueError(f"{type(linear).__name__}: unsupported weight type {type(weight).__name__} ({weight.dtype})")
