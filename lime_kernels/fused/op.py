"""The fused LiME layer as `torch.library` custom ops (forward, backward) with fake implementations,
so `torch.compile` traces through it without graph breaks and CUDA graphs can capture it (no host
synchronization, no data-dependent shape). Every PEFT variant runs through them. Eager calls run the
same implementations through a plain `torch.autograd.Function` (`_EagerFusedLiME`), which skips
torch.library's per-call Python dispatch; with autograd off (inference) they call the forward directly.

Forward, with the default options 3 launches: the frozen GEMM (`F.linear`, cuBLAS: its output is
bit-for-bit the frozen layer's, which masked tokens return), the projection pass over `x` (`z = x A^T`,
the routing features, and the routing itself when it is per token), and the epilogue that writes
`base' + delta * mod` over the frozen output (and finishes the statistics). Pooled routing (n-gram,
rep_mode mean / last) and the maxabs router add one or two small `[tokens, E]` kernels.

Backward, 3 launches: one over `dout` whose programs take either a block of tokens (dz, the mixing
weights' gradient, and the routing backward of those rows) or a block of columns over a split of the
tokens (partial sums for dB, dLiMEs, dLiME_shared, DoRA's dscale), the input-side pass (the low-rank
part of dx, dA partial sums; the last of each column block's programs to finish sums the partials
into the parameter gradients, `finish.py`), and cuBLAS adding `dout W` to dx in its epilogue. Every
reduction has a fixed order (bit-for-bit repeatable) and the partial sums are bounded by
`WORKSPACE_FRACTION` of the activations they reduce. Saved for backward: the inputs, `z (tokens, r)`
and `[tokens, E]` routing state; a `[tokens, Dout]` tensor only for DoRA (the frozen product, which the
magnitude's gradient needs).

Variants: LoRA / LoRA-FA (`A`, `B`); DoRA (`channel_scale` = m / ||W + s B A||, the bias added after
it); SliceFine (`A` = its trainable rows, `B` = their place, `sliced_rows`: the frozen output keeps
only the bias in those channels); embeddings (`base` given, the adapter reads it); prompt tuning
(`base` and `z` given: `B` holds the prompt deltas). The weight may be a transposed view (GPT-2's
`Conv1D`): it is read in place, never copied.
"""

from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import forward_ad

from ..inputs import autocast_cast, autocast_on, full_precision
from ..options import RoutingOptions, selection_code
from ..reference import RoutingStats, balance_statistics
from .common import on_device_of
from .finish import Finishing, arrival_counters, empty_grads, finish_parameter_grads
from .modulation import modulation_backward, modulation_forward
from .projection import input_grads, project, routing_block_rows
from .routing import (
    REP_CODES,
    RoutingConfig,
    RoutingState,
    STAT_ACTIVE,
    STAT_LOAD,
    STAT_USAGE,
    pooling_backward,
    route_pooled,
    state_layout,
    statistics_length,
    statistics_partials,
)

# The backward's partial sums take at most this fraction of the bytes of the activation they reduce
# (dout for the parameter gradients, x for dA).
WORKSPACE_FRACTION = 1 / 16

# Inputs of the forward op that may take a gradient, and their positions.
_INPUTS = ("x", "x_adapter", "weight", "bias", "base", "z", "A", "B", "LiMEs", "LiME_shared", "gamma",
           "channel_scale", "valid", "jitter")
_DIFFERENTIABLE = ("x", "x_adapter", "base", "A", "B", "LiMEs", "LiME_shared", "gamma", "channel_scale")
# Their positions among the inputs, found once (the backward runs on every training step).
_DIFFERENTIABLE_POSITIONS = tuple(_INPUTS.index(name) for name in _DIFFERENTIABLE)


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


def _rows(tensor: Optional[Tensor]) -> Optional[Tensor]:
    """A [rows, features] tensor the kernels can read with a row stride: copied only when its
    features are not contiguous."""
    return tensor if tensor is None or tensor.stride(-1) == 1 else tensor.contiguous()


def _valid_bytes(valid: Optional[Tensor]) -> Optional[Tensor]:
    return None if valid is None else valid.view(torch.uint8)


