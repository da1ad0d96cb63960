"""LiME's benchmarks: layers and training steps against the frozen linear, PEFT LoRA and MoE-LoRA.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--dtype bfloat16] [--out DIR]

Every measurement runs in this one process on one device. The layer sweeps time one provider after
another; the training-step and decode sweeps build every provider's model (or layer) first and time
them interleaved (`measure.interleaved_ms`: each round runs every provider once), so that the drift of
a shared machine (20% between minutes on a busy CPU host) falls on every provider alike instead of on
the ratios between them.

Writes `DIR/results.csv` (one row per measurement, appended as it is measured, so an interrupted run
keeps what it measured), one PNG per sweep, and `DIR/summary.md` (printed last): each provider's time as
a ratio to `frozen-linear` and to `peft-lora`, and its trainable parameters.

Sweeps (layers: forward, backward and forward+backward; time, peak CUDA memory, saved activations):
- `projections`: the q, k, v, o, gate, up, down projections of LLaVA-OneVision 0.5B and 7B (Qwen2)
  and SigLIP's q, k, v, out_proj, fc1, fc2, at several token counts (r = 8, E = 4, n-gram 1);
- `grid`: the 7B q_proj over r in {2, 8, 16}, E in {4, 8}, n-gram in {1, 3};
- `train-step`: samples/s and peak memory of a LLaVA-OneVision-shaped model (random weights) trained
  with each provider on the README's targets (text-only batches: the language model dominates; fused
  AdamW, the Trainer's default), eager and under `torch.compile`;
- `decode`: generation-sized calls: the 7B q_proj's forward (eval, no gradient) at 1 to 64 tokens,
  and tokens/s of greedy `generate` on the same model, the frozen model included.
`--quick` runs small shapes and few repeats (on the CPU: every provider but `lime-fused`, in minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import math
import os
import subprocess
import sys
from typing import Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from measure import interleaved_ms, peak_memory_mib, saved_mib, time_ms  # noqa: E402
from providers import LAYER_PROVIDERS, MODEL_PROVIDERS, available, build_layer, trainable_parameters, wrap_model  # noqa: E402

# (name, in_features, out_features) of LLaVA-OneVision's projections.
QWEN2_05B = [("0.5b-q_proj", 896, 896), ("0.5b-k_proj", 896, 128), ("0.5b-v_proj", 896, 128),
             ("0.5b-o_proj", 896, 896), ("0.5b-gate_proj", 896, 4864), ("0.5b-up_proj", 896, 4864),
             ("0.5b-down_proj", 4864, 896)]
QWEN2_7B = [("7b-q_proj", 3584, 3584), ("7b-k_proj", 3584, 512), ("7b-v_proj", 3584, 512), ("7b-o_proj", 3584, 3584),
            ("7b-gate_proj", 3584, 18944), ("7b-up_proj", 3584, 18944), ("7b-down_proj", 18944, 3584)]
SIGLIP = [("siglip-q_proj", 1152, 1152), ("siglip-k_proj", 1152, 1152), ("siglip-v_proj", 1152, 1152),
          ("siglip-out_proj", 1152, 1152), ("siglip-fc1", 1152, 4304), ("siglip-fc2", 4304, 1152)]
README_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj")
FIELDS = ("benchmark", "provider", "mode", "metric", "unit", "shape", "tokens", "rank", "experts", "n_gram", "p50",
          "p20", "p80", "dtype", "device", "torch", "triton", "commit")


def plan(quick: bool, device: torch.device) -> Dict:
    if quick:
        return {"projections": dict(shapes=[QWEN2_05B[0], QWEN2_05B[6]], tokens=[128], ranks=[8], experts=[4],
                                    n_grams=[1]),
                "grid": dict(shapes=[QWEN2_05B[0]], tokens=[128], ranks=[2, 16], experts=[4, 8], n_grams=[1, 3]),
                # A call or a 4-token generation takes milliseconds at most: many interleaved rounds cost
                # little and steady the ratios on a noisy host.
                "decode": dict(shape=QWEN2_05B[0], tokens=[1, 16], rank=8, experts=4, prompt=8, new_tokens=4,
                               generate_repeats=20 if device.type == "cpu" else 5,
                               call_repeats=200 if device.type == "cpu" else 100),
                "repeats": 5 if device.type == "cpu" else 50, "warmup": 2 if device.type == "cpu" else 10,
                "model": "tiny", "batch": 4, "seq": 32, "steps": 80 if device.type == "cpu" else 20}  # steps: rounds
    return {"projections": dict(shapes=QWEN2_05B + QWEN2_7B + SIGLIP, tokens=[2048, 8192], ranks=[8], experts=[4],
                                n_grams=[1]),
            "grid": dict(shapes=[QWEN2_7B[0]], tokens=[8192], ranks=[2, 8, 16], experts=[4, 8], n_grams=[1, 3]),
            "decode": dict(shape=QWEN2_7B[0], tokens=[1, 4, 16, 64], rank=8, experts=4, prompt=64, new_tokens=32,
                           generate_repeats=5, call_repeats=100),
            "repeats": 100, "warmup": 10, "model": "0.5b", "batch": 4, "seq": 1024, "steps": 20}


def git_commit() -> str:
    """The checkout's commit, or "" where there is none (a copy of the tree without `.git`, no git)."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def _versions(device: torch.device, commit: str = "") -> Dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "triton": triton_version,
            "commit": commit or git_commit()[:12] or "unknown"}


