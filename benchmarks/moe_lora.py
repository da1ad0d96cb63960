"""The standard MoE-LoRA baseline, written plainly: E separate LoRA adapters and a learned linear
router with top-k gating, around a frozen linear layer.

    out = W x + b + scaling * sum_{e in top-k(router(x))} gate_e(x) * B_e A_e x

Every expert's adapter output is computed densely (one batched matmul per projection) and weighted by
the gates, which are zero outside the top k: the plain formulation the LiME paper compares against.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class MoELoRALinear(nn.Module):
    def __init__(self, linear: nn.Linear, num_experts: int = 4, rank: int = 8, alpha: float = 16.0, top_k: int = 2):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must lie in [1, num_experts={num_experts}]; got top_k={top_k}")
        self.linear = linear.requires_grad_(False)
        device = linear.weight.device
        self.top_k = top_k
        self.scaling = alpha / rank
        self.router = nn.Linear(linear.in_features, num_experts, device=device)
        self.A = nn.Parameter(torch.empty(num_experts, rank, linear.in_features, device=device))
        self.B = nn.Parameter(torch.zeros(num_experts, linear.out_features, rank, device=device))
        for expert in range(num_experts):
            nn.init.kaiming_uniform_(self.A[expert], a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.linear(x)
        flat = x.reshape(-1, x.shape[-1]).float()
        logits = self.router(flat)
        top = logits.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(logits).scatter(-1, top.indices, torch.softmax(top.values, dim=-1))
        down = torch.einsum("nd,erd->enr", flat, self.A)               # (E, tokens, r)
        up = torch.einsum("enr,eor->eno", down, self.B)                # (E, tokens, Dout)
        delta = torch.einsum("ne,eno->no", gates, up) * self.scaling   # gated sum over the experts
        return (base.float() + delta.reshape(*base.shape)).to(base.dtype)
