"""The PyTorch reference path: the readable specification of the LiME layer.

Every function here follows one step of `docs/lime-semantics.md` and is plain, vectorized,
differentiable PyTorch (no Python loop over tokens; the n-gram window loops over its n offsets).
Routing and mixing run in float32 when activations are bf16/fp16/fp32 (float64 when any input is
float64, for gradcheck); the output is cast once, to the dtype of the frozen output.

Shapes: B sequences, T tokens, E experts, Din/Dout the wrapped layer's features, r the rank.
`valid` is a `(B, T)` bool tensor of valid tokens, or None when every token is valid.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .options import RoutingOptions

NORM_EPS = 1e-6
WEIGHT_EPS = 1e-9
LOG_EPS = 1e-8

AUX_MODES = ("none", "usage", "full")


class RoutingStats(NamedTuple):
    """Auxiliary load-balancing statistics of one layer call.

    `importance` and `kl_uniform` carry gradients (training with `track_aux`); `load`, `usage`
    (the mean routing probability per expert over valid tokens), `active_experts` (the mean
    number of selected experts per valid token) and `active_histogram` are detached. In eval mode
    only `usage` is set.
    """

    importance: Optional[torch.Tensor]
    kl_uniform: Optional[torch.Tensor]
    load: Optional[torch.Tensor]
    usage: torch.Tensor
    active_experts: Optional[torch.Tensor]
    active_histogram: Optional[torch.Tensor] = None  # (E + 1,): valid tokens by number of selected experts


def sample_jitter(
    num_tokens: int,
    num_experts: int,
    jitter_noise: float,
    device: torch.device,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """The multiplicative routing noise, `Uniform(1 - eps, 1 + eps)` of shape `(tokens, E)` in float32.

    Drawn from torch's RNG (or `generator`) so that every backend, given the same generator state,
    applies the same noise to the same token (tokens in `(B, T)` row-major order).
    """
    noise = torch.empty(num_tokens, num_experts, device=device, dtype=torch.float32)
    return noise.uniform_(1.0 - jitter_noise, 1.0 + jitter_noise, generator=generator)


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float32, or float64 when any of the given tensors is float64."""
    wide = any(t is not None and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if wide else torch.float32


# --- step 3-4: the routing representation -------------------------------------------------------


def _window_pool(features: torch.Tensor, valid: torch.Tensor, n_gram: int) -> torch.Tensor:
    """Causal window mean over the valid tokens s of the same sequence with t-n+1 <= s <= t."""
    tokens = features.shape[1]
    valid3 = valid.unsqueeze(-1)
    kept = torch.where(valid3, features, torch.zeros_like(features))
    count = valid3.to(features.dtype)
    total, seen = kept, count
    for offset in range(1, n_gram):  # n offsets, not tokens: a sum of shifted copies
        total = total + F.pad(kept, (0, 0, offset, 0))[:, :tokens]
        seen = seen + F.pad(count, (0, 0, offset, 0))[:, :tokens]
    # A valid token always counts itself, so `seen >= 1` where the result is used.
    return torch.where(valid3, total / seen.clamp_min(1.0), features)


def _anchor_positions(tokens: int, n_gram: int, device: torch.device) -> torch.Tensor:
    """For each position, the last position of its group of n consecutive positions."""
    positions = torch.arange(tokens, device=device)
    return ((positions // n_gram + 1) * n_gram - 1).clamp_max(tokens - 1)


def _sequence_summary(features: torch.Tensor, valid: torch.Tensor, rep_mode: str) -> torch.Tensor:
    """Per-sequence mean or last valid token, given to every token of the sequence."""
    valid3 = valid.unsqueeze(-1)
    has_valid = valid3.any(dim=1, keepdim=True)
    if rep_mode == "mean":
        count = valid3.sum(dim=1, keepdim=True).clamp_min(1).to(features.dtype)
        summary = torch.where(valid3, features, torch.zeros_like(features)).sum(dim=1, keepdim=True) / count
    else:  # "last"
        positions = torch.arange(features.shape[1], device=features.device)
        last = torch.where(valid, positions, torch.zeros_like(positions)).amax(dim=1)
        summary = features[torch.arange(features.shape[0], device=features.device), last].unsqueeze(1)
    # A sequence with no valid token keeps its per-token features (its output is `base` anyway).
    return torch.where(has_valid, summary.expand_as(features), features)


def routing_representation(features: torch.Tensor, valid: torch.Tensor, options: RoutingOptions) -> torch.Tensor:
    """Steps 3-4: `rep_mode` (token / mean / last), then the n-gram window or anchors for tokens."""
    if options.rep_mode != "token":
        return _sequence_summary(features, valid, options.rep_mode)
    if options.n_gram == 1:
        return features
    if options.ngram_mode == "window":
        return _window_pool(features, valid, options.n_gram)
    return features[:, _anchor_positions(features.shape[1], options.n_gram, features.device)]


# --- steps 5-8: normalization, blend, temperature, jitter, softmax --------------------------------


def normalize_features(features: torch.Tensor, router: str) -> torch.Tensor:
    """Step 5. `cosine`: per-token L2 over the E channels; `maxabs`: one max over the whole batch."""
    if router == "cosine":
        scale = torch.linalg.vector_norm(features, dim=-1, keepdim=True)
    else:  # "maxabs": amax splits the gradient evenly between tied maxima
        scale = features.abs().amax()
    return features / scale.clamp_min(NORM_EPS)


def routing_probs(
    frozen_features: torch.Tensor,
    adapted_features: torch.Tensor,
    valid: torch.Tensor,
    options: RoutingOptions,
    jitter: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Steps 3-8: `(B, T, E)` float32 routing probabilities from `u = base[:E]`, `v = delta[:E]`."""
    frozen = normalize_features(routing_representation(frozen_features, valid, options), options.router)
    adapted = normalize_features(routing_representation(adapted_features, valid, options), options.router)
    logits = ((1.0 - options.gamma_routing) * frozen + options.gamma_routing * adapted) / options.temperature
    if jitter is not None:
        logits = logits * jitter.view_as(logits)
    return torch.softmax(logits, dim=-1)


# --- step 9: mixing weights -------------------------------------------------------------------------


def _one_hot_rows(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    mask = torch.zeros(*indices.shape[:-1], num_experts, dtype=torch.bool, device=indices.device)
    return mask.scatter(-1, indices, True)


def _soft_masked(probs: torch.Tensor, threshold: torch.Tensor, temperature: float) -> torch.Tensor:
    gated = probs * torch.sigmoid((probs - threshold) / temperature)
    return gated / (gated.sum(dim=-1, keepdim=True) + WEIGHT_EPS)


def _renormalized(probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return kept / kept.sum(dim=-1, keepdim=True).clamp_min(WEIGHT_EPS)


def mixing_weights(probs: torch.Tensor, options: RoutingOptions) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step 9: `(weights, selected)`, both `(B, T, E)`; `selected` is the hard choice (for `load`)."""
    num_experts = probs.shape[-1]
    if options.auto_topk:
        cutoff = options.auto_topk_threshold * probs.amax(dim=-1, keepdim=True)
        selected = probs >= cutoff
        if not options.sparse_mode:
            return _soft_masked(probs, cutoff, options.soft_topk_temperature), selected
        # At most min(2k, E) of the qualifying experts, the largest; the arg-max always qualifies.
        largest = torch.topk(probs, min(2 * options.top_k, num_experts), dim=-1).indices
        keep = selected & _one_hot_rows(largest, num_experts)
        return _renormalized(probs, keep), keep
    top = torch.topk(probs, options.top_k, dim=-1)
    selected = _one_hot_rows(top.indices, num_experts)
    if options.soft_topk and not options.sparse_mode:
        return _soft_masked(probs, top.values[..., -1:], options.soft_topk_temperature), selected
    return _renormalized(probs, selected), selected


# --- auxiliary statistics ---------------------------------------------------------------------------


def active_histogram(selected: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """(E + 1,) counts of valid tokens by their number of selected experts; `selected` (..., E).

    Fixed-shape masked arithmetic: a boolean index and `bincount` would each be a host sync (and a graph
    break under torch.compile) on every training call."""
    num_experts = selected.shape[-1]
    per_token = selected.reshape(-1, num_experts).sum(dim=-1)
    bins = per_token.unsqueeze(-1) == torch.arange(num_experts + 1, device=selected.device)
    if valid is not None:
        bins = bins & valid.reshape(-1, 1)
    return bins.sum(dim=0)


def balance_statistics(
    probs_sum: torch.Tensor, selection_counts: torch.Tensor, num_valid: torch.Tensor, aux: str,
    histogram: Optional[torch.Tensor] = None,
) -> Optional[RoutingStats]:
    """The statistics from per-expert sums over the valid tokens (shared by every backend).

    `probs_sum` (E): sum of the routing probabilities (differentiable); `selection_counts` (E):
    how many valid tokens selected each expert; `num_valid`: how many valid tokens there are;
    `histogram`: see `active_histogram` (kept in training only, like the other statistics).
    """
    if aux == "none":
        return None
    num_experts = probs_sum.shape[-1]
    has_tokens = num_valid > 0
    num_valid = num_valid.clamp_min(1).to(probs_sum.dtype)
    mean_probs = probs_sum / num_valid
    usage = mean_probs.detach()
    if aux == "usage":
        return RoutingStats(None, None, None, usage, None)
    # Without a valid token every statistic is 0 (E * sum(p^2) - 1 would read -1, a reward for nothing);
    # masked, not branched on, so that no host sync is needed.
    zero = probs_sum.new_zeros(())
    importance = torch.where(has_tokens, num_experts * mean_probs.square().sum() - 1.0, zero)
    kl_uniform = (mean_probs * (mean_probs.clamp_min(LOG_EPS).log() + math.log(num_experts))).sum()
    counts = selection_counts.to(probs_sum.dtype)
    load_share = counts / counts.sum().clamp_min(1.0)
    load = torch.where(has_tokens, num_experts * load_share.square().sum() - 1.0, zero)
    active = counts.sum() / num_valid
    return RoutingStats(importance, kl_uniform, load.detach(), usage, active.detach(),
                        None if histogram is None else histogram.detach())


def routing_stats(probs: torch.Tensor, selected: torch.Tensor, valid: torch.Tensor, aux: str) -> Optional[RoutingStats]:
    """Load-balancing statistics over the valid tokens (`aux` = 'full' in training, 'usage' in eval)."""
    if aux == "none":
        return None
    valid3 = valid.unsqueeze(-1)
    probs_sum = torch.where(valid3, probs, torch.zeros_like(probs)).sum(dim=(0, 1))
    selection_counts = (selected & valid3).sum(dim=(0, 1))
    histogram = active_histogram(selected, valid) if aux == "full" else None
    return balance_statistics(probs_sum, selection_counts, valid.sum(), aux, histogram)


# --- steps 2-11: route and modulate ------------------------------------------------------------------


def route_and_modulate(
    base: torch.Tensor,
    delta: torch.Tensor,
    LiMEs: torch.Tensor,
    LiME_shared: Optional[torch.Tensor],
    gamma: Optional[torch.Tensor],
    options: RoutingOptions,
    valid: Optional[torch.Tensor] = None,
    jitter: Optional[torch.Tensor] = None,
    aux: str = "none",
) -> Tuple[torch.Tensor, Optional[RoutingStats]]:
    """`out = base + delta * (w @ P + g * p_shared)` with zero-parameter routing.

    The core shared by every PEFT variant: `base` `(B, T, Dout)` is the frozen representation (any
    dtype), `delta` `(B, T, Dout)` the adapter's (float32, or float64). Invalid tokens return `base` exactly.
    """
    if aux not in AUX_MODES:
        raise ValueError(f"aux must be one of {AUX_MODES}; got aux={aux!r}")
    if (LiME_shared is None) != (gamma is None):
        raise ValueError("LiME_shared and gamma must be given together (use_shared_LiME) or both be None")
    num_experts = options.num_experts
    if LiMEs.shape != (num_experts, base.shape[-1]):
        raise ValueError(
            f"LiMEs must have shape (num_experts, Dout) = {(num_experts, base.shape[-1])}; got {tuple(LiMEs.shape)}"
        )
    dtype = compute_dtype(base, delta, LiMEs, LiME_shared)
    all_valid = valid is None
    if all_valid:
        valid = torch.ones(base.shape[:2], dtype=torch.bool, device=base.device)
    frozen_features = base[..., :num_experts].to(dtype)
    probs = routing_probs(frozen_features, delta[..., :num_experts].to(dtype), valid, options, jitter)
    weights, selected = mixing_weights(probs, options)
    modulation = weights @ LiMEs.to(dtype)
    if LiME_shared is not None:
        modulation = modulation + gamma.to(dtype) * LiME_shared.to(dtype)
    out = (base.to(dtype) + delta.to(dtype) * modulation).to(base.dtype)
    if not all_valid:
        out = torch.where(valid.unsqueeze(-1), out, base)
    return out, routing_stats(probs, selected, valid, aux)


def dora_magnitude(
    weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor, scaling: float,
    detach_norm: bool = False,
) -> torch.Tensor:
    """DoRA's per-channel scale `m / ||W + s B A||_row` (Dout,), in float32 (float64 for float64 inputs).

    The row norm takes gradients (to A and B) unless `detach_norm` (Hugging Face PEFT's choice).
    """
    dtype = compute_dtype(weight, A, B, magnitude)
    directions = weight.to(dtype) + scaling * (B.to(dtype) @ A.to(dtype))
    norm = torch.linalg.vector_norm(directions, dim=1)
    if detach_norm:
        norm = norm.detach()
    return magnitude.to(dtype) / norm


def lime_linear(
    adapter_input: torch.Tensor,
    base: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    LiMEs: torch.Tensor,
    LiME_shared: Optional[torch.Tensor],
    gamma: Optional[torch.Tensor],
    options: RoutingOptions,
    scaling: float,
    valid: Optional[torch.Tensor] = None,
    jitter: Optional[torch.Tensor] = None,
    aux: str = "none",
    channel_scale: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[RoutingStats]]:
    """The LiME layer with a low-rank adapter on `(B, T, Din)` sequences, given the frozen output.

    `adapter_input` is `dropout(x)` in training with dropout, else `x` itself: the caller draws the
    dropout mask (after the jitter), so that every backend sees the same random numbers.
    `delta = scaling * adapter_input @ A.T @ B.T` in float32 (float64 for float64 inputs).

    LoRA, LoRA-FA, SliceFine (A = the trainable rows, B = their place among the outputs) and the
    embedding variant pass `base = base_layer(x)`. DoRA passes the frozen product without bias as
    `base`, its `channel_scale` (see `dora_magnitude`) and the `bias`:
    `base' = channel_scale * base + bias` (in the activation dtype), `delta' = channel_scale * delta`.
    The rest is `route_and_modulate(base', delta')`.
    """
    dtype = compute_dtype(adapter_input, A, B)
    down = adapter_input.to(dtype) @ A.to(dtype).t()
    delta = scaling * (down @ B.to(dtype).t())
    if channel_scale is not None:
        scaled = channel_scale.to(dtype) * base.to(dtype)
        if bias is not None:
            scaled = scaled + bias.to(dtype)
        base = scaled.to(base.dtype)
        delta = channel_scale.to(dtype) * delta
    return route_and_modulate(base, delta, LiMEs, LiME_shared, gamma, options, valid, jitter, aux)
