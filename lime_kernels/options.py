"""Validated hyperparameters of the LiME layer.

`RoutingOptions` holds everything the routing and mixing depend on; `AdapterOptions` holds what
shapes the shared adapter and the expert vectors. Both validate themselves on construction (and on
`dataclasses.replace`), so every entry point (the layer, `lime.apply_peft`, the runtime switches)
raises the same `ValueError` that names the offending hyperparameter and its value.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Optional

import torch

ROUTERS = ("cosine", "maxabs")
NGRAM_MODES = ("window", "anchor")
# "lime": the corrected semantics (docs/lime-semantics.md); "original": what the original LiME code's
# classes compute (README, "Differences from the original LiME code").
COMPAT_MODES = ("lime", "original")
# The router and n-gram mode each compat mode takes when none is given.
COMPAT_DEFAULTS = {"lime": {"router": "cosine", "ngram_mode": "window"},
                   "original": {"router": "maxabs", "ngram_mode": "anchor"}}
REP_MODES = ("token", "mean", "last")
BACKENDS = ("auto", "reference", "triton", "cpu")

# Step 9's four mixing rules as the kernels (Triton and C++) number them.
AUTO_DENSE, SOFT_DENSE, HARD, AUTO_SPARSE = 0, 1, 2, 3


def selection_code(auto_topk: bool, soft_topk: bool, sparse_mode: bool) -> int:
    """Dense AutoTop-K, dense soft top-k, hard top-k (dense or sparse) or sparse AutoTop-K."""
    if auto_topk:
        return AUTO_SPARSE if sparse_mode else AUTO_DENSE
    return SOFT_DENSE if soft_topk and not sparse_mode else HARD


def python_number(name: str, value):
    """`value` with a NumPy (or other `numbers`) scalar made a Python int or float, which JSON and the
    kernels take; a tensor is refused; anything else is left for the caller to judge."""
    if isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a Python number, not a tensor (use .item()); got {name}={value!r}")
    if isinstance(value, (int, float)) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def positive_integer(name: str, value) -> int:
    """`value` as a Python int (a NumPy integer converted), or a ValueError naming it unless it is an
    integer >= 1."""
    value = python_number(name, value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {name}={value!r}")
    return value


def optional_integer(name: str, value) -> Optional[int]:
    """`value` as a Python int (a NumPy integer converted) or None, or a ValueError naming it."""
    value = python_number(name, value)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name} must be an integer or None; got {name}={value!r}")
    return value


def _as_python_numbers(options) -> None:
    for field in fields(options):
        object.__setattr__(options, field.name, python_number(field.name, getattr(options, field.name)))


def _require_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer; got {name}={value!r}")


def _require_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False; got {name}={value!r}")


def _require_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {name}={value!r}")
    return float(value)


def require_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {name}={value!r}")


def _refuse_overridden(options) -> None:
    """compat='original' computes the original's routing: an option it would silently override is refused."""
    for name, value in COMPAT_DEFAULTS["original"].items():
        if getattr(options, name) != value:
            raise ValueError(
                f"compat='original' routes as the original code ({name}={value!r}); got {name}={getattr(options, name)!r} "
                f"(use compat='lime' for it)"
            )
    if options.rep_mode != "token":
        raise ValueError(
            f"compat='original' routes per token (the original code accepts rep_mode and ignores it); "
            f"got rep_mode={options.rep_mode!r} (use compat='lime' for it)"
        )