def operator_counts(forward: Callable[[], torch.Tensor], grad: Optional[torch.Tensor] = None):
    """The ATen operators one forward and its backward dispatch (`lime_kernels.accounting`): on small
    layers, host time goes with their number."""
    from lime_kernels.accounting import account

    with account() as recorded_forward:
        output = forward()
    with account() as recorded_backward:
        output.backward(grad)
    return len(recorded_forward.ops), len(recorded_backward.ops)


def _measure_layer(layer, x, grad, device, repeats: int, warmup: int) -> List[Dict]:
    """Time forward, backward and forward+backward; peak memory, saved activations, trainable parameters."""
    output = layer(x)

    def forward():
        layer(x)

    def backward():
        output.backward(grad, retain_graph=True)

    def full():
        layer(x).backward(grad)

    rows = [dict(mode=mode, metric="time", unit="ms", **time_ms(step, device, repeats, warmup))
            for mode, step in (("forward", forward), ("backward", backward), ("full", full))]
    forward_ops, backward_ops = operator_counts(lambda: layer(x), grad)
    rows += [dict(mode=mode, metric="operators", unit="count", p50=count, p20=count, p80=count)
             for mode, count in (("forward", forward_ops), ("backward", backward_ops))]
    memory = peak_memory_mib(full, device)
    saved = saved_mib(lambda: layer(x))
    return rows + [dict(mode="full", metric="peak_memory", unit="MiB", p50=memory, p20=memory, p80=memory),
                   dict(mode="forward", metric="saved_activations", unit="MiB", p50=saved, p20=saved, p80=saved),
                   dict(mode="-", metric="trainable_parameters", unit="count", p50=trainable_parameters(layer),
                        p20="", p80="")]


