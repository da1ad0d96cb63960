"""Model-level load balancing and routing statistics, gathered from every LiME layer."""

from __future__ import annotations

import math
from typing import Dict, Iterable, List

import torch
import torch.nn as nn

from .injection import lime_layers


def compute_balance_loss(model: nn.Module, importance_coef: float = 0.1, kl_coef: float = 0.01) -> torch.Tensor:
    """`importance_coef * mean(importance) + kl_coef * mean(kl_uniform)` over the LiME layers.

    Reads the statistics of each layer's latest training forward (`track_aux=True`) and consumes
    their differentiable parts, so a statistic is never counted twice and its graph is released.
    Raises if a layer with trainable parameters recorded them without a graph (reentrant checkpointing).
    """
    collected = []
    for name, layer in lime_layers(model):
        stats = layer.last_stats
        if stats is not None and stats.importance is not None:
            # `requires_grad`, not `grad_fn`: the statistics are never leaves, and torch.compile traces the
            # former but breaks its graph on the latter.
            if (torch.is_grad_enabled() and not stats.importance.requires_grad
                    and any(parameter.requires_grad for parameter in layer.parameters())):
                # Reentrant checkpointing runs the forward under no_grad: the loss would train nothing.
                raise RuntimeError(
                    f"LiME layer {name} recorded its balance statistics without a graph although its parameters "
                    "require grad, so the balance loss would carry no gradient. Reentrant gradient checkpointing "
                    "does this (it runs the forward under torch.no_grad): enable checkpointing with "
                    "use_reentrant=False. A forward run under torch.no_grad on purpose needs compute_balance_loss "
                    "under torch.no_grad too"
                )
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


@torch.no_grad()
def routing_report(model: nn.Module, batches: Iterable[Dict]) -> Dict:
    """Expert usage per LiME layer and AutoTop-K's histogram of active experts over `batches`
    (model inputs), from the training-mode routing (statistics on) without jitter or gradients.

    Returns {"layers": names, "usage": (layers, E) means over the batches each layer ran on, "runs":
    how many that was per layer, "active_histogram": (E + 1,) token counts by number of selected
    experts, summed over layers and batches}.
    """
    layers = list(lime_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LiME layer")
    sizes = sorted({layer.num_experts for _, layer in layers})
    if len(sizes) > 1:
        raise ValueError(f"LiME layers with different num_experts ({sizes}) cannot share one report")
    saved = [(layer, layer.routing, layer.adapter) for _, layer in layers]
    was_training = model.training
    usage = torch.zeros(len(layers), sizes[0], dtype=torch.float64)
    runs = torch.zeros(len(layers), 1, dtype=torch.float64)
    histogram = torch.zeros(sizes[0] + 1, dtype=torch.float64)
    try:
        for _, layer in layers:
            layer.update_routing(jitter_noise=0.0)
            layer.set_track_aux(True)
        model.train()
        for batch in batches:
            for _, layer in layers:
                layer.last_stats = None
            model(**batch)
            for index, (_, layer) in enumerate(layers):
                stats = layer.last_stats
                if stats is None:  # the layer did not run on this batch (no image for the vision tower, say)
                    continue
                usage[index] += stats.usage.double().cpu()
                runs[index] += 1
                histogram += stats.active_histogram.double().cpu()
    finally:
        for layer, routing, adapter in saved:
            layer.routing, layer.adapter = routing, adapter
            layer.last_stats = None
        model.train(was_training)
    if not runs.any():
        raise ValueError("routing_report: no LiME layer ran on the batches given")
    return {"layers": [name for name, _ in layers], "usage": (usage / runs.clamp_min(1)).tolist(),
            "runs": runs.squeeze(1).tolist(), "active_histogram": histogram.tolist()}
