"""Where LiME's host time goes on small layers, against MoE-LoRA and PEFT LoRA: the experiments behind the
README's "Where the host decides".

    PYTHONPATH=. python -m benchmarks.host_gap [--rounds N] [--skip-compiled] [--out DIR]

On the CPU, float32, every comparison times its variants interleaved in one process
(`measure.interleaved_ms`), so the ratios between them do not carry the machine's drift:

1. `layer`: one layer (4 x 32 tokens, 64 -> 64, r = 8, E = 4) forward + backward, eager: LiME's reference
   backend, LiME's C++ CPU operators (`lime-cpu`), PEFT LoRA, MoE-LoRA; and the same layer under `torch.compile(layer)`, LiME also with
   `jitter_noise=0` and with the routing features cut from the gradient (`base[..., :E]` and
   `delta[..., :E]` detached: an experiment that changes the gradient, to weigh what their backward costs).
2. `stand-in`: the tiny LLaVA-OneVision's eager training step (fused AdamW) and greedy generation (4 new
   tokens), LiME on the reference and on the C++ operators beside a LiME whose routing and modulation are
   replaced by one operator each way (`_OneOperatorRouting`), with the adapter's products and everything else
   as they are. Its arithmetic is not LiME's: it bounds what one call forward and one backward (the C++
   operators, as the Triton kernels are on a GPU) could reach.

Prints a markdown table and, with `--out`, writes it to `DIR/host_gap.md`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Sequence
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from measure import interleaved_ms  # noqa: E402
from providers import build_layer, wrap_model  # noqa: E402
from run import README_TARGETS, _compiling, _generation, _model, _random_tokens, _train_step  # noqa: E402

from lime_kernels import eager, reference  # noqa: E402
from lime_kernels.reference import Routed  # noqa: E402

DEVICE = torch.device("cpu")


def _detached_route(base, delta, LiMEs, LiME_shared, gamma, options, valid=None, jitter=None, routing_features=None,
                    history=None):
    """`reference.route` routing from detached features: what the step costs without their backward."""
    if routing_features is None:
        experts = options.num_experts
        routing_features = (base[..., :experts].detach(), delta[..., :experts].detach())
    return reference.route(base, delta, LiMEs, LiME_shared, gamma, options, valid, jitter, routing_features, history)


class _OneOperatorRouting(torch.autograd.Function):
    """The adapter's products as LiME's eager path computes them, then ONE operator in place of the routing and
    the modulation (`base + delta * LiMEs[0]`), and one in place of their backward: a timing stand-in."""

    @staticmethod
    def forward(ctx, adapter_input, base, A, B, LiMEs, scaling):
        flat_input = adapter_input.reshape(-1, adapter_input.shape[-1])
        projected = (flat_input @ A.t()) * scaling
        delta = (projected @ B.t()).view(base.shape)
        ctx.save_for_backward(flat_input, projected, A, B, LiMEs)
        ctx.scaling, ctx.input_shape = scaling, adapter_input.shape
        return torch.addcmul(base, delta, LiMEs[0])

    @staticmethod
    def backward(ctx, grad_out):
        flat_input, projected, A, B, LiMEs = ctx.saved_tensors
        flat_grad_delta = (grad_out * LiMEs[0]).reshape(-1, grad_out.shape[-1])
        grad_B = flat_grad_delta.t() @ projected
        grad_projected = (flat_grad_delta @ B) * ctx.scaling
        grad_A = grad_projected.t() @ flat_input
        grad_input = (grad_projected @ A).view(ctx.input_shape)
        return grad_input, grad_out, grad_A, grad_B, None, None


def _one_operator_lime_linear(adapter_input, base, A, B, LiMEs, LiME_shared, gamma, options, scaling, valid=None,
                              jitter=None, history=None, native=False):
    """`eager.lime_linear`'s signature around `_OneOperatorRouting` (no statistics: probs are None)."""
    if torch.is_grad_enabled():
        return Routed(_OneOperatorRouting.apply(adapter_input, base, A, B, LiMEs, scaling), None, valid)
    delta = ((adapter_input.reshape(-1, adapter_input.shape[-1]) @ A.t()) * scaling) @ B.t()
    return Routed(torch.addcmul(base, delta.view(base.shape), LiMEs[0]), None, valid)


def _within(module, name: str, replacement, call: Callable[[], None]) -> Callable[[], None]:
    """`call` with `module.name` replaced for its duration only. A graph compiled inside guards on that global,
    so each variant keeps its own graph while the variants' calls alternate."""
    def run():
        with mock.patch.object(module, name, replacement):
            call()
    return run


