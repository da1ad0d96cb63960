"""Input shapes and attention masks, checked once for every backend.

A LiME layer sees `x` as `(B, T, Din)` sequences: a 2-D input `(N, Din)` is N sequences of length 1
and extra leading dimensions are folded into B. Masks become a `(B, T)` bool tensor of valid tokens.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch


def as_sequences(x: torch.Tensor, in_features: int) -> torch.Tensor:
    """View `x` as `(B, T, Din)`; raise a ValueError naming both shapes when it cannot be."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"LiME layer input must be a torch.Tensor; got {type(x).__name__}")
    if x.dim() < 2 or x.shape[-1] != in_features:
        raise ValueError(
            f"LiME layer expects input of shape (..., {in_features}) with at least 2 dimensions; "
            f"got input of shape {tuple(x.shape)}"
        )
    if x.dim() == 3:  # already (B, T, Din): a view would add an autograd node for nothing
        return x
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x.reshape(x.shape[:-2].numel(), x.shape[-2], x.shape[-1])  # explicit sizes: 0 tokens is valid


def autocast_on(device_type: str) -> bool:
    # Devices autocast has no mode for (meta, where a device_map may park layers) are never autocast.
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def autocast_cast(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """`tensor` as autocast would hand it to a linear layer: cast to autocast's dtype when autocast is
    on for its device and it is a floating tensor other than float64; otherwise unchanged."""
    if tensor is None or not autocast_on(tensor.device.type):
        return tensor
    if not tensor.is_floating_point() or tensor.dtype == torch.float64:
        return tensor
    return tensor.to(torch.get_autocast_dtype(tensor.device.type))


def full_precision(device: torch.device):
    """LiME's own math runs in float32 (or float64) whatever autocast would make of it. Autocast is
    switched off only where it is on: entering `torch.autocast` costs host time on every call."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    if autocast_on(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return _NO_CONTEXT


_NO_CONTEXT = contextlib.nullcontext()  # reusable: it holds no state


def _check_mask_dtype(mask: torch.Tensor) -> None:
    # Floating masks are refused: an additive mask (0 = attend, -inf = masked) would read backwards.
    if mask.dtype != torch.bool and (mask.dtype.is_floating_point or mask.dtype.is_complex):
        raise ValueError(f"attention_mask must be bool or integer (1 = valid token, 0 = padding); got dtype {mask.dtype}")


def _check_model_mask(mask: torch.Tensor) -> None:
    """A model's padding mask may also be floating with only 0s and 1s, as Hugging Face models take it;
    other floating values (an additive mask) are refused."""
    if not mask.dtype.is_floating_point:
        _check_mask_dtype(mask)
        return
    # A host sync, on this path only. A compiled graph cannot branch on values: it skips the check.
    if not torch.compiler.is_compiling() and not ((mask == 0) | (mask == 1)).all():
        other = mask[(mask != 0) & (mask != 1)][0].item()
        raise ValueError(
            f"a floating attention_mask must hold only 0 and 1 (1 = valid token, 0 = padding); got {other} in a "
            f"{mask.dtype} mask (an additive mask, 0 = attend and -inf = masked, would read backwards)"
        )


def explicit_valid_mask(attention_mask: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
    """The `(B, T)` bool mask for an attention mask passed to the layer itself.

    Accepted shapes: `input_shape[:-1]`, or `(B, T)` after folding leading dimensions; for a 2-D
    input `(N, Din)` also `(N,)`.
    """
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a torch.Tensor; got {type(attention_mask).__name__}")
    _check_mask_dtype(attention_mask)
    if len(input_shape) == 2:
        batch, tokens = input_shape[0], 1
        accepted = [(batch,), (batch, 1)]
    else:
        tokens = input_shape[-2]
        batch = input_shape[:-2].numel()
        accepted = [tuple(input_shape[:-1]), (batch, tokens)]
    if tuple(attention_mask.shape) not in accepted:
        raise ValueError(
            f"attention_mask of shape {tuple(attention_mask.shape)} does not match input of shape "
            f"{tuple(input_shape)}: expected one of {', '.join(map(str, dict.fromkeys(accepted)))}"
        )
    return attention_mask.reshape(batch, tokens) != 0


class ContextMask(NamedTuple):
    """A padding mask `(B, Tm)` offered to a layer by the model call it runs in.

    `in_sequence_model`: the layer belongs to the model that consumes the masked token sequence (a
    language model's body), so it may see only the last T <= Tm positions (decoding with a cache)
    and an input the mask does not fit is unexpected. Otherwise (layers of a composite model beside
    its sub-models: a projector on image features, a head on the kept positions) the mask applies
    only to an input of exactly its shape.

    A decoder's call also offers the encoder's states and their padding mask (or None): a layer whose
    input is that very tensor (a cross-attention key or value projection) takes the encoder's mask,
    never the decoder's. `mask` is None when the call has no padding mask of its own.

    `decoding`: the `lime_kernels.decoding.DecodingState` of the KV cache the call decodes with, where
    some layer's routing reads earlier tokens (a causal n-gram window); else None.

    `aligned`: an empty dict of the call's own (or None) in which `context_valid_mask` keeps what it worked
    out per input shape, so that a model's layers share one alignment of the mask (an eager call on small
    layers otherwise spends more host time aligning the mask in every layer than the layer's own routing takes).
    """

    mask: Optional[torch.Tensor]
    in_sequence_model: bool
    encoder_states: Optional[torch.Tensor] = None
    encoder_mask: Optional[torch.Tensor] = None
    decoding: Optional[Any] = None
    aligned: Optional[Dict[tuple, Tuple[Optional[torch.Tensor], bool]]] = None


def context_valid_mask(context: ContextMask, input_shape: torch.Size) -> Tuple[Optional[torch.Tensor], bool]:
    """Align a model-level padding mask with a layer input `(..., T, Din)`.

    Returns `(valid, True)` when the mask describes the input and `(None, False)` when it does not
    (an input that is not that token sequence, such as image features or a pooled 2-D input). In the
    sequence model, a 2-D input with one row per token of the mask is the flattened sequence. Kept in
    `context.aligned` per shape where the context has one (eagerly: a compiled graph aligns once anyway).
    """
    aligned = context.aligned
    if aligned is None or torch.compiler.is_compiling():
        return _align_mask(context, input_shape)
    key = (context.in_sequence_model, tuple(input_shape[:-1]))
    found = aligned.get(key)
    if found is None:
        found = aligned[key] = _align_mask(context, input_shape)
    return found


def _align_mask(context: ContextMask, input_shape: torch.Size) -> Tuple[Optional[torch.Tensor], bool]:
    mask = context.mask
    _check_model_mask(mask)
    if mask.dim() != 2:
        return None, False
    if len(input_shape) == 2 and context.in_sequence_model and input_shape[0] == mask.numel():
        # The whole token sequence flattened to (B * T, Din), as MoE blocks (Qwen2-MoE's shared expert)
        # hand it to their layers: one row per token, in the mask's order. A 2-D input of any other
        # length (a pooled (B, Din) vector, a decoding step) is not matched.
        return (mask != 0).reshape(-1, 1), True
    if len(input_shape) < 3:
        return None, False
    tokens = input_shape[-2]
    batch = input_shape[:-2].numel()
    fits = mask.shape[1] >= tokens if context.in_sequence_model else mask.shape[1] == tokens
    if mask.shape[0] != batch or not fits:
        return None, False
    return mask[:, mask.shape[1] - tokens :] != 0, True