def _empty_statistics(num_experts: int, device) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The statistics of a batch without tokens, from the reference's formulas."""
    zeros = torch.zeros(num_experts, device=device, dtype=torch.float32)
    stats = balance_statistics(zeros, zeros, torch.zeros((), device=device), "full")
    vector = torch.cat([torch.stack([stats.load, stats.active_experts, torch.zeros((), device=device)]), stats.usage])
    histogram = torch.zeros(num_experts + 1, device=device, dtype=torch.int64)
    return stats.importance, stats.kl_uniform, vector, histogram


def fused_lime_impl(
    x: Optional[Tensor], x_adapter: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor],
    base: Optional[Tensor], z: Optional[Tensor], A: Optional[Tensor], B: Tensor, LiMEs: Tensor,
    LiME_shared: Optional[Tensor], gamma: Optional[Tensor], channel_scale: Optional[Tensor], valid: Optional[Tensor],
    jitter: Optional[Tensor], seq_len: int, sliced_rows: int, scaling: float, top_k: int, temperature: float,
    gamma_routing: float, router: str, rep_mode: str, n_gram: int, ngram_mode: str, selection: int,
    soft_topk_temperature: float, auto_topk_threshold: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The frozen output is `F.linear(x, weight, bias)` (no bias inside with `channel_scale`) when
    `weight` is given, else `base`; the adapter reads `x_adapter`, or `x`, unless `z` is given.

    Returns (out, importance, kl_uniform, stats, histogram, z, features, selected, extra, frozen):
    `out`, `importance` and `kl_uniform` are differentiable; `stats` is [load, active_experts, valid
    tokens, usage (E)], `histogram` the valid tokens by number of selected experts (E + 1); the last
    five are saved for the backward (`z` and `frozen` empty when not computed here).
    """
    source = next(t for t in (x, x_adapter, base) if t is not None)
    with on_device_of(source), full_precision(source.device):
        return _forward(x, x_adapter, weight, bias, base, z, A, B, LiMEs, LiME_shared, gamma, channel_scale, valid,
                        jitter, seq_len, sliced_rows, scaling,
                        _config(LiMEs.shape[0], seq_len, top_k, temperature, gamma_routing, router, rep_mode, n_gram,
                                ngram_mode, selection, soft_topk_temperature, auto_topk_threshold))


fused_lime = torch.library.custom_op("lime::fused_lime", fused_lime_impl, mutates_args=())


def _forward(x, x_adapter, weight, bias, base, z, A, B, LiMEs, LiME_shared, gamma, channel_scale, valid, jitter,
             seq_len, sliced_rows, scaling, config: RoutingConfig):
    x, x_adapter, base = _rows(x), _rows(x_adapter), _rows(base)
    z, A, B, LiMEs, LiME_shared, gamma, channel_scale, valid, jitter = _contiguous(
        z, A, B, LiMEs, LiME_shared, gamma, channel_scale, valid, jitter)
    num_experts = config.num_experts
    scale = None if channel_scale is None else channel_scale.float()
    frozen = F.linear(x, weight, None if scale is not None else bias) if weight is not None else base
    num_tokens = frozen.shape[0]
    device = frozen.device
    computes_base = weight is not None
    saved_frozen = frozen if scale is not None and computes_base else frozen.new_empty(0)
    state = RoutingState.allocate(num_tokens, config, device)
    if num_tokens == 0:
        out = frozen if computes_base and scale is None else frozen.clone()
        importance, kl_uniform, stats, histogram = _empty_statistics(num_experts, device)
        saved_z = torch.empty((0, B.shape[1]) if z is None else (0,), device=device, dtype=torch.float32)
        return (out, importance, kl_uniform, stats, histogram, saved_z, state.features, state.selected, state.extra,
                saved_frozen)
    valid_bytes = _valid_bytes(valid)
    sliced = sliced_rows if computes_base else 0
    # The kernels add the bias after DoRA's scale, and put it alone in SliceFine's sliced channels;
    # otherwise the frozen output already holds it.
    kernel_bias = bias if scale is not None or sliced else None
    adapter_source = x_adapter if x_adapter is not None else x
    block_rows = routing_block_rows(num_tokens, B.shape[1], config,
                                    adapter_source.dtype if z is None else frozen.dtype)
    stat_partials = statistics_partials(num_tokens, block_rows, config, device)
    z_used, raw = project(adapter_source, A, z.float() if z is not None else None, B, frozen, scale, kernel_bias,
                          sliced, valid_bytes, jitter, state, stat_partials, scaling, config)
    if raw is not None:
        route_pooled(raw, valid_bytes, jitter, state, stat_partials, config)
    # The output overwrites the frozen product when nothing else needs it (plain linear, no DoRA).
    out = frozen if computes_base and scale is None else torch.empty_like(frozen)
    importance = torch.empty((), device=device, dtype=torch.float32)
    kl_uniform = torch.empty((), device=device, dtype=torch.float32)
    stats = torch.empty(statistics_length(num_experts), device=device, dtype=torch.float32)
    histogram = torch.empty(num_experts + 1, device=device, dtype=torch.int64)
    modulation_forward(frozen, out, z_used, B, state.weights, LiMEs, LiME_shared, gamma, valid_bytes, scaling,
                       stat_partials, importance, kl_uniform, stats, histogram, channel_scale=scale, bias=kernel_bias,
                       sliced_rows=sliced)
    saved_z = z_used if z is None else z_used.new_empty(0)
    return (out, importance, kl_uniform, stats, histogram, saved_z, state.features, state.selected, state.extra,
            saved_frozen)


@fused_lime.register_fake
def _(x, x_adapter, weight, bias, base, z, A, B, LiMEs, LiME_shared, gamma, channel_scale, valid, jitter,
      seq_len, sliced_rows, scaling, top_k, temperature, gamma_routing, router, rep_mode, n_gram, ngram_mode,
      selection, soft_topk_temperature, auto_topk_threshold):
    source = x if x is not None else (x_adapter if x_adapter is not None else base)
    num_tokens = source.shape[0]
    out_features = B.shape[0]
    num_experts = LiMEs.shape[0]
    floats = dict(device=source.device, dtype=torch.float32)
    activation = base.dtype if base is not None else x.dtype
    rank = B.shape[1]
    config = _config(num_experts, seq_len, top_k, temperature, gamma_routing, router, rep_mode, n_gram, ngram_mode,
                     selection, soft_topk_temperature, auto_topk_threshold)
    return (
        source.new_empty(num_tokens, out_features, dtype=activation),
        source.new_empty((), **floats),
        source.new_empty((), **floats),
        source.new_empty(statistics_length(num_experts), **floats),
        source.new_empty(num_experts + 1, dtype=torch.int64),
        source.new_empty((num_tokens, rank) if z is None else (0,), **floats),
        source.new_empty(4, num_tokens, num_experts, **floats),
        source.new_empty(num_tokens, num_experts, dtype=torch.int8),
        source.new_empty(sum(state_layout(num_tokens, config).values()), **floats),
        source.new_empty((num_tokens, out_features) if channel_scale is not None and weight is not None else (0,),
                         dtype=activation),
    )


def fused_lime_backward_impl(
    dout: Optional[Tensor], dimportance: Optional[Tensor], dkl: Optional[Tensor], x: Optional[Tensor],
    x_adapter: Optional[Tensor],
    weight: Optional[Tensor], bias: Optional[Tensor], A: Optional[Tensor], B: Tensor, LiMEs: Tensor,
    LiME_shared: Optional[Tensor], gamma: Optional[Tensor], channel_scale: Optional[Tensor], valid: Optional[Tensor],
    jitter: Optional[Tensor], z: Tensor, features: Tensor, selected: Tensor, extra: Tensor, stats: Tensor,
    frozen: Tensor, seq_len: int, sliced_rows: int, scaling: float, top_k: int, temperature: float,
    gamma_routing: float, router: str, rep_mode: str, n_gram: int, ngram_mode: str, selection: int,
    soft_topk_temperature: float, auto_topk_threshold: float, needs_input_grad: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients for `_DIFFERENTIABLE` (x, x_adapter, base, A, B, LiMEs, LiME_shared, gamma,
    channel_scale); those `needs_input_grad` does not ask for are empty tensors. `dout`,
    `dimportance`, `dkl` may be None (that output took no gradient). `frozen` is the saved frozen output
    for DoRA, else `base` as given (or empty)."""
    source = next(t for t in (z, x, x_adapter, frozen) if t is not None)
    config = _config(LiMEs.shape[0], seq_len, top_k, temperature, gamma_routing, router, rep_mode, n_gram,
                     ngram_mode, selection, soft_topk_temperature, auto_topk_threshold)
    with on_device_of(source), full_precision(source.device):
        grads = _backward_impl(dout, dimportance, dkl, x, x_adapter, weight, A, B, LiMEs, LiME_shared, gamma, channel_scale,
                               valid, jitter, z, features, selected, extra, stats, frozen, sliced_rows, scaling,
                               config, needs_input_grad)
    # A custom op returns tensors only, none aliasing another: an empty one stands for "not asked for".
    return tuple(grad if grad is not None else stats.new_empty(0) for grad in grads)


