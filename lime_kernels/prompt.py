"""`LiMEPromptEncoder`: LiME prompt tuning, routed soft prompts for a sequence of input embeddings."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import eager, reference
from .inputs import explicit_valid_mask, full_precision
from .layer import LiMEModule
from .options import AdapterOptions, RoutingOptions, positive_integer


class LiMEPromptEncoder(LiMEModule):
    """V virtual tokens of size H: `prompts = base' + delta' * (w @ LiMEs + gamma * LiME_shared)`.

    `prompt_base` (V, H) is a frozen bank (normal, std 0.02, or `init_embeddings`, e.g. chosen
    vocabulary embeddings); `prompt_delta` (V, H) trains (zeros at init). Input-conditioned (default):
    `base' = prompt_base + the mean of the sequence's input embeddings over its valid tokens`, so each
    sequence gets its own prompts; else `base' = prompt_base`. Routing runs over the V virtual tokens
    (all valid; n-gram along them) from `(base'[:E], delta'[:E])`, as in every other variant.

    `compat="original"` computes the original's `LiMEPromptTuning` as the paper's run_prompt.py sets it up
    (no conditioning projection): the input mean runs over every token, padding included (its model wrapper
    passes no mask; `attention_mask` is not read); static prompts are routed once, as a batch of one;
    `prompt_dropout` drops prompt entries in training (after the jitter draw).
    """

    peft = "prompt"

    def __init__(
        self,
        num_virtual_tokens: int,
        hidden_size: int,
        num_experts: int = 4,
        top_k: int = 1,
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
        input_conditioned: bool = True,
        init_embeddings: Optional[torch.Tensor] = None,
        device=None,
        compat: str = "lime",
        prompt_dropout: float = 0.0,
    ):
        super().__init__()
        num_virtual_tokens = positive_integer("num_virtual_tokens", num_virtual_tokens)
        hidden_size = positive_integer("hidden_size", hidden_size)
        if not isinstance(input_conditioned, bool):
            raise ValueError(f"input_conditioned must be True or False; got input_conditioned={input_conditioned!r}")
        if init_embeddings is not None and tuple(init_embeddings.shape) != (num_virtual_tokens, hidden_size):
            raise ValueError(
                f"init_embeddings must have shape (num_virtual_tokens, hidden_size) = "
                f"{(num_virtual_tokens, hidden_size)}; got {tuple(init_embeddings.shape)}"
            )
        routing = RoutingOptions(
            num_experts=num_experts, top_k=top_k, temperature=temperature, gamma_routing=gamma_routing,
            router=router, rep_mode=rep_mode, n_gram=n_gram, ngram_mode=ngram_mode,
            jitter_noise=jitter_noise, soft_topk=soft_topk, soft_topk_temperature=soft_topk_temperature,
            auto_topk=auto_topk, auto_topk_threshold=auto_topk_threshold, sparse_mode=sparse_mode, compat=compat,
        )
        # The prompts' dropout is the original's (compat='original'), kept as the adapter's dropout.
        if isinstance(prompt_dropout, bool) or not isinstance(prompt_dropout, (int, float)) \
                or not 0 <= prompt_dropout < 1:
            raise ValueError(f"prompt_dropout must lie in [0, 1); got prompt_dropout={prompt_dropout!r}")
        if prompt_dropout != 0 and routing.compat != "original":
            raise ValueError(f"prompt_dropout is the original code's (compat='original'); got prompt_dropout={prompt_dropout!r} "
                             f"with compat={routing.compat!r}")
        # The prompt delta is the adapter: rank V, scaling 1 (alpha = V).
        adapter = AdapterOptions(
            rank=num_virtual_tokens, alpha=float(num_virtual_tokens), dropout=prompt_dropout, use_shared_LiME=use_shared_LiME,
            LiME_init_std=LiME_init_std, track_aux=track_aux, peft_dtype=peft_dtype, moe_dtype=moe_dtype,
            backend=backend,
        )
        self._init_lime(hidden_size, routing, adapter)
        self.input_conditioned = input_conditioned
        if init_embeddings is not None:
            if routing.compat == "original":  # the original draws its random bank before copying the embeddings
                torch.randn(num_virtual_tokens, hidden_size, device=device)
            bank = init_embeddings.detach().to(device=device, dtype=torch.float32).clone()
        else:
            bank = torch.randn(num_virtual_tokens, hidden_size, device=device) * 0.02
        self.register_buffer("prompt_base", bank)
        self.prompt_delta = nn.Parameter(
            torch.zeros(num_virtual_tokens, hidden_size, device=device, dtype=peft_dtype or torch.float32)
        )
        # z = one-hot of the virtual token: delta = z @ prompt_delta, the low-rank form of the op.
        self.register_buffer("positions", torch.eye(num_virtual_tokens, device=device), persistent=False)
        self._init_experts(hidden_size, device)

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt_delta.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.prompt_delta.shape[1]

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """inputs_embeds (B, T, H), attention_mask (B, T) or None; returns the prompts (B, V, H)."""
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.hidden_size:
            raise ValueError(
                f"LiMEPromptEncoder expects inputs_embeds of shape (batch, tokens, {self.hidden_size}); "
                f"got {tuple(inputs_embeds.shape)}"
            )
        if self.compat == "original":
            return self._original_forward(inputs_embeds, attention_mask)
        batch = inputs_embeds.shape[0]
        dtype = reference.compute_dtype(inputs_embeds)
        bank = self.prompt_base.to(dtype).unsqueeze(0).expand(batch, -1, -1)
        if self.input_conditioned:
            valid = self._valid_tokens(inputs_embeds, attention_mask)
            embeds = inputs_embeds.to(dtype)
            if valid is None:
                context = embeds.mean(dim=1, keepdim=True)
            else:
                weights = valid.unsqueeze(-1).to(embeds.dtype)
                context = (embeds * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
            bank = bank + context
        base = bank.to(inputs_embeds.dtype)
        positions = self.positions.unsqueeze(0).expand(batch, -1, -1)
        jitter, _ = self._random_draws(base)
        backend = self.resolve_backend(base)
        if backend == "triton":
            from .fused import fused_lime_linear, fused_statistics

            result = fused_lime_linear(
                x=None, adapter_input=None, weight=None, bias=None, base=base, A=None, z=positions,
                B=self.prompt_delta.t(), LiMEs=self.LiMEs, LiME_shared=self.LiME_shared, gamma=self.gamma,
                options=self.routing, scaling=1.0, valid=None, jitter=jitter,
            )
            self._defer_stats(fused_statistics, result)
            return result.out
        delta = self.prompt_delta.to(dtype).unsqueeze(0).expand(batch, -1, -1)
        with full_precision(base.device):
            routed = eager.route(base, delta, self.LiMEs, self.LiME_shared, self.gamma, self.routing, None, jitter,
                                 native=backend == "cpu")
        self._defer_stats(reference.routing_stats, routed.probs, routed.valid, self.routing)
        return routed.out

    def _drops_input(self) -> bool:
        return False  # the original's prompt dropout acts on the prompts, after the jitter (see `_original_forward`)

    def _original_forward(self, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """The original's `get_prompt_embeddings`, in the prompt's dtype (float32, float64 for float64 prompts)."""
        batch = inputs_embeds.shape[0]
        dtype = reference.compute_dtype(self.prompt_delta)
        if attention_mask is not None:
            explicit_valid_mask(attention_mask, inputs_embeds.shape)  # checked, as on the default path, not read
        if self.input_conditioned:
            base = self.prompt_base.to(dtype).unsqueeze(0) + inputs_embeds.to(dtype).mean(dim=1, keepdim=True)
            delta = self.prompt_delta.to(dtype).unsqueeze(0).expand(batch, -1, -1)
        else:  # routed once, as a batch of one
            base = self.prompt_base.to(dtype).unsqueeze(0)
            delta = self.prompt_delta.to(dtype).unsqueeze(0)
        jitter, _ = self._random_draws(base)
        options = self._call_options()
        backend = self.resolve_backend(base)
        if backend == "triton":
            from .fused import fused_lime_linear, fused_statistics

            rows = base.shape[0]
            result = fused_lime_linear(
                x=None, adapter_input=None, weight=None, bias=None, base=base, A=None,
                z=self.positions.to(dtype).unsqueeze(0).expand(rows, -1, -1), B=self.prompt_delta.t(),
                LiMEs=self.LiMEs, LiME_shared=self.LiME_shared, gamma=self.gamma, options=options, scaling=1.0,
                valid=None, jitter=jitter,
            )
            self._defer_stats(fused_statistics, result)
            prompts = result.out
        else:
            with full_precision(base.device):
                routed = eager.route(base, delta, self.LiMEs, self.LiME_shared, self.gamma, options, None, jitter,
                                     native=backend == "cpu")
            self._defer_stats(reference.routing_stats, routed.probs, None, options)
            prompts = routed.out
        prompts = prompts.expand(batch, -1, -1)
        if self.training and self.adapter.dropout > 0:
            prompts = F.dropout(prompts, p=self.adapter.dropout, training=True)
        return prompts.to(inputs_embeds.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_virtual_tokens={self.num_virtual_tokens}, hidden_size={self.hidden_size}, "
            f"experts={self.routing.num_experts}, input_conditioned={self.input_conditioned}, "
            f"selection={self.routing.selection}"
        )
