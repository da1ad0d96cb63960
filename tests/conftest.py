import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

from lime_kernels import LiMELinear  # noqa: E402


def make_layer(d_in=8, d_out=10, dtype=torch.float64, seed=0, bias=True, **kwargs):
    """A LiMELinear with every parameter random (B and gamma are zero at init, which would hide bugs)."""
    torch.manual_seed(seed)
    linear = torch.nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
    kwargs.setdefault("peft_dtype", dtype)
    kwargs.setdefault("moe_dtype", dtype)
    layer = LiMELinear(linear, **kwargs)
    with torch.no_grad():
        layer.B.normal_(0.0, 0.5)
        if layer.gamma is not None:
            layer.gamma.fill_(0.7)
    return layer


def padding_mask(kind, batch, tokens):
    """None, or a (batch, tokens) long mask with left or right padding of different lengths."""
    if kind == "none":
        return None
    mask = torch.ones(batch, tokens, dtype=torch.long)
    for b in range(batch):
        pad = (b * 2) % tokens  # 0, 2, 4, ... padded positions (the first sequence is full)
        if b == batch - 1:
            pad = tokens  # one sequence entirely padding
        if pad:
            if kind == "left":
                mask[b, :pad] = 0
            else:
                mask[b, tokens - pad :] = 0
    return mask