fused_lime_backward = torch.library.custom_op("lime::fused_lime_backward", fused_lime_backward_impl, mutates_args=())
# The Python implementations behind the ops (for accounting that follows a call into them).
IMPLEMENTATIONS = {"lime::fused_lime": fused_lime_impl, "lime::fused_lime_backward": fused_lime_backward_impl}


def _backward_impl(dout, dimportance, dkl, x, x_adapter, weight, A, B, LiMEs, LiME_shared, gamma, channel_scale, valid, jitter,
                   z, features, selected, extra, stats, frozen, sliced_rows, scaling, config: RoutingConfig,
                   needs_input_grad):
    need_x, need_adapter, need_base, need_A, need_B, need_P, need_shared, need_gamma, need_scale = needs_input_grad
    computes_base = weight is not None
    num_tokens = features.shape[1]
    out_features = B.shape[0]
    num_experts = config.num_experts
    device = features.device
    if num_tokens == 0:
        return _empty_grads(x, x_adapter, frozen, A, B, LiMEs, LiME_shared, gamma, channel_scale, needs_input_grad)
    if dout is None:  # only the statistics took a gradient; `frozen` has the output's dtype, even when empty
        dout = torch.zeros(num_tokens, out_features, device=device, dtype=frozen.dtype)
    # Autograd may hand over expanded (stride 0) gradients; the kernels index them densely.
    dout = dout.contiguous()
    x, x_adapter, frozen = _rows(x), _rows(x_adapter), _rows(frozen)
    A, B, LiMEs, LiME_shared, gamma, channel_scale, valid, jitter, z = _contiguous(
        A, B, LiMEs, LiME_shared, gamma, channel_scale, valid, jitter, z)
    state = RoutingState(features, selected, extra, state_layout(num_tokens, config))
    valid_bytes = _valid_bytes(valid)
    scale = None if channel_scale is None else channel_scale.float()
    adapter_source = x_adapter if x_adapter is not None else x
    # What depends on the routing's gradients: everything upstream of u = base'[:E] and v = delta'[:E].
    routing = need_x or need_adapter or need_base or need_A or need_B or need_scale
    need_parameters = need_A or need_B or need_P or need_shared or need_gamma or need_scale
    grads = (empty_grads(A, B, LiMEs, LiME_shared, gamma, channel_scale, need_A, need_B, need_P, need_shared,
                         need_gamma, need_scale) if need_parameters else None)
    # The input pass finishes the parameter gradients, counting its programs' arrivals per column block.
    counters = (arrival_counters(adapter_source.shape[1] if adapter_source is not None else 0, device)
                if routing and need_parameters else None)
    dz, dpooled, dgamma_partials, max_partials, partials = modulation_backward(
        dout, z, B, LiMEs, LiME_shared, gamma, valid_bytes, scale, frozen if scale is not None else None, state,
        jitter, stats, dimportance, dkl, scaling, config, routing,
        partials=need_B or need_P or need_shared or need_scale,
        budget_bytes=int(WORKSPACE_FRACTION * dout.numel() * dout.element_size()), counters=counters)
    draw = None
    if routing:
        draw = pooling_backward(dpooled, max_partials, valid_bytes, state, config) if config.pooled else dpooled

    dx = dx_adapter = dbase = None
    adapter_reads_x = x_adapter is None and x is not None
    if routing:
        if need_x and computes_base:
            dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        if need_adapter:
            dx_adapter = torch.empty_like(x_adapter, memory_format=torch.contiguous_format)
        elif need_x and not computes_base:  # the frozen output is given: x reaches the op as the adapter's input
            dx_adapter = torch.empty_like(x, memory_format=torch.contiguous_format)
        adapter_into_dx = dx is not None and adapter_reads_x
        source_bytes = adapter_source.numel() * adapter_source.element_size() if adapter_source is not None else 0
        input_grads(
            dout, adapter_source, weight if computes_base else None, A, B, z, dz, draw, scale,
            frozen if scale is not None else None, sliced_rows if computes_base else 0, scaling,
            routed_into_dx=dx, adapter_into_dx=adapter_into_dx,
            adapter_grad=dx_adapter if not adapter_into_dx or need_adapter else None,
            finishing=Finishing(partials, dgamma_partials, counters, grads, gamma) if need_parameters else None,
            budget_bytes=max(1, int(WORKSPACE_FRACTION * source_bytes)))
        if dx is not None:
            # dx = dout W (DoRA: W scaled by row) added by cuBLAS onto the low-rank part, in its epilogue.
            frozen_weight = weight if scale is None else (scale[:, None] * weight.float()).to(weight.dtype)
            dx.addmm_(dout, frozen_weight)
        if need_base:
            dbase = _base_grad(dout, draw[0], scale, num_experts)
    elif need_parameters:
        finish_parameter_grads(partials, dgamma_partials, grads, gamma=gamma, out_features=out_features,
                               rank=B.shape[1], num_experts=num_experts, has_scale=scale is not None,
                               scaling=scaling)
    dA, dB, dP, dshared, dgamma, dscale = grads if grads is not None else (None,) * 6
    if need_x and not computes_base:
        dx, dx_adapter = dx_adapter, None
    return dx, dx_adapter, dbase, dA, dB, dP, dshared, dgamma, dscale


