"""The MoE-LoRA baseline in its fastest plain formulation: E LoRA adapters of rank r and a learned
linear router with top-k softmax gates, around a frozen linear layer.

    out = W x + b + scaling * sum_{e in top-k(router(x))} gate_e(x) * B_e A_e x

The E adapters are stored as one rank-E·r pair: `A` (E·r, Din) stacks the experts' down projections
and `B` (Dout, E·r) their up projections side by side, so the layer runs two GEMMs however many experts
there are. The gates scale each expert's r columns of the down projection in between, which gives the
gated sum above without ever materialising the experts' `(E, tokens, Dout)` outputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class MoELoRALinear(nn.Module):
    def __init__(self, linear: nn.Linear, num_experts: int = 4, rank: int = 8, alpha: float = 16.0, top_k: int = 2):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must lie in [1, num_experts={num_experts}]; got top_k={top_k}")
        self.linear = linear.requires_grad_(False)
        device = linear.weight.device
        self.num_experts, self.rank, self.top_k = num_experts, rank, top_k
        self.scaling = alpha / rank
        self.router = nn.Linear(linear.in_features, num_experts, device=device)
        self.A = nn.Parameter(torch.empty(num_experts * rank, linear.in_features, device=device))
        self.B = nn.Parameter(torch.zeros(linear.out_features, num_experts * rank, device=device))
        for expert in range(num_experts):  # each expert's A initialized as a LoRA's own would be
            nn.init.kaiming_uniform_(self.A[expert * rank:(expert + 1) * rank], a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = self.router(x).topk(self.top_k, dim=-1)
        gates = torch.zeros(*x.shape[:-1], self.num_experts, device=x.device, dtype=top.values.dtype)
        gates = gates.scatter(-1, top.indices, torch.softmax(top.values, dim=-1))
        down = F.linear(x, self.A).unflatten(-1, (self.num_experts, self.rank)) * gates.unsqueeze(-1)
        return self.linear(x) + F.linear(down.flatten(-2), self.B) * self.scaling
