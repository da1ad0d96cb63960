"""Steps 5-11 of the reference path as one autograd node, for eager training.

Run eagerly, every operator of `reference.route` records an autograd node, and on small layers
(LLaVA-OneVision-0.5B's 896-wide projections, a decoding step) that host time is the layer's cost:
about 45 operators forward and 110 backward where a LoRA needs 14 and 28. `route` here computes the
same forward with the same operators inside one `torch.autograd.Function`, so they record nothing,
and its backward is the chain rule written out, in about half as many operators as autograd's.
With `native=True` (backend 'cpu') the C++ operators of `lime_kernels.cpu` compute it instead: one
operator forward, whose autograd node (made in C++) runs one operator backward (`_cpu_forward`).
Under torch.compile the reference is traced instead, for every backend (`_traces_reference`).

`reference.route` stays the specification: it is what runs under `torch.compile` (inductor fuses its
operators) and in the tests, which hold both implementations equal to it in float64: outputs, and every
gradient to rounding.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import reference
from .options import RoutingOptions, selection_code
from .reference import (NORM_EPS, WEIGHT_EPS, Routed, RoutingHistory, blend_coefficients, compute_dtype, next_history,
                        route as reference_route, routing_representations, selected_experts)


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # `.to` of a tensor already in `dtype` still costs a call into C++ (~1.5 µs); on this path that adds up.
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _soft_threshold(probs: torch.Tensor, options: RoutingOptions):
    """The threshold of the dense soft mask, its factor theta and, for soft top-k, the k-th expert's
    index (the threshold's gradient goes there); AutoTop-K's threshold is the max (index None)."""
    if options.auto_topk:
        return probs.amax(dim=-1, keepdim=True), options.auto_topk_threshold, None
    top = torch.topk(probs, options.top_k, dim=-1)
    return top.values[..., -1:], 1.0, top.indices[..., -1:]


def _modulation_backward(ctx, grad_out, delta, probs, gate, total, weights, threshold, kth, keep, floor_passes,
                         modulation, P, LiME_shared, gamma, valid, wants_delta):
    """Steps 9-11 backward: the gradients of delta (if `wants_delta`), the experts, the shared vector and
    gamma, and of the probabilities through the mixing weights."""
    options, dtype, needs = ctx.options, ctx.dtype, ctx.needs_input_grad
    num_experts = options.num_experts
    grad_modulated = _as(grad_out, dtype)
    if valid is not None:  # invalid tokens are `base`: nothing of theirs reaches the adapter or the experts
        grad_modulated = torch.where(valid.unsqueeze(-1), grad_modulated, torch.zeros_like(grad_modulated))
    # Step 11: out = base + delta * mod.
    grad_mod = grad_modulated * _as(delta, dtype)
    grad_delta = grad_modulated * modulation if wants_delta else None
    # Step 10: mod = w @ P + g * p_shared.
    grad_weights = F.linear(grad_mod, P)
    flat_grad_mod = grad_mod.reshape(-1, grad_mod.shape[-1])
    grad_LiMEs = _as(weights.reshape(-1, num_experts).t() @ flat_grad_mod, P.dtype) if needs[8] else None
    grad_shared = grad_gamma = None
    if LiME_shared is not None and (needs[9] or needs[10]):
        column_sums = flat_grad_mod.sum(dim=0)
        grad_shared = _as(_as(gamma, dtype) * column_sums, LiME_shared.dtype)
        grad_gamma = _as((column_sums * _as(LiME_shared, dtype)).sum().reshape(gamma.shape), gamma.dtype)
    # Step 9: w = gated / total.
    weighted = (grad_weights * weights).sum(dim=-1, keepdim=True)
    if gate is not None:  # dense soft mask: gated = probs * sigmoid((probs - theta * threshold) / tau)
        grad_gated = (grad_weights - weighted) / total
        grad_probs = grad_gated * gate
        grad_logit = torch.ops.aten.sigmoid_backward(grad_gated * probs, gate).div_(options.soft_topk_temperature)
        grad_probs += grad_logit
        theta = options.auto_topk_threshold if options.auto_topk else 1.0
        grad_threshold = grad_logit.sum(dim=-1, keepdim=True).mul_(-theta)
        if kth is None:  # the max: shared evenly by tied maxima, as amax's gradient is
            maxima = probs == threshold
            grad_probs += maxima * (grad_threshold / maxima.sum(dim=-1, keepdim=True))
        else:  # the k-th largest probability: to that expert, as topk's gradient is
            grad_probs.scatter_add_(-1, kth, grad_threshold)
    else:  # hard choice: w = where(keep, probs, 0) / max(sum, eps)
        weighted = torch.where(floor_passes, weighted, torch.zeros_like(weighted))
        grad_probs = torch.where(keep, (grad_weights - weighted) / total, torch.zeros_like(probs))
    return grad_delta, grad_LiMEs, grad_shared, grad_gamma, grad_probs


def _forward(base, delta, adapter_input, A, B, scaling, frozen, adapted, LiMEs, LiME_shared, gamma, valid, jitter,
             options, dtype):
    """`_Route`'s forward as a plain function: `(out, probs, saved)`, `saved` being what its backward reads.
    Called directly where no graph is recorded: the same operators, without autograd's bookkeeping."""
    num_experts = options.num_experts
    flat_input = projected = None
    if delta is None:  # reference.adapter_delta's products: z = x A^T, then (scaling z) B^T
        projection_dtype = compute_dtype(adapter_input, A, B)
        flat_input = _as(adapter_input, projection_dtype).reshape(-1, adapter_input.shape[-1])
        projected = (flat_input @ _as(A, projection_dtype).t()) * scaling
        delta = (projected @ _as(B, projection_dtype).t()).view(*adapter_input.shape[:-1], B.shape[0])
    if frozen is None:
        frozen, adapted = base[..., :num_experts], delta[..., :num_experts]
    features = _as(torch.stack((frozen, adapted)), dtype)
    if options.router == "cosine":
        norm = torch.linalg.vector_norm(features, dim=-1, keepdim=True)
    else:  # maxabs: one max per side over its whole batch
        norm = features.abs().amax(dim=tuple(range(1, features.dim())), keepdim=True)
    scale = norm.clamp_min(NORM_EPS)
    hat = features / scale
    frozen_coef, adapted_coef = blend_coefficients(options)
    logits = torch.add(hat[0] * frozen_coef, hat[1], alpha=adapted_coef)
    if jitter is not None:
        logits = logits * jitter.view_as(logits)
    probs = torch.softmax(logits, dim=-1)
    if not options.sparse_mode and (options.auto_topk or options.soft_topk):
        threshold, theta, kth = _soft_threshold(probs, options)
        gate = torch.sigmoid(torch.sub(probs, threshold, alpha=theta).div_(options.soft_topk_temperature))
        gated = probs * gate
        total = gated.sum(dim=-1, keepdim=True) + WEIGHT_EPS
        weights = gated / total
        keep = floor_passes = None
    else:
        keep = selected_experts(probs, options)
        kept = torch.where(keep, probs, torch.zeros_like(probs))
        kept_sum = kept.sum(dim=-1, keepdim=True)
        total = kept_sum.clamp_min(WEIGHT_EPS)
        weights = kept / total
        threshold = kth = gate = None
        floor_passes = kept_sum >= WEIGHT_EPS
    P = _as(LiMEs, dtype)
    shared = None if LiME_shared is None else _as(gamma, dtype) * _as(LiME_shared, dtype)
    flat_weights = weights.reshape(-1, num_experts)
    mixed = flat_weights @ P if shared is None else torch.addmm(shared, flat_weights, P)  # (tokens, Dout) in one call
    modulation = mixed.view(*weights.shape[:-1], P.shape[1])
    out = torch.addcmul(_as(base, dtype), _as(delta, dtype), modulation)
    out = _as(out, base.dtype)
    if valid is not None:
        out = torch.where(valid.unsqueeze(-1), out, base)
    saved = (delta, features, norm, scale, hat, probs, gate, total, weights, threshold, kth, keep, floor_passes,
             modulation, P, LiME_shared, gamma, valid, jitter, flat_input, projected, A, B)
    return out, probs, saved


class _Route(torch.autograd.Function):
    """Inputs as `reference.route`'s, with either `delta` or the low-rank adapter that makes it
    (`adapter_input`, `A`, `B`, `scaling`: `delta = scaling * adapter_input A^T B^T`, computed and
    differentiated here too), plus the routing features when a representation other than the token's
    own (n-gram window, anchor, mean, last) was computed outside (else None: `base[..., :E]` and
    `delta[..., :E]` themselves). Outputs: `out` and `probs` (differentiable: the balance loss reads them).

    The frozen and the adapted features are normalized as one stacked `(2, B, T, E)` tensor: the
    same values as the reference's two normalizations, in half the operators (and their backward)."""

    @staticmethod
    def forward(ctx, base, delta, adapter_input, A, B, scaling, frozen, adapted, LiMEs, LiME_shared, gamma, valid, jitter,
                options, dtype):
        if delta is None:
            ctx.scaling, ctx.input_shape, ctx.input_dtype = scaling, adapter_input.shape, adapter_input.dtype
        out, probs, saved = _forward(base, delta, adapter_input, A, B, scaling, frozen, adapted, LiMEs, LiME_shared,
                                     gamma, valid, jitter, options, dtype)
        ctx.options, ctx.own_features, ctx.dtype, ctx.out_dtype = options, frozen is None, dtype, base.dtype
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not a tensor of zeros
        ctx.save_for_backward(*saved)
        return out, probs

    @staticmethod
    def backward(ctx, grad_out, grad_probs):
        (delta, features, norm, scale, hat, probs, gate, total, weights, threshold, kth, keep, floor_passes,
         modulation, P, LiME_shared, gamma, valid, jitter, flat_input, projected, A, B) = ctx.saved_tensors
        options, dtype = ctx.options, ctx.dtype
        num_experts = options.num_experts
        needs = ctx.needs_input_grad
        wants_delta = needs[1] or needs[2] or needs[3] or needs[4]
        grad_delta = grad_LiMEs = grad_shared = grad_gamma = None
        if grad_out is None and grad_probs is None:
            return (None,) * 15
        if grad_out is None:  # only the statistics were differentiated (a balance loss on its own)
            grad_probs_total = grad_probs
        else:
            grad_delta, grad_LiMEs, grad_shared, grad_gamma, grad_probs_total = _modulation_backward(
                ctx, grad_out, delta, probs, gate, total, weights, threshold, kth, keep, floor_passes, modulation, P,
                LiME_shared, gamma, valid, wants_delta)
            if grad_probs is not None:
                grad_probs_total += grad_probs
        # Steps 6-8: probs = softmax(logits * jitter), logits = c_u * u_hat + c_v * v_hat.
        grad_logits = torch._softmax_backward_data(grad_probs_total, probs, -1, probs.dtype)
        if jitter is not None:
            grad_logits = grad_logits * jitter.view_as(grad_logits)
        # Step 5, both sides at once: x_hat = x / max(norm, eps). With g = d logits, side k's gradient is
        # c_k * (g - direction * sum(g * x_hat) * [norm >= eps]) / scale, where direction = d norm / d x:
        # x_hat (cosine), or sign(x) shared evenly by the tied maxima of |x| (maxabs).
        cosine = options.router == "cosine"
        reduced = -1 if cosine else tuple(range(1, features.dim()))
        inner = (grad_logits * hat).sum(dim=reduced, keepdim=True) * (norm >= NORM_EPS)
        if cosine:
            direction = hat
        else:
            maxima = features.abs() == norm
            direction = torch.where(maxima, features.sign(), torch.zeros_like(features))
            inner = inner / maxima.sum(dim=reduced, keepdim=True)
        grad_features = torch.addcmul(grad_logits, direction, inner, value=-1.0).div_(scale)
        frozen_coef, adapted_coef = blend_coefficients(options)
        grad_frozen = grad_adapted = None
        grad_base = None
        if ctx.own_features:
            if needs[0]:
                grad_base = grad_out.clone() if grad_out is not None else torch.zeros(
                    delta.shape, dtype=ctx.out_dtype, device=delta.device)
                grad_base[..., :num_experts].add_(grad_features[0], alpha=frozen_coef)
            if wants_delta:
                if grad_delta is None:
                    grad_delta = torch.zeros_like(delta)
                grad_delta[..., :num_experts].add_(grad_features[1], alpha=adapted_coef)
        else:
            grad_base = grad_out if needs[0] else None
            grad_frozen, grad_adapted = grad_features[0] * frozen_coef, grad_features[1] * adapted_coef
        grad_input = grad_A = grad_B = None
        if projected is not None and wants_delta:  # delta = (scaling x A^T) B^T
            flat_grad_delta = grad_delta.reshape(-1, grad_delta.shape[-1])
            grad_B = _as(flat_grad_delta.t() @ projected, B.dtype) if needs[4] else None
            grad_projected = (flat_grad_delta @ _as(B, projected.dtype)) * ctx.scaling
            grad_A = _as(grad_projected.t() @ flat_input, A.dtype) if needs[3] else None
            if needs[2]:
                grad_input = _as((grad_projected @ _as(A, projected.dtype)).view(ctx.input_shape), ctx.input_dtype)
            grad_delta = None
        return (grad_base, grad_delta, grad_input, grad_A, grad_B, None, grad_frozen, grad_adapted, grad_LiMEs,
                grad_shared, grad_gamma, None, None, None, None)


def _cpu_options(options: RoutingOptions) -> tuple:
    """The routing options as the `lime_cpu` operators take them, after their tensors. Computed per call (about a
    µs): a cache in a global that a call fills would make torch.compile guard on it and recompile."""
    frozen_coef, adapted_coef = blend_coefficients(options)
    return (options.router == "maxabs", selection_code(options.auto_topk, options.soft_topk, options.sparse_mode),
            options.top_k, min(2 * options.top_k, options.num_experts), options.auto_topk_threshold,
            options.soft_topk_temperature, frozen_coef, adapted_coef)


def _cpu_forward(base, delta, adapter_input, A, B, scaling, frozen, adapted, LiMEs, LiME_shared, gamma, valid, jitter,
                 cpu_options):
    """`(out, probs)` from one `lime_cpu` operator: `lora_route_modulate` when this call computes delta (`delta`
    None: from `adapter_input`, `A`, `B`, `scaling`), else `route_modulate`. `cpu_options`: what `_cpu_options`
    gives. Where a graph is recorded, the operator's autograd kernel (C++) makes the call one node, whose backward
    is the backward operator (which recomputes the routing from the features rather than saving its
    intermediates)."""
    if delta is None:
        return torch.ops.lime_cpu.lora_route_modulate(adapter_input, base, A, B, scaling, LiMEs, LiME_shared, gamma,
                                                      valid, jitter, *cpu_options)[:2]
    return torch.ops.lime_cpu.route_modulate(base, delta, frozen, adapted, LiMEs, LiME_shared, gamma, valid, jitter,
                                             *cpu_options)


def _records_graph(*differentiable: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable)


def _traces_reference() -> bool:
    """Whether to trace `reference.route` here: under torch.compile, on every backend. Inductor fuses its operators
    into few kernels (see `reference.expert_mixture`); the C++ operators would be opaque calls, each from Python
    and around the fused kernels. Traced, the reference was faster in training (compiled step 0.75-0.85 x
    MoE-LoRA against 0.77-0.80 for the operators, 3 of 4 paired `make bench` runs) and, since the mixture is fused
    (5d2eb15), in generation too (0.865-0.914 x PEFT LoRA's tokens/s against 0.809-0.890, 3 paired runs)."""
    return torch.compiler.is_compiling()


def _routed(arguments: tuple, *differentiable: Optional[torch.Tensor]) -> tuple:
    """`(out, probs)` of `_Route` on `arguments`: one autograd node where a graph is recorded (gradients on,
    one of `differentiable` requiring one), else its forward alone, without autograd's bookkeeping."""
    if _records_graph(*differentiable):
        return _Route.apply(*arguments)
    return _forward(*arguments)[:2]


def route(
    base: torch.Tensor,
    delta: torch.Tensor,
    LiMEs: torch.Tensor,
    LiME_shared: Optional[torch.Tensor],
    gamma: Optional[torch.Tensor],
    options: RoutingOptions,
    valid: Optional[torch.Tensor] = None,
    jitter: Optional[torch.Tensor] = None,
    routing_features=None,
    history: Optional[RoutingHistory] = None,
    native: bool = False,
) -> Routed:
    """`reference.route` as one autograd node, or its forward alone where no graph is recorded (evaluation,
    decoding); `routing_features` and `history` as the reference's. `native`: steps 5-11 as the C++ operators of
    `lime_kernels.cpu` (CPU tensors; the caller checked that they are loaded). Under torch.compile see
    `_traces_reference`."""
    if _traces_reference():
        return reference_route(base, delta, LiMEs, LiME_shared, gamma, options, valid, jitter, routing_features,
                               history)
    dtype = compute_dtype(base, delta, LiMEs, LiME_shared)
    frozen = adapted = following = None
    if options.rep_mode != "token" or options.n_gram != 1 or routing_features is not None or history is not None:
        num_experts = options.num_experts
        own = routing_features or (base[..., :num_experts], delta[..., :num_experts])
        own = (_as(own[0], dtype), _as(own[1], dtype))
        frozen, adapted = routing_representations(own[0], own[1], valid, options, history)
        following = None if history is None else next_history(history, own[0], own[1], valid)
    if native:
        out, probs = _cpu_forward(base, delta, None, None, None, None, frozen, adapted, LiMEs, LiME_shared, gamma, valid,
                                  jitter, _cpu_options(options))
        return Routed(out, probs, valid, following)
    arguments = (base, delta, None, None, None, None, frozen, adapted, LiMEs, LiME_shared, gamma, valid, jitter, options,
                 dtype)
    out, probs = _routed(arguments, base, delta, LiMEs, LiME_shared, gamma)
    return Routed(out, probs, valid, following)


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
    history: Optional[RoutingHistory] = None,
    native: bool = False,
) -> Routed:
    """`reference.lime_linear_routed` without DoRA's channel scale: with per-token routing, the adapter's
    two products join the same node (or forward); otherwise `route` over `reference.adapted_outputs`.
    `native`: as `route`'s."""
    if (options.rep_mode != "token" or options.n_gram != 1 or history is not None
            or _traces_reference()):
        base, delta = reference.adapted_outputs(adapter_input, base, A, B, scaling)
        return route(base, delta, LiMEs, LiME_shared, gamma, options, valid, jitter, history=history, native=native)
    if native:
        out, probs = _cpu_forward(base, None, adapter_input, A, B, scaling, None, None, LiMEs, LiME_shared, gamma, valid,
                                  jitter, _cpu_options(options))
        return Routed(out, probs, valid)
    dtype = compute_dtype(base, adapter_input, A, B, LiMEs, LiME_shared)  # delta's dtype is that of x, A and B
    arguments = (base, None, adapter_input, A, B, scaling, None, None, LiMEs, LiME_shared, gamma, valid, jitter, options,
                 dtype)
    out, probs = _routed(arguments, adapter_input, base, A, B, LiMEs, LiME_shared, gamma)
    return Routed(out, probs, valid)