def _base_grad(dout: Tensor, du: Tensor, scale: Optional[Tensor], num_experts: int) -> Tensor:
    """The given frozen output's gradient: dout (times DoRA's scale) plus the routing's on the first E
    channels (through u = base'[:E], which carries the scale too)."""
    dbase = dout.float() * scale if scale is not None else dout.to(torch.float32, copy=True)  # never dout itself
    head = du * scale[:num_experts] if scale is not None else du
    dbase[:, :num_experts] += head
    return dbase.to(dout.dtype)


def _empty_grads(x, x_adapter, frozen, A, B, LiMEs, LiME_shared, gamma, channel_scale, needs_input_grad):
    """Gradients of a batch without tokens: empty activations' gradients, zero parameters' gradients.
    The frozen output's is (0, Dout) in its dtype (`frozen` has that dtype, even when empty)."""
    base_like = frozen.new_empty(0, B.shape[0])
    like = (x, x_adapter, base_like, A, B, LiMEs, LiME_shared, gamma, channel_scale)
    return tuple(torch.zeros_like(tensor) if need else None for tensor, need in zip(like, needs_input_grad))


@fused_lime_backward.register_fake
def _(dout, dimportance, dkl, x, x_adapter, weight, bias, A, B, LiMEs, LiME_shared, gamma, channel_scale, valid,
      jitter, z, features, selected, extra, stats, frozen, *args):
    needs_input_grad = args[-1]
    num_tokens = features.shape[1]
    base_like = dout if dout is not None else frozen.new_empty(num_tokens, B.shape[0])
    like = (x, x_adapter, base_like, A, B, LiMEs, LiME_shared, gamma, channel_scale)
    return tuple(t.new_empty(t.shape) if need else stats.new_empty(0) for t, need in zip(like, needs_input_grad))


