"""LiME prompt tuning: routed soft prompts prepended to a frozen model's input embeddings.

`apply_peft(model, num_virtual_tokens=20, ...)` attaches a `lime_kernels.LiMEPromptEncoder` as
`model.lime_prompt_encoder` and wraps the model's `forward` (an instance attribute, `PromptedForward`).
On each call that starts a sequence (no cache yet) the wrapper embeds `input_ids`, computes the prompts
from them, and passes `inputs_embeds = [prompts, embeddings]`; on every call it prepends ones to the
`attention_mask`
(the prompts are always attended, also from a cache), -100 to the `labels` (no loss on the prompts)
and shifts given `position_ids`.

Input-conditioned prompts read the context, not the targets: the valid tokens whose label is -100
(in training the answer's tokens would otherwise leak into the prompts that precede them, which
generation, reading the question alone, never sees again), and inside `generate()` the tokens of its
first call only. So `generate()` gives the same prompts, and answers, with or without a cache: without
one every step runs the whole sequence again, generated tokens included.

Multimodal models find their image and video placeholders in `inputs_embeds` (Hugging Face
LLaVA-OneVision does), so the prompts go in front of the merged sequence.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Optional, Sequence

import torch
import torch.nn as nn

from lime_kernels import LiMEPromptEncoder

from .injection import CACHE_ARGUMENTS, freeze_base, record_base_flags


class PromptInjector:
    """Prepends the prompts to a model call's arguments, extends the mask, the labels and the positions."""

    def __init__(self, model: nn.Module, encoder: LiMEPromptEncoder):
        self.encoder = encoder
        self.embed = model.get_input_embeddings
        self.signature = inspect.signature(model.forward)
        self.generating = False
        self.prompt_length: Optional[int] = None  # tokens of the running generate()'s first call

    @contextlib.contextmanager
    def generation(self):
        """Inside one `generate()`: later calls without a cache condition on the first call's tokens."""
        outer = self.generating, self.prompt_length
        self.generating, self.prompt_length = True, None
        try:
            yield
        finally:
            self.generating, self.prompt_length = outer

    def context_mask(self, call: dict, embeds: torch.Tensor) -> Optional[torch.Tensor]:
        """(B, T) bool for the embedded input `embeds` (B, T, H): the tokens the prompts are conditioned
        on (see the module's docstring); None when every token counts."""
        batch, tokens = embeds.shape[:2]
        mask = call.get("attention_mask")
        context = None if mask is None else mask != 0
        labels = call.get("labels")
        if labels is not None:
            unlabelled = labels == -100
            context = unlabelled if context is None else context & unlabelled
        if self.generating:
            if self.prompt_length is None:
                self.prompt_length = tokens
            elif tokens > self.prompt_length:
                first_call = (torch.arange(tokens, device=embeds.device) < self.prompt_length).expand(batch, -1)
                context = first_call if context is None else context & first_call
        return context

    def inject(self, args: tuple, kwargs: dict) -> dict:
        """The keyword arguments of the model call `(args, kwargs)` with the prompts in."""
        call = dict(self.signature.bind_partial(*args, **kwargs).arguments)
        call.update(call.pop("kwargs", {}))
        virtual = self.encoder.num_virtual_tokens
        cache = next((call[name] for name in CACHE_ARGUMENTS if call.get(name) is not None), None)
        starting = cache is None or (hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0)
        mask = call.get("attention_mask")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            described = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(
                f"LiME prompt tuning prepends its prompts to a 2-D attention_mask; got {described}. transformers' "
                "generate() passes precomputed masks with a static (compilable) cache, which it also sizes without "
                "the prompts: generate with the default dynamic cache (no cache_implementation='static')")
        if starting:
            embeds = call.get("inputs_embeds")
            if embeds is None:
                if call.get("input_ids") is None:
                    raise ValueError("LiME prompt tuning needs input_ids or inputs_embeds")
                embeds = self.embed()(call["input_ids"])
            # The original's model wrapper conditions on every input token (no mask, answer included).
            context = None if self.encoder.compat == "original" else self.context_mask(call, embeds)
            prompts = self.encoder(embeds, context)
            call["inputs_embeds"] = torch.cat([prompts.to(embeds.dtype), embeds], dim=1)
            call["input_ids"] = None
            labels = call.get("labels")
            if labels is not None:
                ignored = labels.new_full((labels.shape[0], virtual), -100)
                call["labels"] = torch.cat([ignored, labels], dim=1)
        batch = call["inputs_embeds"].shape[0] if starting else self._batch(call)
        if mask is not None:
            call["attention_mask"] = torch.cat([mask.new_ones(batch, virtual), mask], dim=1)
        positions = call.get("position_ids")
        if positions is not None:
            if call.get("attention_mask") is not None:
                # As generate derives them: the count of attended positions so far, minus one.
                full = (call["attention_mask"].long().cumsum(dim=1) - 1).clamp_min(0)
                new_tokens = call["inputs_embeds"].shape[1] if starting else positions.shape[1]
                call["position_ids"] = full[:, -new_tokens:]
            else:
                shifted = positions + virtual
                call["position_ids"] = (
                    torch.cat([torch.arange(virtual, device=positions.device).expand(batch, -1), shifted], dim=1)
                    if starting else shifted
                )
        return call

    @staticmethod
    def _batch(call: dict) -> int:
        for name in ("input_ids", "inputs_embeds", "attention_mask"):
            if call.get(name) is not None:
                return call[name].shape[0]
        raise ValueError("LiME prompt tuning cannot tell the batch size of this call")


