"""`LiMEConfig`: every `apply_peft` hyperparameter in one validated, JSON-serializable dataclass."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Optional, Union

import torch

from lime_kernels.layer import LINEAR_VARIANTS
from lime_kernels.options import ADAPTER_FIELDS, ROUTING_FIELDS, AdapterOptions, RoutingOptions, optional_integer

_DTYPE_FIELDS = ("peft_dtype", "moe_dtype")


def _dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def _dtype_from_name(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r}")
    return dtype


@dataclass
class LiMEConfig:
    """The hyperparameters of `lime.apply_peft` (defaults: the LiME README's recommended values).

    Validates on construction: an invalid value raises a ValueError naming the field and its value.
    `targets` is a list of module-name suffixes or None (every linear layer); a callable target is
    accepted by `apply_peft` but is not part of a serializable config. `router` and `ngram_mode` left None
    take `compat`'s (see `RoutingOptions`); the config then holds the resolved values.
    """

    targets: Optional[List[str]] = None
    num_experts: int = 4
    rank: int = 2
    alpha: float = 16.0
    top_k: int = 1
    dropout: float = 0.0
    temperature: float = 0.5
    use_shared_LiME: bool = True
    preserve_tying: bool = True
    pad_token_id: Optional[int] = None
    track_aux: bool = True
    rep_mode: str = "token"
    jitter_noise: float = 0.1
    n_gram: int = 1
    LiME_init_std: float = 0.1
    gamma_routing: float = 0.7
    soft_topk: bool = True
    soft_topk_temperature: float = 0.5
    auto_topk: bool = True
    auto_topk_threshold: float = 0.5
    peft_dtype: Optional[torch.dtype] = None
    moe_dtype: Optional[torch.dtype] = None
    use_compile: bool = False
    sparse_mode: bool = False
    router: Optional[str] = None
    ngram_mode: Optional[str] = None
    backend: str = "auto"
    peft: str = "lora"
    dora_detach_norm: bool = False
    compat: str = "lime"

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if self.targets is not None:
            if isinstance(self.targets, Iterable):
                self.targets = list(self.targets)
            if not (isinstance(self.targets, list) and self.targets
                    and all(isinstance(t, str) and t for t in self.targets)):
                raise ValueError(f"targets must be None or a non-empty list of module-name suffixes; got targets={self.targets!r}")
        if self.peft not in LINEAR_VARIANTS:
            raise ValueError(f"peft must be one of {', '.join(map(repr, LINEAR_VARIANTS))}; got peft={self.peft!r}")
        for name in ("preserve_tying", "use_compile", "dora_detach_norm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False; got {name}={getattr(self, name)!r}")
        if self.dora_detach_norm and self.peft != "dora":
            raise ValueError(f"dora_detach_norm=True applies to peft='dora' only; got peft={self.peft!r}")
        if self.dora_detach_norm and self.compat == "original":
            raise ValueError("dora_detach_norm=True detaches the norm as HF PEFT does; compat='original' takes its "
                             "gradients as the original code does")
        self.pad_token_id = optional_integer("pad_token_id", self.pad_token_id)
        # The validated options hold Python numbers (NumPy scalars converted), which JSON takes.
        for options in (self.routing_options(), self.adapter_options()):
            for field in fields(options):
                setattr(self, field.name, getattr(options, field.name))

    def routing_options(self) -> RoutingOptions:
        return RoutingOptions(**{name: getattr(self, name) for name in ROUTING_FIELDS})

    def adapter_options(self) -> AdapterOptions:
        return AdapterOptions(**{name: getattr(self, name) for name in ADAPTER_FIELDS})

    def layer_kwargs(self) -> Dict[str, Any]:
        """The keyword arguments every LiME layer takes (`LiMELinear` and its variants, `LiMEEmbedding`)."""
        return {name: getattr(self, name) for name in ROUTING_FIELDS + ADAPTER_FIELDS}

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        for name in _DTYPE_FIELDS:
            data[name] = _dtype_name(data[name])
        return data

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "LiMEConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LiMEConfig field(s): {', '.join(unknown)}")
        values = dict(data)
        for name in _DTYPE_FIELDS:
            if name in values:
                values[name] = _dtype_from_name(values[name])
        return cls(**values)

    @classmethod
    def from_json_string(cls, text: Union[str, bytes]) -> "LiMEConfig":
        return cls.from_dict(json.loads(text))