def _setup_context(ctx, inputs, output):
    named = dict(zip(_INPUTS, inputs[: len(_INPUTS)]))
    ctx.options = inputs[len(_INPUTS):]
    _, _, _, stats, _, z, features, selected, extra, frozen = output
    z_saved = z if named["z"] is None else named["z"]
    # DoRA's magnitude needs the product without bias: computed here, or the base given.
    frozen_saved = frozen
    if named["channel_scale"] is not None and named["base"] is not None:
        frozen_saved = named["base"]
    ctx.save_for_backward(
        named["x"], named["x_adapter"], named["weight"], named["bias"], named["A"], named["B"], named["LiMEs"],
        named["LiME_shared"], named["gamma"], named["channel_scale"], named["valid"], named["jitter"], z_saved,
        features, selected, extra, stats, frozen_saved,
    )
    ctx.mark_non_differentiable(*output[3:])
    # Gradients of outputs nothing used arrive as None instead of materialized zeros.
    ctx.set_materialize_grads(False)


def _backward(ctx, dout, dimportance, dkl, *unused):
    return _gradients(fused_lime_backward, ctx, dout, dimportance, dkl)


def _gradients(backward, ctx, dout, dimportance, dkl):
    """The forward inputs' gradients, from `backward` (the registered op, or its implementation)."""
    needs = [ctx.needs_input_grad[position] for position in _DIFFERENTIABLE_POSITIONS]
    result = [None] * (len(_INPUTS) + len(ctx.options))
    if dout is None and dimportance is None and dkl is None:
        return tuple(result)
    grads = backward(dout, dimportance, dkl, *ctx.saved_tensors, *ctx.options, needs)
    for position, grad, need in zip(_DIFFERENTIABLE_POSITIONS, grads, needs):
        if need:
            result[position] = grad
    return tuple(result)


