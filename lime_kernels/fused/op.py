"""The fused LiME-LoRA layer as `torch.library` custom ops (forward, backward) with fake
implementations, so `torch.compile` traces through it without graph breaks.

Forward: the frozen product from cuBLAS (`F.linear`), `z = x A^T` (Triton, float32), the routing
on `[tokens, E]` features (Triton), then the modulated up projection written over the frozen output
in one pass (Triton). Saved for backward: `x` (and the dropped-out adapter input), `z (tokens, r)`
and the `[tokens, E]` routing state; no `[tokens, Dout]` tensor.

Backward: `dx = dout W` (cuBLAS), one Triton pass over `dout` for `dz`, `dw`, `dB`, `dLiMEs`,
`dLiME_shared`, `dgamma`; the routing backward (Triton); then the low-rank part of `dx`
(`+ du W[:E] + dz A`, Triton) and `dA = dz^T x` (Triton).
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


@torch.library.custom_op("lime::fused_linear", mutates_args=())
def fused_linear(
    x: Tensor, x_adapter: Optional[Tensor], weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
    LiMEs: Tensor, LiME_shared: Optional[Tensor], gamma: Optional[Tensor], valid: Optional[Tensor],
    jitter: Optional[Tensor], seq_len: int, scaling: float, top_k: int, temperature: float, gamma_routing: float,
    router: str, rep_mode: str, n_gram: int, ngram_mode: str, selection: int, soft_topk_temperature: float,
    auto_topk_threshold: float, deterministic: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x `(N, Din)`; returns (out, probs_sum, selection_counts, num_valid, z, features, selected, extra)."""
    x, x_adapter, weight, A, B, LiMEs, LiME_shared, gamma, valid, jitter = _contiguous(
        x, x_adapter, weight, A, B, LiMEs, LiME_shared, gamma, valid, jitter)
    num_experts = LiMEs.shape[0]
    config = _config(num_experts, seq_len, top_k, temperature, gamma_routing, router, rep_mode, n_gram,
                     ngram_mode, selection, soft_topk_temperature, auto_topk_threshold)
    base = F.linear(x, weight, bias)
    z = down_projection(x_adapter if x_adapter is not None else x, A)
    # A fresh copy: `base` becomes the output in place below.
    u_raw = base[:, :num_experts].to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    v_raw = scaling * (z @ B[:num_experts].float().t())
    valid_bytes = _valid_bytes(valid)
    state, probs_sum, selection_counts, num_valid = routing_forward(u_raw, v_raw, valid_bytes, jitter, config)
    out = modulation_forward(base, z, B, state.weights, LiMEs, LiME_shared, gamma, valid_bytes, scaling)
    return out, probs_sum, selection_counts, num_valid, z, state.features, state.selected, state.extra


@fused_linear.register_fake
def _(x, x_adapter, weight, bias, A, B, LiMEs, LiME_shared, gamma, valid, jitter, seq_len, *args):
    num_tokens = x.shape[0]
    num_experts = LiMEs.shape[0]
    num_seqs = num_tokens // seq_len
    floats = dict(device=x.device, dtype=torch.float32)
    return (
        x.new_empty(num_tokens, weight.shape[0]),
        x.new_empty(num_experts, **floats),
        x.new_empty(num_experts, **floats),
        x.new_empty((), **floats),
        x.new_empty(num_tokens, A.shape[0], **floats),
        x.new_empty(4, num_tokens, num_experts, **floats),
        x.new_empty(num_tokens, num_experts, device=x.device, dtype=torch.int8),
        x.new_empty(num_tokens + 2 * num_seqs + 6, **floats),
    )