def layer_sweep(name: str, sweep: Dict, providers: List[str], device, dtype, repeats: int, warmup: int,
                versions: Dict, on_rows: Optional[Callable[[List[Dict]], None]] = None) -> List[Dict]:
    """Every setting of `sweep` for every provider; `on_rows` gets each layer's rows as they are measured."""
    rows = []
    for shape, d_in, d_out in sweep["shapes"]:
        for tokens in sweep["tokens"]:
            for rank in sweep["ranks"]:
                for experts in sweep["experts"]:
                    for n_gram in sweep["n_grams"]:
                        torch.manual_seed(0)
                        x = torch.randn(4, tokens // 4, d_in, device=device, dtype=dtype, requires_grad=True)
                        grad = torch.randn(4, tokens // 4, d_out, device=device, dtype=dtype)
                        for provider in providers:
                            linear = torch.nn.Linear(d_in, d_out, device=device, dtype=dtype)
                            layer = build_layer(provider, linear, rank, experts, n_gram)
                            common = dict(benchmark=name, provider=provider, shape=f"{shape} {d_in}x{d_out}",
                                          tokens=tokens, rank=rank, experts=experts, n_gram=n_gram,
                                          dtype=str(dtype).removeprefix("torch."), **versions)
                            measured = [dict(common, **row) for row in _measure_layer(layer, x, grad, device,
                                                                                      repeats, warmup)]
                            rows += measured
                            if on_rows is not None:
                                on_rows(measured)
        print(f"  {name}: {shape} done", flush=True)
    return rows


def _model(size: str, device, dtype):
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config,
                              SiglipVisionConfig)

    from lime.tiny import build_tiny_llava_onevision

    if size == "tiny":
        return build_tiny_llava_onevision(seed=0, dtype=dtype)[0].to(device)
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                                image_size=384, patch_size=14, vision_use_head=False)
    text = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        return LlavaOnevisionForConditionalGeneration(LlavaOnevisionConfig(vision_config=vision, text_config=text)).to(dtype)


MODES = ("eager", "compiled")


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def _compiling(models: int):
    """A fresh dynamo (`torch._dynamo.reset()`) for `models` models compiled side by side, its recompile
    limits (`recompile_limit` and `accumulated_recompile_limit`, formerly `cache_size_limit` and
    `accumulated_cache_size_limit`) raised `models`-fold until the block ends: dynamo caches graphs by
    code object, which models of one class share, so each model's graphs count against the limit of
    them all (past it, dynamo would run the next model eager)."""
    torch._dynamo.reset()
    config = torch._dynamo.config
    return config.patch(recompile_limit=models * config.recompile_limit,
                        accumulated_recompile_limit=models * config.accumulated_recompile_limit)


def _per_second(timing: Dict[str, float], amount: int) -> Dict[str, float]:
    """`amount` items per second at the times (ms) of `timing`: the 20th percentile rate is that of the 80th
    percentile time, and the other way round."""
    return {key: 1e3 * amount / timing[other] for key, other in (("p50", "p50"), ("p20", "p80"), ("p80", "p20"))}


def _random_tokens(model, shape, device) -> torch.Tensor:
    """Token ids of `shape` from seed 0 (the same for every provider) in [10, the model's vocabulary)."""
    config = model.config.text_config if hasattr(model.config, "text_config") else model.config
    torch.manual_seed(0)
    return torch.randint(10, config.vocab_size, shape, device=device)


TRAIN_WARMUP = 2  # untimed steps; a compiled model's first step compiles it


def _train_step(model, inputs: Dict, mode: str) -> Callable[[], None]:
    """An AdamW step of `model` on `inputs`, eager or under `torch.compile(model)`."""
    # fused: transformers' Trainer default from torch 2.8 on (`default_optim = "adamw_torch_fused"` in
    # transformers/training_args.py), what users of lime's trainer get. Asked for explicitly, torch raises
    # at the first step where the device or dtype has no fused kernel instead of falling back to another one.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    call = torch.compile(model) if mode == "compiled" else model

    def step():
        optimizer.zero_grad(set_to_none=True)
        call(**inputs).loss.backward()
        optimizer.step()

    return step


def _train_step_rows(model, inputs: Dict, step: Callable[[], None], timing: Dict[str, float], batch: int, device,
                     mode: str, graph_breaks: Optional[int]) -> List[Dict]:
    """Samples per second (from `timing`, the step's times) and peak memory of `step`; saved activations,
    trainable parameters and the operators of an eager step's forward and backward, or the graph breaks
    of the compiled one."""
    memory = peak_memory_mib(step, device)
    rows = [dict(metric="samples_per_second", unit="samples/s", **_per_second(timing, batch)),
            dict(metric="peak_memory", unit="MiB", p50=memory, p20=memory, p80=memory)]
    if mode == "compiled":
        return rows + [dict(metric="graph_breaks", unit="count", p50=graph_breaks, p20=graph_breaks,
                            p80=graph_breaks)]
    saved = saved_mib(lambda: model(**inputs).loss)
    forward_ops, backward_ops = operator_counts(lambda: model(**inputs).loss)
    return rows + [dict(metric="saved_activations", unit="MiB", p50=saved, p20=saved, p80=saved),
                   dict(metric="operators_forward", unit="count", p50=forward_ops, p20=forward_ops, p80=forward_ops),
                   dict(metric="operators_backward", unit="count", p50=backward_ops, p20=backward_ops,
                        p80=backward_ops),
                   dict(metric="trainable_parameters", unit="count", p50=trainable_parameters(model), p20="",
                        p80="")]


