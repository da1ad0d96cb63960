"""The providers compared by the benchmarks, as layers and as whole-model wrappers.

- `frozen-linear`: the floor (the frozen layer alone; backward gives the input gradient only);
- `lime-fused`: LiME on the fused Triton backend (CUDA);
- `lime-cpu`: LiME with its routing and modulation in the C++ CPU operators (`lime_kernels.cpu`);
- `lime-reference`: LiME on the PyTorch reference backend (the unfused formulation);
- `peft-lora`: Hugging Face PEFT's LoRA layer of the same rank;
- `moe-lora`: E separate LoRA adapters with a learned top-k router (`moe_lora.py`).
"""

from __future__ import annotations

import importlib.util
from typing import List, Tuple

import torch
import torch.nn as nn
from moe_lora import MoELoRALinear

import lime
from lime_kernels import LiMELinear, cpu
from lime_kernels.layer import triton_interpreting

LAYER_PROVIDERS = ("frozen-linear", "lime-fused", "lime-cpu", "lime-reference", "peft-lora", "moe-lora")
MODEL_PROVIDERS = ("lime-fused", "lime-cpu", "lime-reference", "peft-lora", "moe-lora")
# The LiME providers and the backend each one runs.
LIME_BACKENDS = {"lime-fused": "triton", "lime-cpu": "cpu", "lime-reference": "reference"}


def available(providers, device: torch.device, interpreter: bool = False) -> Tuple[List[str], List[str]]:
    """The providers that can run here, and a reason for each one that cannot: the fused backend
    needs CUDA (the CPU interpreter is far too slow to time; `interpreter=True` admits it on the CPU
    under `TRITON_INTERPRET=1`, for smoke runs of the measuring code), `lime-cpu` the CPU and its C++ operators
    built, and `peft-lora` needs `peft`."""
    runnable, skipped = [], []
    for provider in providers:
        if provider == "lime-fused" and device.type != "cuda" and not (interpreter and triton_interpreting()):
            skipped.append(f"{provider}: needs a CUDA device")
        elif provider == "lime-cpu" and device.type != "cpu":
            skipped.append(f"{provider}: the C++ operators run on the CPU only")
        elif provider == "lime-cpu" and cpu.unavailable_reason() is not None:
            skipped.append(f"{provider}: {cpu.unavailable_reason()}")
        elif provider == "peft-lora" and importlib.util.find_spec("peft") is None:
            skipped.append(f"{provider}: the peft package is not installed (pip install peft)")
        else:
            runnable.append(provider)
    return runnable, skipped


def _lime_layer(linear: nn.Linear, backend: str, rank: int, experts: int, n_gram: int) -> LiMELinear:
    layer = LiMELinear(linear, num_experts=experts, rank=rank, n_gram=n_gram, auto_topk=True, backend=backend)
    with torch.no_grad():
        layer.B.normal_(0.0, 0.02)  # away from B = 0, where the adapter's routing features vanish
    return layer


def build_layer(provider: str, linear: nn.Linear, rank: int, experts: int, n_gram: int) -> nn.Module:
    """`linear` (frozen) wrapped by `provider`, in training mode."""
    linear.requires_grad_(False)
    if provider == "frozen-linear":
        return linear
    if provider in LIME_BACKENDS:
        return _lime_layer(linear, LIME_BACKENDS[provider], rank, experts, n_gram).train()
    if provider == "peft-lora":
        from peft import LoraConfig
        from peft.tuners.lora.layer import Linear as PeftLoraLinear

        config = LoraConfig(r=rank, lora_alpha=16, target_modules=["linear"])
        return PeftLoraLinear(linear, "default", config, r=rank, lora_alpha=16).to(linear.weight.device).train()
    if provider == "moe-lora":
        layer = MoELoRALinear(linear, num_experts=experts, rank=rank, top_k=2)
        with torch.no_grad():
            layer.B.normal_(0.0, 0.02)
        return layer.train()
    raise ValueError(f"unknown provider {provider!r}; known: {LAYER_PROVIDERS}")


def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def wrap_model(provider: str, model: nn.Module, targets, rank: int, experts: int) -> nn.Module:
    """A LLaVA-OneVision-shaped model with `provider` on `targets` (everything else frozen);
    `frozen-linear`: the model alone, frozen (a baseline for inference only: nothing to train)."""
    if provider == "frozen-linear":
        return model.requires_grad_(False)
    if provider in LIME_BACKENDS:
        return lime.apply_peft(model, targets=list(targets), rank=rank, num_experts=experts,
                               backend=LIME_BACKENDS[provider])
    if provider == "peft-lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=16, target_modules=list(targets)))
    if provider == "moe-lora":
        model.requires_grad_(False)
        for path, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] in targets:
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent), child, MoELoRALinear(module, num_experts=experts, rank=rank))
        return model
    raise ValueError(f"unknown provider {provider!r}; known: {MODEL_PROVIDERS}")