fused_lime.register_autograd(_backward, setup_context=_setup_context)


class _EagerFusedLiME(torch.autograd.Function):
    """The registered op's forward and backward without torch.library's Python dispatch, which binds
    the schema and fills the defaults of some thirty arguments on every call (about 300 of the 1,050 µs
    of host time a training step took, measured on this project's CPU). Eager calls take this; traced
    ones (`torch.compile`) the registered ops.

    Autograd handles every input and output of a Function on every call, and again in the backward,
    so this one takes the (B, T, .) sequences as they are (flattened inside, where no autograd node
    records the views), the routing options as one prebuilt `RoutingConfig` (17 inputs instead of
    the op's 27), returns only the 5 outputs the caller reads (not the op's 10) and keeps the routing
    state for the backward on `ctx`. Measured on this project's CPU, kernels not started: with
    `launch`'s cheaper recording, a training step's host time went from about 680 to 616 µs; the
    flattening moved in here, with the layer's own views of 3-D inputs dropped, took it to 583 µs."""

    @staticmethod
    def forward(ctx, x, x_adapter, weight, bias, base, z, A, B, LiMEs, LiME_shared, gamma, channel_scale, valid,
                jitter, sliced_rows: int, scaling: float, config: RoutingConfig):
        # The caller (`fused_lime_linear`) has switched autocast off already. The (B, T, .) sequences
        # are flattened here, where no autograd node records the views.
        source = x if x is not None else (x_adapter if x_adapter is not None else base)
        ctx.sequences = source.shape[:2]
        x, x_adapter, base, z = _flat(x), _flat(x_adapter), _flat(base), _flat(z)
        out, importance, kl_uniform, stats, histogram, z_used, features, selected, extra, frozen = _flat_forward(
            source, x, x_adapter, weight, bias, base, z, A, B, LiMEs, LiME_shared, gamma, channel_scale, valid,
            jitter, sliced_rows, scaling, config)
        # Inputs (and the statistics, an output) through save_for_backward, which checks that nothing
        # changed them in place before the backward; the routing state is this Function's own.
        # DoRA's magnitude needs the product without bias: computed here, or the base given.
        dora_base = base if channel_scale is not None and base is not None else None
        ctx.save_for_backward(x, x_adapter, weight, A, B, LiMEs, LiME_shared, gamma, channel_scale, valid, jitter,
                              z, dora_base, stats)
        ctx.state = (z_used, features, selected, extra, frozen)
        ctx.sliced_rows, ctx.scaling, ctx.config = sliced_rows, scaling, config
        ctx.mark_non_differentiable(stats, histogram)
        # Gradients of outputs nothing used arrive as None instead of materialized zeros.
        ctx.set_materialize_grads(False)
        return out, importance, kl_uniform, stats, histogram

    @staticmethod
    def backward(ctx, dout, dimportance, dkl, _dstats, _dhistogram):
        if dout is None and dimportance is None and dkl is None:
            return (None,) * (len(_INPUTS) + 3)
        x, x_adapter, weight, A, B, LiMEs, LiME_shared, gamma, channel_scale, valid, jitter, z, dora_base, stats = \
            ctx.saved_tensors
        z_used, features, selected, extra, frozen = ctx.state
        if z is None:
            z = z_used
        if dora_base is not None:
            frozen = dora_base
        # The Function's first inputs are `_INPUTS`, in that order.
        needs = tuple(ctx.needs_input_grad[position] for position in _DIFFERENTIABLE_POSITIONS)
        config = ctx.config
        if torch.compiler.is_compiling():  # compiled autograd traces this: the registered op, as `_backward` calls
            grads = fused_lime_backward(
                dout, dimportance, dkl, x, x_adapter, weight, None, A, B, LiMEs, LiME_shared, gamma, channel_scale,
                valid, jitter, z, features, selected, extra, stats, frozen, config.seq_len, ctx.sliced_rows,
                ctx.scaling, *_op_options(config), list(needs))
            dx, dx_adapter, dbase, dA, dB, dP, dshared, dgamma, dscale = (
                grad if wanted else None for grad, wanted in zip(grads, needs))
        else:
            with on_device_of(z), full_precision(z.device):
                dx, dx_adapter, dbase, dA, dB, dP, dshared, dgamma, dscale = _backward_impl(
                    dout, dimportance, dkl, x, x_adapter, weight, A, B, LiMEs, LiME_shared, gamma, channel_scale,
                    valid, jitter, z, features, selected, extra, stats, frozen, ctx.sliced_rows, ctx.scaling, config,
                    needs)
        batch, tokens = ctx.sequences
        dx, dx_adapter, dbase = (None if grad is None else grad.view(batch, tokens, grad.shape[-1])
                                 for grad in (dx, dx_adapter, dbase))
        result = [None] * (len(_INPUTS) + 3)  # and sliced_rows, scaling, config
        for position, grad in zip(_DIFFERENTIABLE_POSITIONS, (dx, dx_adapter, dbase, dA, dB, dP, dshared, dgamma,
                                                               dscale)):
            result[position] = grad
        return tuple(result)