def train_step_sweep(settings: Dict, providers: List[str], device, dtype, versions: Dict,
                     on_rows: Optional[Callable[[List[Dict]], None]] = None) -> List[Dict]:
    """Every provider's training step eager, then compiled (each mode on models of its own, from the same
    seed), the providers' steps timed interleaved (`interleaved_ms`)."""
    from torch._dynamo.utils import counters

    rows = []
    batch, seq = settings["batch"], settings["seq"]
    for mode in MODES:
        models = {provider: wrap_model(provider, _model(settings["model"], device, dtype), README_TARGETS, rank=8,
                                       experts=4).train() for provider in providers}
        inputs = {}
        for provider in providers:
            input_ids = _random_tokens(models[provider], (batch, seq), device)
            inputs[provider] = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=input_ids)
        with _compiling(len(providers)) if mode == "compiled" else contextlib.nullcontext():
            steps = {provider: _train_step(models[provider], inputs[provider], mode) for provider in providers}
            graph_breaks = {}
            if mode == "compiled":  # each model compiles on its first step: one at a time, to count its graph breaks
                for provider in providers:
                    counters.clear()
                    for _ in range(TRAIN_WARMUP):
                        steps[provider]()
                    graph_breaks[provider] = _graph_breaks()
            timings = interleaved_ms(steps, device, settings["steps"], TRAIN_WARMUP)
            for provider in providers:
                common = dict(benchmark="train-step", provider=provider, mode=mode,
                              shape=f"llava-onevision-{settings['model']}", tokens=batch * seq, rank=8, experts=4,
                              n_gram=1, dtype=str(dtype).removeprefix("torch."), **versions)
                measured = [dict(common, **row) for row in _train_step_rows(
                    models[provider], inputs[provider], steps[provider], timings[provider], batch, device, mode,
                    graph_breaks.get(provider))]
                rows += measured
                if on_rows is not None:
                    on_rows(measured)
                print(f"  train-step: {provider} {mode} done", flush=True)
        del models, steps  # before the next mode's are built
    return rows