@dataclass(frozen=True)
class RoutingOptions:
    """Zero-parameter routing and expert mixing (steps 2-10 of `docs/lime-semantics.md`).

    Defaults follow the LiME README's recommended configuration. `router` and `ngram_mode` left None
    take `compat`'s: cosine / window, or the original's maxabs / anchor with `compat="original"`, which
    refuses the options it overrides (another router, n-gram mode or `rep_mode`).
    """

    num_experts: int = 4
    top_k: int = 1
    temperature: float = 0.5
    gamma_routing: float = 0.7
    router: Optional[str] = None
    rep_mode: str = "token"
    n_gram: int = 1
    ngram_mode: Optional[str] = None
    jitter_noise: float = 0.1
    soft_topk: bool = True
    soft_topk_temperature: float = 0.5
    auto_topk: bool = True
    auto_topk_threshold: float = 0.5
    sparse_mode: bool = False
    compat: str = "lime"

    def __post_init__(self) -> None:
        _as_python_numbers(self)
        require_choice("compat", self.compat, COMPAT_MODES)
        for name, default in COMPAT_DEFAULTS[self.compat].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        _require_int("num_experts", self.num_experts)
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1; got num_experts={self.num_experts}")
        _require_int("top_k", self.top_k)
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"top_k must satisfy 1 <= top_k <= num_experts (num_experts={self.num_experts}); "
                f"got top_k={self.top_k}"
            )
        if _require_real("temperature", self.temperature) <= 0:
            raise ValueError(f"temperature must be > 0; got temperature={self.temperature}")
        if not 0 <= _require_real("gamma_routing", self.gamma_routing) <= 1:
            raise ValueError(f"gamma_routing must lie in [0, 1]; got gamma_routing={self.gamma_routing}")
        require_choice("router", self.router, ROUTERS)
        require_choice("rep_mode", self.rep_mode, REP_MODES)
        _require_int("n_gram", self.n_gram)
        if self.n_gram < 1:
            raise ValueError(f"n_gram must be >= 1; got n_gram={self.n_gram}")
        require_choice("ngram_mode", self.ngram_mode, NGRAM_MODES)
        if self.n_gram > 1 and self.rep_mode != "token":
            # n-gram smoothing is defined along the tokens; a per-sequence representation has none.
            raise ValueError(
                f"n_gram={self.n_gram} smooths routing along the tokens and needs rep_mode='token'; "
                f"got rep_mode={self.rep_mode!r}"
            )
        if not 0 <= _require_real("jitter_noise", self.jitter_noise) < 1:
            raise ValueError(f"jitter_noise must lie in [0, 1); got jitter_noise={self.jitter_noise}")
        _require_bool("soft_topk", self.soft_topk)
        if _require_real("soft_topk_temperature", self.soft_topk_temperature) <= 0:
            raise ValueError(
                f"soft_topk_temperature must be > 0; got soft_topk_temperature={self.soft_topk_temperature}"
            )
        _require_bool("auto_topk", self.auto_topk)
        if not 0 < _require_real("auto_topk_threshold", self.auto_topk_threshold) <= 1:
            raise ValueError(
                f"auto_topk_threshold must lie in (0, 1]; got auto_topk_threshold={self.auto_topk_threshold}"
            )
        _require_bool("sparse_mode", self.sparse_mode)
        if self.compat == "original":
            _refuse_overridden(self)

    @property
    def selection(self) -> str:
        """The mixing rule in words: 'auto', 'soft' or 'hard', dense or sparse."""
        if self.auto_topk:
            rule = f"auto(theta={self.auto_topk_threshold})"
        elif self.soft_topk and not self.sparse_mode:
            rule = f"soft(k={self.top_k})"
        else:
            rule = f"hard(k={self.top_k})"
        return f"{rule}, {'sparse' if self.sparse_mode else 'dense'}"


@dataclass(frozen=True)
class AdapterOptions:
    """The shared LoRA adapter and the expert vectors around it."""

    rank: int = 2
    alpha: float = 16.0
    dropout: float = 0.0
    use_shared_LiME: bool = True
    LiME_init_std: float = 0.1
    track_aux: bool = True
    peft_dtype: Optional[torch.dtype] = None
    moe_dtype: Optional[torch.dtype] = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        _as_python_numbers(self)
        _require_int("rank", self.rank)
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1; got rank={self.rank}")
        if _require_real("alpha", self.alpha) <= 0:
            raise ValueError(f"alpha must be > 0 (the adapter's scaling is alpha / rank); got alpha={self.alpha}")
        if not 0 <= _require_real("dropout", self.dropout) < 1:
            raise ValueError(f"dropout must lie in [0, 1); got dropout={self.dropout}")
        _require_bool("use_shared_LiME", self.use_shared_LiME)
        if _require_real("LiME_init_std", self.LiME_init_std) < 0:
            raise ValueError(f"LiME_init_std must be >= 0; got LiME_init_std={self.LiME_init_std}")
        _require_bool("track_aux", self.track_aux)
        for name in ("peft_dtype", "moe_dtype"):
            dtype = getattr(self, name)
            if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
                raise ValueError(f"{name} must be a floating torch.dtype or None; got {name}={dtype!r}")
        require_choice("backend", self.backend, BACKENDS)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


ROUTING_FIELDS = tuple(f.name for f in fields(RoutingOptions))
ADAPTER_FIELDS = tuple(f.name for f in fields(AdapterOptions))
