"""The fused LiME layer as `torch.library` custom ops (forward, backward) with fake implementations,
so `torch.compile` traces through it without graph breaks. Every PEFT variant runs through them.

Forward: the frozen output, either computed here from a plain linear layer (`F.linear`, cuBLAS) or
given (bitsandbytes layers, embeddings, prompt banks); `z = x A^T` (Triton, float32) or a given `z`;
the routing on `[tokens, E]` features (Triton); then the modulated up projection written over the
frozen output in one pass (Triton). Saved for backward: the inputs, `z (tokens, r)` and the
`[tokens, E]` routing state; a `[tokens, Dout]` tensor only for DoRA (its product without bias,
which the magnitude's gradient needs).

Backward: one Triton pass over `dout` for `dz`, `dw`, `dB`, `dLiMEs`, `dLiME_shared`, `dgamma` (and
DoRA's d(scale)); the routing backward (Triton); then the input gradient — its low-rank part
(`du W[:E] + dz A`, Triton), to which cuBLAS adds `dout W` — or the frozen output's gradient, and
`dA = dz^T x` (Triton).

Variants: LoRA / LoRA-FA (`A`, `B`); DoRA (`channel_scale` = m / ||W + s B A||, the bias added after
it); SliceFine (`A` = its trainable rows, `B` = their place, `sliced_rows`: the frozen output keeps
only the bias in those channels); embeddings (`base` given, the adapter reads it); prompt tuning
(`base` and `z` given: `B` holds the prompt deltas).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..options import RoutingOptions
from .modulation import modulation_backward, modulation_forward
from .projection import down_projection, down_projection_grad, low_rank_input_grad
from .routing import REP_CODES, RoutingConfig, RoutingState, routing_backward, routing_forward, selection_code

# Inputs of the forward op that may take a gradient, and their positions.
_INPUTS = ("x", "x_adapter", "weight", "bias", "base", "z", "A", "B", "LiMEs", "LiME_shared", "gamma",
           "channel_scale", "valid", "jitter")
_DIFFERENTIABLE = ("x", "x_adapter", "base", "A", "B", "LiMEs", "LiME_shared", "gamma", "channel_scale")


def _config(num_experts, seq_len, top_k, temperature, gamma_routing, router, rep_mode, n_gram, ngram_mode,
            selection, soft_topk_temperature, auto_topk_threshold) -> RoutingConfig:
    rep = REP_CODES[rep_mode]
    return RoutingConfig(
        num_experts=num_experts, seq_len=seq_len, rep=rep, n_gram=n_gram,
        window=rep == 0 and n_gram > 1 and ngram_mode == "window",
        anchor=rep == 0 and n_gram > 1 and ngram_mode == "anchor",
        maxabs=router == "maxabs", selection=selection, top_k=top_k, temperature=float(temperature),
        gamma_routing=float(gamma_routing), theta=float(auto_topk_threshold), tau=float(soft_topk_temperature),
    )


def _contiguous(*tensors: Optional[Tensor]) -> Tuple[Optional[Tensor], ...]:
    return tuple(None if t is None else t.contiguous() for t in tensors)


def _valid_bytes(valid: Optional[Tensor]) -> Optional[Tensor]:
    return None if valid is None else valid.view(torch.uint8)


def _routed_frozen(frozen: Tensor, num_experts: int, channel_scale: Optional[Tensor], bias: Optional[Tensor],
                   sliced_rows: int) -> Tensor:
    """u: the first E channels of the frozen output base' (float32, rounded as base' is held)."""
    head = frozen[:, :num_experts].float()
    if channel_scale is not None:
        head = channel_scale[:num_experts] * head
        if bias is not None:
            head = head + bias[:num_experts].float()
        return head.to(frozen.dtype).float()
    head = head.clone()
    kept = min(sliced_rows, num_experts)
    if kept:
        head[:, :kept] = bias[:kept].float() if bias is not None else 0.0
    return head


@torch.library.custom_op("lime::fused_lime", mutates_args=())
def fused_lime(
    x: Optional[Tensor], x_adapter: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
    base: Optional[Tensor], z: Optional[Tensor], A: Optional[Tensor], B: Tensor, LiMEs: Tensor,
    LiME_shared: Optional[Tensor], gamma: Optional[Tensor], channel_scale: Optional[Tensor], valid: Optional[Tensor],
    jitter: Optional[Tensor], seq_len: int, sliced_rows: int, scaling: float, top_k: int, temperature: float,
    gamma_routing: float, router: str, rep_mode: str, n_gram: int, ngram_mode: str, selection: int,
    soft_topk_temperature: float, auto_topk_threshold: float, deterministic: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The frozen output is `F.linear(x, weight, bias)` (no bias inside with `channel_scale`) when
    `weight` is given, else `base`; the adapter reads `x_adapter`, or `x`, unless `z` is given.

    Returns (out, probs_sum, selection_counts, num_valid, z, features, selected, extra, frozen):
    the last five are saved for the backward (`z` and `frozen` empty when not computed here).
    """
    x, x_adapter, weight, base, z, A, B, LiMEs, LiME_shared, gamma, channel_scale, valid, jitter = _contiguous(
        x, x_adapter, weight, base, z, A, B, LiMEs, LiME_shared, gamma, channel_scale, valid, jitter)
    num_experts = LiMEs.shape[0]
    config = _config(num_experts, seq_len, top_k, temperature, gamma_routing, router, rep_mode, n_gram,
                     ngram_mode, selection, soft_topk_temperature, auto_topk_threshold)
    scale = None if channel_scale is None else channel_scale.float()
    if weight is not None:
        frozen = F.linear(x, weight, None if scale is not None else bias)
    else:
        frozen = base
    z_used = z.float() if z is not None else down_projection(x_adapter if x_adapter is not None else x, A)
    u_raw = _routed_frozen(frozen, num_experts, scale, bias, sliced_rows if weight is not None else 0)
    v_raw = scaling * (z_used @ B[:num_experts].float().t())
    if scale is not None:
        v_raw = v_raw * scale[:num_experts]
    valid_bytes = _valid_bytes(valid)
    state, probs_sum, selection_counts, num_valid = routing_forward(u_raw, v_raw, valid_bytes, jitter, config)
    # The output overwrites the frozen product when nothing else needs it (plain linear, no DoRA).
    in_place = weight is not None and scale is None
    out = frozen if in_place else torch.empty_like(frozen)
    # The kernel adds the bias after DoRA's scale, and puts it alone in SliceFine's sliced channels;
    # otherwise the frozen output already holds it.
    kernel_bias = bias if scale is not None or (weight is not None and sliced_rows) else None
    modulation_forward(
        frozen, out, z_used, B, state.weights, LiMEs, LiME_shared, gamma, valid_bytes, scaling, channel_scale=scale,
        bias=kernel_bias, sliced_rows=sliced_rows if weight is not None else 0,
    )
    saved_z = z_used if z is None else z_used.new_empty(0)
    saved_frozen = frozen if scale is not None and weight is not None else frozen.new_empty(0)
    return (out, probs_sum, selection_counts, num_valid, saved_z, state.features, state.selected, state.extra,
            saved_frozen)