def apply_peft(
    model: nn.Module,
    num_virtual_tokens: int = 20,
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
    init_token_ids: Optional[Sequence[int]] = None,
    tokenizer=None,
    init_text: Optional[str] = None,
    compat: str = "lime",
    prompt_dropout: float = 0.0,
) -> nn.Module:
    """Freeze `model` and give it LiME prompt tuning (see the module's docstring); returns the model.

    The hidden size comes from `model.get_input_embeddings()`. The frozen prompt bank starts
    random (normal, std 0.02), or copies the embeddings of `init_token_ids`, or of `init_text`
    tokenized by `tokenizer` (cycled to `num_virtual_tokens`). The routing keywords are
    `lime.apply_peft`'s. `compat="original"`: the original's `LiMEPromptTuning` (see `LiMEPromptEncoder`;
    `prompt_dropout` is its), conditioned, as its model wrapper does, on the mean of every input token
    (padding and answer included).
    """
    embeddings = model.get_input_embeddings()
    if not isinstance(embeddings, nn.Embedding):
        raise ValueError(f"prompt tuning needs an nn.Embedding input embedding; got {type(embeddings).__name__}")
    if init_text is not None:
        if tokenizer is None:
            raise ValueError("init_text needs a tokenizer")
        init_token_ids = tokenizer(init_text, add_special_tokens=False)["input_ids"]
    init = None
    if init_token_ids is not None:
        ids = list(init_token_ids)
        if not ids:
            raise ValueError("init_token_ids / init_text gave no token")
        bad = [i for i in ids if not 0 <= i < embeddings.num_embeddings]
        if bad:
            raise ValueError(f"init_token_ids out of the vocabulary (size {embeddings.num_embeddings}): {bad[:5]}")
        index = torch.tensor([ids[i % len(ids)] for i in range(num_virtual_tokens)], device=embeddings.weight.device)
        init = embeddings.weight.detach()[index]
    encoder = LiMEPromptEncoder(
        num_virtual_tokens, embeddings.embedding_dim, num_experts=num_experts, top_k=top_k, temperature=temperature,
        use_shared_LiME=use_shared_LiME, track_aux=track_aux, rep_mode=rep_mode, jitter_noise=jitter_noise,
        n_gram=n_gram, LiME_init_std=LiME_init_std, gamma_routing=gamma_routing, soft_topk=soft_topk,
        soft_topk_temperature=soft_topk_temperature, auto_topk=auto_topk, auto_topk_threshold=auto_topk_threshold,
        peft_dtype=peft_dtype, moe_dtype=moe_dtype, sparse_mode=sparse_mode, router=router, ngram_mode=ngram_mode,
        backend=backend, input_conditioned=input_conditioned, init_embeddings=init, device=embeddings.weight.device,
        compat=compat, prompt_dropout=prompt_dropout,
    )
    return attach_prompt_encoder(model, encoder)


def attach_prompt_encoder(model: nn.Module, encoder: LiMEPromptEncoder) -> nn.Module:
    """Freeze `model`, make `encoder` its `lime_prompt_encoder` and hook it into the model's forward."""
    if getattr(model, "lime_prompt_encoder", None) is not None:
        raise ValueError(f"{type(model).__name__} already has LiME prompt tuning")
    embeddings = model.get_input_embeddings()
    if encoder.hidden_size != embeddings.embedding_dim:
        raise ValueError(
            f"the prompt encoder's hidden size {encoder.hidden_size} does not match the model's input embeddings "
            f"({embeddings.embedding_dim})"
        )
    record_base_flags(model)
    freeze_base(model)
    encoder.train(model.training)  # as the linear layers take their base's mode: no jitter in an eval model
    model.lime_prompt_encoder = encoder
    injector = PromptInjector(model, encoder)
    # A wrapped forward, not a forward pre-hook: torch.compile(model) runs hooks outside the forward's frame,
    # compiling the prompts as a graph of their own; inside it they join the model's one graph.
    model.forward = PromptedForward(model, injector, model.forward)
    if hasattr(model, "generate"):
        # An instance attribute, which remove_lime drops; a class, not a closure, so that a deep copy of the
        # model calls its own generate with its own injector.
        model.generate = GenerateConditionedOnThePrompt(injector, model.generate)
    return model


class PromptedForward:
    """The model's `forward`, called with the prompts in (`PromptInjector.inject`). An instance attribute,
    which `remove_lime` drops; a class, not a closure, so that a deep copy of the model calls its own forward
    with its own injector. Its signature is the wrapped forward's (`functools.update_wrapper`), which
    Hugging Face's generate and Trainer read."""

    def __init__(self, model: nn.Module, injector: PromptInjector, forward):
        self.model = model
        self.injector = injector
        self.forward = forward
        functools.update_wrapper(self, forward)

    def __call__(self, *args, **kwargs):
        call = self.injector.inject(args, kwargs)
        # The model's own mask scope (LiME layers outside its inner models: the output head, say) entered this
        # call before the prompts were in; from here on its layers read the extended mask, as the inner models do.
        scope = getattr(self.model, "_lime_mask_scopes", {}).get(id(self.model))
        if scope is not None:
            scope.continue_with(self.model, call)
        return self.forward(**call)


class GenerateConditionedOnThePrompt:
    """The model's `generate`, run inside `PromptInjector.generation()`."""

    def __init__(self, injector: PromptInjector, generate):
        self.injector = injector
        self.generate = generate
        functools.update_wrapper(self, generate)

    def __call__(self, *args, **kwargs):
        with self.injector.generation():
            return self.generate(*args, **kwargs)
