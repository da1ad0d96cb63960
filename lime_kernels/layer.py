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

from . import cpu, eager, reference
from .bases import computes_plain_product, is_wrappable_linear, linear_features
from .decoding import DecodingState, needs_history
from .inputs import (ContextMask, as_sequences, autocast_cast, autocast_on, context_valid_mask,
                     explicit_valid_mask, full_precision)
from .options import AdapterOptions, RoutingOptions
from .quantized import frozen_weight
from .reference import RoutingStats

MaskProvider = Callable[[], Optional[ContextMask]]

# Whether backend='auto' has warned that the C++ CPU operators are unavailable (once per process).
_warned_cpu_reference = [False]

# What the fused kernels are built and compile-checked for: the projections pad the rank to a
# tl.dot width of at most 128; the routing keeps [tokens, E] tiles of at most 64 lanes in registers.
MAX_FUSED_RANK = 128
MAX_FUSED_EXPERTS = 64


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels_execute() -> bool:
    """False inside `lime_kernels.accounting.account(compute=False)`, which starts no kernel (so the
    fused path can be accounted for on any device)."""
    from .fused.common import kernels_execute

    return kernels_execute()


@functools.lru_cache(maxsize=None)
def _compiled_reference():
    return torch.compile(reference.lime_linear_routed)


@functools.lru_cache(maxsize=64)
def _changed_options(options: RoutingOptions, **changes) -> RoutingOptions:
    """`replace(options, **changes)`, validated once per options (they are frozen and hashable)."""
    return replace(options, **changes)


def check_rank(layer: str, rank: int, sizes, names) -> None:
    """A ValueError naming the layer and its sizes unless rank <= min(sizes)."""
    if rank > min(sizes):
        described = ", ".join(f"{name}={size}" for name, size in zip(names, sizes))
        raise ValueError(f"{layer}({described}): rank={rank} must be <= min({', '.join(names)}) = {min(sizes)}")


