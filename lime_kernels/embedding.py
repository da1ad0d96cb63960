"""`LiMEEmbedding`: LiME around a frozen `nn.Embedding` (the adapter reads the embedding output)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .inputs import as_sequences
from .layer import LiMEModule, check_rank
from .options import AdapterOptions, RoutingOptions, optional_integer

EMBEDDING_VARIANTS = ("lora", "lora_fa")


class LiMEEmbedding(LiMEModule):
    """`base = emb(ids)`, `delta = s * base A^T B^T`, then the LiME routing and modulation.

    `peft` is 'lora' or 'lora_fa' (A frozen). Padding: an explicit `attention_mask`, else the
    padding mask of the model call (installed by `lime.apply_peft`), else, with `pad_token_id`,
    the pad tokens are the invalid ones. Keywords and parameter names are `LiMELinear`'s.
    `compat="original"`: no dropout, and LoRA-FA's `B` is `(num_embeddings, rank)` with
    `delta = s * B[ids] A` (the original's embedding classes).
    """

    def __init__(
        self,
        embedding: nn.Embedding,
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
        pad_token_id: Optional[int] = None,
        peft: str = "lora",
    ):
        super().__init__()
        if not isinstance(embedding, nn.Embedding):
            raise ValueError(f"LiMEEmbedding wraps an nn.Embedding; got {type(embedding).__name__}")
        if peft not in EMBEDDING_VARIANTS:
            raise ValueError(f"nn.Embedding targets take peft='lora' or 'lora_fa'; got peft={peft!r}")
        pad_token_id = optional_integer("pad_token_id", pad_token_id)
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
        check_rank("LiMEEmbedding", adapter.rank, (embedding.num_embeddings, embedding.embedding_dim),
                   ("num_embeddings", "embedding_dim"))
        device = embedding.weight.device
        self._init_lime(embedding.embedding_dim, routing, adapter)
        self.peft = peft
        self.pad_token_id = pad_token_id
        self.embedding = embedding
        for parameter in embedding.parameters():
            parameter.requires_grad_(False)
        dtype = peft_dtype or torch.float32
        dim = embedding.embedding_dim
        self.A = nn.Parameter(torch.empty(rank, dim, device=device, dtype=dtype))
        # The original's LoRA-FA embedding gives every vocabulary row its own B row: delta = s * B[ids] A.
        per_token = routing.compat == "original" and peft == "lora_fa"
        self.B = nn.Parameter(torch.zeros(embedding.num_embeddings if per_token else dim, rank, device=device,
                                          dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        if peft == "lora_fa":
            self.A.requires_grad_(False)
        if per_token:
            self.register_buffer("rank_identity", torch.eye(rank, device=device, dtype=dtype), persistent=False)
        self._init_experts(dim, device)
        # The mode of the model it joins: wrapping (or loading into) an eval model adds no jitter or dropout.
        self.train(embedding.training)

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    @weight.setter
    def weight(self, value: torch.Tensor) -> None:
        self.embedding.weight = value

    @property
    def num_embeddings(self) -> int:
        return self.embedding.num_embeddings

    @property
    def embedding_dim(self) -> int:
        return self.embedding.embedding_dim

    @property
    def padding_idx(self) -> Optional[int]:
        return self.embedding.padding_idx

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dim() < 1:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"LiMEEmbedding expects integer token ids of shape (batch, tokens) or (tokens,); got {shape}")
        base = self.embedding(input_ids)
        # (tokens,) ids are one sequence, not `tokens` sequences of one token; their explicit mask is (tokens,).
        sequences = base.unsqueeze(0) if input_ids.dim() == 1 else as_sequences(base, self.embedding_dim)
        valid = self._valid_tokens(base, attention_mask)  # an explicit mask, else the model call's
        if valid is None and self.pad_token_id is not None:
            valid = input_ids != self.pad_token_id
        if valid is not None:
            valid = valid.reshape(sequences.shape[:2])
        jitter, dropped = self._random_draws(sequences)
        adapter_input, A, B = dropped if dropped is not None else sequences, self.A, self.B
        if self.peft == "lora_fa" and self.compat == "original":
            # delta = s * B[ids] A, written as the op's s * z I^T (A^T)^T with z = B[ids] (B, T, r).
            adapter_input = F.embedding(input_ids, self.B).reshape(*sequences.shape[:2], -1)
            A, B = self.rank_identity, self.A.t()
        out = self._modulate(
            backend=self.resolve_backend(sequences, valid), x=None, adapter_input=adapter_input,
            A=A, B=B, scaling=self.adapter.scaling, valid=valid, jitter=jitter, frozen=lambda: sequences,
            decoding=self._decoding_state(base, attention_mask),
        )
        return out.reshape(base.shape)

    def _drops_input(self) -> bool:
        # The original's embedding classes have no dropout.
        return False

    def extra_repr(self) -> str:
        routing = self.routing
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, peft={self.peft}, "
            f"experts={routing.num_experts}, rank={self.adapter.rank}, router={routing.router}, "
            f"selection={routing.selection}, pad_token_id={self.pad_token_id}"
        )