@fused_lime.register_fake
def _(x, x_adapter, weight, bias, base, z, A, B, LiMEs, LiME_shared, gamma, channel_scale, valid, jitter,
      seq_len, *args):
    source = x if x is not None else (x_adapter if x_adapter is not None else base)
    num_tokens = source.shape[0]
    out_features = B.shape[0]
    num_experts = LiMEs.shape[0]
    floats = dict(device=source.device, dtype=torch.float32)
    activation = base.dtype if base is not None else x.dtype
    rank = B.shape[1]
    return (
        source.new_empty(num_tokens, out_features, dtype=activation),
        source.new_empty(num_experts, **floats),
        source.new_empty(num_experts, **floats),
        source.new_empty((), **floats),
        source.new_empty((num_tokens, rank) if z is None else (0,), **floats),
        source.new_empty(4, num_tokens, num_experts, **floats),
        source.new_empty(num_tokens, num_experts, device=source.device, dtype=torch.int8),
        source.new_empty(num_tokens + 2 * (num_tokens // seq_len) + 6, **floats),
        source.new_empty((num_tokens, out_features) if channel_scale is not None and weight is not None else (0,),
                         dtype=activation),
    )


@torch.library.custom_op("lime::fused_lime_backward", mutates_args=())
def fused_lime_backward(
    dout: Tensor, dprobs_sum: Optional[Tensor], x: Optional[Tensor], x_adapter: Optional[Tensor],
    weight: Optional[Tensor], bias: Optional[Tensor], A: Optional[Tensor], B: Tensor, LiMEs: Tensor,
    LiME_shared: Optional[Tensor], gamma: Optional[Tensor], channel_scale: Optional[Tensor], valid: Optional[Tensor],
    jitter: Optional[Tensor], z: Tensor, features: Tensor, selected: Tensor, extra: Tensor, frozen: Tensor,
    seq_len: int, sliced_rows: int, scaling: float, top_k: int, temperature: float, gamma_routing: float,
    router: str, rep_mode: str, n_gram: int, ngram_mode: str, selection: int, soft_topk_temperature: float,
    auto_topk_threshold: float, deterministic: bool, needs_input_grad: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients for `_DIFFERENTIABLE` (x, x_adapter, base, A, B, LiMEs, LiME_shared, gamma,
    channel_scale); those `needs_input_grad` does not ask for are empty tensors. `frozen` is the
    saved frozen output for DoRA, else `base` as given (or empty)."""
    # The kernels index memory directly: autograd may hand over expanded (stride 0) gradients, and the
    # saved inputs are the caller's tensors (a transposed view, say), not the forward's contiguous copies.
    dout, dprobs_sum, x, x_adapter, weight, A, B, LiMEs, LiME_shared, gamma, channel_scale, valid, jitter, z = (
        _contiguous(dout, dprobs_sum, x, x_adapter, weight, A, B, LiMEs, LiME_shared, gamma, channel_scale, valid,
                    jitter, z))
    need_x, need_adapter, need_base, need_A, need_B, need_P, need_shared, need_gamma, need_scale = needs_input_grad
    num_experts = LiMEs.shape[0]
    config = _config(num_experts, seq_len, top_k, temperature, gamma_routing, router, rep_mode, n_gram,
                     ngram_mode, selection, soft_topk_temperature, auto_topk_threshold)
    state = RoutingState(features, selected, extra)
    valid_bytes = _valid_bytes(valid)
    scale = None if channel_scale is None else channel_scale.float()
    computes_base = weight is not None
    adapter_source = x_adapter if x_adapter is not None else x
    need_routing = need_x or need_adapter or need_base or need_A or need_B or need_scale
    param_grads = need_B or need_P or need_shared or need_gamma or need_scale
    dz, dweights, dB, dP, dcol, dscale = modulation_backward(
        dout, z, B, state.weights, LiMEs, LiME_shared, gamma, valid_bytes, scaling,
        input_grads=need_routing, param_grads=param_grads, deterministic=deterministic,
        channel_scale=scale, base=frozen if scale is not None else None,
    )
    du = None
    if need_routing:
        # Gradients w.r.t. u = base'[:, :E] and v = delta'[:, :E]; base' and delta' carry DoRA's scale.
        du, dv = routing_backward(dweights, dprobs_sum, valid_bytes, jitter, state, config)
        z_float = z.float()
        if scale is not None:
            if need_scale:
                v_unscaled = scaling * (z_float @ B[:num_experts].float().t())
                dscale[:num_experts] += (du * frozen[:, :num_experts].float() + dv * v_unscaled).sum(dim=0)
            du = du * scale[:num_experts]
            dv = dv * scale[:num_experts]
        dz = dz + scaling * (dv @ B[:num_experts].float())
        if need_B:
            dB[:num_experts] += scaling * (dv.t() @ z_float)

    dx = dx_adapter = dbase = None
    if need_x and computes_base:
        # dx = d(frozen) W with d(frozen) = scale * dout (+ du on the first E channels), minus the
        # sliced channels (their output is the bias alone), plus dz A when the adapter reads x.
        routed = du
        if sliced_rows:
            width = max(num_experts, sliced_rows)
            routed = torch.zeros(dout.shape[0], width, device=dout.device, dtype=torch.float32)
            routed[:, :num_experts] = du
            routed[:, :sliced_rows] = -dout[:, :sliced_rows].float()
        dx = low_rank_input_grad(torch.empty_like(x), routed, weight, dz if x_adapter is None else None, A)
        # The low-rank terms first, so that the frozen product adds them in its GEMM's epilogue (a read
        # hidden behind the product) instead of a pass over dx after it.
        dx.addmm_(dout, weight if scale is None else (scale[:, None] * weight.float()).to(weight.dtype))
    elif need_x:  # the frozen output is given: x reaches the op only as the adapter's input
        dx = low_rank_input_grad(torch.empty_like(x), None, A, dz, A)
    if need_adapter:
        dx_adapter = low_rank_input_grad(torch.empty_like(x_adapter), None, A, dz, A)
    if need_base:
        dbase = dout.to(torch.float32, copy=True) if scale is None else dout.float() * scale  # never dout itself
        dbase[:, :num_experts] += du
        dbase = dbase.to(dout.dtype)
    grads = (
        dx,
        dx_adapter,
        dbase,
        down_projection_grad(adapter_source, dz, deterministic).to(A.dtype) if need_A else None,
        dB.to(B.dtype) if need_B else None,
        dP.to(LiMEs.dtype) if need_P else None,
        (gamma.float() * dcol).to(LiME_shared.dtype) if need_shared else None,
        (dcol @ LiME_shared.float()).reshape(1).to(gamma.dtype) if need_gamma else None,
        dscale.to(channel_scale.dtype) if need_scale else None,
    )
    # A custom op returns tensors only, none aliasing another: an empty one stands for "not asked for".
    return tuple(grad if grad is not None else dout.new_empty(0) for grad in grads)


@fused_lime_backward.register_fake
def _(dout, dprobs_sum, x, x_adapter, weight, bias, A, B, LiMEs, LiME_shared, gamma, channel_scale, *args):
    needs_input_grad = args[-1]
    base_like = dout  # the frozen output's gradient has the output's shape and dtype
    like = (x, x_adapter, base_like, A, B, LiMEs, LiME_shared, gamma, channel_scale)
    return tuple(t.new_empty(t.shape) if need else dout.new_empty(0) for t, need in zip(like, needs_input_grad))


def _setup_context(ctx, inputs, output):
    named = dict(zip(_INPUTS, inputs[: len(_INPUTS)]))
    ctx.options = inputs[len(_INPUTS):]
    _, _, _, _, z, features, selected, extra, frozen = output
    z_saved = z if named["z"] is None else named["z"]
    # DoRA's magnitude needs the product without bias: computed here, or the base given.
    frozen_saved = frozen
    if named["channel_scale"] is not None and named["base"] is not None:
        frozen_saved = named["base"]
    ctx.save_for_backward(
        named["x"], named["x_adapter"], named["weight"], named["bias"], named["A"], named["B"], named["LiMEs"],
        named["LiME_shared"], named["gamma"], named["channel_scale"], named["valid"], named["jitter"], z_saved,
        features, selected, extra, frozen_saved,
    )
    ctx.mark_non_differentiable(*output[2:])


def _backward(ctx, dout, dprobs_sum, *unused):
    needs = [ctx.needs_input_grad[_INPUTS.index(name)] for name in _DIFFERENTIABLE]
    grads = fused_lime_backward(dout, dprobs_sum, *ctx.saved_tensors, *ctx.options, needs)
    by_name = {name: (grad if need else None) for name, grad, need in zip(_DIFFERENTIABLE, grads, needs)}
    return tuple(by_name.get(name) for name in _INPUTS) + (None,) * len(ctx.options)


fused_lime.register_autograd(_backward, setup_context=_setup_context)


def fused_lime_linear(
    *,
    x: Optional[Tensor],
    adapter_input: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    base: Optional[Tensor],
    A: Optional[Tensor],
    B: Tensor,
    LiMEs: Tensor,
    LiME_shared: Optional[Tensor],
    gamma: Optional[Tensor],
    options: RoutingOptions,
    scaling: float,
    valid: Optional[Tensor],
    jitter: Optional[Tensor],
    z: Optional[Tensor] = None,
    channel_scale: Optional[Tensor] = None,
    sliced_rows: int = 0,
    deterministic: bool = True,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The fused layer on `(B, T, .)` sequences; returns (out (B, T, Dout), probs_sum (E),
    selection_counts (E), num_valid (), selected (B*T, E) int8) for
    `lime_kernels.reference.balance_statistics`.

    The frozen output is `F.linear(x, weight, bias)` when `weight` is given (a plain, frozen linear
    layer: weight and bias get no gradient), else `base` (`(B, T, Dout)`, which may take one). The
    adapter reads `adapter_input` (the input after dropout, or the embedding output), or `x`; or
    `z` `(B, T, r)` is given. `deterministic=False` lets the backward reduce with atomics (faster;
    the last bits may differ from run to run).
    """
    if weight is not None and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError("the fused LiME path keeps the base layer frozen: weight and bias must not require grad")
    if (weight is None) == (base is None):
        raise ValueError("give exactly one of weight (the frozen layer's) and base (its output)")
    if (z is None) == (A is None):
        raise ValueError("give exactly one of A (the adapter's down projection) and z (its output)")
    shaped = next(t for t in (x, adapter_input, base, z) if t is not None)
    batch, tokens = shaped.shape[:2]

    def flat(tensor):
        return None if tensor is None else tensor.reshape(batch * tokens, tensor.shape[-1])

    out, probs_sum, selection_counts, num_valid, _, _, selected, *_ = fused_lime(
        flat(x), flat(adapter_input), weight, bias, flat(base), flat(z), A, B, LiMEs, LiME_shared, gamma,
        channel_scale, None if valid is None else valid.reshape(-1), None if jitter is None else jitter.float(),
        tokens, int(sliced_rows), float(scaling), options.top_k, float(options.temperature),
        float(options.gamma_routing), options.router, options.rep_mode, options.n_gram, options.ngram_mode,
        selection_code(options.auto_topk, options.soft_topk, options.sparse_mode),
        float(options.soft_topk_temperature), float(options.auto_topk_threshold), bool(deterministic),
    )
    return out.reshape(batch, tokens, -1), probs_sum, selection_counts, num_valid, selected


__all__: Sequence[str] = ["fused_lime", "fused_lime_backward", "fused_lime_linear"]
