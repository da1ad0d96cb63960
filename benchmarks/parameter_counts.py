"""Trainable-parameter counts of every LiME variant on LLaVA-OneVision-7B's shapes (no weights needed).

    python benchmarks/parameter_counts.py [--rank 2] [--experts 4] [--virtual-tokens 20]

The model is built on the meta device from the 7B configuration (Qwen2-7B language model, SigLIP
so400m vision tower without its head) and wrapped with the LiME README's targets; the counts come
from `lime.lime_summary`, the same numbers `print_lime_summary` prints.
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

import lime
import lime.prompt_tuning

README_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "out_proj"]


def llava_onevision_7b_on_meta() -> torch.nn.Module:
    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                                image_size=384, patch_size=14, vision_use_head=False)
    text = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text)
    with torch.device("meta"):
        return LlavaOnevisionForConditionalGeneration(config)


def counts(rank: int, experts: int, virtual_tokens: int):
    rows = []
    for variant in ("lora", "dora", "lora_fa", "slicefine", "prompt"):
        model = llava_onevision_7b_on_meta()
        if variant == "prompt":
            lime.prompt_tuning.apply_peft(model, num_virtual_tokens=virtual_tokens, num_experts=experts)
        else:
            lime.apply_peft(model, targets=README_TARGETS, peft=variant, rank=rank, num_experts=experts)
        summary = lime.lime_summary(model)
        rows.append((variant, summary["wrapped_layers"], summary["peft_parameters"], summary["moe_parameters"],
                     summary["trainable_parameters"], summary["total_parameters"]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--virtual-tokens", type=int, default=20)
    args = parser.parse_args(argv)
    print("| variant | LiME layers | PEFT parameters | MoE parameters | trainable | of total |")
    print("|:--|--:|--:|--:|--:|--:|")
    for variant, layers, peft, moe, trainable, total in counts(args.rank, args.experts, args.virtual_tokens):
        print(f"| {variant} | {layers} | {peft:,} | {moe:,} | {trainable:,} | {100 * trainable / total:.4f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