def decode_sweep(settings: Dict, layer_providers: List[str], model_providers: List[str], device, dtype,
                 versions: Dict, on_rows: Optional[Callable[[List[Dict]], None]] = None) -> List[Dict]:
    """Generation-sized work: the decode shape's forward (eval mode, no gradient) at each token count,
    then greedy `generate` of `new_tokens` tokens after a `prompt`-token prompt on the LLaVA-OneVision-shaped
    model (text only), as tokens/s, for the frozen model and each model provider; the providers' calls
    timed interleaved (`interleaved_ms`)."""
    decode = settings["decode"]
    shape, d_in, d_out = decode["shape"]
    dtype_name = str(dtype).removeprefix("torch.")
    rows = []

    def record(measured):
        nonlocal rows
        rows += measured
        if on_rows is not None:
            on_rows(measured)

    for tokens in decode["tokens"]:
        torch.manual_seed(0)
        x = torch.randn(1, tokens, d_in, device=device, dtype=dtype)
        layers = {provider: build_layer(provider, nn.Linear(d_in, d_out, device=device, dtype=dtype), decode["rank"],
                                        decode["experts"], n_gram=1).eval() for provider in layer_providers}
        with torch.no_grad():
            timings = interleaved_ms({provider: functools.partial(layer, x) for provider, layer in layers.items()},
                                     device, decode["call_repeats"], settings["warmup"])
        for provider, timing in timings.items():
            record([dict(benchmark="decode", provider=provider, mode="forward", metric="time", unit="ms",
                         shape=f"{shape} {d_in}x{d_out}", tokens=tokens, rank=decode["rank"],
                         experts=decode["experts"], n_gram=1, dtype=dtype_name, **timing, **versions)])
        print(f"  decode: {tokens} tokens done", flush=True)
    new_tokens = decode["new_tokens"]
    for mode in MODES:
        models = {provider: wrap_model(provider, _model(settings["model"], device, dtype), README_TARGETS, rank=8,
                                       experts=4).eval() for provider in ["frozen-linear"] + list(model_providers)}
        generations = {provider: _generation(model, _random_tokens(model, (1, decode["prompt"]), device), new_tokens,
                                             mode) for provider, model in models.items()}
        with _compiling(len(generations)) if mode == "compiled" else contextlib.nullcontext():
            # The first call of a compiled model compiles its decoding step (on a GPU, then records its CUDA graphs).
            timings = interleaved_ms(generations, device, decode["generate_repeats"], 2 if mode == "compiled" else 1)
        for provider, timing in timings.items():
            record([dict(benchmark="generate", provider=provider, mode=mode, metric="tokens_per_second",
                         unit="tokens/s", shape=f"llava-onevision-{settings['model']}", tokens=new_tokens, rank=8,
                         experts=4, n_gram=1, dtype=dtype_name, **_per_second(timing, new_tokens), **versions)])
            print(f"  generate: {provider} {mode} done", flush=True)
        del models, generations  # before the next mode's are built
    return rows


def _generation(model, prompt, new_tokens: int, mode: str) -> Callable[[], None]:
    """Greedy generation of `new_tokens` tokens after `prompt`: eager with the dynamic cache, or compiled:
    a static cache, whose decoding step transformers compiles (`mode="reduce-overhead"`: CUDA graphs on a
    GPU; on the CPU the same compiled graph without them)."""
    from transformers import CompileConfig

    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if mode == "compiled":
        # As lime.evaluation.compiled_generation (not imported: it needs `datasets`, which the GPU image lacks).
        config = CompileConfig(mode="reduce-overhead")
        config._compile_all_devices = True  # transformers compiles the step on a GPU only, unless told (not a keyword)
        options.update(cache_implementation="static", compile_config=config)

    def generate():
        with torch.no_grad():
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **options)

    return generate