def layer_rows(rounds: int, compiled: bool) -> List[Dict]:
    torch.manual_seed(0)
    x = torch.randn(4, 32, 64, requires_grad=True)
    grad = torch.randn(4, 32, 64)
    layers = {provider: build_layer(provider, nn.Linear(64, 64), 8, 4, 1)
              for provider in ("moe-lora", "peft-lora", "lime-reference", "lime-cpu")}

    def step(module):
        return lambda: module(x).backward(grad)

    rows = []
    eager_times = interleaved_ms({name: step(layer) for name, layer in layers.items()}, DEVICE, rounds, 20)
    rows += [dict(experiment="layer, eager", variant=name, **timing) for name, timing in eager_times.items()]
    if compiled:
        without_jitter = build_layer("lime-reference", nn.Linear(64, 64), 8, 4, 1)
        without_jitter.update_routing(jitter_noise=0.0)
        detached = build_layer("lime-reference", nn.Linear(64, 64), 8, 4, 1)
        steps = {"moe-lora": step(torch.compile(layers["moe-lora"])),
                 "lime-reference": step(torch.compile(layers["lime-reference"])),
                 "lime-reference, jitter_noise=0": step(torch.compile(without_jitter)),
                 "lime-reference, routing features detached (experiment)": _within(
                     eager, "reference_route", _detached_route, step(torch.compile(detached)))}
        with _compiling(len(steps)):
            compiled_times = interleaved_ms(steps, DEVICE, rounds, 20)
        rows += [dict(experiment="layer, torch.compile(layer)", variant=name, **timing)
                 for name, timing in compiled_times.items()]
    return rows


def _tiny(provider: str):
    return wrap_model(provider, _model("tiny", DEVICE, torch.float32), README_TARGETS, rank=8, experts=4)


def stand_in_rows(rounds: int) -> List[Dict]:
    """The tiny model's eager training step and generation: PEFT LoRA, MoE-LoRA, LiME, and LiME with
    `_OneOperatorRouting` (the stand-in's models run with `eager.lime_linear` replaced, the others without)."""
    providers = {"peft-lora": "peft-lora", "moe-lora": "moe-lora", "lime-reference": "lime-reference",
                 "lime-cpu": "lime-cpu", "lime-reference, one-operator routing (stand-in)": "lime-reference"}

    def with_stand_in(name: str, call: Callable[[], None]) -> Callable[[], None]:
        if "stand-in" in name:
            return _within(eager, "lime_linear", _one_operator_lime_linear, call)
        return call

    rows, steps, generations = [], {}, {}
    for name, provider in providers.items():
        model = _tiny(provider).train()
        input_ids = _random_tokens(model, (4, 32), DEVICE)
        inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids)
        steps[name] = with_stand_in(name, _train_step(model, inputs, "eager"))
        model_for_generation = _tiny(provider).eval()
        prompt = _random_tokens(model_for_generation, (1, 8), DEVICE)
        generations[name] = with_stand_in(name, _generation(model_for_generation, prompt, 4, "eager"))
    rows += [dict(experiment="tiny LLaVA-OneVision training step, eager", variant=name, **timing)
             for name, timing in interleaved_ms(steps, DEVICE, rounds, 3).items()]
    rows += [dict(experiment="tiny LLaVA-OneVision generation (4 tokens), eager", variant=name, **timing)
             for name, timing in interleaved_ms(generations, DEVICE, max(rounds // 2, 2), 2).items()]
    return rows


def table(rows: List[Dict]) -> str:
    """Per experiment, each variant's median time and its ratio to moe-lora's and peft-lora's (where measured)."""
    lines = ["| experiment | variant | median ms | p20-p80 ms | time / moe-lora | time / peft-lora |",
             "|:--|:--|--:|--:|--:|--:|"]
    for experiment in dict.fromkeys(row["experiment"] for row in rows):
        mine = [row for row in rows if row["experiment"] == experiment]
        baseline = {row["variant"]: row["p50"] for row in mine}
        for row in mine:
            ratios = [f"{row['p50'] / baseline[name]:.3f}" if name in baseline else "-"
                      for name in ("moe-lora", "peft-lora")]
            lines.append(f"| {experiment} | {row['variant']} | {row['p50']:.3f} | {row['p20']:.3f}-{row['p80']:.3f} | "
                         f"{ratios[0]} | {ratios[1]} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1000, help="interleaved rounds per layer comparison "
                        "(the model comparisons take a fifth of them)")
    parser.add_argument("--skip-compiled", action="store_true", help="no torch.compile(layer) comparison")
    parser.add_argument("--out", default=None, help="directory for host_gap.md")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error(f"--rounds must be at least 2 (percentiles need two samples); got {args.rounds}")
    rows = layer_rows(args.rounds, not args.skip_compiled) + stand_in_rows(max(args.rounds // 5, 2))
    text = table(rows)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "host_gap.md"), "w") as handle:
            handle.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