def _flat_forward(source, x, x_adapter, weight, bias, base, z, A, B, LiMEs, LiME_shared, gamma, channel_scale, valid,
                  jitter, sliced_rows: int, scaling: float, config: RoutingConfig):
    """`_forward` on flattened (tokens, features) inputs, on the device of `source`."""
    with on_device_of(source):
        return _forward(x, x_adapter, weight, bias, base, z, A, B, LiMEs, LiME_shared, gamma, channel_scale, valid,
                        jitter, config.seq_len, sliced_rows, scaling, config)


def _flat(sequences: Optional[Tensor]) -> Optional[Tensor]:
    """(B, T, features) as (B * T, features)."""
    if sequences is None:
        return None
    shape = sequences.shape
    return sequences.reshape(shape[0] * shape[1], shape[2])


_REP_MODES = {code: mode for mode, code in REP_CODES.items()}


def _op_options(config: RoutingConfig) -> tuple:
    """The registered ops' routing arguments (top_k ... auto_topk_threshold) that give `config`."""
    return (config.top_k, config.temperature, config.gamma_routing, "maxabs" if config.maxabs else "cosine",
            _REP_MODES[config.rep], config.n_gram, "anchor" if config.anchor else "window", config.selection,
            config.tau, config.theta)


@functools.lru_cache(maxsize=256)
def _options_config(options: RoutingOptions, num_experts: int, seq_len: int) -> RoutingConfig:
    """The kernels' `RoutingConfig`, built once per options (immutable: a runtime switch replaces
    them), number of experts and sequence length."""
    return _config(num_experts, seq_len, options.top_k, options.temperature, options.gamma_routing, options.router,
                   options.rep_mode, options.n_gram, options.ngram_mode,
                   selection_code(options.auto_topk, options.soft_topk, options.sparse_mode),
                   options.soft_topk_temperature, options.auto_topk_threshold)


