"""A second, plainly written LiME layer: loops over sequences, tokens and experts.

Written from `docs/lime-semantics.md` alone, without looking at `lime_kernels.reference`'s
vectorized tricks (shifted sums, scatters, masked where), so that the two can disagree. Slow by
design: use small shapes, float64.
"""

from __future__ import annotations

import math

import torch


def _mean(vectors):
    total = vectors[0]
    for vector in vectors[1:]:
        total = total + vector
    return total / len(vectors)


def _sigmoid(value):
    return 1.0 / (1.0 + torch.exp(-value))


def loop_lime(x, weight, bias, A, B, LiMEs, LiME_shared, gamma, *, options, scaling, mask=None, jitter=None, adapter_input=None):
    """Returns (out, stats) with stats = dict(importance, kl_uniform, load, usage, active_experts).

    `adapter_input` (default `x`) feeds the adapter only: the input after dropout.
    """
    if adapter_input is None:
        adapter_input = x
    batch, tokens, _ = x.shape
    num_experts = options.num_experts
    n = options.n_gram
    valid = [[mask is None or bool(mask[b, t]) for t in range(tokens)] for b in range(batch)]

    base, delta = {}, {}
    for b in range(batch):
        for t in range(tokens):
            frozen = weight @ x[b, t]
            if bias is not None:
                frozen = frozen + bias
            base[b, t] = frozen
            delta[b, t] = scaling * (B @ (A @ adapter_input[b, t]))

    def representation(source):
        feature = {}
        for b in range(batch):
            members_of_sequence = [t for t in range(tokens) if valid[b][t]]
            for t in range(tokens):
                own = source[b, t][:num_experts]
                if options.rep_mode == "mean":
                    feature[b, t] = _mean([source[b, s][:num_experts] for s in members_of_sequence]) if members_of_sequence else own
                elif options.rep_mode == "last":
                    feature[b, t] = source[b, members_of_sequence[-1]][:num_experts] if members_of_sequence else own
                elif n == 1:
                    feature[b, t] = own
                elif options.ngram_mode == "window":
                    if valid[b][t]:
                        window = [s for s in range(max(0, t - n + 1), t + 1) if valid[b][s]]
                        feature[b, t] = _mean([source[b, s][:num_experts] for s in window])
                    else:
                        feature[b, t] = own
                else:  # anchor
                    group = t // n
                    anchor = min(group * n + n - 1, tokens - 1)
                    feature[b, t] = source[b, anchor][:num_experts]
        return feature

    def normalized(feature):
        out = {}
        if options.router == "maxabs":
            largest = None
            for key in feature:
                for e in range(num_experts):
                    value = feature[key][e].abs()
                    largest = value if largest is None or value > largest else largest
            scale = torch.clamp(largest, min=1e-6)
            for key in feature:
                out[key] = feature[key] / scale
        else:
            for key in feature:
                squares = sum(feature[key][e] ** 2 for e in range(num_experts))
                out[key] = feature[key] / torch.clamp(torch.sqrt(squares), min=1e-6)
        return out

    frozen_hat = normalized(representation(base))
    adapted_hat = normalized(representation(delta))

    outputs, probs_of, chosen_of = {}, {}, {}
    gamma_r = options.gamma_routing
    for b in range(batch):
        for t in range(tokens):
            logits = [((1 - gamma_r) * frozen_hat[b, t][e] + gamma_r * adapted_hat[b, t][e]) / options.temperature
                      for e in range(num_experts)]
            if jitter is not None:
                logits = [logits[e] * jitter[b * tokens + t, e] for e in range(num_experts)]
            exps = [torch.exp(logit) for logit in logits]
            total = sum(exps)
            probs = [value / total for value in exps]
            order = sorted(range(num_experts), key=lambda e: -probs[e].item())
            largest = probs[order[0]]
            k = options.top_k

            def soft(threshold):
                gated = [probs[e] * _sigmoid((probs[e] - threshold) / options.soft_topk_temperature) for e in range(num_experts)]
                denominator = sum(gated) + 1e-9
                return [value / denominator for value in gated]

            def renormalize(kept):
                denominator = torch.clamp(sum(probs[e] for e in kept), min=1e-9)
                return [probs[e] / denominator if e in kept else probs[e] * 0 for e in range(num_experts)]

            if options.auto_topk and not options.sparse_mode:
                weights = soft(options.auto_topk_threshold * largest)
                chosen = [e for e in range(num_experts) if probs[e] >= options.auto_topk_threshold * largest]
            elif options.auto_topk:
                candidates = order[: min(2 * k, num_experts)]
                chosen = [e for e in candidates if probs[e] >= options.auto_topk_threshold * largest]
                weights = renormalize(chosen)
            elif options.soft_topk and not options.sparse_mode:
                weights = soft(probs[order[k - 1]])
                chosen = order[:k]
            else:
                chosen = order[:k]
                weights = renormalize(chosen)

            modulation = sum(weights[e] * LiMEs[e] for e in range(num_experts))
            if LiME_shared is not None:
                modulation = modulation + gamma[0] * LiME_shared
            outputs[b, t] = base[b, t] + delta[b, t] * modulation if valid[b][t] else base[b, t]
            probs_of[b, t] = probs
            chosen_of[b, t] = chosen

    out = torch.stack([torch.stack([outputs[b, t] for t in range(tokens)]) for b in range(batch)])

    valid_keys = [(b, t) for b in range(batch) for t in range(tokens) if valid[b][t]]
    count = max(len(valid_keys), 1)
    usage = [sum((probs_of[key][e] for key in valid_keys), torch.zeros((), dtype=x.dtype)) / count for e in range(num_experts)]
    # No valid token: no statistic (importance and load would read -1 otherwise).
    importance = num_experts * sum(value ** 2 for value in usage) - 1 if valid_keys else torch.zeros((), dtype=x.dtype)
    kl_uniform = sum(value * (torch.log(torch.clamp(value, min=1e-8)) + math.log(num_experts)) for value in usage)
    selections = [sum(1 for key in valid_keys if e in chosen_of[key]) for e in range(num_experts)]
    total_selections = max(sum(selections), 1)
    load = num_experts * sum((s / total_selections) ** 2 for s in selections) - 1 if valid_keys else 0.0
    active = sum(len(chosen_of[key]) for key in valid_keys) / count
    histogram = [sum(1 for key in valid_keys if len(chosen_of[key]) == n) for n in range(num_experts + 1)]
    stats = dict(importance=importance, kl_uniform=kl_uniform, load=load, usage=torch.stack(usage), active_experts=active,
                 active_histogram=histogram)
    return out, stats
