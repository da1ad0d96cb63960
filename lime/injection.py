"""`apply_peft`: wrap a model's linear layers with LiME and route the model's padding mask to them."""

from __future__ import annotations

import contextlib
import inspect
import sys
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from lime_kernels import LINEAR_VARIANTS, LiMEEmbedding, LiMEModule, LiMEPromptEncoder
from lime_kernels.bases import is_wrappable_linear, linear_features
from lime_kernels.decoding import DecodingState, needs_history, non_causal_options
from lime_kernels.embedding import EMBEDDING_VARIANTS
from lime_kernels.inputs import ContextMask

from .config import LiMEConfig

Targets = Union[None, str, Sequence[str], Callable[[str, nn.Module], bool]]

# The names a transformers model's forward takes its KV cache by (transformers 5.25 renamed `past_key_values`).
CACHE_ARGUMENTS = ("cache", "past_key_values")

# The LiME README's targets: the attention projections of the language model and of SigLIP.
README_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj")


def lime_layers(model: nn.Module) -> Iterator[Tuple[str, LiMEModule]]:
    """`(qualified name, layer)` for every LiME layer of `model` (linear, embedding, prompt encoder)."""
    for name, module in model.named_modules():
        if isinstance(module, LiMEModule):
            yield name, module


class MaskScope:
    """Carries the padding mask of one module's calls to the LiME layers below it.

    The module (a scope owner: the model given to `apply_peft` and every Hugging Face
    `PreTrainedModel` inside it) gets hooks that record the 2-D `attention_mask` of each call. Its
    LiME layers read the mask of the call in progress; during backward (recomputation under
    gradient checkpointing, after the call has returned) they read the mask of the latest training
    call that recorded gradients, which is the one being recomputed when each forward is followed by
    its backward. When several training calls with different masks wait for one backward (two
    batches, one summed loss), which of them a recomputation belongs to cannot be told: that
    recomputation raises instead of guessing.

    An owner with no other owner inside it is the model that consumes the token sequence (a
    language model, a vision tower); an owner with sub-models inside is a composite whose own
    layers (projector, head) see the sequence only when their input has the mask's exact shape.
    A layer called while its owner has no call in progress (a language model's `embed_tokens`, which
    LLaVA calls before its language model) reads the call of the nearest enclosing owner that has
    one, under the composite's exact-shape rule.
    """

    def __init__(self, owner_name: str, owner: nn.Module, in_sequence_model: bool):
        self.owner_name = owner_name or type(owner).__name__
        self.in_sequence_model = in_sequence_model
        self._mask_position = self._positional_index(owner)
        self._cache_positions = [self._positional_index(owner, name) for name in CACHE_ARGUMENTS]
        self.layers: List[LiMEModule] = []  # the LiME layers below (they may read this call's context)
        # `_routing_kinds`'s state when last asked (the layers, their options) and its answer.
        self._kinds: Optional[tuple] = None
        self._active: List[Optional[ContextMask]] = []
        self._latest_with_grad: Optional[ContextMask] = None
        # Whether a training call was recorded since a backward last read a context, and whether
        # another one with different tensors was too.
        self._called_since_backward = False
        self._mixed_since_backward = False
        self._warned = False
        self.handles: list = []  # the owner's hooks, removed by `remove_lime`
        self.enclosing: Optional["MaskScope"] = None  # the nearest owner around this one

    @staticmethod
    def _positional_index(owner: nn.Module, name: str = "attention_mask") -> Optional[int]:
        parameters = list(inspect.signature(owner.forward).parameters.values())
        for index, parameter in enumerate(parameters):
            if parameter.name == name:
                positional = parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
                return index if positional else None
        return None

    def _mask_of_call(self, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        mask = kwargs.get("attention_mask")
        if mask is None and self._mask_position is not None and len(args) > self._mask_position:
            mask = args[self._mask_position]
        if mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            return mask
        if not self._warned:
            self._warned = True
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            warnings.warn(
                f"{self.owner_name} received an attention_mask of shape {shape}, not a 2-D padding mask; "
                "its LiME layers route every token.",
                stacklevel=4,
            )
        return None

    def _context_of_call(self, args: tuple, kwargs: dict) -> Optional[ContextMask]:
        """The call's mask and, for a decoder, the encoder's states and their padding mask (given by
        keyword, as encoder-decoder models pass them): cross-attention layers read those states."""
        mask = self._mask_of_call(args, kwargs)
        encoder_states = kwargs.get("encoder_hidden_states")
        encoder_mask = kwargs.get("encoder_attention_mask")
        if not isinstance(encoder_states, torch.Tensor):
            encoder_states = None
        if not (isinstance(encoder_mask, torch.Tensor) and encoder_mask.dim() == 2):
            encoder_mask = None
        if mask is None and encoder_states is None:
            return None
        # A dict for the call's layers to share the mask's alignments in (`context_valid_mask`); none in a
        # compiled graph, which would have to rebuild it after every call.
        aligned = None if torch.compiler.is_compiling() else {}
        return ContextMask(mask, self.in_sequence_model, encoder_states, encoder_mask, aligned=aligned)

    def _cache_of_call(self, args: tuple, kwargs: dict):
        for name, position in zip(CACHE_ARGUMENTS, self._cache_positions):
            cache = kwargs.get(name)
            if cache is None and position is not None and len(args) > position:
                cache = args[position]
            if cache is not None:
                return cache
        return None

    def _decoding_of_call(self, args: tuple, kwargs: dict) -> Optional[DecodingState]:
        """The routing history this call's layers continue and extend (`lime_kernels.decoding`): the state of
        the KV cache it is given, started afresh when the cache holds no token yet; a call nested in one that
        decodes (LLaVA's language model in its wrapper) shares its state. None for a call without a cache (it
        may create one, but recording a history for a continuation that may never come would keep every
        such eval call off the fused kernels; a vision tower inside a decoding call has no history either)
        and when no layer below routes from earlier tokens and none needs the non-causal warning."""
        cache = self._cache_of_call(args, kwargs)
        if cache is None:
            return None
        if torch.compiler.is_compiling():
            # A compiled decoding step (a static cache) continues the state its eager prefill attached; the
            # cache's length, a Python int, would be a guard that recompiles every step.
            return DecodingState.of(cache)
        if not callable(getattr(cache, "get_seq_length", None)):
            return None  # not a transformers Cache (a legacy tuple): nothing to attach to
        state = DecodingState.of(cache)
        if state is not None and state is self._enclosing_decoding():
            return state  # the same decoding step, one model further in: started (or reset) already
        length = cache.get_seq_length()
        if state is None or length == 0:
            causal, non_causal = self._routing_kinds()
            if not causal and not non_causal:
                return None
            if state is None:
                state = DecodingState().attach(cache)
                if length > 0 and causal:
                    state.lost = (f"{self.owner_name} continues a KV cache of {length} tokens that LiME did not "
                                  "see being filled (pass a cache object, e.g. transformers.DynamicCache(), to the "
                                  "first call too, or use generate())")
            else:
                state.reset()  # the cache object starts a new sequence
            state.non_causal = non_causal
        if length > 0:
            self._warn_decoding(state)
        return state

    def _enclosing_decoding(self) -> Optional[DecodingState]:
        """The routing history of the nearest enclosing owner's call in progress, if it decodes."""
        enclosing = self.enclosing
        while enclosing is not None:
            if enclosing._active and enclosing._active[-1] is not None:
                return enclosing._active[-1].decoding
            enclosing = enclosing.enclosing
        return None

    def _routing_kinds(self) -> Tuple[bool, List[str]]:
        """Whether a layer below routes from earlier tokens (a causal window), and the non-causal options of
        the layers below (`lime_kernels.decoding.non_causal_options`). A generation asks at every step (no history
        is attached where none is needed): the answer is kept while the layers and their options are the same
        objects (`update_routing` replaces a layer's options)."""
        kept = self._kinds
        if kept is not None and kept[0] == self.layers and all(
                layer.routing is routing for layer, routing in zip(self.layers, kept[1])):
            return kept[2]
        options = [layer._call_options() for layer in self.layers]
        kinds = (any(needs_history(o) for o in options),
                 sorted({text for o in options for text in non_causal_options(o)}))
        self._kinds = (list(self.layers), [layer.routing for layer in self.layers], kinds)
        return kinds

    def _warn_decoding(self, state: DecodingState) -> None:
        if state.lost is not None:
            warnings.warn(f"{state.lost}: the n-gram routing windows of the next tokens miss the positions before "
                          "them, so this generation can differ from uncached generation", stacklevel=5)
            state.lost = None
        if state.non_causal and not state.warned:
            state.warned = True
            warnings.warn(
                f"LiME layers of {self.owner_name} route with {', '.join(state.non_causal)}, which reads tokens "
                "after the current one or the whole batch: decoding with a KV cache routes each new token without "
                "them, so cached generation differs from uncached generation and from training. "
                "ngram_mode='window', rep_mode='token' and router='cosine' are causal (cached generation then "
                "equals uncached); or generate with use_cache=False", stacklevel=5)

    def _with_decoding(self, context: Optional[ContextMask], decoding: Optional[DecodingState]) -> Optional[ContextMask]:
        """`context` carrying the call's routing history (a context of its own where the call has no mask)."""
        if decoding is None:
            return context
        return (context or ContextMask(None, self.in_sequence_model))._replace(decoding=decoding)

    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        context = self._context_of_call(args, kwargs)
        decoding = self._decoding_of_call(args, kwargs) if self.layers else None
        self._active.append(self._with_decoding(context, decoding))
        # The record serves eager checkpoint recomputation only (a compiled graph replays its own, see
        # `current`); read while compiling, its flags would be guards that recompile the whole model twice.
        if torch.is_grad_enabled() and module.training and not torch.compiler.is_compiling():
            if self._called_since_backward and not _same_context(self._latest_with_grad, context):
                self._mixed_since_backward = True
            self._called_since_backward = True
            self._latest_with_grad = context

    def exit(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        self._active.pop()

    def continue_with(self, module: nn.Module, kwargs: dict) -> None:
        """The call in progress goes on with the keyword arguments `kwargs` (prompt tuning's, with the prompts
        in): its layers, and a recomputation of them, read those. Outside a call (`model.forward(...)` run
        directly, without the hooks) there is nothing to continue."""
        if not self._active:
            return
        decoding = self._active[-1].decoding if self._active[-1] is not None else None
        context = self._with_decoding(self._context_of_call((), kwargs), decoding)  # the same call: the same history
        self._active[-1] = context
        if torch.is_grad_enabled() and module.training and not torch.compiler.is_compiling():
            self._latest_with_grad = context

    def current(self) -> Optional[ContextMask]:
        if self._active:
            return self._active[-1]
        # Inside backward: checkpoint recomputation. A compiled graph replays its traced recomputation
        # without these hooks (and the check, an int from the autograd engine, would break the graph).
        if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
            mixed, self._mixed_since_backward, self._called_since_backward = self._mixed_since_backward, False, False
            if mixed:
                raise RuntimeError(
                    f"gradient checkpointing is recomputing a LiME layer of {self.owner_name}, but several "
                    "training calls with different padding masks ran before this backward: which one is "
                    "being recomputed cannot be told, and the wrong mask would give wrong gradients. Run "
                    "backward after each training forward, concatenate the batches into one call, or run "
                    "the calls whose outputs take no gradient under torch.no_grad() (a training call made "
                    "before checkpointing was enabled counts too: the record starts afresh after this error)")
            return self._latest_with_grad
        enclosing = self.enclosing
        while enclosing is not None:
            if enclosing._active:
                context = enclosing._active[-1]
                return None if context is None else context._replace(in_sequence_model=False)
            enclosing = enclosing.enclosing
        return None


def _same_context(first: Optional[ContextMask], second: Optional[ContextMask]) -> bool:
    """Whether two calls offer their layers the very same tensors (compared by identity: comparing
    values would synchronize with the device on every training call of a run without checkpointing,
    where this record is never read). Each call's own `aligned` dict is not what it offers."""
    if first is None or second is None:
        return first is second
    return all(getattr(first, name) is getattr(second, name) for name in ContextMask._fields if name != "aligned")


def is_target_type(module: nn.Module) -> bool:
    """What LiME wraps: `nn.Linear` (and subclasses, bitsandbytes' included), transformers' `Conv1D`
    (GPT-2), `nn.Embedding`."""
    return is_wrappable_linear(module) or isinstance(module, nn.Embedding)


def _suffix_matcher(targets: Union[str, Sequence[str]]) -> Callable[[str], bool]:
    suffixes = [targets] if isinstance(targets, str) else list(targets)
    return lambda path: any(path == s or path.endswith("." + s) for s in suffixes)


def _target_matcher(targets: Targets) -> Callable[[str, nn.Module], bool]:
    """None: every linear layer (nn.Linear, Conv1D); names or a callable: the matching linear and
    nn.Embedding modules."""
    if targets is None:
        return lambda path, module: is_wrappable_linear(module)
    if callable(targets):
        return lambda path, module: is_target_type(module) and bool(targets(path, module))
    named = _suffix_matcher(targets)
    return lambda path, module: is_target_type(module) and named(path)


def _base_modules(model: nn.Module, remove_duplicate: bool = True) -> Iterator[Tuple[str, nn.Module]]:
    """The model's modules outside LiME's layers (a LiME layer's wrapped layer is not a candidate)."""
    inside_lime = []
    for path, module in model.named_modules(remove_duplicate=remove_duplicate):
        if any(path.startswith(prefix) for prefix in inside_lime):
            continue
        if isinstance(module, LiMEModule):
            inside_lime.append(path + ".")
            continue
        yield path, module


def _describe_target_names(model: nn.Module, targets: Targets, limit: int = 12) -> str:
    """What exists instead: modules the names match that LiME cannot wrap, and the wrappable layers' names."""
    unwrappable = []
    if targets is not None and not callable(targets):
        named = _suffix_matcher(targets)
        for path, module in _base_modules(model):
            if is_target_type(module):
                continue
            if path and named(path):
                unwrappable.append(f"{path} is a {type(module).__name__}")
            # Its parameters too: MoE models keep every expert as slices of 3-D parameters.
            unwrappable += [f"{path}.{name} is a {tuple(parameter.shape)} parameter of a {type(module).__name__}"
                            for name, parameter in module.named_parameters(recurse=False)
                            if named(f"{path}.{name}" if path else name)]
    names = []
    for path, module in _base_modules(model):
        leaf = path.rsplit(".", 1)[-1]
        if is_target_type(module) and leaf not in names:
            names.append(leaf)
    text = ""
    if unwrappable:
        more = f" (and {len(unwrappable) - 4} more)" if len(unwrappable) > 4 else ""
        text = (f"{'; '.join(unwrappable[:4])}{more}, not a layer LiME wraps (nn.Linear, transformers Conv1D, "
                "nn.Embedding); ")
    if not names:
        return text + "the model has no nn.Linear, Conv1D or nn.Embedding layer"
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return text + "layers that exist: " + ", ".join(names[:limit]) + more


def _tied_with_a_linear(embedding: nn.Embedding, model: nn.Module) -> Optional[str]:
    """The name of a linear layer that shares the embedding's weight (tied input/output embeddings)."""
    for path, module in model.named_modules():
        if is_wrappable_linear(module) and getattr(module, "weight", None) is embedding.weight:
            return path
    return None


def _refuse_lime_layers(model: nn.Module) -> None:
    """LiME layers are not stacked: a second `apply_peft` would wrap nothing new or wrap LiME's own
    internals."""
    present = [name for name, layer in lime_layers(model) if not isinstance(layer, LiMEPromptEncoder)]
    if present:
        more = f" (and {len(present) - 3} more)" if len(present) > 3 else ""
        raise ValueError(
            f"{type(model).__name__} already has {len(present)} LiME layer(s): {', '.join(present[:3])}{more}. "
            "LiME is applied once per model: call lime.remove_lime(model) to get the base model back (then "
            "apply_peft again), or lime.load_adapter(model, directory) to load saved LiME weights into these layers."
        )


def record_base_flags(model: nn.Module) -> None:
    """Remember which base parameters trained before LiME froze them (once), for `remove_lime`."""
    if not hasattr(model, "_lime_base_requires_grad"):
        model._lime_base_requires_grad = {name: p.requires_grad for name, p in _base_parameters(model)}


def _base_parameters(model: nn.Module) -> Iterator[Tuple[str, nn.Parameter]]:
    """Every parameter that is not a LiME layer's own (a wrapped layer's included)."""
    lime_parameters = {id(p) for _, layer in lime_layers(model) for p in layer.parameters(recurse=False)}
    return ((name, p) for name, p in model.named_parameters() if id(p) not in lime_parameters)


def replace_children(model: nn.Module, replacement: Callable[[nn.Module], Optional[nn.Module]]) -> None:
    """Put `replacement(child)` in place of every child of every module of `model` for which it is not
    None, in one walk: a module shared by several parents is replaced under each of them."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            new = replacement(child)
            if new is not None:
                setattr(parent, child_name, new)


@contextlib.contextmanager
def requires_grad_restored(model: nn.Module):
    """LiME layers are built inside the block before any is installed; building one freezes the module
    it wraps, so on leaving (refused or not) every parameter of the model gets its flag back: a refused
    build leaves the model as it was, and `record_base_flags` then sees the flags from before."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def freeze_base(model: nn.Module) -> None:
    """Freeze every parameter that is not a LiME layer's own (its frozen base included)."""
    for _, parameter in _base_parameters(model):
        parameter.requires_grad_(False)


def _is_pretrained_model(module: nn.Module) -> bool:
    """A transformers `PreTrainedModel`, looked up without importing transformers (a slow import that
    `import lime` avoids): no such model exists unless transformers' modeling code is imported."""
    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(module, modeling.PreTrainedModel)


def _install_mask_scopes(model: nn.Module) -> None:
    """Give every LiME layer the scope of its nearest owner (the model or a PreTrainedModel)."""
    scopes: Dict[int, MaskScope] = getattr(model, "_lime_mask_scopes", None)
    if scopes is None:
        scopes = model._lime_mask_scopes = {}
    owners = {name: module for name, module in model.named_modules() if name == "" or _is_pretrained_model(module)}

    def nearest_owner(path: str) -> str:
        return max((o for o in owners if o == "" or path.startswith(o + ".")), key=len)

    def scope_of(owner_name: str) -> MaskScope:
        owner = owners[owner_name]
        scope = scopes.get(id(owner))
        if scope is None:
            composite = any(o != owner_name and (owner_name == "" or o.startswith(owner_name + ".")) for o in owners)
            scope = scopes[id(owner)] = MaskScope(owner_name, owner, in_sequence_model=not composite)
            scope.handles = [
                owner.register_forward_pre_hook(scope.enter, with_kwargs=True),
                owner.register_forward_hook(scope.exit, with_kwargs=True, always_call=True),
            ]
            if owner_name != "":  # the owners around it too, for layers called outside its calls
                scope.enclosing = scope_of(nearest_owner(owner_name))
        return scope

    for scope in scopes.values():  # layers replaced since (load_adapter) leave their scope
        scope.layers = []
    for name, layer in lime_layers(model):
        scope = scope_of(nearest_owner(name))
        layer.mask_provider = scope.current
        if isinstance(layer, LiMEPromptEncoder):  # it routes over its virtual tokens, not the sequence
            continue
        while scope is not None:  # the enclosing owners' calls too: a layer called outside its owner's reads theirs
            scope.layers.append(layer)
            scope = scope.enclosing


def apply_peft(
    model: nn.Module,
    targets: Targets = None,
    num_experts: int = 4,
    rank: int = 2,
    alpha: float = 16.0,
    top_k: int = 1,
    dropout: float = 0.0,
    temperature: float = 0.5,
    use_shared_LiME: bool = True,
    preserve_tying: bool = True,
    pad_token_id: Optional[int] = None,
    tokenizer=None,
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
    use_compile: bool = False,
    sparse_mode: bool = False,
    router: Optional[str] = None,
    ngram_mode: Optional[str] = None,
    backend: str = "auto",
    peft: str = "lora",
    dora_detach_norm: bool = False,
    compat: str = "lime",
) -> nn.Module:
    """Wrap the target layers of `model` with LiME, in place, and return the model.

    `targets`: module-name suffixes (`"q_proj"` matches `...self_attn.q_proj`), a callable
    `(qualified_name, module) -> bool`, or None for every linear layer. Linear layers are `nn.Linear`
    (bitsandbytes' `Linear8bitLt` / `Linear4bit` too: QLoRA-style LiME) and transformers' `Conv1D`
    (GPT-2's transposed linear layers). Names and callables also match `nn.Embedding` layers, which get
    `LiMEEmbedding` (an embedding tied to a linear layer is left alone with `preserve_tying=True`, the
    default). The `out_proj` of a `torch.nn.MultiheadAttention` is left alone (with a warning): that
    module's forward reads `out_proj.weight` directly, so an adapter there would never run.

    A model that already has LiME layers is refused (`remove_lime` gives the base model back).

    `peft`: the shared adapter, 'lora' (default), 'dora' (`dora_detach_norm=True` for HF PEFT's
    detached norm), 'lora_fa' (A frozen) or 'slicefine' (the first `rank` rows of each weight
    train); `lime.prompt_tuning.apply_peft` is the prompt-tuning entry point.

    Every parameter that is not LiME's is frozen. The 2-D `attention_mask` that the model (or any
    Hugging Face model inside it) receives reaches its LiME layers, so padding changes neither routing
    nor the statistics. `tokenizer` supplies `pad_token_id` (pad tokens are invalid in embedding
    targets given no mask). `use_compile` runs the layers' math through `torch.compile`
    (`LiMELinear.compile_reference`). `compat="original"` makes every layer compute what the original
    LiME code's class computes (router 'maxabs' and ngram_mode 'anchor' by default, the options it overrides
    refused; README, "Differences from the original LiME code"). The other keywords are `LiMELinear`'s.
    """
    tokenizer_pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    if tokenizer_pad is not None:
        if pad_token_id is not None and pad_token_id != tokenizer_pad:
            raise ValueError(f"pad_token_id={pad_token_id!r} differs from the tokenizer's pad_token_id={tokenizer_pad!r}: "
                             "give one of them")
        pad_token_id = tokenizer_pad
    config = LiMEConfig(
        targets=None if targets is None or callable(targets) else targets,
        num_experts=num_experts, rank=rank, alpha=alpha, top_k=top_k, dropout=dropout, temperature=temperature,
        use_shared_LiME=use_shared_LiME, preserve_tying=preserve_tying, pad_token_id=pad_token_id,
        track_aux=track_aux, rep_mode=rep_mode, jitter_noise=jitter_noise, n_gram=n_gram,
        LiME_init_std=LiME_init_std, gamma_routing=gamma_routing, soft_topk=soft_topk,
        soft_topk_temperature=soft_topk_temperature, auto_topk=auto_topk, auto_topk_threshold=auto_topk_threshold,
        peft_dtype=peft_dtype, moe_dtype=moe_dtype, use_compile=use_compile, sparse_mode=sparse_mode,
        router=router, ngram_mode=ngram_mode, backend=backend, peft=peft, dora_detach_norm=dora_detach_norm,
        compat=compat,
    )
    _refuse_lime_layers(model)
    wants = _target_matcher(targets)

    replacements = []
    tied_skipped = []
    bypassed = []
    parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    for path, module in _base_modules(model, remove_duplicate=False):
        if not path or not wants(path, module):
            continue
        if isinstance(parents.get(id(module)), nn.MultiheadAttention):
            bypassed.append(path)
            continue
        if isinstance(module, nn.Embedding) and preserve_tying:
            tied = _tied_with_a_linear(module, model)
            if tied is not None:
                tied_skipped.append(f"{path} (tied to {tied})")
                continue
        replacements.append((path, module))
    multihead_reason = (
        "torch.nn.MultiheadAttention reads out_proj.weight directly in its forward, so a LiME adapter there "
        "would never run"
    )
    if not replacements and is_target_type(model):
        wrapper = "LiMEEmbedding" if isinstance(model, nn.Embedding) else "LiMELinear"
        raise ValueError(
            f"the model is itself a {type(model).__name__}: apply_peft wraps the layers inside a model, in place. "
            f"Wrap a bare layer with lime_kernels.{wrapper}(layer, ...) (the same keywords), or give apply_peft a "
            f"container of it, e.g. apply_peft(nn.Sequential(layer))"
        )
    if not replacements:
        bypass = f"; {', '.join(bypassed[:4])} left alone: {multihead_reason}" if bypassed else ""
        raise ValueError(
            f"targets={targets!r} match no wrappable layer of {type(model).__name__}{bypass}; "
            f"{_describe_target_names(model, targets)}"
        )
    for path, module in replacements:
        width = module.embedding_dim if isinstance(module, nn.Embedding) else linear_features(module)[1]
        if width < num_experts:
            raise ValueError(
                f"num_experts must be <= the output size of every target: {path} has {width}; "
                f"got num_experts={num_experts}"
            )
        if isinstance(module, nn.Embedding) and peft not in EMBEDDING_VARIANTS:
            raise ValueError(
                f"{path} is an nn.Embedding: embedding targets take peft='lora' or 'lora_fa'; got peft={peft!r}"
            )
    if tied_skipped:
        warnings.warn(
            f"preserve_tying=True leaves embeddings tied to a linear layer unwrapped: {', '.join(tied_skipped)}",
            stacklevel=2,
        )
    if bypassed:
        more = f" (and {len(bypassed) - 4} more)" if len(bypassed) > 4 else ""
        warnings.warn(f"left unwrapped: {', '.join(bypassed[:4])}{more}: {multihead_reason}", stacklevel=2)

    # The layers are built on the side first: a variant's own checks (SliceFine's rank) may still refuse
    # a target, and the model must then be left as it was.
    layer_kwargs = config.layer_kwargs()
    wrapped: Dict[int, LiMEModule] = {}
    with requires_grad_restored(model):
        for path, module in replacements:
            if id(module) in wrapped:  # a module shared by several parents is wrapped once
                continue
            try:
                if isinstance(module, nn.Embedding):
                    wrapped[id(module)] = LiMEEmbedding(module, pad_token_id=pad_token_id, peft=peft, **layer_kwargs)
                elif peft == "dora":
                    wrapped[id(module)] = LINEAR_VARIANTS[peft](module, dora_detach_norm=dora_detach_norm,
                                                                **layer_kwargs)
                else:
                    wrapped[id(module)] = LINEAR_VARIANTS[peft](module, **layer_kwargs)
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from None

    # Validated: from here on the model is changed.
    record_base_flags(model)
    freeze_base(model)
    for path, module in replacements:
        parent_path, _, child_name = path.rpartition(".")
        setattr(model.get_submodule(parent_path), child_name, wrapped[id(module)])

    _install_mask_scopes(model)
    if use_compile:
        for _, layer in lime_layers(model):
            layer.compile_reference()
    model.lime_config = config
    return model


def remove_lime(model: nn.Module) -> nn.Module:
    """Undo `apply_peft` / `load_adapter` in place and return the model: every LiME layer is replaced
    by the very module it wraps, the prompt encoder and every hook LiME installed are removed, and
    `lime_config` is dropped; the base parameters that trained before LiME froze them train again.
    The outputs are then the base model's, bit for bit (the adapters are discarded, not merged;
    `save_adapter` first to keep them).
    """
    layers = list(lime_layers(model))
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LiME layer to remove")
    def wrapped_module(child: nn.Module) -> Optional[nn.Module]:
        if isinstance(child, LiMEEmbedding):
            return child.embedding
        if isinstance(child, LiMEModule) and not isinstance(child, LiMEPromptEncoder):
            return child.linear
        return None

    replace_children(model, wrapped_module)
    if getattr(model, "lime_prompt_encoder", None) is not None:
        del model.lime_prompt_encoder
        for attribute in ("forward", "generate"):  # the class's again
            model.__dict__.pop(attribute, None)
    for scope in getattr(model, "_lime_mask_scopes", {}).values():
        for handle in scope.handles:
            handle.remove()
    flags = getattr(model, "_lime_base_requires_grad", {})
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(flags.get(name, parameter.requires_grad))
    for attribute in ("_lime_mask_scopes", "lime_config", "_lime_base_requires_grad"):
        if hasattr(model, attribute):
            delattr(model, attribute)
    return model
