"""Model-level load balancing and routing statistics, gathered from every LiME layer."""

from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn as nn

from .injection import lime_layers


def compute_balance_loss(model: nn.Module, importance_coef: float = 0.1, kl_coef: float = 0.01) -> torch.Tensor:
    """`importance_coef * mean(importance) + kl_coef * mean(kl_uniform)` over the LiME layers.

    Reads the statistics of each layer's latest training forward (`track_aux=True`) and consumes
    their differentiable parts, so a statistic is never counted twice and its graph is released.
    """
    collected = []
    for name, layer in lime_layers(model):
        stats = layer.last_stats
        if stats is not None and stats.importance is not None:
            collected.append(stats)
            layer.last_stats = stats._replace(importance=None, kl_uniform=None)
    if not collected:
        raise RuntimeError(
            "no LiME layer holds balance statistics: run a forward pass in training mode with track_aux=True "
            "before compute_balance_loss (each forward's statistics are consumed once)"
        )
    device = collected[0].importance.device
    importance = torch.stack([s.importance.to(device) for s in collected]).mean()
    kl_uniform = torch.stack([s.kl_uniform.to(device) for s in collected]).mean()
    return importance_coef * importance + kl_coef * kl_uniform


def get_expert_usage_stats(model: nn.Module) -> Dict:
    """Expert usage (mean routing probability per expert over valid tokens) averaged over layers.

    Returns `usage_per_expert`, `entropy` (nats; log E is perfectly balanced), `max_usage`,
    `min_usage`, `imbalance_ratio` (max / min), `active_experts` (mean selected experts per token,
    training forwards only, else None) and `layers` (how many layers contributed).
    """
    usages: List[torch.Tensor] = []
    active: List[float] = []
    for name, layer in lime_layers(model):
        stats = layer.last_stats
        if stats is None:
            continue
        usages.append(stats.usage.detach().float().cpu())
        if stats.active_experts is not None:
            active.append(float(stats.active_experts))
    if not usages:
        raise RuntimeError("no LiME layer holds routing statistics: run a forward pass with track_aux=True first")
    sizes = sorted({u.numel() for u in usages})
    if len(sizes) > 1:
        raise ValueError(f"LiME layers with different num_experts ({sizes}) cannot be averaged together")
    usage = torch.stack(usages).mean(dim=0)
    entropy = float(-(usage * usage.clamp_min(1e-12).log()).sum())
    return {
        "usage_per_expert": usage.tolist(),
        "entropy": entropy,
        "max_entropy": math.log(usage.numel()),
        "max_usage": float(usage.max()),
        "min_usage": float(usage.min()),
        "imbalance_ratio": float(usage.max() / usage.min().clamp_min(1e-12)),
        "active_experts": sum(active) / len(active) if active else None,
        "layers": len(usages),
    }


def clear_aux(model: nn.Module) -> None:
    """Drop every layer's stored statistics."""
    for _, layer in lime_layers(model):
        layer.last_stats = None