class LiMEModule(nn.Module):
    """What every LiME layer shares: validated options, the expert vectors, the statistics of the
    last forward, the padding mask, the runtime switches and the choice of backend.

    Subclasses provide the frozen path and the adapter (`LiMELinear` and its PEFT variants,
    `LiMEEmbedding`) and call `_modulate`, which runs `docs/lime-semantics.md` on the reference or
    the fused backend.
    """

    peft = "lora"

    def _init_lime(self, out_features: int, routing: RoutingOptions, adapter: AdapterOptions) -> None:
        """Options and state; `_init_experts` creates the expert vectors (after the adapter, as the
        original code does, so that a seed gives the same initialization)."""
        if routing.num_experts > out_features:
            raise ValueError(
                f"num_experts must be <= the wrapped layer's output size ({out_features}): routing reads the first "
                f"num_experts output channels; got num_experts={routing.num_experts}"
            )
        if adapter.backend == "triton" and not torch.cuda.is_available() and not triton_interpreting() \
                and _kernels_execute():
            raise ValueError(
                "backend='triton' needs a CUDA device and torch.cuda.is_available() is False; on CPU the kernels run "
                "only under Triton's interpreter (TRITON_INTERPRET=1). Use backend='reference' or 'auto'."
            )
        if adapter.backend == "cpu" or (adapter.backend == "auto" and not torch.cuda.is_available()):
            # Built (or found built) now, not at a first forward that torch.compile may be tracing. With CUDA,
            # 'auto' builds it only when a CPU input first needs it (most layers there never do).
            cpu.unavailable_reason()
        self.routing = routing
        self.adapter = adapter
        self.compiled = False
        self.mask_provider: Optional[MaskProvider] = None
        self.last_stats = None
        self._warned_unmatched_mask = False
        self._warned_history_backend = False

    def _init_experts(self, out_features: int, device) -> None:
        moe_dtype = self.adapter.moe_dtype or torch.float32
        std = self.adapter.LiME_init_std
        self.LiMEs = nn.Parameter(
            torch.empty(self.routing.num_experts, out_features, device=device, dtype=moe_dtype).uniform_(
                1.0 - std, 1.0 + std
            )
        )
        if self.adapter.use_shared_LiME:
            self.LiME_shared = nn.Parameter(self._initial_shared(out_features, device, moe_dtype))
            self.gamma = nn.Parameter(torch.zeros(1, device=device, dtype=moe_dtype))
        else:
            self.register_parameter("LiME_shared", None)
            self.register_parameter("gamma", None)

    def _initial_shared(self, out_features: int, device, dtype) -> torch.Tensor:
        return torch.randn(out_features, device=device, dtype=dtype) * 0.1

    @property
    def compat(self) -> str:
        """'lime' (the corrected semantics) or 'original' (the original code's classes)."""
        return self.routing.compat

    def _call_options(self) -> RoutingOptions:
        """The routing options this layer's calls use: `routing`, but the original code's LoRA classes (linear
        and embedding) ignore `n_gram` and route every token on its own."""
        routing = self.routing
        if routing.compat == "original" and self.peft == "lora" and routing.n_gram > 1:
            return _changed_options(routing, n_gram=1)
        return routing

    @property
    def last_stats(self) -> Optional[RoutingStats]:
        """The routing statistics of the latest forward (see `RoutingStats`), or None.

        Computed when first read: a step whose balance loss and logs do not read them does not pay for
        their operators. They carry gradients as they would have in the forward."""
        pending = self.__dict__["_pending_stats"]
        if pending is not None:
            compute, arguments, with_grad = pending
            with torch.set_grad_enabled(with_grad):
                self.__dict__["_last_stats"] = compute(*arguments)
            self.__dict__["_pending_stats"] = None
        return self.__dict__["_last_stats"]

    @last_stats.setter
    def last_stats(self, stats: Optional[RoutingStats]) -> None:
        self.__dict__["_pending_stats"] = None
        self.__dict__["_last_stats"] = stats

    def _defer_stats(self, compute: Callable[..., Optional[RoutingStats]], *arguments) -> None:
        """Record how to compute this forward's statistics (`last_stats`), or None without `track_aux`.
        (Plain attributes: nn.Module.__setattr__'s checks take several µs per call.)"""
        aux = self._aux_mode()
        self.__dict__["_last_stats"] = None
        self.__dict__["_pending_stats"] = None if aux == "none" else (compute, arguments + (aux,),
                                                                      torch.is_grad_enabled())

    @property
    def num_experts(self) -> int:
        return self.routing.num_experts

    @property
    def rank(self) -> int:
        return self.adapter.rank

    def update_routing(self, **changes) -> None:
        """Runtime switches (temperature, gamma_routing, auto_topk, jitter_noise, ...), validated."""
        # num_experts shapes LiMEs; compat shapes the parameters of some variants.
        switchable = [name for name in self.routing.__dataclass_fields__ if name not in ("num_experts", "compat")]
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
        if context is not None and context.encoder_states is not None and x is context.encoder_states:
            # Cross-attention reading the encoder's states: their padding mask is the encoder's.
            if context.encoder_mask is None:
                return None
            return context_valid_mask(ContextMask(context.encoder_mask, False), x.shape)[0]
        if context is None or context.mask is None:
            return None
        valid, matched = context_valid_mask(context, x.shape)
        # One row per sequence (a pooled vector, a flattened decoding step): one valid token each, as
        # expected; any other mismatch is worth a warning.
        one_row_per_sequence = x.dim() == 2 and x.shape[0] == context.mask.shape[0]
        if not matched and context.in_sequence_model and not one_row_per_sequence and not self._warned_unmatched_mask:
            self._warned_unmatched_mask = True
            warnings.warn(
                f"{type(self).__name__}: the model's attention_mask of shape {tuple(context.mask.shape)} does not "
                f"describe this layer's input of shape {tuple(x.shape)} (not the masked token sequence); "
                "this layer routes every token of it.",
                stacklevel=3,
            )
        return valid

    def _decoding_state(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> Optional[DecodingState]:
        """The routing history of the KV cache this call continues (`lime_kernels.decoding`), when the layer's
        routing has a causal window and its input `(B, T, D)` is the model's token sequence; else None."""
        if attention_mask is not None or self.mask_provider is None or x.dim() != 3 \
                or not needs_history(self._call_options()):
            return None
        context = self.mask_provider()
        if context is None or context.decoding is None:
            return None
        if context.encoder_states is not None and x is context.encoder_states:
            return None  # cross-attention reads the encoder's states, not the decoded sequence
        # A decoding step's tokens are the mask's last ones, also for a layer called outside the sequence
        # model's call (LLaVA's embed_tokens), which reads the enclosing call's mask by exact shape otherwise.
        if context.mask is not None and not context_valid_mask(context._replace(in_sequence_model=True), x.shape)[1]:
            return None  # not the masked token sequence
        return context.decoding

    def _aux_mode(self) -> str:
        if not self.adapter.track_aux:
            return "none"
        return "full" if self.training else "usage"

    def resolve_backend(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> str:
        """The backend this input (with its valid tokens) runs on: 'auto' takes the fused Triton path for CUDA
        inputs within its limits (rank <= 128, at most 64 experts; see `_fused_unsupported`), the C++ operators
        (`lime_kernels.cpu`) for CPU inputs where they build, and the reference elsewhere."""
        backend = self.adapter.backend
        if backend == "reference":
            return "reference"
        if backend == "cpu" or (backend == "auto" and x.device.type == "cpu"):
            return self._resolve_cpu(x, backend)
        unsupported = self._fused_unsupported() or self._fused_unsupported_call(x, valid)
        if backend == "auto":
            return "triton" if x.is_cuda and unsupported is None else "reference"
        if unsupported is not None:
            raise ValueError(f"backend='triton' cannot run this layer: {unsupported}")
        if not x.is_cuda and _kernels_execute() and not triton_interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got an input on {x.device}); on CPU it runs only "
                "under Triton's interpreter (TRITON_INTERPRET=1). Use backend='reference' or 'auto'."
            )
        return "triton"

    def _resolve_cpu(self, x: torch.Tensor, backend: str) -> str:
        """'cpu' where the C++ operators are loaded; 'auto' otherwise warns once (with the reason) and takes the
        reference, 'cpu' raises."""
        if x.device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors (got an input on {x.device}); use backend='auto'")
        reason = cpu.unavailable_reason()
        if reason is None:
            return "cpu"
        if backend == "cpu":
            raise ValueError(f"backend='cpu' cannot run: {reason}")
        if not _warned_cpu_reference[0]:
            _warned_cpu_reference[0] = True
            warnings.warn(f"LiME's C++ CPU operators are unavailable ({reason}); backend='auto' runs the reference "
                          "path on the CPU, which is slower on small layers", stacklevel=4)
        return "reference"

    def _fused_unsupported(self) -> Optional[str]:
        if self.routing.compat == "original":
            reason = self._original_unfused()
            if reason is not None:
                return reason
        if self.adapter.rank > MAX_FUSED_RANK:
            return f"rank={self.adapter.rank} > {MAX_FUSED_RANK}"
        if self.routing.num_experts > MAX_FUSED_EXPERTS:
            return f"num_experts={self.routing.num_experts} > {MAX_FUSED_EXPERTS}"
        return None

    def _fused_unsupported_call(self, x: torch.Tensor, valid: Optional[torch.Tensor]) -> Optional[str]:
        """Why the fused kernels cannot compute this call's statistics as compat='original' counts them, or None.

        The kernels count valid tokens only, and every token under n-gram anchors; the original counts
        padding in `load` and in the eval `usage`, its sparse AutoTop-K candidates, and one selection per anchor."""
        aux = self._aux_mode()
        if self.routing.compat != "original" or aux == "none":
            return None
        if valid is not None:
            return ("compat='original' counts padding in the statistics (load, eval usage); the fused kernels count "
                    "valid tokens only (give no attention mask, or track_aux=False)")
        options = self._call_options()
        if aux == "full" and options.sparse_mode and options.auto_topk:
            return "compat='original' counts every sparse AutoTop-K candidate in load; the fused kernels count the kept ones"
        tokens = x.shape[-2] if x.dim() >= 3 else 1
        if aux == "full" and options.n_gram > 1 and tokens % options.n_gram:
            return (f"compat='original' counts one load selection per n-gram anchor; the fused kernels count every token "
                    f"(equal only when n_gram={options.n_gram} divides the {tokens} tokens)")
        return None

    def _original_unfused(self) -> Optional[str]:
        """Why the fused kernels cannot compute this variant as the original code does, or None."""
        return None

    def _drops_input(self) -> bool:
        """Whether training with dropout draws a mask of the input (the original's embedding classes have none)."""
        return True

    def _random_draws(self, sequences: torch.Tensor):
        """The jitter noise, then the dropout mask: the same random numbers for every backend."""
        if self.routing.compat == "original":
            return self._original_draws(sequences)
        jitter = None
        if self.training and self.routing.jitter_noise > 0:
            jitter = reference.sample_jitter(
                sequences.shape[0] * sequences.shape[1], self.routing.num_experts, self.routing.jitter_noise,
                sequences.device,
            )
        dropped = None
        if self.training and self.adapter.dropout > 0:
            dropped = F.dropout(sequences, p=self.adapter.dropout, training=True)
        return jitter, dropped

    def _original_draws(self, sequences: torch.Tensor):
        """The original code's draws: the dropout mask (in its forward), then the jitter (in its routing), in the
        activation dtype, one row per routed position: per n-gram anchor, repeated over the anchor's group."""
        dropped = None
        if self.training and self.adapter.dropout > 0 and self._drops_input():
            dropped = F.dropout(sequences, p=self.adapter.dropout, training=True)
        options = self._call_options()
        jitter = None
        if self.training and options.jitter_noise > 0:
            batch, tokens = sequences.shape[:2]
            groups = -(-tokens // options.n_gram)
            noise = torch.empty(batch, groups, options.num_experts, device=sequences.device, dtype=sequences.dtype)
            noise.uniform_(1.0 - options.jitter_noise, 1.0 + options.jitter_noise)
            if options.n_gram > 1:
                noise = noise[:, torch.arange(tokens, device=sequences.device) // options.n_gram]
            jitter = noise.reshape(batch * tokens, options.num_experts).to(reference.compute_dtype(sequences))
        return jitter, dropped

    def _modulate(
        self, *, backend: str, x: Optional[torch.Tensor], adapter_input: Optional[torch.Tensor], A: torch.Tensor,
        B: torch.Tensor, scaling: float, valid, jitter, frozen: Callable[[], torch.Tensor],
        weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
        channel_scale: Optional[torch.Tensor] = None, sliced_rows: int = 0,
        decoding: Optional[DecodingState] = None,
    ) -> torch.Tensor:
        """Run the layer on `(B, T, .)` sequences and record its statistics.

        The adapter reads `adapter_input`, or `x` when it is None. `frozen()` gives the frozen
        output as the reference takes it (the product without bias for DoRA, whose `channel_scale`
        and `bias` are applied on top). The fused backend instead computes `F.linear(x, weight, bias)`
        itself when `weight` is given (a plain nn.Linear; its first `sliced_rows` output channels then
        keep only the bias), else it takes `frozen()`. `decoding`: the KV cache's routing history
        (`_decoding_state`), which the causal window continues and this call extends.
        """
        options = self._call_options()
        if decoding is not None and backend == "triton":
            # The fused kernels carry no routing history: the reference decodes (and the prefill before it).
            if self.adapter.backend == "triton" and not self._warned_history_backend:
                self._warned_history_backend = True
                warnings.warn(f"{type(self).__name__}: backend='triton' cannot carry the n-gram routing history "
                              f"of decoding with a KV cache (n_gram={options.n_gram}, ngram_mode='window'); this "
                              "layer decodes on the reference backend", stacklevel=3)
            backend = "reference"
        if backend == "triton":
            from .fused import fused_lime_linear, fused_statistics

            computes_base = weight is not None
            result = fused_lime_linear(
                x=x if computes_base or adapter_input is None else None, adapter_input=adapter_input,
                weight=weight, bias=bias, base=None if computes_base else frozen(), A=A, B=B, LiMEs=self.LiMEs,
                LiME_shared=self.LiME_shared, gamma=self.gamma, options=options, scaling=scaling, valid=valid,
                jitter=jitter, channel_scale=channel_scale, sliced_rows=sliced_rows if computes_base else 0,
            )
            self._defer_stats(fused_statistics, result)
            return result.out
        frozen_output = frozen()  # under autocast, as the base layer would run
        adapter_input = adapter_input if adapter_input is not None else x
        bias = bias if channel_scale is not None else None
        history = None if decoding is None else decoding.history(self, frozen_output.shape[0], options,
                                                                 frozen_output.device)
        with full_precision(frozen_output.device):
            if self.compiled:
                routed = _compiled_reference()(adapter_input, frozen_output, A, B, self.LiMEs, self.LiME_shared,
                                               self.gamma, options, scaling, valid, jitter, channel_scale, bias,
                                               history=history)
            elif channel_scale is None:
                routed = eager.lime_linear(adapter_input, frozen_output, A, B, self.LiMEs, self.LiME_shared, self.gamma,
                                           options, scaling, valid, jitter, history=history, native=backend == "cpu")
            else:
                base, delta, features = reference.dora_outputs(adapter_input, frozen_output, A, B, scaling,
                                                               channel_scale, bias, options)
                routed = eager.route(base, delta, self.LiMEs, self.LiME_shared, self.gamma, options, valid, jitter,
                                     features, history, native=backend == "cpu")
        if decoding is not None:
            decoding.store(self, routed.history)
        self._defer_stats(reference.routing_stats, routed.probs, routed.valid, options)
        return routed.out


class LiMELinear(LiMEModule):
    """A frozen linear layer plus one shared LoRA adapter, E expert modulation vectors and
    zero-parameter routing: `out = base + delta * (w @ LiMEs + gamma * LiME_shared)`.

    Keyword names and parameter names (`A`, `B`, `LiMEs`, `LiME_shared`, `gamma`) are those of the
    original LiME code; `router`, `ngram_mode` and `backend` are new. The exact function is
    `docs/lime-semantics.md`; `lime_kernels.reference` is its readable implementation. The
    wrapped layer is any `nn.Linear`, bitsandbytes' `Linear8bitLt` / `Linear4bit` included (their
    own kernels then compute the frozen output), or a transformers `Conv1D` (GPT-2: the weight
    stored as `(in, out)`; `weight` below is that parameter as stored, the fused path reads its
    transpose as a view).

    `forward(x, attention_mask=None)`: tokens whose mask is 0 return the frozen output exactly. With
    no mask given, a `mask_provider` (installed by `lime.apply_peft`) may supply the padding mask of
    the model call this layer runs in.

    The PEFT variants are subclasses: `LiMELoRAFALinear`, `LiMEDoRALinear`, `LiMESliceFineLinear`.
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
        router: Optional[str] = None,
        ngram_mode: Optional[str] = None,
        backend: str = "auto",
        compat: str = "lime",
    ):
        super().__init__()
        if not is_wrappable_linear(linear):
            raise ValueError(
                f"{type(self).__name__} wraps an nn.Linear or a transformers Conv1D; got {type(linear).__name__}"
            )
        out_features = linear_features(linear)[1]
        routing = RoutingOptions(
            num_experts=num_experts, top_k=top_k, temperature=temperature, gamma_routing=gamma_routing,
            router=router, rep_mode=rep_mode, n_gram=n_gram, ngram_mode=ngram_mode,
            jitter_noise=jitter_noise, soft_topk=soft_topk, soft_topk_temperature=soft_topk_temperature,
            auto_topk=auto_topk, auto_topk_threshold=auto_topk_threshold, sparse_mode=sparse_mode, compat=compat,
        )
        adapter = AdapterOptions(
            rank=rank, alpha=alpha, dropout=dropout, use_shared_LiME=use_shared_LiME,
            LiME_init_std=LiME_init_std, track_aux=track_aux, peft_dtype=peft_dtype,
            moe_dtype=moe_dtype, backend=backend,
        )
        self.routing = routing  # read by the variants' checks and initialization (before `_init_lime` sets it too)
        self._check_variant(linear, adapter)
        self._init_lime(out_features, routing, adapter)
        self.linear = linear
        for parameter in linear.parameters():
            parameter.requires_grad_(False)
        self._init_adapter(linear.weight.device, peft_dtype or torch.float32)
        self._init_experts(out_features, linear.weight.device)
        # The mode of the model it joins: wrapping (or loading into) an eval model adds no jitter or dropout.
        self.train(linear.training)

    # --- what the variants change -----------------------------------------------------------------

    def _check_variant(self, linear: nn.Linear, adapter: AdapterOptions) -> None:
        """Variant-specific validation, before anything is created: a LoRA's rank is at most
        min(in_features, out_features) (beyond it the factors add memory, not freedom)."""
        check_rank(type(self).__name__, adapter.rank, linear_features(linear), ("in_features", "out_features"))

    def _init_adapter(self, device, dtype) -> None:
        self.A = nn.Parameter(torch.empty(self.adapter.rank, self.in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(self.out_features, self.adapter.rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def adapter_factors(self):
        """`(A, B, scaling)` with `delta = scaling * x A^T B^T`."""
        return self.A, self.B, self.adapter.scaling

    def channel_scale(self) -> Optional[torch.Tensor]:
        """A per-output-channel scale of the frozen product and of delta (DoRA's magnitude), or None."""
        return None

    def _frozen_output(self, sequences: torch.Tensor) -> torch.Tensor:
        return self.linear(sequences)

    # --- the wrapped layer's attributes, so code that reads `.weight` directly keeps working -------

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
        return linear_features(self.linear)[0]

    @property
    def out_features(self) -> int:
        return linear_features(self.linear)[1]

    def _plain_linear(self) -> bool:
        """A plain nn.Linear or Conv1D: the fused path computes its product itself (cuBLAS)."""
        return computes_plain_product(self.linear)

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # Eager CPU sequences first: a compiled graph never reads (or guards on) the direct path's state.
        if not torch.compiler.is_compiling() and attention_mask is None and x.dim() == 3 and x.device.type == "cpu":
            options = self._direct_cpu_options()
            if options is not None and x.shape[-1] == self.A.shape[1] and not autocast_on("cpu"):
                return self._direct_cpu_forward(x, options)
        # Under autocast the layer reads its input as the frozen linear layer would (in autocast's
        # dtype), on both backends; LiME's own math then runs in float32.
        linear = self.linear
        in_features, out_features = linear_features(linear)
        sequences = autocast_cast(as_sequences(x, in_features))
        valid = self._valid_tokens(x, attention_mask)
        jitter, dropped = self._random_draws(sequences)
        A, B, scaling = self.adapter_factors()
        backend = self.resolve_backend(x, valid)
        fused_computes_base = backend == "triton" and self._plain_linear()
        with full_precision(x.device):
            channel_scale = self.channel_scale()
        # The original's DoRA feeds the dropped input to the frozen product too.
        frozen_input = dropped if dropped is not None and self.compat == "original" and self.peft == "dora" \
            else sequences
        out = self._modulate(
            backend=backend, x=sequences, adapter_input=dropped, A=A, B=B, scaling=scaling, valid=valid,
            jitter=jitter, frozen=lambda: self._frozen_output(frozen_input),
            weight=frozen_weight(linear) if fused_computes_base else None, bias=linear.bias,
            channel_scale=channel_scale, sliced_rows=self._sliced_rows(),
            decoding=self._decoding_state(x, attention_mask),
        )
        # A 3-D input's output is (B, T, Dout) already: no view (each one is a node the backward runs).
        return out if x.dim() == 3 else out.reshape(*x.shape[:-1], out_features)

    def _direct_cpu_options(self) -> Optional[RoutingOptions]:
        """The routing options when this layer's calls on `(B, T, Din)` CPU sequences (eager, no autocast, no
        mask argument) go straight to the C++ operators (`_direct_cpu_forward`), else None: a LoRA or LoRA-FA
        layer with compat='lime', per-token routing (no window, no history), not `compile_reference`, on
        backend 'cpu' or 'auto' with the operators built. Worked out once per state of the layer (its mode,
        options and compile switch, by identity) and kept: on small layers the general path's checks cost
        more host time than the routing itself."""
        state = (self.training, self.routing, self.adapter, self.compiled)
        kept = self.__dict__.get("_direct_cpu")
        if kept is not None and all(now is then for now, then in zip(state, kept[0])):
            return kept[1]
        options = self._call_options()
        direct = (type(self) in (LiMELinear, LiMELoRAFALinear) and options.compat == "lime"
                  and options.rep_mode == "token" and options.n_gram == 1 and not self.compiled
                  and self.adapter.backend in ("auto", "cpu") and cpu.unavailable_reason() is None)
        self.__dict__["_direct_cpu"] = (state, options if direct else None)
        return options if direct else None

    def _direct_cpu_forward(self, x: torch.Tensor, options: RoutingOptions) -> torch.Tensor:
        """`forward` for the calls `_direct_cpu_options` admits: the general path's steps that apply to them, in
        its order (the same mask, the same random draws, the same operators: the same output bit for bit)."""
        valid = self._valid_tokens(x, None)
        jitter, dropped = self._random_draws(x)
        routed = eager.lime_linear(x if dropped is None else dropped, self.linear(x), self.A, self.B, self.LiMEs,
                                   self.LiME_shared, self.gamma, options, self.adapter.scaling, valid, jitter,
                                   native=True)
        self._defer_stats(reference.routing_stats, routed.probs, routed.valid, options)
        return routed.out

    def _sliced_rows(self) -> int:
        return 0

    def extra_repr(self) -> str:
        routing = self.routing
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, peft={self.peft}, "
            f"experts={routing.num_experts}, rank={self.adapter.rank}, router={routing.router}, "
            f"rep_mode={routing.rep_mode}, selection={routing.selection}"
        )
        if routing.n_gram > 1:
            text += f", n_gram={routing.n_gram} ({routing.ngram_mode})"
        return text


class LiMELoRAFALinear(LiMELinear):
    """LoRA-FA: `A` stays frozen at its random initialization; only `B` (and the experts) train."""

    peft = "lora_fa"

    def _init_adapter(self, device, dtype) -> None:
        super()._init_adapter(device, dtype)
        self.A.requires_grad_(False)


class LiMEDoRALinear(LiMELinear):
    """DoRA: a trainable magnitude `m` (Dout,), initialized to the row norms of W, rescales the frozen
    product and the adapter's output by `m / ||W + s B A||_row`; the bias is not rescaled (as in the
    DoRA paper and HF PEFT). `dora_detach_norm=True` stops gradients through the norm (HF PEFT)."""

    peft = "dora"

    def __init__(self, linear: nn.Linear, *args, dora_detach_norm: bool = False, **kwargs):
        if not isinstance(dora_detach_norm, bool):
            raise ValueError(f"dora_detach_norm must be True or False; got dora_detach_norm={dora_detach_norm!r}")
        if dora_detach_norm and kwargs.get("compat") == "original":
            raise ValueError("dora_detach_norm=True detaches the norm as HF PEFT does; compat='original' takes its "
                             "gradients as the original code does")
        super().__init__(linear, *args, **kwargs)
        self.dora_detach_norm = dora_detach_norm

    def _original_unfused(self) -> Optional[str]:
        return ("compat='original' routes DoRA from its adapted output and rescales the bias; the fused kernels route "
                "from the frozen output")

    def _init_adapter(self, device, dtype) -> None:
        super()._init_adapter(device, dtype)
        with torch.no_grad():
            row_norms = torch.linalg.vector_norm(frozen_weight(self.linear).float(), dim=1)
        self.m = nn.Parameter(row_norms.to(dtype))

    def channel_scale(self) -> torch.Tensor:
        original = self.compat == "original"
        return reference.dora_magnitude(
            frozen_weight(self.linear), self.A, self.B, self.m, self.adapter.scaling, self.dora_detach_norm,
            reference.ORIGINAL_DORA_NORM_FLOOR if original else None,
        )

    def _frozen_output(self, sequences: torch.Tensor) -> torch.Tensor:
        """The frozen product `x W^T` without the bias (added after DoRA's scale)."""
        if self._plain_linear():
            return F.linear(sequences, frozen_weight(self.linear))
        out = self.linear(sequences)
        return out if self.linear.bias is None else out - self.linear.bias.to(out.dtype)


class LiMESliceFineLinear(LiMELinear):
    """SliceFine: the first `rank` rows of W become trainable (`part_T`, a copy; W itself is not
    changed). `delta` = their output in the first `rank` channels (zeros elsewhere); the frozen
    output keeps only the bias in those channels. `alpha` plays no part (the scaling is 1)."""

    peft = "slicefine"

    def _check_variant(self, linear: nn.Linear, adapter: AdapterOptions) -> None:
        out_features = linear_features(linear)[1]
        if adapter.rank > out_features:
            raise ValueError(
                f"rank must be <= out_features ({out_features}) for SliceFine (the trainable rows); "
                f"got rank={adapter.rank}"
            )
        if not linear.weight.dtype.is_floating_point:
            raise ValueError(
                f"SliceFine needs the base layer's rows as plain weights; {type(linear).__name__} is quantized"
            )

    def _init_adapter(self, device, dtype) -> None:
        rank = self.adapter.rank
        self.part_T = nn.Parameter(frozen_weight(self.linear).detach()[:rank].clone().to(dtype))
        selector = torch.zeros(self.out_features, rank, device=device, dtype=dtype)
        selector[:rank] = torch.eye(rank, device=device, dtype=dtype)
        self.register_buffer("selector", selector, persistent=False)
        if self.routing.compat == "original" and self.linear.bias is not None:
            # The original trains a copy of the bias, named `bias` as there (`bias` reads it, see below;
            # nn.Module refuses to register a name the class has as a property, hence `_parameters`).
            self._parameters["bias"] = nn.Parameter(self.linear.bias.detach().clone().to(dtype))

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The wrapped layer's bias, or with compat='original' the trained copy of it."""
        trained = self._parameters.get("bias")
        return trained if trained is not None else self.linear.bias

    @bias.setter
    def bias(self, value: Optional[torch.Tensor]) -> None:
        if "bias" in self._parameters:
            raise ValueError("compat='original' SliceFine trains its own bias; set it with torch.no_grad() copy_")
        self.linear.bias = value

    def _initial_shared(self, out_features: int, device, dtype) -> torch.Tensor:
        if self.routing.compat == "original":
            return torch.zeros(out_features, device=device, dtype=dtype)  # the original's SliceFine: zeros, no draw
        return super()._initial_shared(out_features, device, dtype)

    def _call_options(self) -> RoutingOptions:
        """compat='original': routing reads the frozen side alone (gamma_routing 0, see `forward`)."""
        if self.routing.compat == "original" and self.routing.gamma_routing != 0:
            return _changed_options(self.routing, gamma_routing=0.0)
        return self.routing

    def _original_unfused(self) -> Optional[str]:
        return ("compat='original' routes SliceFine from the whole product without bias and trains the bias; the "
                "fused kernels route from the frozen rows and the bias")

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.compat != "original":
            return super().forward(x, attention_mask)
        return self._original_forward(x, attention_mask)

    def _original_forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The original's SliceFine: the dropped input feeds every row; the first `rank` channels are the
        trainable rows' output times the modulation, the others the frozen rows' output, plus the trained bias;
        routing reads the first E channels of the whole product without bias (the frozen side alone); masked
        tokens get the unmodulated output."""
        in_features, out_features = linear_features(self.linear)
        sequences = autocast_cast(as_sequences(x, in_features))
        valid = self._valid_tokens(x, attention_mask)
        jitter, dropped = self._random_draws(sequences)
        backend = self.resolve_backend(x, valid)  # backend='triton' raises: see `_original_unfused`
        rows_input = dropped if dropped is not None else sequences
        rank, num_experts = self.adapter.rank, self.routing.num_experts
        options = self._call_options()
        with full_precision(x.device):
            product = F.linear(rows_input, frozen_weight(self.linear))
            frozen_rows = torch.cat([torch.zeros_like(product[..., :rank]), product[..., rank:]], dim=-1)
            delta = reference.adapter_delta(rows_input, self.part_T, self.selector, 1.0)
            bias = self.bias
            base = frozen_rows if bias is None else frozen_rows + bias.to(frozen_rows.dtype)
            features = (frozen_rows[..., :num_experts].to(delta.dtype) + delta[..., :num_experts],
                        delta[..., :num_experts])
            routed = eager.route(base, delta, self.LiMEs, self.LiME_shared, self.gamma, options, None, jitter, features,
                                 native=backend == "cpu")
            out = routed.out
            if valid is not None:
                unrouted = (base.to(delta.dtype) + delta).to(out.dtype)
                out = torch.where(valid.unsqueeze(-1), out, unrouted)
        self._defer_stats(reference.routing_stats, routed.probs, valid, options)
        return out if x.dim() == 3 else out.reshape(*x.shape[:-1], out_features)

    def adapter_factors(self):
        return self.part_T, self.selector, 1.0

    def _sliced_rows(self) -> int:
        return self.adapter.rank

    def _frozen_output(self, sequences: torch.Tensor) -> torch.Tensor:
        out = self.linear(sequences)
        kept = torch.zeros_like(out[..., : self.adapter.rank])
        if self.linear.bias is not None:
            kept = kept + self.linear.bias[: self.adapter.rank].to(out.dtype)
        return torch.cat([kept, out[..., self.adapter.rank :]], dim=-1)


LINEAR_VARIANTS = {
    "lora": LiMELinear,
    "lora_fa": LiMELoRAFALinear,
    "dora": LiMEDoRALinear,
    "slicefine": LiMESliceFineLinear,
}