@torch.library.custom_op("lime::fused_linear_backward", mutates_args=())
def fused_linear_backward(
    dout: Tensor, dprobs_sum: Optional[Tensor], x: Tensor, x_adapter: Optional[Tensor], weight: Tensor, A: Tensor,
    B: Tensor, LiMEs: Tensor, LiME_shared: Optional[Tensor], gamma: Optional[Tensor], valid: Optional[Tensor],
    jitter: Optional[Tensor], z: Tensor, features: Tensor, selected: Tensor, extra: Tensor, seq_len: int,
    scaling: float, top_k: int, temperature: float, gamma_routing: float, router: str, rep_mode: str, n_gram: int,
    ngram_mode: str, selection: int, soft_topk_temperature: float, auto_topk_threshold: float,
    deterministic: bool, needs_input_grad: List[bool],
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dx_adapter, dA, dB, dLiMEs, dLiME_shared, dgamma); gradients not asked for
    (by `needs_input_grad` = [x, x_adapter, A, B, LiMEs, LiME_shared, gamma]) are empty tensors."""
    # Autograd may hand over expanded (stride 0) gradients; the kernels index memory directly.
    dout, dprobs_sum = _contiguous(dout, dprobs_sum)
    need_x, need_x_adapter, need_A, need_B, need_P, need_shared, need_gamma = needs_input_grad
    num_experts = LiMEs.shape[0]
    config = _config(num_experts, seq_len, top_k, temperature, gamma_routing, router, rep_mode, n_gram,
                     ngram_mode, selection, soft_topk_temperature, auto_topk_threshold)
    state = RoutingState(features, selected, extra)
    valid_bytes = _valid_bytes(valid)
    adapter_input = x_adapter if x_adapter is not None else x
    input_grads = need_x or need_x_adapter or need_A or need_B  # anything behind z or the routing
    param_grads = need_B or need_P or need_shared or need_gamma
    dz, dweights, dB, dP, dcol = modulation_backward(
        dout, z, B, state.weights, LiMEs, LiME_shared, gamma, valid_bytes, scaling,
        input_grads=input_grads, param_grads=param_grads, deterministic=deterministic,
    )
    du_raw = None
    if input_grads:
        du_raw, dv_raw = routing_backward(dweights, dprobs_sum, valid_bytes, jitter, state, config)
        # v = scaling * z @ B[:E].T: its gradient reaches z and the first E rows of B.
        B_top = B[:num_experts].float()
        dz = dz + scaling * (dv_raw @ B_top)
        if need_B:
            dB[:num_experts] += scaling * (dv_raw.t() @ z)

    dx = dx_adapter = None
    if need_x:
        dx = dout @ weight  # u = base[:, :E]: du reaches x through W[:E]; without dropout so does dz
        low_rank_input_grad(dx, du_raw, weight, dz if x_adapter is None else None, A, accumulate=True)
    if need_x_adapter:
        dx_adapter = low_rank_input_grad(torch.empty_like(x_adapter), None, weight, dz, A, accumulate=False)
    grads = (
        dx,
        dx_adapter,
        down_projection_grad(adapter_input, dz, deterministic).to(A.dtype) if need_A else None,
        dB.to(B.dtype) if need_B else None,
        dP.to(LiMEs.dtype) if need_P else None,
        (gamma.float() * dcol).to(LiME_shared.dtype) if need_shared else None,
        (dcol @ LiME_shared.float()).reshape(1).to(gamma.dtype) if need_gamma else None,
    )
    # A custom op returns tensors only, none aliasing another: an empty one stands for "not asked for".
    return tuple(grad if grad is not None else dout.new_empty(0) for grad in grads)


@fused_linear_backward.register_fake
def _(dout, dprobs_sum, x, x_adapter, weight, A, B, LiMEs, LiME_shared, gamma, *args):
    needs_input_grad = args[-1]
    like = (x, x_adapter, A, B, LiMEs, LiME_shared, gamma)
    return tuple(t.new_empty(t.shape) if need else dout.new_empty(0) for t, need in zip(like, needs_input_grad))


_DIFFERENTIABLE_INPUTS = ("x", "x_adapter", "A", "B", "LiMEs", "LiME_shared", "gamma")
_INPUT_INDEX = {"x": 0, "x_adapter": 1, "weight": 2, "bias": 3, "A": 4, "B": 5, "LiMEs": 6, "LiME_shared": 7,
                "gamma": 8, "valid": 9, "jitter": 10}


def _setup_context(ctx, inputs, output):
    (x, x_adapter, weight, bias, A, B, LiMEs, LiME_shared, gamma, valid, jitter, *options) = inputs
    _, _, _, _, z, features, selected, extra = output
    ctx.save_for_backward(x, x_adapter, weight, A, B, LiMEs, LiME_shared, gamma, valid, jitter, z, features,
                          selected, extra)
    ctx.options = options
    ctx.mark_non_differentiable(*output[2:])


def _backward(ctx, dout, dprobs_sum, *unused):
    x, x_adapter, weight, A, B, LiMEs, LiME_shared, gamma, valid, jitter, z, features, selected, extra = ctx.saved_tensors
    needs = [ctx.needs_input_grad[_INPUT_INDEX[name]] for name in _DIFFERENTIABLE_INPUTS]
    grads = fused_linear_backward(
        dout, dprobs_sum, x, x_adapter, weight, A, B, LiMEs, LiME_shared, gamma, valid, jitter,
        z, features, selected, extra, *ctx.options, needs,
    )
    by_name = {name: (grad if need else None) for name, grad, need in zip(_DIFFERENTIABLE_INPUTS, grads, needs)}
    return tuple(by_name.get(name) for name in _INPUT_INDEX) + (None,) * len(ctx.options)


fused_linear.register_autograd(_backward, setup_context=_setup_context)


def fused_lime_linear(
    x: Tensor,
    adapter_input: Optional[Tensor],
    weight: Tensor,
    bias: Optional[Tensor],
    A: Tensor,
    B: Tensor,
    LiMEs: Tensor,
    LiME_shared: Optional[Tensor],
    gamma: Optional[Tensor],
    options: RoutingOptions,
    scaling: float,
    valid: Optional[Tensor],
    jitter: Optional[Tensor],
    deterministic: bool = True,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fused layer on `(B, T, Din)` sequences; returns (out (B, T, Dout), probs_sum (E),
    selection_counts (E), num_valid ()) for `lime_kernels.reference.balance_statistics`.

    `adapter_input`: the adapter's input after dropout, or None when it is `x` itself. The frozen
    layer is `F.linear(x, weight, bias)`; weight and bias get no gradient, so they must not ask for one.
    `deterministic=False` lets the backward accumulate its reductions with atomics (faster; the
    last bits may differ from run to run).
    """
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("the fused LiME path keeps the base layer frozen: weight and bias must not require grad")
    batch, tokens, in_features = x.shape
    flat = x.reshape(batch * tokens, in_features)
    flat_adapter = None if adapter_input is None else adapter_input.reshape(batch * tokens, in_features)
    out, probs_sum, selection_counts, num_valid, *_ = fused_linear(
        flat, flat_adapter, weight, bias, A, B, LiMEs, LiME_shared, gamma,
        None if valid is None else valid.reshape(-1), None if jitter is None else jitter.float(), tokens, float(scaling), options.top_k,
        float(options.temperature), float(options.gamma_routing), options.router, options.rep_mode,
        options.n_gram, options.ngram_mode, selection_code(options.auto_topk, options.soft_topk, options.sparse_mode),
        float(options.soft_topk_temperature), float(options.auto_topk_threshold), bool(deterministic),
    )
    return out.reshape(batch, tokens, -1), probs_sum, selection_counts, num_valid


__all__: Sequence[str] = ["fused_lime_linear", "fused_linear", "fused_linear_backward"]
