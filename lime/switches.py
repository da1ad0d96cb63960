"""Runtime switches: change routing hyperparameters of every LiME layer of a model, validated."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch.nn as nn

from .config import LiMEConfig
from .injection import lime_layers


def _layers_of(model: nn.Module) -> list:
    layers = [layer for _, layer in lime_layers(model)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LiME layer; call lime.apply_peft first")
    return layers


def _update_all(model: nn.Module, **changes) -> int:
    layers = _layers_of(model)
    for layer in layers:
        layer.update_routing(**changes)
    _record(model, **changes)
    return len(layers)


def _record(model: nn.Module, **changes) -> None:
    """The model's `lime_config` (which `save_adapter` writes) follows the layers it describes."""
    config = getattr(model, "lime_config", None)
    if isinstance(config, LiMEConfig):
        model.lime_config = dataclasses.replace(config, **changes)


def set_temperature(model: nn.Module, temperature: float) -> int:
    """Routing softmax temperature of every LiME layer; returns the number of layers changed."""
    return _update_all(model, temperature=temperature)


def set_gamma_routing(model: nn.Module, gamma: float) -> int:
    """Blend between the frozen (0) and the adapted (1) routing features."""
    return _update_all(model, gamma_routing=gamma)


def set_jitter(model: nn.Module, jitter: float) -> int:
    """Multiplicative routing noise amplitude used in training (0 switches it off)."""
    return _update_all(model, jitter_noise=jitter)


def set_auto_topk(model: nn.Module, auto_topk: bool, threshold: Optional[float] = None, temperature: Optional[float] = None) -> int:
    """Switch AutoTop-K, optionally with a new threshold theta and soft-mask temperature."""
    changes = {"auto_topk": auto_topk}
    if threshold is not None:
        changes["auto_topk_threshold"] = threshold
    if temperature is not None:
        changes["soft_topk_temperature"] = temperature
    return _update_all(model, **changes)


def set_soft_topk(model: nn.Module, soft_topk: bool, temperature: Optional[float] = None) -> int:
    """Switch between soft (sigmoid-masked) and hard top-k when AutoTop-K is off."""
    changes = {"soft_topk": soft_topk}
    if temperature is not None:
        changes["soft_topk_temperature"] = temperature
    return _update_all(model, **changes)


def set_sparse_mode(model: nn.Module, sparse: bool) -> int:
    """Hard masks with exact zeros (sparse) or sigmoid-soft masks (dense)."""
    return _update_all(model, sparse_mode=sparse)


def set_track_aux(model: nn.Module, track_aux: bool) -> int:
    """Compute load-balancing statistics in forward (off: they cost nothing)."""
    layers = _layers_of(model)
    for layer in layers:
        layer.set_track_aux(track_aux)
    _record(model, track_aux=track_aux)
    return len(layers)
