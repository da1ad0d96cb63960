"""An independent oracle of what the ORIGINAL LiME code (github Kowsher/LiME: LiMELoRA.py,
LiMELoRAFA.py, LiMEDoRA.py, LiMESliceFine.py, LiMEPromtTuning.py) computes.

Written from a reading of that code, not copied from it: plain functions that take explicit
parameter tensors (the names are the project's: `A`, `B`, `LiMEs`, `LiME_shared`, `gamma`, `m`,
`part_T`, the wrapped layer's `W` and `b`), so that a test can feed them a project layer's
parameters and compare. They compute in the dtype of the input (float64 in, float64 out), with
every adapter parameter cast to it, as the original does.

Random numbers are drawn from torch's global generator in the original's order: the dropout mask
(`F.dropout` of the layer input) first, then the routing jitter (`Uniform(1 - eps, 1 + eps)` of shape
`(B, routed positions, E)` in the activation dtype). Prompt tuning draws the jitter first and then the
dropout of the prompts (its dropout acts on the output).

Every forward returns `(out, stats)`; `stats` is None without `track_aux`, a dict with `importance`,
`load`, `kl_uniform`, `usage` in training, and a dict with `usage` alone in eval.

What the original computes, step by step (all variants)
---------------------------------------------------------
1. `is_cls`: a 2-D input `(N, Din)` is N sequences of one token.
2. Training with dropout p > 0: `x_d = dropout(x)`. LoRA and LoRA-FA use `x_d` for the adapter
   only (the frozen `W x + b` reads `x`); DoRA and SliceFine use `x_d` for the frozen product too.
3. Routing features `H_slice` (frozen side) and `delta_slice` (adapter side), the first E channels:
   - LoRA, LoRA-FA: `(W x + b)[:E]` and `(s B A x_d)[:E]`.
   - DoRA: with `mag = m / max(||W + s B A||_row, 1e-8)`: frozen side `mag * (W x_d + b) + mag * s B A x_d`
     (the adapted output), adapter side `mag * s B A x_d`.
   - SliceFine: `(W' x_d)[:E]` with `W' = [part_T; W[r:]]` and no bias; no adapter side.
   - Prompt tuning: `prompt_base + input_proj(mean of the input embeddings)` and `prompt_delta`.
   - Embeddings: `emb(ids)[:E]` and the adapter's `delta[:E]` (LoRA: `s emb(ids) A^T B^T`; LoRA-FA: `(s B A)[ids]`).
4. n-gram (`n_gram = n > 1`; LoRA ignores it): only the anchor positions are routed, the last
   position of each group of n consecutive positions (`n-1, 2n-1, ...`, and `T-1` for a shorter last
   group), padding or not; each group's mixture is then repeated over its positions.
5. `scale_u = max(max|H_slice|, 1e-6)` over every element of the routed batch (B, anchors, E), padding
   included; `scale_v` the same for `delta_slice`.
   `logits = ((1 - gamma_r) * H_slice / scale_u + gamma_r * delta_slice / scale_v) * (1 / max(temperature, 1e-6))`
   (SliceFine: `logits = H_slice / scale_u * (1 / max(temperature, 1e-6))`, no gamma_routing).
6. Training with jitter eps > 0: `logits *= Uniform(1 - eps, 1 + eps)` (drawn after the dropout mask).
7. `probs = softmax(logits)` over the E experts.
8. Mixing (`p_mix`, and what `load` counts):
   - dense AutoTop-K: `w = probs * sig / (sum + 1e-9)`, `sig = sigmoid((probs - theta * max probs) / tau)`;
     load counts `probs >= theta * max probs`.
   - dense soft top-k: the same with threshold `k-th largest prob`; load counts the top-k.
   - dense hard top-k / sparse top-k: top-k probs renormalized (sum clamped at 1e-9); load counts the top-k.
     Sparse with k = 1: the arg-max expert's vector itself (weight exactly 1).
   - sparse AutoTop-K: the `max_k = min(2 top_k, E)` largest probs, those below `theta * max` zeroed,
     renormalized (a row with nothing left would take the arg-max alone); load counts all max_k
     candidates, kept or not.
   `p_mix = w @ LiMEs`.
9. `routed = delta * p_mix + gamma * (delta * LiME_shared)`, `out = frozen + routed`; tokens with
   mask 0 get `frozen`. (SliceFine: the first r channels are `part_T x_d * (p_mix + gamma * LiME_shared)[:r]`,
   the others `W[r:] x_d`, then `+ b`; masked tokens get `W' x_d + b`.)
10. Statistics (training): `p_bar` = mean of the (expanded) probs over the tokens with mask 1
    (all tokens without a mask; the denominator clamped at 1); `importance = E sum p_bar^2 - 1`;
    `kl_uniform = sum p_bar (log max(p_bar, 1e-8) + log E)`; `load = E sum (c / max(sum c, 1))^2 - 1`
    (detached) with `c` the per-expert selection counts over EVERY routed position (padding
    included; one per anchor with n-gram); `usage = p_bar`. Eval: `usage` = the mean of the probs over
    every token, padding included.

Differences from this project's default semantics (docs/lime-semantics.md)
--------------------------------------------------------------------------
All variants:
- Router: original = one max |.| over the whole batch, padding included ("maxabs"); project default = per-token
  L2 ("cosine").
- n-gram: original = anchors (group's last position, padding included; LoRA ignores n_gram);
  project default = causal window over valid tokens ("window").
- rep_mode: original accepts "mean"/"last" and ignores them; project implements them.
- Temperature: original multiplies by 1 / max(T, 1e-6); project divides by T (T > 0 enforced): same for valid T.
- Random draws: original draws the dropout mask, then the jitter (shape (B, anchors, E), activation dtype: one
  draw per n-gram group); project draws the jitter (B*T, E, float32, one per token), then the dropout mask.
- `load`: original counts the selections of every routed position, padding included, one per anchor group
  with n-gram, and in sparse AutoTop-K all min(2k, E) candidates even below the threshold; project counts the
  experts actually kept by each valid token.
- Eval `usage`: original averages over every token, padding included; project over valid tokens.
- No valid token in the batch: original importance = -1, load from the padding; project 0 for both.
- Precision: original computes in the activation dtype (adapter cast to it); project in float32 accumulators.
LoRA: ignores n_gram (n_gram > 1 routes every token on its own).
LoRA-FA: as above, with n_gram applied (anchors).
DoRA:
- Routing's frozen side: original = the adapted, magnitude-scaled output `mag (W x_d + b) + mag s B A x_d`;
  project = the frozen output `mag W x + b`.
- Bias: original rescales it with the magnitude (`mag (W x + b)`); project adds it unscaled (DoRA paper, HF PEFT).
- Dropout: original feeds the dropped input to the frozen product too; project only to the adapter.
- Masked tokens: original `mag (W x_d + b)`; project `mag W x + b`.
- Norm floor: original clamps `||W + s B A||` at 1e-8; project does not.
SliceFine:
- Routing: original routes from `(W' x_d)[:E]` alone (the trainable and frozen rows' products, no bias, no adapter
  side, gamma_routing unused); project from `u = base'[:E]` (frozen rows + bias, zeros+bias in the first r channels)
  and `v = delta'[:E]` (the trainable rows' output), blended by gamma_routing.
- Dropout: original feeds the dropped input to the frozen rows too; project only to the trainable rows.
- Bias: original trains it; project keeps it frozen.
- LiME_shared init: original zeros; project normal(0, 0.1).
- Masked tokens: original `W x_d + b` (the layer's plain output, trainable rows included); project `base'`, whose first
  r channels hold the bias alone (the trainable rows' product is dropped for padding).
Embeddings (`nn.Embedding` targets):
- No dropout in the original's embedding classes; a mask from `pad_token_id` when none is given (as the project).
- LoRA embedding: `delta = s * emb(ids) A^T B^T` as the project, n_gram ignored (as the LoRA linear).
- LoRA-FA embedding: the original's delta is a low-rank table looked up by token id, `delta = (s * B A)[ids]` with
  `B (num_embeddings, r)` trained and `A (r, H)` frozen (HF PEFT's embedding LoRA), not a function of the embedding;
  project: `s * emb(ids) A^T B^T` as LoRA. n_gram anchors apply.
Prompt tuning:
- Conditioning: the original class passes the input mean through a trainable H x H `input_proj` (identity init) by
  default (`conditioning_projection=True`); the paper's run_prompt.py turns it off, as the project (no projection).
- Conditioning mean: the original's model-forward wrapper calls it without the mask, so padding is averaged in
  (the manual `prompt_module(embeds, mask)` call masks it); project always masks.
- prompt_dropout: original applies dropout to the prompts after mixing (after the jitter draw); project has none.
- sparse_mode default True (original prompt tuning) vs False; original init_from_vocab default takes vocabulary
  rows 100..100+V.
- Static prompts (input_conditioned=False): original routes the V prompts once (maxabs over V); same routing as
  conditioned with batch 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

SCALE_EPS = 1e-6
WEIGHT_EPS = 1e-9
NORM_FLOOR = 1e-8
LOG_EPS = 1e-8


@dataclass(frozen=True)
class OriginalOptions:
    """The original's routing hyperparameters (defaults: the original classes' defaults)."""

    num_experts: int = 8
    top_k: int = 2
    temperature: float = 1.0
    gamma_routing: float = 0.5
    jitter_noise: float = 0.0
    n_gram: int = 1
    soft_topk: bool = True
    soft_topk_temperature: float = 0.5
    auto_topk: bool = False
    auto_topk_threshold: float = 0.5
    sparse_mode: bool = False


Stats = Optional[Dict[str, torch.Tensor]]


# --- n-gram anchors ---------------------------------------------------------------------------------


def anchor_positions(tokens: int, n_gram: int) -> list:
    """The routed positions: the last position of every group of n consecutive positions."""
    anchors = []
    start = 0
    while start < tokens:
        anchors.append(min(start + n_gram, tokens) - 1)
        start += n_gram
    return anchors


def expand_anchors(values: torch.Tensor, tokens: int, n_gram: int) -> torch.Tensor:
    """(B, anchors, D) -> (B, tokens, D): position t takes the value of its group (t // n)."""
    group_of = [t // n_gram for t in range(tokens)]
    return values[:, group_of, :]


# --- routing -------------------------------------------------------------------------------------------


def draw_jitter(shape, eps: float, dtype: torch.dtype, device) -> torch.Tensor:
    """The original's jitter: a fresh Uniform(1 - eps, 1 + eps) tensor like the logits."""
    return torch.empty(shape, dtype=dtype, device=device).uniform_(1.0 - eps, 1.0 + eps)


def routing_probs(frozen_slice: torch.Tensor, adapter_slice: Optional[torch.Tensor], options: OriginalOptions,
                  jitter: bool) -> torch.Tensor:
    """Softmax over the experts of the max-abs-normalized, gamma-blended features (step 5-7).
    `adapter_slice` None: SliceFine's frozen-only routing."""
    frozen_scale = frozen_slice.abs().max().clamp_min(SCALE_EPS)
    if adapter_slice is None:
        logits = frozen_slice / frozen_scale
    else:
        adapter_scale = adapter_slice.abs().max().clamp_min(SCALE_EPS)
        gamma_r = options.gamma_routing
        logits = (1.0 - gamma_r) * (frozen_slice / frozen_scale) + gamma_r * (adapter_slice / adapter_scale)
    logits = logits * (1.0 / max(options.temperature, SCALE_EPS))
    if jitter:
        logits = logits * draw_jitter(logits.shape, options.jitter_noise, logits.dtype, logits.device)
    return torch.softmax(logits, dim=-1)


def mix_experts(probs: torch.Tensor, LiMEs: torch.Tensor, options: OriginalOptions):
    """Step 8, token by token: `(p_mix, counted)` with `p_mix` (B, N, Dout) and `counted` (B, N, E) the
    number of times each expert is counted by `load` at each routed position."""
    batch, positions, num_experts = probs.shape
    k = options.top_k
    rows = []
    counted = torch.zeros(batch, positions, num_experts, dtype=torch.long)
    for b in range(batch):
        row = []
        for n in range(positions):
            p = probs[b, n]
            order = torch.topk(p.detach(), num_experts).indices.tolist()  # experts by decreasing prob
            if options.sparse_mode and options.auto_topk:
                max_k = min(2 * k, num_experts)
                candidates = order[:max_k]
                threshold = options.auto_topk_threshold * p.max()
                kept = [e for e in candidates if bool(p[e] >= threshold)]
                if not kept:  # cannot happen for threshold <= 1; the original falls back to the arg-max
                    kept = candidates[:1]
                total = sum(p[e] for e in kept).clamp_min(WEIGHT_EPS)
                vector = sum(p[e] / total * LiMEs[e] for e in kept)
                for e in candidates:
                    counted[b, n, e] += 1
            elif options.sparse_mode and k == 1:
                vector = LiMEs[order[0]]
                counted[b, n, order[0]] += 1
            elif options.sparse_mode or (not options.auto_topk and not options.soft_topk):
                chosen = order[:k]
                total = sum(p[e] for e in chosen).clamp_min(WEIGHT_EPS)
                vector = sum(p[e] / total * LiMEs[e] for e in chosen)
                for e in chosen:
                    counted[b, n, e] += 1
            else:
                if options.auto_topk:
                    threshold = options.auto_topk_threshold * p.max()
                    for e in range(num_experts):
                        if bool(p[e] >= threshold):
                            counted[b, n, e] += 1
                else:
                    threshold = p[order[k - 1]]
                    for e in order[:k]:
                        counted[b, n, e] += 1
                gated = p * torch.sigmoid((p - threshold) * (1.0 / options.soft_topk_temperature))
                weights = gated / (gated.sum() + WEIGHT_EPS)
                vector = weights @ LiMEs
            row.append(vector)
        rows.append(torch.stack(row))
    return torch.stack(rows), counted


def statistics(probs: torch.Tensor, counted: torch.Tensor, attention_mask: Optional[torch.Tensor],
               training: bool, track_aux: bool) -> Stats:
    """Step 10. `probs` (B, T, E) expanded to every token; `counted` per routed position."""
    if not track_aux:
        return None
    num_experts = probs.shape[-1]
    if not training:
        return {"usage": probs.mean(dim=(0, 1)).detach()}
    if attention_mask is not None:
        weights = attention_mask.to(probs.dtype)
        p_bar = (probs * weights.unsqueeze(-1)).sum(dim=(0, 1)) / weights.sum().clamp_min(1.0)
    else:
        p_bar = probs.mean(dim=(0, 1))
    importance = num_experts * (p_bar * p_bar).sum() - 1.0
    counts = counted.sum(dim=(0, 1)).to(probs.dtype)
    share = counts / counts.sum().clamp_min(1.0)
    load = (num_experts * (share * share).sum() - 1.0).detach()
    kl_uniform = (p_bar * (p_bar.clamp_min(LOG_EPS).log() + math.log(num_experts))).sum()
    return {"importance": importance, "load": load, "kl_uniform": kl_uniform, "usage": p_bar.detach()}


def route_and_mix(frozen_slice, adapter_slice, LiMEs, options: OriginalOptions, tokens: int, use_ngram: bool,
                  training: bool):
    """Steps 4-8: `(p_mix (B, T, Dout), probs (B, T, E), counted)`. Draws the jitter (after the caller's dropout)."""
    n_gram = options.n_gram if use_ngram else 1
    if n_gram > 1:
        anchors = anchor_positions(tokens, n_gram)
        frozen_slice = frozen_slice[:, anchors, :]
        adapter_slice = None if adapter_slice is None else adapter_slice[:, anchors, :]
    jitter = training and options.jitter_noise > 0
    probs = routing_probs(frozen_slice, adapter_slice, options, jitter)
    p_mix, counted = mix_experts(probs, LiMEs, options)
    if n_gram > 1:
        p_mix = expand_anchors(p_mix, tokens, n_gram)
        probs = expand_anchors(probs, tokens, n_gram)
    return p_mix, probs, counted


# --- helpers -------------------------------------------------------------------------------------------


def _as_sequences(x: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    if x.dim() == 2:
        return x.unsqueeze(1), True
    return x, False


def _masked(out: torch.Tensor, fallback: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    if attention_mask is None:
        return out
    keep = attention_mask.bool()
    if keep.dim() == 2:
        keep = keep.unsqueeze(-1)
    return torch.where(keep, out, fallback)


def _dropped(x: torch.Tensor, dropout: float, training: bool) -> torch.Tensor:
    if training and dropout > 0:
        return F.dropout(x, p=dropout, training=True)
    return x


def _cast(t: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(dtype)


def _modulation(delta, p_mix, LiME_shared, gamma):
    routed = delta * p_mix
    if LiME_shared is not None:
        routed = routed + gamma * (delta * LiME_shared)
    return routed


# --- LoRA and LoRA-FA ----------------------------------------------------------------------------------


def lora_forward(x, W, b, A, B, LiMEs, LiME_shared, gamma, options: OriginalOptions, scaling: float,
                 attention_mask=None, training=False, dropout=0.0, track_aux=True, variant="lora"):
    """LoRALiMELinear (variant 'lora': n_gram ignored) and LoRAFALiMELinear ('lora_fa': n_gram anchors).
    `W` (Dout, Din), `b` (Dout) or None, `A` (r, Din), `B` (Dout, r). Returns `(out, stats)`."""
    if variant not in ("lora", "lora_fa"):
        raise ValueError(f"variant must be 'lora' or 'lora_fa'; got {variant!r}")
    x, is_cls = _as_sequences(x)
    frozen = F.linear(x, W.to(x.dtype), _cast(b, x.dtype))
    dtype = frozen.dtype
    A, B, LiMEs = A.to(dtype), B.to(dtype), LiMEs.to(dtype)
    LiME_shared, gamma = _cast(LiME_shared, dtype), _cast(gamma, dtype)
    x_d = _dropped(x, dropout, training)
    delta = (x_d @ A.t()) @ B.t() * scaling
    E = options.num_experts
    p_mix, probs, counted = route_and_mix(frozen[:, :, :E], delta[:, :, :E], LiMEs, options, x.shape[1],
                                          use_ngram=variant == "lora_fa", training=training)
    stats = statistics(probs, counted, attention_mask, training, track_aux)
    out = _masked(frozen + _modulation(delta, p_mix, LiME_shared, gamma), frozen, attention_mask)
    return (out.squeeze(1) if is_cls else out), stats


def lora_fa_forward(*args, **kwargs):
    """LoRA-FA: the LoRA computation with the n-gram anchors (A is frozen by the caller)."""
    return lora_forward(*args, variant="lora_fa", **kwargs)


# --- DoRA ----------------------------------------------------------------------------------------------


def dora_magnitude(W, A, B, m, scaling: float) -> torch.Tensor:
    """`m / max(||W + s B A||_row, 1e-8)`, the norm not detached."""
    directions = W + (B @ A) * scaling
    return m / directions.norm(p=2, dim=1).clamp_min(NORM_FLOOR)


def dora_forward(x, W, b, A, B, m, LiMEs, LiME_shared, gamma, options: OriginalOptions, scaling: float,
                 attention_mask=None, training=False, dropout=0.0, track_aux=True):
    """DoRALiMELinear. Returns `(out, stats)`."""
    x, is_cls = _as_sequences(x)
    dtype = x.dtype
    W, b, A, B, m, LiMEs = W.to(dtype), _cast(b, dtype), A.to(dtype), B.to(dtype), m.to(dtype), LiMEs.to(dtype)
    LiME_shared, gamma = _cast(LiME_shared, dtype), _cast(gamma, dtype)
    x_d = _dropped(x, dropout, training)
    mag = dora_magnitude(W, A, B, m, scaling)
    frozen = F.linear(x_d, W, b) * mag  # the bias is rescaled too
    delta = ((x_d @ A.t()) @ B.t() * scaling) * mag
    adapted = frozen + delta  # the frozen side of the routing
    E = options.num_experts
    p_mix, probs, counted = route_and_mix(adapted[:, :, :E], delta[:, :, :E], LiMEs, options, x.shape[1],
                                          use_ngram=True, training=training)
    stats = statistics(probs, counted, attention_mask, training, track_aux)
    out = _masked(frozen + _modulation(delta, p_mix, LiME_shared, gamma), frozen, attention_mask)
    return (out.squeeze(1) if is_cls else out), stats


# --- SliceFine -----------------------------------------------------------------------------------------


def slicefine_forward(x, W, b, part_T, LiMEs, LiME_shared, gamma, options: OriginalOptions,
                      attention_mask=None, training=False, dropout=0.0, track_aux=True):
    """SliceFineLiMELinear (row mode). `part_T` (r, Din) is the trainable copy of W's first r rows; the
    frozen rows are `W[r:]`; `b` is the (trainable, in the original) bias. Returns `(out, stats)`."""
    x, is_cls = _as_sequences(x)
    dtype = x.dtype
    rank = part_T.shape[0]
    part_T, part_F, b, LiMEs = part_T.to(dtype), W[rank:].to(dtype), _cast(b, dtype), LiMEs.to(dtype)
    LiME_shared, gamma = _cast(LiME_shared, dtype), _cast(gamma, dtype)
    x_d = _dropped(x, dropout, training)
    out_T = F.linear(x_d, part_T)  # (B, T, r): the trainable rows
    out_F = F.linear(x_d, part_F)  # (B, T, Dout - r): the frozen rows
    E = options.num_experts
    # The routing reads the first E channels of the whole product (no bias), and nothing else.
    product = torch.cat([out_T, out_F], dim=-1)
    p_mix, probs, counted = route_and_mix(product[:, :, :E], None, LiMEs, options, x.shape[1],
                                          use_ngram=True, training=training)
    stats = statistics(probs, counted, attention_mask, training, track_aux)
    modulation = p_mix[:, :, :rank]
    if LiME_shared is not None:
        routed_T = out_T * modulation + gamma * out_T * LiME_shared[:rank]
    else:
        routed_T = out_T * modulation
    out = torch.cat([routed_T, out_F], dim=-1)
    unrouted = product
    if b is not None:
        out = out + b
        unrouted = unrouted + b
    out = _masked(out, unrouted, attention_mask)
    return (out.squeeze(1) if is_cls else out), stats


# --- prompt tuning -------------------------------------------------------------------------------------


def conditioning_mean(inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, H): the mean of the input embeddings, over the tokens with mask 1 when a mask is given (the
    original's manual call), over every token (padding included) without one (its model-forward wrapper)."""
    if attention_mask is None:
        return inputs_embeds.mean(dim=1)
    weights = attention_mask.unsqueeze(-1).to(inputs_embeds.dtype)
    return (inputs_embeds * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def prompt_forward(inputs_embeds, prompt_base, prompt_delta, LiMEs, LiME_shared, gamma, options: OriginalOptions,
                   attention_mask=None, input_proj=None, input_conditioned=True, training=False,
                   prompt_dropout=0.0, track_aux=True):
    """LiMEPromptTuning.get_prompt_embeddings: the (B, V, H) prompts, cast to the input's dtype, and the stats.

    `attention_mask` is the mask the conditioning mean sees: pass None to reproduce the original's
    model-forward wrapper (padding averaged in). `input_proj` (H, H) is the conditioning projection's
    weight (identity at init), None for no projection. The prompt statistics take no mask (every
    virtual token counts). Draws: the jitter, then the prompts' dropout.
    """
    batch = inputs_embeds.shape[0]
    dtype = prompt_delta.dtype
    LiMEs = LiMEs.to(dtype)
    LiME_shared, gamma = _cast(LiME_shared, dtype), _cast(gamma, dtype)
    V = prompt_delta.shape[0]
    E = options.num_experts
    if input_conditioned:
        representation = conditioning_mean(inputs_embeds.to(dtype), attention_mask)
        if input_proj is not None:
            representation = representation @ input_proj.to(dtype).t()
        frozen = prompt_base.to(dtype).unsqueeze(0) + representation.unsqueeze(1)  # (B, V, H)
        delta = prompt_delta.unsqueeze(0).expand(batch, -1, -1)
    else:
        # The static prompts are routed once, as a batch of one, then repeated over the batch.
        frozen = prompt_base.to(dtype).unsqueeze(0)
        delta = prompt_delta.unsqueeze(0)
    p_mix, probs, counted = route_and_mix(frozen[:, :, :E], delta[:, :, :E], LiMEs, options, V,
                                          use_ngram=True, training=training)
    stats = statistics(probs, counted, None, training, track_aux)
    prompts = frozen + _modulation(delta, p_mix, LiME_shared, gamma)
    if not input_conditioned:
        prompts = prompts.expand(batch, -1, -1).clone()
    if training and prompt_dropout > 0:
        prompts = F.dropout(prompts, p=prompt_dropout, training=True)
    return prompts.to(inputs_embeds.dtype), stats


def prepend_prompts(prompts, inputs_embeds, attention_mask=None, labels=None):
    """The original's integration: prompts before the embeddings, mask ones and labels -100 for them."""
    batch, V = prompts.shape[0], prompts.shape[1]
    embeds = torch.cat([prompts, inputs_embeds], dim=1)
    mask = None
    if attention_mask is not None:
        mask = torch.cat([torch.ones(batch, V, dtype=attention_mask.dtype, device=attention_mask.device),
                          attention_mask], dim=1)
    new_labels = None
    if labels is not None:
        new_labels = torch.cat([torch.full((batch, V), -100, dtype=labels.dtype, device=labels.device), labels], dim=1)
    return embeds, mask, new_labels


# --- embeddings ----------------------------------------------------------------------------------------


def embedding_forward(input_ids, weight, A, B, LiMEs, LiME_shared, gamma, options: OriginalOptions, scaling: float,
                      attention_mask=None, pad_token_id=None, training=False, track_aux=True, variant="lora"):
    """LoRALiMEEmbedding ('lora': `delta = s emb A^T B^T`, A (r, H), B (H, r), n_gram ignored) and
    LoRAFALiMEEmbedding ('lora_fa': `delta = (s B A)[ids]`, A (r, H), B (num_embeddings, r), n-gram anchors).
    `weight` is the embedding table. No dropout. Returns `(out, stats)`."""
    if variant not in ("lora", "lora_fa"):
        raise ValueError(f"variant must be 'lora' or 'lora_fa'; got {variant!r}")
    frozen = F.embedding(input_ids, weight)
    dtype = frozen.dtype
    A, B, LiMEs = A.to(dtype), B.to(dtype), LiMEs.to(dtype)
    LiME_shared, gamma = _cast(LiME_shared, dtype), _cast(gamma, dtype)
    if attention_mask is None and pad_token_id is not None:
        attention_mask = input_ids != pad_token_id
    if variant == "lora":
        delta = (frozen @ A.t()) @ B.t() * scaling
    else:
        delta = F.embedding(input_ids, (B @ A) * scaling)
    E = options.num_experts
    p_mix, probs, counted = route_and_mix(frozen[:, :, :E], delta[:, :, :E], LiMEs, options, input_ids.shape[1],
                                          use_ngram=variant == "lora_fa", training=training)
    stats = statistics(probs, counted, attention_mask, training, track_aux)
    out = _masked(frozen + _modulation(delta, p_mix, LiME_shared, gamma), frozen, attention_mask)
    return out, stats


# --- initialization -------------------------------------------------------------------------------------


def initial_parameters(variant: str, W: torch.Tensor, b: Optional[torch.Tensor], num_experts: int, rank: int,
                       LiME_init_std: float = 0.1, use_shared_LiME: bool = True, dtype=torch.float32) -> Dict:
    """The parameters the original's linear classes create, drawn from torch's global generator in their
    order: A (kaiming-uniform, a = sqrt 5), B (zeros), [DoRA: m = row norms of W], LiMEs (uniform
    1 +- std), LiME_shared (normal * 0.1; SliceFine: zeros), gamma (zero). SliceFine: part_T = W[:r], bias = b."""
    out_features, in_features = W.shape
    params: Dict[str, Optional[torch.Tensor]] = {}
    if variant == "slicefine":
        params["part_T"] = W[:rank].detach().clone().to(dtype)
        params["bias"] = None if b is None else b.detach().clone().to(dtype)
    else:
        A = torch.empty(rank, in_features, dtype=dtype)
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        params["A"] = A
        params["B"] = torch.zeros(out_features, rank, dtype=dtype)
        if variant == "dora":
            params["m"] = W.detach().norm(p=2, dim=1).to(dtype)
    params["LiMEs"] = torch.empty(num_experts, out_features, dtype=dtype).uniform_(1.0 - LiME_init_std,
                                                                                  1.0 + LiME_init_std)
    if use_shared_LiME:
        if variant == "slicefine":
            params["LiME_shared"] = torch.zeros(out_features, dtype=dtype)
        else:
            params["LiME_shared"] = torch.randn(out_features, dtype=dtype) * 0.1
        params["gamma"] = torch.zeros(1, dtype=dtype)
    return params