class FusedResult(NamedTuple):
    """`fused_lime_linear`'s result: the output `(B, T, Dout)`, the two differentiable statistics, the
    detached statistics vector ([load, active_experts, valid tokens, usage (E)]) and the histogram."""

    out: Tensor
    importance: Tensor
    kl_uniform: Tensor
    stats: Tensor
    histogram: Tensor


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
) -> FusedResult:
    """The fused layer on `(B, T, .)` sequences.

    The frozen output is `F.linear(x, weight, bias)` when `weight` is given (a plain, frozen linear
    layer: weight and bias get no gradient; a transposed view such as `Conv1D.weight.t()` is read in
    place), else `base` (`(B, T, Dout)`, which may take one). The adapter reads `adapter_input` (the
    input after dropout, or the embedding output), or `x`; or `z` `(B, T, r)` is given. Under autocast
    the frozen product runs in autocast's dtype (as `nn.Linear` would) and the rest in float32.
    `fused_statistics` turns the statistics vector into `RoutingStats`.
    """
    if weight is not None and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError("the fused LiME path keeps the base layer frozen: weight and bias must not require grad")
    if (weight is None) == (base is None):
        raise ValueError("give exactly one of weight (the frozen layer's) and base (its output)")
    if (z is None) == (A is None):
        raise ValueError("give exactly one of A (the adapter's down projection) and z (its output)")
    shaped = x if x is not None else (adapter_input if adapter_input is not None else (base if base is not None else z))
    # The frozen product as nn.Linear under autocast would compute it (checked once here: the hot path).
    if weight is not None and autocast_on(shaped.device.type):
        x, weight, bias = autocast_cast(x), autocast_cast(weight), autocast_cast(bias)
    batch, tokens = shaped.shape[:2]
    valid = None if valid is None else valid.reshape(-1)
    jitter = None if jitter is None else jitter.float()
    seq_len = max(tokens, 1)
    if torch.compiler.is_compiling():
        with full_precision(shaped.device):
            out, importance, kl_uniform, stats, histogram, *_ = fused_lime(
                _flat(x), _flat(adapter_input), weight, bias, _flat(base), _flat(z), A, B, LiMEs, LiME_shared, gamma,
                channel_scale, valid, jitter, seq_len, int(sliced_rows), float(scaling), options.top_k,
                float(options.temperature), float(options.gamma_routing), options.router, options.rep_mode, options.n_gram, options.ngram_mode,
                selection_code(options.auto_topk, options.soft_topk, options.sparse_mode),
                float(options.soft_topk_temperature), float(options.auto_topk_threshold),
            )
    else:
        config = _options_config(options, LiMEs.shape[0], seq_len)
        with full_precision(shaped.device):  # enters torch.autocast only where autocast is on
            # Forward-mode AD (a dual level open) goes through the Function too, which refuses dual
            # inputs with a clear error instead of dropping their tangents.
            if torch.is_grad_enabled() or forward_ad._current_level >= 0:
                out, importance, kl_uniform, stats, histogram = _EagerFusedLiME.apply(
                    x, adapter_input, weight, bias, base, z, A, B, LiMEs, LiME_shared, gamma, channel_scale, valid,
                    jitter, int(sliced_rows), float(scaling), config)
            else:  # inference: no graph to record, so none of autograd.Function's per-call bookkeeping
                out, importance, kl_uniform, stats, histogram, *_ = _flat_forward(
                    shaped, _flat(x), _flat(adapter_input), weight, bias, _flat(base), _flat(z), A, B, LiMEs,
                    LiME_shared, gamma, channel_scale, valid, jitter, int(sliced_rows), float(scaling), config)
    return FusedResult(out.reshape(batch, tokens, out.shape[-1]), importance, kl_uniform, stats, histogram)


def fused_statistics(result: FusedResult, aux: str) -> Optional[RoutingStats]:
    """`RoutingStats` from the fused statistics (views of the vector: no launch): `importance` and
    `kl_uniform` with gradients, the rest detached; eval mode ('usage') keeps only the usage."""
    if aux == "none":
        return None
    stats = result.stats
    usage = stats[STAT_USAGE:]
    if aux == "usage":
        return RoutingStats(None, None, None, usage, None)
    return RoutingStats(result.importance, result.kl_uniform, stats[STAT_LOAD], usage, stats[STAT_ACTIVE],
                        result.histogram)


__all__: Sequence[str] = ["FusedResult", "fused_lime", "fused_lime_backward", "fused_lime_linear", "fused_statistics"]
