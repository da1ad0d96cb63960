"""The linear layers LiME wraps: `nn.Linear` (bitsandbytes' quantized ones included) and the
`Conv1D` of GPT-2 and its relatives in transformers, a linear layer whose weight is stored
transposed, `(in_features, out_features)`."""

from __future__ import annotations

import sys
from typing import Optional, Tuple

import torch.nn as nn


def _conv1d_class() -> Optional[type]:
    """transformers' `Conv1D`, if transformers is imported (a Conv1D instance implies it is): LiME's
    kernels do not depend on transformers."""
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)


def is_conv1d(module: nn.Module) -> bool:
    cls = _conv1d_class()
    return cls is not None and isinstance(module, cls)


def is_wrappable_linear(module: nn.Module) -> bool:
    """An `nn.Linear` (subclasses included) or a transformers `Conv1D`."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_features(module: nn.Module) -> Tuple[int, int]:
    """`(in_features, out_features)` of a wrappable linear layer."""
    if is_conv1d(module):
        return module.nx, module.nf
    return module.in_features, module.out_features


def computes_plain_product(module: nn.Module) -> bool:
    """Whether the layer's forward is the plain `x W^T + b` of its class (not a quantized kernel, not a
    subclass with its own forward): the fused path may then compute the product itself."""
    if is_conv1d(module):
        return type(module).forward is _conv1d_class().forward
    return type(module).forward is nn.Linear.forward
