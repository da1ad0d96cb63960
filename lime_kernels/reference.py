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


class RoutingHistory(NamedTuple):
    """What a causal n-gram window needs from before a call's first token (decoding with a KV cache): the
    per-token routing features `u`, `v` (before pooling) of the n-1 positions before it, `(B, n-1, E)`, and
    whether each of those positions is a valid token `(B, n-1)` bool (padding and positions before the
    sequence's start are not, and enter no window)."""

    frozen: torch.Tensor
    adapted: torch.Tensor
    valid: torch.Tensor

    @staticmethod
    def empty(batch: int, n_gram: int, num_experts: int, device: torch.device,
              dtype: torch.dtype = torch.float32) -> "RoutingHistory":
        """The history before a sequence's first token: n-1 invalid positions."""
        zeros = torch.zeros(batch, n_gram - 1, num_experts, device=device, dtype=dtype)
        return RoutingHistory(zeros, zeros, torch.zeros(batch, n_gram - 1, dtype=torch.bool, device=device))


def _all_valid(features: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ones(features.shape[:2], dtype=torch.bool, device=features.device) if valid is None else valid


def _window_pool_after(features: torch.Tensor, valid: Optional[torch.Tensor], past: torch.Tensor,
                       past_valid: torch.Tensor, n_gram: int) -> torch.Tensor:
    """`_window_pool` of the call's tokens continuing `past` (n-1 earlier positions): the same sums in the
    same order as over the whole sequence, so cached decoding pools exactly as one uncached call."""
    joined = torch.cat((past.to(features.dtype), features), dim=1)
    joined_valid = torch.cat((past_valid, _all_valid(features, valid)), dim=1)
    return _window_pool(joined, joined_valid, n_gram)[:, past.shape[1]:]


def next_history(history: RoutingHistory, frozen: torch.Tensor, adapted: torch.Tensor,
                 valid: Optional[torch.Tensor]) -> RoutingHistory:
    """The history after this call: the last n-1 positions of `history` followed by its tokens' features
    (not detached: a later call's gradients reach them as they reach the KV cache). Contiguous: the same
    strides after every call, so a compiled decoding step does not recompile for the prefill's."""
    tokens = frozen.shape[1]
    return RoutingHistory(
        torch.cat((history.frozen.to(frozen.dtype), frozen), dim=1)[:, tokens:].contiguous(),
        torch.cat((history.adapted.to(adapted.dtype), adapted), dim=1)[:, tokens:].contiguous(),
        torch.cat((history.valid, _all_valid(frozen, valid)), dim=1)[:, tokens:].contiguous(),
    )


def routing_representation(features: torch.Tensor, valid: Optional[torch.Tensor], options: RoutingOptions,
                           past: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
    """Steps 3-4: `rep_mode` (token / mean / last), then the n-gram window or anchors for tokens.
    `valid` None: every token is valid. `past`: the features and validity of the n-1 positions before the
    first token (`RoutingHistory`), which the causal window reads; the other modes have no such history."""
    if past is not None and options.rep_mode == "token" and options.n_gram > 1 and options.ngram_mode == "window":
        return _window_pool_after(features, valid, past[0], past[1], options.n_gram)
    if options.rep_mode == "token" and (options.n_gram == 1 or options.ngram_mode == "anchor"):
        if options.n_gram == 1:
            return features
        return features[:, _anchor_positions(features.shape[1], options.n_gram, features.device)]
    if valid is None:
        valid = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
    if options.rep_mode != "token":
        return _sequence_summary(features, valid, options.rep_mode)
    return _window_pool(features, valid, options.n_gram)


# --- steps 5-8: normalization, blend, temperature, jitter, softmax --------------------------------


def feature_norm(features: torch.Tensor, router: str) -> torch.Tensor:
    """Step 5's norm before its floor. `cosine`: per-token L2 over the E channels; `maxabs`: one max of
    |features| over the whole batch (amax splits the gradient evenly between tied maxima)."""
    if router == "cosine":
        return torch.linalg.vector_norm(features, dim=-1, keepdim=True)
    return features.abs().amax()


def feature_scale(features: torch.Tensor, router: str) -> torch.Tensor:
    """Step 5's divisor, `max(norm, 1e-6)`."""
    return feature_norm(features, router).clamp_min(NORM_EPS)


def blend_coefficients(options: RoutingOptions) -> Tuple[float, float]:
    """Step 6's weights of `u_hat` and `v_hat` with the temperature folded in: `(1 - gamma) / T`, `gamma / T`."""
    return (1.0 - options.gamma_routing) / options.temperature, options.gamma_routing / options.temperature


def routing_representations(frozen_features: torch.Tensor, adapted_features: torch.Tensor,
                            valid: Optional[torch.Tensor], options: RoutingOptions,
                            history: Optional[RoutingHistory] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Steps 3-4 on both sides: `routing_representation` of `u` and of `v`, each continuing its side of
    `history` (the causal window's earlier positions) if given."""
    return (routing_representation(frozen_features, valid, options,
                                   None if history is None else (history.frozen, history.valid)),
            routing_representation(adapted_features, valid, options,
                                   None if history is None else (history.adapted, history.valid)))


def routing_probs(
    frozen_features: torch.Tensor,
    adapted_features: torch.Tensor,
    valid: Optional[torch.Tensor],
    options: RoutingOptions,
    jitter: Optional[torch.Tensor] = None,
    history: Optional[RoutingHistory] = None,
) -> torch.Tensor:
    """Steps 3-8: `(B, T, E)` float32 routing probabilities from `u = base[:E]`, `v = delta[:E]`;
    `history`: the causal window's earlier positions (see `RoutingHistory`)."""
    frozen, adapted = routing_representations(frozen_features, adapted_features, valid, options, history)
    frozen_coef, adapted_coef = blend_coefficients(options)
    logits = torch.add(frozen / feature_scale(frozen, options.router) * frozen_coef,
                       adapted / feature_scale(adapted, options.router), alpha=adapted_coef)
    if jitter is not None:
        logits = logits * jitter.view_as(logits)
    return torch.softmax(logits, dim=-1)


# --- step 9: mixing weights -------------------------------------------------------------------------


def _one_hot_rows(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    mask = torch.zeros(*indices.shape[:-1], num_experts, dtype=torch.bool, device=indices.device)
    return mask.scatter(-1, indices, True)


def _soft_masked(probs: torch.Tensor, threshold: torch.Tensor, threshold_scale: float, temperature: float) -> torch.Tensor:
    """`probs * m / (sum(probs * m) + 1e-9)` with `m = sigmoid((probs - threshold_scale * threshold) / temperature)`."""
    gated = probs * torch.sigmoid(torch.sub(probs, threshold, alpha=threshold_scale).div_(temperature))
    return gated / (gated.sum(dim=-1, keepdim=True) + WEIGHT_EPS)


def _renormalized(probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    kept = torch.where(keep, probs, torch.zeros_like(probs))
    return kept / kept.sum(dim=-1, keepdim=True).clamp_min(WEIGHT_EPS)


def selected_experts(probs: torch.Tensor, options: RoutingOptions) -> torch.Tensor:
    """The hard choice of step 9, `(B, T, E)` bool: the experts AutoTop-K or top-k keeps (what `load`
    counts, and what the sparse and hard modes mix)."""
    num_experts = probs.shape[-1]
    if options.auto_topk:
        selected = probs >= options.auto_topk_threshold * probs.amax(dim=-1, keepdim=True)
        if not options.sparse_mode:
            return selected
        # At most min(2k, E) of the qualifying experts, the largest; the arg-max always qualifies.
        largest = torch.topk(probs, min(2 * options.top_k, num_experts), dim=-1).indices
        return selected & _one_hot_rows(largest, num_experts)
    return _one_hot_rows(torch.topk(probs, options.top_k, dim=-1).indices, num_experts)


def mixing_weights(probs: torch.Tensor, options: RoutingOptions) -> torch.Tensor:
    """Step 9: the `(B, T, E)` mixing weights."""
    if not options.sparse_mode:
        if options.auto_topk:
            return _soft_masked(probs, probs.amax(dim=-1, keepdim=True), options.auto_topk_threshold,
                                options.soft_topk_temperature)
        if options.soft_topk:
            kth = torch.topk(probs, options.top_k, dim=-1).values[..., -1:]
            return _soft_masked(probs, kth, 1.0, options.soft_topk_temperature)
    return _renormalized(probs, selected_experts(probs, options))


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
    probs_sum: torch.Tensor, selection_counts: Optional[torch.Tensor], num_valid: torch.Tensor, aux: str,
    histogram: Optional[torch.Tensor] = None,
) -> Optional[RoutingStats]:
    """The statistics from per-expert sums over the valid tokens (shared by every backend).

    `probs_sum` (E): sum of the routing probabilities (differentiable); `selection_counts` (E):
    how many valid tokens selected each expert (None for 'usage'); `num_valid`: how many valid tokens there are;
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


def _valid_probability_sum(probs: torch.Tensor, valid: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The number of valid tokens (a long scalar) and the sum of their probabilities (E,); `valid` None: every
    token is valid. Masked, not indexed: no host sync."""
    if valid is None:
        return (probs.new_full((), probs.shape[0] * probs.shape[1], dtype=torch.long),
                probs.sum(dim=(0, 1)))
    return valid.sum(), torch.where(valid.unsqueeze(-1), probs, torch.zeros_like(probs)).sum(dim=(0, 1))


def routing_stats(probs: torch.Tensor, valid: Optional[torch.Tensor], options: RoutingOptions,
                  aux: str) -> Optional[RoutingStats]:
    """Load-balancing statistics over the valid tokens (`aux` = 'full' in training, 'usage' in eval);
    `valid` None: every token is valid. `compat='original'`: `original_routing_stats`."""
    if aux == "none":
        return None
    if options.compat == "original":
        return original_routing_stats(probs, valid, options, aux)
    num_valid, probs_sum = _valid_probability_sum(probs, valid)
    if aux == "usage":
        return balance_statistics(probs_sum, None, num_valid, aux)
    selected = selected_experts(probs.detach(), options)
    if valid is not None:
        selected = selected & valid.unsqueeze(-1)
    return balance_statistics(probs_sum, selected.sum(dim=(0, 1)), num_valid, aux, active_histogram(selected, valid))


def original_selections(probs: torch.Tensor, options: RoutingOptions) -> torch.Tensor:
    """(..., E) counts of what the original code's `load` counts per token: the AutoTop-K mask (dense), the
    top-k indices, or, sparse AutoTop-K, all min(2k, E) candidates whether above the threshold or not."""
    if options.sparse_mode and options.auto_topk:
        candidates = torch.topk(probs, min(2 * options.top_k, probs.shape[-1]), dim=-1).indices
        return _one_hot_rows(candidates, probs.shape[-1])
    return selected_experts(probs, options)


def original_routing_stats(probs: torch.Tensor, valid: Optional[torch.Tensor], options: RoutingOptions,
                           aux: str) -> Optional[RoutingStats]:
    """The original code's statistics: `importance` and `kl_uniform` over the valid tokens' mean probability
    (no valid token: -1 and 0), `load` over every token, padding included (with n-gram anchors, over the
    anchors only: the original selects on them), and in eval mode `usage` over every token, padding included."""
    if aux == "none":
        return None
    if aux == "usage":
        return RoutingStats(None, None, None, probs.mean(dim=(0, 1)).detach(), None)
    num_experts = probs.shape[-1]
    num_valid, probs_sum = _valid_probability_sum(probs, valid)
    mean_probs = probs_sum / num_valid.clamp_min(1).to(probs.dtype)
    importance = num_experts * mean_probs.square().sum() - 1.0
    kl_uniform = (mean_probs * (mean_probs.clamp_min(LOG_EPS).log() + math.log(num_experts))).sum()
    counted = probs.detach()
    if options.n_gram > 1:
        tokens = probs.shape[1]
        positions = torch.arange(tokens, device=probs.device)
        counted = counted[:, _anchor_positions(tokens, options.n_gram, probs.device) == positions]
    counts = original_selections(counted, options).sum(dim=(0, 1)).to(probs.dtype)
    load_share = counts / counts.sum().clamp_min(1.0)
    load = num_experts * load_share.square().sum() - 1.0
    # Not the original's: the number of experts each valid token selects, as the default statistics report it.
    selected = selected_experts(probs.detach(), options)
    if valid is not None:
        selected = selected & valid.unsqueeze(-1)
    active = selected.sum() / num_valid.clamp_min(1).to(probs.dtype)
    return RoutingStats(importance, kl_uniform, load.detach(), mean_probs.detach(), active.detach(),
                        active_histogram(selected, valid))


# --- steps 2-11: route and modulate ------------------------------------------------------------------


class Routed(NamedTuple):
    """A layer call's output and what its statistics are computed from (`routing_stats`), so that a
    caller computes them only if something reads them."""

    out: torch.Tensor
    probs: torch.Tensor
    valid: Optional[torch.Tensor]
    history: Optional[RoutingHistory] = None  # after this call, when one was given (decoding with a cache)


# Under torch.compile, a mixture `w @ P` of at most this many products is written as E broadcast products summed
# (`expert_mixture`); a larger one stays a matrix product.
FUSED_MIXTURE_PRODUCTS = 1 << 18


def expert_mixture(weights: torch.Tensor, LiMEs: torch.Tensor, shared: Optional[torch.Tensor]) -> torch.Tensor:
    """Step 10, `w @ P + g * p_shared`: one matrix product with the shared term `shared` as its bias.

    Under torch.compile, a small one (at most `FUSED_MIXTURE_PRODUCTS` products) is written as the E
    products `w[..., e] * P[e]` summed: inductor then fuses it into the routing's kernels before and after it,
    where a matrix product with K = E is an extern call each way (one forward, two backward) whose fixed cost
    outweighs its arithmetic. A large one stays a product: summed, its backward would read d(modulation)
    once per expert for P's gradient."""
    if torch.compiler.is_compiling() and weights.numel() * LiMEs.shape[-1] <= FUSED_MIXTURE_PRODUCTS:
        mixture = (weights.unsqueeze(-1) * LiMEs).sum(dim=-2)
        return mixture if shared is None else mixture + shared
    return F.linear(weights, LiMEs.t(), shared)


def _expert_major(features: torch.Tensor) -> torch.Tensor:
    """`features` (..., E) as they are, in an expert-major memory layout (E, ...). Under torch.compile, inductor
    vectorizes the routing's per-token arithmetic along the innermost dimension of its buffers, in a
    token-major layout across the E experts of one token (E = 4 lanes of a 16-lane AVX-512 vector, each load
    and store masked). With this layout some of the backward's loops run across tokens instead (2 of the 11
    loops over tokens and experts in one layer's generated code at 3ab156c); inductor fuses the copy into the
    forward's kernel, whose loops stay along E."""
    return features.movedim(-1, 0).contiguous().movedim(0, -1)


def check_experts(base: torch.Tensor, LiMEs: torch.Tensor, LiME_shared: Optional[torch.Tensor],
                   gamma: Optional[torch.Tensor], options: RoutingOptions) -> None:
    if (LiME_shared is None) != (gamma is None):
        raise ValueError("LiME_shared and gamma must be given together (use_shared_LiME) or both be None")
    if LiMEs.shape != (options.num_experts, base.shape[-1]):
        raise ValueError(
            f"LiMEs must have shape (num_experts, Dout) = {(options.num_experts, base.shape[-1])}; "
            f"got {tuple(LiMEs.shape)}"
        )


def route(
    base: torch.Tensor,
    delta: torch.Tensor,
    LiMEs: torch.Tensor,
    LiME_shared: Optional[torch.Tensor],
    gamma: Optional[torch.Tensor],
    options: RoutingOptions,
    valid: Optional[torch.Tensor] = None,
    jitter: Optional[torch.Tensor] = None,
    routing_features: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    history: Optional[RoutingHistory] = None,
) -> Routed:
    """`out = base + delta * (w @ P + g * p_shared)` with zero-parameter routing, and the routing
    probabilities; `route_and_modulate` adds the statistics. `routing_features`: the per-token `(u, v)`
    `(B, T, E)` to route from instead of `(base[:E], delta[:E])` (the original code's DoRA and SliceFine).
    `history`: the causal window's positions before this call (decoding with a cache); the result then
    carries the history after it."""
    num_experts = options.num_experts
    dtype = compute_dtype(base, delta, LiMEs, LiME_shared)
    frozen, adapted = routing_features or (base[..., :num_experts], delta[..., :num_experts])
    frozen, adapted = frozen.to(dtype), adapted.to(dtype)
    if torch.compiler.is_compiling():
        frozen, adapted = _expert_major(frozen), _expert_major(adapted)
    probs = routing_probs(frozen, adapted, valid, options, jitter, history)
    weights = mixing_weights(probs, options)
    shared = None if LiME_shared is None else gamma.to(dtype) * LiME_shared.to(dtype)
    modulation = expert_mixture(weights, LiMEs.to(dtype), shared)
    out = torch.addcmul(base.to(dtype), delta.to(dtype), modulation).to(base.dtype)
    if valid is not None:
        out = torch.where(valid.unsqueeze(-1), out, base)
    return Routed(out, probs, valid, None if history is None else next_history(history, frozen, adapted, valid))


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
    """`out = base + delta * (w @ P + g * p_shared)` with zero-parameter routing, and its statistics.

    The core shared by every PEFT variant: `base` `(B, T, Dout)` is the frozen representation (any
    dtype), `delta` `(B, T, Dout)` the adapter's (float32, or float64). Invalid tokens return `base` exactly.
    """
    if aux not in AUX_MODES:
        raise ValueError(f"aux must be one of {AUX_MODES}; got aux={aux!r}")
    check_experts(base, LiMEs, LiME_shared, gamma, options)
    routed = route(base, delta, LiMEs, LiME_shared, gamma, options, valid, jitter)
    return routed.out, routing_stats(routed.probs, routed.valid, options, aux)


ORIGINAL_DORA_NORM_FLOOR = 1e-8  # the original code floors DoRA's row norm


def dora_magnitude(
    weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor, magnitude: torch.Tensor, scaling: float,
    detach_norm: bool = False, norm_floor: Optional[float] = None,
) -> torch.Tensor:
    """DoRA's per-channel scale `m / ||W + s B A||_row` (Dout,), in float32 (float64 for float64 inputs).

    The row norm takes gradients (to A and B) unless `detach_norm` (Hugging Face PEFT's choice); it is
    floored at `norm_floor` when given (the original code's 1e-8).
    """
    dtype = compute_dtype(weight, A, B, magnitude)
    directions = weight.to(dtype) + scaling * (B.to(dtype) @ A.to(dtype))
    norm = torch.linalg.vector_norm(directions, dim=1)
    if norm_floor is not None:
        norm = norm.clamp_min(norm_floor)
    if detach_norm:
        norm = norm.detach()
    return magnitude.to(dtype) / norm


def adapter_delta(adapter_input: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """`delta = scaling * adapter_input @ A.T @ B.T` in float32 (float64 for float64 inputs); the scaling
    multiplies the rank-r intermediate, the smaller tensor.

    Under torch.compile it multiplies the product instead: inductor fuses it into the kernels that read
    `delta` (the routing's, forward and backward), where between the two matrix products it is a kernel
    of its own each way."""
    dtype = compute_dtype(adapter_input, A, B)
    projected = F.linear(adapter_input.to(dtype), A.to(dtype))
    if torch.compiler.is_compiling():
        return F.linear(projected, B.to(dtype)) * scaling
    return F.linear(projected * scaling, B.to(dtype))


def adapted_outputs(
    adapter_input: torch.Tensor,
    base: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    scaling: float,
    channel_scale: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    scale_bias: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`(base', delta')` of a low-rank adapter: `delta = scaling * adapter_input @ A.T @ B.T`; with
    DoRA's `channel_scale`, `base' = channel_scale * base + bias` and `delta' = channel_scale * delta`
    (`scale_bias`: `base' = channel_scale * (base + bias)`, the original code's DoRA)."""
    delta = adapter_delta(adapter_input, A, B, scaling)
    if channel_scale is None:
        return base, delta
    dtype = delta.dtype
    if scale_bias and bias is not None:
        scaled = channel_scale.to(dtype) * (base.to(dtype) + bias.to(dtype))
    else:
        scaled = channel_scale.to(dtype) * base.to(dtype)
        if bias is not None:
            scaled = scaled + bias.to(dtype)
    return scaled.to(base.dtype), channel_scale.to(dtype) * delta


def dora_outputs(
    adapter_input: torch.Tensor, base: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float,
    channel_scale: torch.Tensor, bias: Optional[torch.Tensor], options: RoutingOptions,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[Tuple[torch.Tensor, torch.Tensor]]]:
    """DoRA's `(base', delta')` and the routing features to use instead of their first E channels (None: those).

    `compat='original'`: the bias is rescaled with the magnitude, and the frozen side routes from the adapted
    output `base' + delta'` (the original code's DoRA), the adapter side from `delta'`."""
    original = options.compat == "original"
    base, delta = adapted_outputs(adapter_input, base, A, B, scaling, channel_scale, bias, scale_bias=original)
    if not original:
        return base, delta, None
    num_experts = options.num_experts
    adapted = delta[..., :num_experts]
    return base, delta, (base[..., :num_experts].to(delta.dtype) + adapted, adapted)


def lime_linear_routed(
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
    channel_scale: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    history: Optional[RoutingHistory] = None,
) -> Routed:
    """`lime_linear` without the statistics: the output and what they are computed from (`history`: see
    `route`)."""
    features = None
    if channel_scale is None:
        base, delta = adapted_outputs(adapter_input, base, A, B, scaling)
    else:
        base, delta, features = dora_outputs(adapter_input, base, A, B, scaling, channel_scale, bias, options)
    check_experts(base, LiMEs, LiME_shared, gamma, options)
    return route(base, delta, LiMEs, LiME_shared, gamma, options, valid, jitter, features, history=history)


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
    if aux not in AUX_MODES:
        raise ValueError(f"aux must be one of {AUX_MODES}; got aux={aux!r}")
    routed = lime_linear_routed(adapter_input, base, A, B, LiMEs, LiME_shared, gamma, options, scaling, valid, jitter,
                                channel_scale, bias)
    return routed.out, routing_stats(routed.probs, routed.valid, options, aux)
