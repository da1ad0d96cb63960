"""`print_lime_summary`: what LiME wrapped and what it trains."""

from __future__ import annotations

from collections import Counter
from typing import Dict

import torch.nn as nn

from lime_kernels import LiMEPromptEncoder

from .injection import lime_layers

# The adapter's trainable parameters in every variant (LoRA / LoRA-FA: A, B; DoRA: + m;
# SliceFine: part_T; prompt tuning: prompt_delta) and the mixture's.
PEFT_PARAMETERS = ("A", "B", "m", "part_T", "prompt_delta")
# compat="original" SliceFine trains its own copy of the bias, in the PEFT group as the original's trainer put it.
LIME_BIAS = "bias"
MOE_PARAMETERS = ("LiMEs", "LiME_shared", "gamma")


def _sorted_text(values) -> str:
    return ", ".join(sorted(str(v) for v in values))


def lime_summary(model: nn.Module) -> Dict:
    """The numbers `print_lime_summary` prints, as a dict."""
    layers = list(lime_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LiME layer; call lime.apply_peft first")
    peft = moe = 0
    trainable_outside = 0
    lime_parameter_ids = set()
    for _, layer in layers:
        for name, parameter in layer.named_parameters(recurse=False):
            lime_parameter_ids.add(id(parameter))
            if not parameter.requires_grad:
                continue
            if name in PEFT_PARAMETERS or name == LIME_BIAS:
                peft += parameter.numel()
            elif name in MOE_PARAMETERS:
                moe += parameter.numel()
            else:
                raise ValueError(f"{type(layer).__name__} has an unclassified trainable parameter {name!r}")
    total = sum(p.numel() for p in model.parameters())
    for parameter in model.parameters():
        if parameter.requires_grad and id(parameter) not in lime_parameter_ids:
            trainable_outside += parameter.numel()
    routing = [layer.routing for _, layer in layers]
    adapters = [layer.adapter for _, layer in layers]
    # A prompt encoder's rank and alpha are its virtual-token count (its delta is one row per token):
    # reported as such, not mixed with the layers' ranks.
    prompts = [layer for _, layer in layers if isinstance(layer, LiMEPromptEncoder)]
    low_rank = [layer.adapter for _, layer in layers if not isinstance(layer, LiMEPromptEncoder)]
    return {
        "model": type(model).__name__,
        "wrapped_layers": len(layers),
        "layers_by_name": dict(sorted(Counter(name.rsplit(".", 1)[-1] for name, _ in layers).items())),
        "routing_parameters": 0,
        "peft_parameters": peft,
        "moe_parameters": moe,
        "other_trainable_parameters": trainable_outside,
        "trainable_parameters": peft + moe + trainable_outside,
        "total_parameters": total,
        "peft": _sorted_text({layer.peft for _, layer in layers}),
        "peft_dtypes": _sorted_text({p.dtype for _, layer in layers for n, p in layer.named_parameters(recurse=False)
                                     if n in PEFT_PARAMETERS}),
        "moe_dtypes": _sorted_text({layer.LiMEs.dtype for _, layer in layers}),
        "num_experts": _sorted_text({r.num_experts for r in routing}),
        "rank": _sorted_text({a.rank for a in low_rank}) or "-",
        "alpha": _sorted_text({a.alpha for a in low_rank}) or "-",
        "virtual_tokens": _sorted_text({layer.num_virtual_tokens for layer in prompts}) or "-",
        "shared_vector": _sorted_text({a.use_shared_LiME for a in adapters}),
        "router": _sorted_text({r.router for r in routing}),
        "representation": _sorted_text(
            {r.rep_mode + (f", {r.n_gram}-gram {r.ngram_mode}" if r.n_gram > 1 else "") for r in routing}
        ),
        "selection": _sorted_text({r.selection for r in routing}),
        "temperature": _sorted_text({r.temperature for r in routing}),
        "gamma_routing": _sorted_text({r.gamma_routing for r in routing}),
        "jitter_noise": _sorted_text({r.jitter_noise for r in routing}),
        "backend": _sorted_text({a.backend for a in adapters}),
        "compat": _sorted_text({r.compat for r in routing}),
    }


def print_lime_summary(model: nn.Module) -> Dict:
    """Print the wrapped layers, the trainable parameters split into PEFT and MoE, and the modes.

    Returns the printed numbers (see `lime_summary`).
    """
    summary = lime_summary(model)
    trainable, total = summary["trainable_parameters"], summary["total_parameters"]
    rows = [
        ("Model", summary["model"]),
        ("Wrapped layers", f"{summary['wrapped_layers']} ("
         + ", ".join(f"{k} x{v}" for k, v in summary["layers_by_name"].items()) + ")"),
        ("Routing parameters", "0 (zero-parameter routing)"),
        ("PEFT variant", summary["peft"]),
        ("PEFT parameters", f"{summary['peft_parameters']:,}"),
        ("MoE parameters (LiMEs, shared, gamma)", f"{summary['moe_parameters']:,}"),
    ]
    if summary["other_trainable_parameters"]:
        rows.append(("Other trainable parameters", f"{summary['other_trainable_parameters']:,}"))
    rows += [
        ("Trainable / total", f"{trainable:,} / {total:,} ({100.0 * trainable / max(total, 1):.4f}%)"),
        ("PEFT dtype / MoE dtype", f"{summary['peft_dtypes']} / {summary['moe_dtypes']}"),
        ("Experts / rank / alpha", f"{summary['num_experts']} / {summary['rank']} / {summary['alpha']}"),
        *([("Prompt virtual tokens", summary["virtual_tokens"])] if summary["virtual_tokens"] != "-" else []),
        ("Shared vector", summary["shared_vector"]),
        ("Router / representation", f"{summary['router']} / {summary['representation']}"),
        ("Selection", summary["selection"]),
        ("Temperature / gamma_routing / jitter",
         f"{summary['temperature']} / {summary['gamma_routing']} / {summary['jitter_noise']}"),
        ("Backend", summary["backend"]),
        ("Semantics (compat)", summary["compat"]),
    ]
    width = max(len(label) for label, _ in rows)
    line = "=" * (width + 40)
    print(line)
    print("LiME summary")
    print(line)
    for label, value in rows:
        print(f"{label:<{width}} : {value}")
    print(line)
    return summary