def _geometric_mean(values: List[float]) -> float:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def summarize(rows: List[Dict], providers: List[str], skipped: List[str]) -> str:
    """Markdown: per provider, the geometric mean over the layer measurements of its forward+backward
    time as a ratio to frozen-linear and to peft-lora, the training-step and the decode results (each
    section only where its rows exist: an interrupted run is summarized as far as it got)."""
    def measured(provider, metric, mode):
        return {(r["benchmark"], r["shape"], r["tokens"], r["rank"], r["experts"], r["n_gram"]): r["p50"]
                for r in rows if r["provider"] == provider and r["metric"] == metric and r["mode"] == mode}

    def ratio(provider, baseline, metric="time", mode="full"):
        mine, theirs = measured(provider, metric, mode), measured(baseline, metric, mode)
        return _geometric_mean([mine[k] / theirs[k] for k in mine if k in theirs and theirs[k] > 0])

    lines = []
    reference_layer = next((r for r in rows if r["metric"] == "trainable_parameters"
                            and r["benchmark"] != "train-step"), None)
    if reference_layer is not None:
        lines += ["## Layers (forward + backward, geometric mean over every measured shape and setting)", "",
                  f"| provider | time / frozen-linear | time / peft-lora | peak memory / peft-lora | "
                  f"saved activations / peft-lora | operators, forward + backward | "
                  f"trainable parameters ({reference_layer['shape']}, r = {reference_layer['rank']}, "
                  f"E = {reference_layer['experts']}) |", "|:--|--:|--:|--:|--:|--:|--:|"]
    for provider in providers if reference_layer is not None else []:
        params = next((f"{r['p50']:,}" for r in rows if r["metric"] == "trainable_parameters"
                       and r["provider"] == provider and r["shape"] == reference_layer["shape"]
                       and r["rank"] == reference_layer["rank"] and r["experts"] == reference_layer["experts"]), "-")
        operators = "-"
        counts = [next((r["p50"] for r in rows if r["metric"] == "operators" and r["provider"] == provider
                        and r["mode"] == mode and r["shape"] == reference_layer["shape"]
                        and r["rank"] == reference_layer["rank"] and r["experts"] == reference_layer["experts"]
                        and r["benchmark"] == reference_layer["benchmark"]), None) for mode in ("forward", "backward")]
        if None not in counts:
            operators = f"{int(counts[0])} + {int(counts[1])}"
        lines.append(f"| {provider} | {ratio(provider, 'frozen-linear'):.3f} | {ratio(provider, 'peft-lora'):.3f} | "
                     f"{ratio(provider, 'peft-lora', 'peak_memory'):.3f} | "
                     f"{ratio(provider, 'peft-lora', 'saved_activations', 'forward'):.3f} | {operators} | {params} |")
    steps = [r for r in rows if r["benchmark"] == "train-step"]
    if steps:
        lines += ["", f"## Training step ({steps[0]['shape']}, {steps[0]['tokens']} tokens per step, AdamW fused)", "",
                  "| provider | eager samples/s | / moe-lora | / peft-lora | operators, forward + backward | "
                  "compiled samples/s | / moe-lora | / peft-lora | graph breaks | peak memory (MiB) | "
                  "trainable parameters |", "|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        step = {(r["provider"], r["mode"], r["metric"]): r["p50"] for r in steps}

        def speed_ratio(provider, mode, baseline):
            theirs = step.get((baseline, mode, "samples_per_second"))
            mine = step.get((provider, mode, "samples_per_second"))
            return f"{mine / theirs:.3f}" if mine is not None and theirs else "-"

        def value(provider, mode, metric, form):
            found = step.get((provider, mode, metric))
            return "-" if found is None else format(found, form)

        for provider in dict.fromkeys(r["provider"] for r in steps):
            operators = "-"
            if (provider, "eager", "operators_forward") in step:
                operators = (f"{int(step[provider, 'eager', 'operators_forward'])} + "
                             f"{int(step[provider, 'eager', 'operators_backward'])}")
            lines.append(
                f"| {provider} | {value(provider, 'eager', 'samples_per_second', '.1f')} | "
                f"{speed_ratio(provider, 'eager', 'moe-lora')} | {speed_ratio(provider, 'eager', 'peft-lora')} | "
                f"{operators} | {value(provider, 'compiled', 'samples_per_second', '.1f')} | "
                f"{speed_ratio(provider, 'compiled', 'moe-lora')} | {speed_ratio(provider, 'compiled', 'peft-lora')} | "
                f"{value(provider, 'compiled', 'graph_breaks', '.0f')} | {value(provider, 'eager', 'peak_memory', '.1f')} | "
                f"{value(provider, 'eager', 'trainable_parameters', ',.0f')} |")
    decode = [r for r in rows if r["benchmark"] == "decode"]
    if decode:
        token_counts = sorted({r["tokens"] for r in decode})
        times = {(r["provider"], r["tokens"]): r["p50"] for r in decode}
        lines += ["", f"## Decode-sized calls ({decode[0]['shape']}, forward without gradient, ms)", "",
                  "| provider | " + " | ".join(f"{t} tokens" for t in token_counts) + " |",
                  "|:--|" + "--:|" * len(token_counts)]
        for provider in dict.fromkeys(r["provider"] for r in decode):
            lines.append(f"| {provider} | " + " | ".join(f"{times.get((provider, t), float('nan')):.3f}"
                                                        for t in token_counts) + " |")
    generate = [r for r in rows if r["benchmark"] == "generate"]
    if generate:
        speed = {(r["provider"], r["mode"]): r["p50"] for r in generate}
        lines += ["", f"## Generation ({generate[0]['shape']}, greedy, {generate[0]['tokens']} new tokens)", "",
                  "| provider | eager tokens/s | / peft-lora | compiled (static cache) tokens/s | / peft-lora |",
                  "|:--|--:|--:|--:|--:|"]
        for provider in dict.fromkeys(r["provider"] for r in generate):
            cells = []
            for mode in MODES:
                mine, theirs = speed.get((provider, mode)), speed.get(("peft-lora", mode))
                cells += ["-" if mine is None else f"{mine:.1f}", f"{mine / theirs:.3f}" if mine and theirs else "-"]
            lines.append(f"| {provider} | " + " | ".join(cells) + " |")
    device = rows[0]["device"] if rows else "-"
    lines += ["", f"Device: {device}; torch {rows[0]['torch'] if rows else '-'}, triton {rows[0]['triton'] if rows else '-'}, "
              f"commit {rows[0]['commit'] if rows else '-'}. Peak CUDA memory is NaN on the CPU."]
    lines += [f"Not run here: {reason}." for reason in skipped]
    return "\n".join(lines) + "\n"


def plot(rows: List[Dict], path: str, benchmark: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    selected = [r for r in rows if r["benchmark"] == benchmark and r["metric"] == "time" and r["mode"] == "full"]
    if not selected:
        return
    keys = sorted({(r["shape"], r["tokens"], r["rank"], r["experts"], r["n_gram"]) for r in selected},
                  key=lambda k: (k[0], k[1], k[2], k[3], k[4]))
    providers = sorted({r["provider"] for r in selected}, key=LAYER_PROVIDERS.index)
    figure, axes = plt.subplots(figsize=(max(8, 0.5 * len(keys) + 3), 5))
    width = 0.8 / len(providers)
    for index, provider in enumerate(providers):
        values = {(r["shape"], r["tokens"], r["rank"], r["experts"], r["n_gram"]): r["p50"] for r in selected
                  if r["provider"] == provider}
        axes.bar([i + index * width for i in range(len(keys))], [values.get(k, float("nan")) for k in keys], width,
                 label=provider)
    axes.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))])
    axes.set_xticklabels([f"{k[0].split()[0]} T={k[1]} r={k[2]} E={k[3]} n={k[4]}" for k in keys], rotation=70,
                         fontsize=7, ha="right")
    axes.set_ylabel("forward + backward, ms (median)")
    axes.set_yscale("log")
    axes.set_title(f"{benchmark} ({selected[0]['device']}, {selected[0]['dtype']})")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="activation dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    parser.add_argument("--out", default="benchmark-results", help="output directory")
    parser.add_argument("--skip-train-step", action="store_true", help="no training-step sweep")
    parser.add_argument("--skip-decode", action="store_true", help="no decode sweep")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    settings = plan(args.quick, device)
    versions = _versions(device)
    layer_providers, skipped = available(LAYER_PROVIDERS, device)
    for reason in skipped:
        print(f"not run here: {reason}", file=sys.stderr, flush=True)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    model_providers = available(MODEL_PROVIDERS, device)[0]
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        handle.flush()

        def record(measured: List[Dict]) -> None:
            writer.writerows(measured)
            handle.flush()

        for name in ("projections", "grid"):
            print(f"{name} ...", flush=True)
            rows += layer_sweep(name, settings[name], layer_providers, device, dtype, settings["repeats"],
                                settings["warmup"], versions, on_rows=record)
            plot(rows, os.path.join(args.out, f"{name}.png"), name)
        if not args.skip_train_step:
            print("train-step ...", flush=True)
            rows += train_step_sweep(settings, model_providers, device, dtype, versions, on_rows=record)
        if not args.skip_decode:
            print("decode ...", flush=True)
            rows += decode_sweep(settings, layer_providers, model_providers, device, dtype, versions, on_rows=record)
    summary = summarize(rows, layer_providers, skipped)
    with open(os.path.join(args.out, "summary.md"), "w") as handle:
        handle.write(summary)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
