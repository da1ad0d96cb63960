"""`LiMELinear`: the drop-in LiME layer around a frozen linear layer."""

from __future__ import annotations

import functools
import math
import os
import warnings
from dataclasses import replace
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import reference
from .inputs import ContextMask, as_sequences, context_valid_mask, explicit_valid_mask
from .options import AdapterOptions, RoutingOptions
from .reference import RoutingStats

MaskProvider = Callable[[], Optional[ContextMask]]

# What the fused kernels are built and compile-checked for: the projections pad the rank to a
# tl.dot width of at most 128; the routing keeps [tokens, E] tiles of at most 64 lanes in registers.
MAX_FUSED_RANK = 128
MAX_FUSED_EXPERTS = 64


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(reference.lime_linear)


class LiMELinear(nn.Module):
    """A frozen `nn.Linear` plus one shared LoRA adapter, E expert modulation vectors and
    zero-parameter routing: `out = base + delta * (w @ LiMEs + gamma * LiME_shared)`.

    Keyword names and parameter names (`A`, `B`, `LiMEs`, `LiME_shared`, `gamma`) are those of the
    original LiME code; `router`, `ngram_mode` and `backend` are new. The exact function is
    `shared/lime-semantics.md`; `lime_kernels.reference` is its readable implementation.

    `forward(x, attention_mask=None)`: tokens whose mask is 0 return the frozen output exactly. With
    no mask given, a `mask_provider` (installed by `lime.apply_peft`) may supply the padding mask of
    the model call this layer runs in.
    """

    def __init__(
        self,
        linear: nn.Linear,
        num_experts: int = 4,
        rank: int = 2,
        alpha: float = 16.0,
        top_k: int = 1,
        dropout: float = 0.0,
        temperature: float = 0.5,
        use_shared_LiME: bool = True,
        track_aux: bool = True,
        rep_mode: str = "token",
        jitter_noise: float = 0.1,
        n_gram: int = 1,
        LiME_init_std: float = 0.1,
        gamma_routing: float = 0.7,
        soft_topk: bool = True,
        soft_topk_temperature: float = 0.5,
        auto_topk: bool = True,
        auto_topk_threshold: float = 0.5,
        peft_dtype: Optional[torch.dtype] = None,
        moe_dtype: Optional[torch.dtype] = None,
        sparse_mode: bool = False,
        router: str = "cosine",
        ngram_mode: str = "window",
        backend: str = "auto",
    ):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"LiMELinear wraps an nn.Linear; got {type(linear).__name__}")
        self.routing = RoutingOptions(
            num_experts=num_experts, top_k=top_k, temperature=temperature, gamma_routing=gamma_routing,
            router=router, rep_mode=rep_mode, n_gram=n_gram, ngram_mode=ngram_mode,
            jitter_noise=jitter_noise, soft_topk=soft_topk, soft_topk_temperature=soft_topk_temperature,
            auto_topk=auto_topk, auto_topk_threshold=auto_topk_threshold, sparse_mode=sparse_mode,
        )
        self.adapter = AdapterOptions(
            rank=rank, alpha=alpha, dropout=dropout, use_shared_LiME=use_shared_LiME,
            LiME_init_std=LiME_init_std, track_aux=track_aux, peft_dtype=peft_dtype,
            moe_dtype=moe_dtype, backend=backend,
        )
        if num_experts > linear.out_features:
            raise ValueError(
                f"num_experts must be <= out_features of the wrapped layer ({linear.out_features}): routing "
                f"reads the first num_experts output channels; got num_experts={num_experts}"
            )

        self.linear = linear
        for parameter in linear.parameters():
            parameter.requires_grad_(False)

        device = linear.weight.device
        peft_dtype = peft_dtype or torch.float32
        moe_dtype = moe_dtype or torch.float32
        d_in, d_out = linear.in_features, linear.out_features
        self.A = nn.Parameter(torch.empty(rank, d_in, device=device, dtype=peft_dtype))
        self.B = nn.Parameter(torch.zeros(d_out, rank, device=device, dtype=peft_dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.LiMEs = nn.Parameter(
            torch.empty(num_experts, d_out, device=device, dtype=moe_dtype).uniform_(
                1.0 - LiME_init_std, 1.0 + LiME_init_std
            )
        )
        if use_shared_LiME:
            self.LiME_shared = nn.Parameter(torch.randn(d_out, device=device, dtype=moe_dtype) * 0.1)
            self.gamma = nn.Parameter(torch.zeros(1, device=device, dtype=moe_dtype))
        else:
            self.register_parameter("LiME_shared", None)
            self.register_parameter("gamma", None)

        self.compiled = False
        # The fused backward reduces with per-tile partial sums; False allows atomics (faster, last bits vary).
        self.deterministic = True
        self.mask_provider: Optional[MaskProvider] = None
        self.last_stats: Optional[RoutingStats] = None
        self._warned_unmatched_mask = False

    # The wrapped layer's attributes, so code that reads `.weight` directly keeps working.
    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @weight.setter
    def weight(self, value: torch.Tensor) -> None:
        self.linear.weight = value

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.linear.bias

    @bias.setter
    def bias(self, value: Optional[torch.Tensor]) -> None:
        self.linear.bias = value

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return self.linear.out_features

    @property
    def num_experts(self) -> int:
        return self.routing.num_experts

    @property
    def rank(self) -> int:
        return self.adapter.rank

    def update_routing(self, **changes) -> None:
        """Runtime switches (temperature, gamma_routing, auto_topk, jitter_noise, ...), validated."""
        switchable = [name for name in self.routing.__dataclass_fields__ if name != "num_experts"]  # shapes LiMEs
        refused = sorted(set(changes) - set(switchable))
        if refused:
            raise ValueError(f"cannot switch {', '.join(refused)} at runtime; switchable: {', '.join(switchable)}")
        self.routing = replace(self.routing, **changes)

    def compile_reference(self) -> None:
        """Run the reference math through `torch.compile` (one compiled function shared by all layers).

        Only the math is compiled: the jitter and the dropout mask are still drawn eagerly from
        torch's RNG, so compiled and eager layers see the same random numbers.
        """
        self.compiled = True

    def set_track_aux(self, track_aux: bool) -> None:
        self.adapter = replace(self.adapter, track_aux=track_aux)

    def _valid_tokens(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        valid = self._resolve_mask(x, attention_mask)
        # With device_map="auto" the model's mask stays on the first device; layers may be elsewhere.
        return None if valid is None else valid.to(x.device, non_blocking=True)

    def _resolve_mask(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if attention_mask is not None:
            return explicit_valid_mask(attention_mask, x.shape)
        context = self.mask_provider() if self.mask_provider is not None else None
        if context is None:
            return None
        valid, matched = context_valid_mask(context, x.shape)
        if not matched and context.in_sequence_model and not self._warned_unmatched_mask:
            self._warned_unmatched_mask = True
            warnings.warn(
                f"LiMELinear({self.in_features}->{self.out_features}): the model's attention_mask of shape "
                f"{tuple(context.mask.shape)} does not describe this layer's input of shape {tuple(x.shape)} "
                "(not the masked token sequence); this layer routes every token of it.",
                stacklevel=3,
            )
        return valid

    def _aux_mode(self) -> str:
        if not self.adapter.track_aux:
            return "none"
        return "full" if self.training else "usage"

    def resolve_backend(self, x: torch.Tensor) -> str:
        """The backend this input runs on: 'auto' takes the fused path for CUDA inputs it supports
        (a plain linear base, rank <= 128, at most 64 experts) and the reference elsewhere."""
        backend = self.adapter.backend
        if backend == "reference":
            return "reference"
        unsupported = self._fused_unsupported()
        if backend == "auto":
            return "triton" if x.is_cuda and unsupported is None else "reference"
        if unsupported is not None:
            raise ValueError(f"backend='triton' cannot run this layer: {unsupported}")
        if not x.is_cuda and not triton_interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got an input on {x.device}); on CPU it runs only "
                "under Triton's interpreter (TRITON_INTERPRET=1). Use backend='reference' or 'auto'."
            )
        return "triton"

    def _fused_unsupported(self) -> Optional[str]:
        if type(self.linear).forward is not nn.Linear.forward:
            return f"the base layer {type(self.linear).__name__} is not a plain nn.Linear"
        if self.adapter.rank > MAX_FUSED_RANK:
            return f"rank={self.adapter.rank} > {MAX_FUSED_RANK}"
        if self.routing.num_experts > MAX_FUSED_EXPERTS:
            return f"num_experts={self.routing.num_experts} > {MAX_FUSED_EXPERTS}"
        return None

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        sequences = as_sequences(x, self.in_features)
        valid = self._valid_tokens(x, attention_mask)
        routing = self.routing
        # Random numbers in a fixed order for every backend: the jitter, then the dropout mask.
        jitter = None
        if self.training and routing.jitter_noise > 0:
            jitter = reference.sample_jitter(
                sequences.shape[0] * sequences.shape[1], routing.num_experts, routing.jitter_noise, x.device
            )
        dropped = None
        if self.training and self.adapter.dropout > 0:
            dropped = F.dropout(sequences, p=self.adapter.dropout, training=True)
        if self.resolve_backend(x) == "triton":
            from .fused import fused_lime_linear

            out, probs_sum, selection_counts, num_valid = fused_lime_linear(
                sequences, dropped, self.linear.weight, self.linear.bias, self.A, self.B, self.LiMEs,
                self.LiME_shared, self.gamma, routing, self.adapter.scaling, valid, jitter, self.deterministic,
            )
            self.last_stats = reference.balance_statistics(probs_sum, selection_counts, num_valid, self._aux_mode())
        else:
            compute = _compiled_reference() if self.compiled else reference.lime_linear
            out, self.last_stats = compute(
                dropped if dropped is not None else sequences, self.linear(sequences), self.A, self.B, self.LiMEs,
                self.LiME_shared, self.gamma, routing, self.adapter.scaling, valid=valid, jitter=jitter,
                aux=self._aux_mode(),
            )
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        routing = self.routing
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, experts={routing.num_experts}, "
            f"rank={self.adapter.rank}, router={routing.router}, rep_mode={routing.rep_mode}, "
            f"selection={routing.selection}"
        )
        if routing.n_gram > 1:
            text += f", n_gram={routing.n_gram} ({routing.ngram_mode})"
        return text
