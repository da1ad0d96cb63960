"""Routing history for decoding with a KV cache, so that cached generation routes as training did.

A causal n-gram window (`ngram_mode="window"`, `n_gram = n > 1`, `rep_mode="token"`) routes a token from
itself and the valid tokens among the n-1 positions before it. A decoding step with a KV cache sees only
its new tokens, so each LiME layer with such a window keeps the routing features of the last n-1
positions (`reference.RoutingHistory`) from one step to the next. The history belongs to the cache: it
lives on the cache object (`DecodingState`), starts empty with a new or reset cache, and follows what
`generate` does to the cache (beam search's reordering, batch expansion or selection).

The other routing modes read tokens after the current one or the whole batch (`ngram_mode="anchor"`,
`rep_mode="mean"` or `"last"`, `router="maxabs"`): no history can make cached decoding equal to them,
and `non_causal_options` names them for a warning.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from .options import RoutingOptions
from .reference import RoutingHistory

STATE_ATTRIBUTE = "_lime_decoding_state"


def needs_history(options: RoutingOptions) -> bool:
    """Whether a layer's routing reads earlier tokens causally (a window that decoding must carry)."""
    return options.rep_mode == "token" and options.n_gram > 1 and options.ngram_mode == "window"


def non_causal_options(options: RoutingOptions) -> List[str]:
    """The options of a layer whose routing reads later tokens or other sequences (cached decoding cannot
    reproduce them), as `name=value` texts."""
    found = []
    if options.rep_mode != "token":
        found.append(f"rep_mode={options.rep_mode!r}")
    elif options.n_gram > 1 and options.ngram_mode == "anchor":
        found.append(f"ngram_mode='anchor' (n_gram={options.n_gram})")
    if options.router == "maxabs":
        found.append("router='maxabs'")
    return found


class _Following:
    """A cache method that, once the cache has run it, applies the same change to the routing history."""

    def __init__(self, method: Callable, follow: Callable):
        self.method = method
        self.follow = follow

    def __call__(self, *args, **kwargs):
        result = self.method(*args, **kwargs)
        self.follow(*args, **kwargs)
        return result


class DecodingState:
    """The routing histories of one KV cache: for each LiME layer with a causal window, the features of
    the last n-1 positions the cache holds. Attached to the cache (`attach`), whose batch edits it follows."""

    def __init__(self):
        self.histories: Dict[int, RoutingHistory] = {}  # by id(layer): a cache handed back keeps no layer alive
        self.warned = False  # the non-causal warning, once per cache (one generate call)
        self.lost: Optional[str] = None  # why the history no longer matches the cache (a crop), until warned
        self.non_causal: List[str] = []  # the options to warn about, found when the cache starts

    @staticmethod
    def of(cache) -> Optional["DecodingState"]:
        """The state attached to `cache`, or None."""
        return getattr(cache, STATE_ATTRIBUTE, None)

    def attach(self, cache) -> "DecodingState":
        """Make this the cache's state, following the cache's batch edits (the instance's methods are wrapped,
        so whoever edits the cache, `generate` or a loop of one's own, edits the history alike)."""
        setattr(cache, STATE_ATTRIBUTE, self)
        for name, follow in (("reorder_cache", self.reorder), ("batch_select_indices", self.reorder),
                             ("batch_repeat_interleave", self.repeat), ("reset", self.reset), ("crop", self.crop)):
            method = getattr(cache, name, None)
            if callable(method):
                setattr(cache, name, _Following(method, follow))
        return self

    def history(self, layer, batch: int, options: RoutingOptions, device: torch.device) -> RoutingHistory:
        """The layer's history (empty positions for its first call on this cache)."""
        history = self.histories.get(id(layer))
        if history is None:
            return RoutingHistory.empty(batch, options.n_gram, options.num_experts, device)
        if history.valid.shape != (batch, options.n_gram - 1):
            raise ValueError(
                f"{type(layer).__name__}: the KV cache's routing history holds {history.valid.shape[0]} sequences "
                f"and {history.valid.shape[1] + 1}-gram windows, but this decoding step has {batch} sequences and "
                f"n_gram={options.n_gram}; a cache continues the batch and the routing options it was filled with "
                "(start a new cache for another batch)"
            )
        return history

    def store(self, layer, history: RoutingHistory) -> None:
        self.histories[id(layer)] = history

    def reorder(self, indices, *args, **kwargs) -> None:
        """Beam search's `reorder_cache(beam_idx)`, `batch_select_indices(indices)`: the same rows, in order."""
        for key, history in self.histories.items():
            index = torch.as_tensor(indices, device=history.valid.device)
            self.histories[key] = RoutingHistory(*(t.index_select(0, index) for t in history))

    def repeat(self, repeats: int, *args, **kwargs) -> None:
        """`batch_repeat_interleave(repeats)`: every sequence repeated, as the cache's."""
        for key, history in self.histories.items():
            self.histories[key] = RoutingHistory(*(t.repeat_interleave(repeats, dim=0) for t in history))

    def reset(self, *args, **kwargs) -> None:
        """The cache starts afresh: so does the routing history."""
        self.histories.clear()
        self.warned = False
        self.lost = None

    def crop(self, tokens, *args, **kwargs) -> None:
        """Cropping the cache (assisted decoding's rollback) drops positions the history kept no earlier ones
        for: the windows right after the crop point lose them, with a warning."""
        if tokens == 0 or not self.histories:
            return
        self.histories.clear()
        self.lost = f"the KV cache was cropped (crop({tokens}))"
