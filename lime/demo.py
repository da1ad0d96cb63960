"""`make demo`: LiME on a tiny LLaVA-OneVision built from a config, trained for a few steps on CPU.

Wraps the model with the LiME README's `apply_peft` call, prints the summary, trains on a small
batch of image questions with the balance loss, and prints the loss going down. Exits non-zero if
it does not.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

import numpy as np
import torch
from PIL import Image

from . import apply_peft, compute_balance_loss, get_expert_usage_stats, print_lime_summary
from .tiny import build_tiny_llava_onevision

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}


def _color_image(rgb, height, width, rng) -> Image.Image:
    pixels = np.clip(np.array(rgb)[None, None, :] + rng.normal(0, 12, size=(height, width, 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8))


def demo_batch(processor, seed: int = 0):
    """Image questions with short answers; prompt and padding are masked out of the labels."""
    rng = np.random.default_rng(seed)
    texts, images, prompts = [], [], []
    for index, (name, rgb) in enumerate(COLORS.items()):
        question = [{"type": "image"}, {"type": "text", "text": "What color is the image? answer with one word"}]
        user = [{"role": "user", "content": question}]
        prompts.append(processor.apply_chat_template(user, add_generation_prompt=True))
        texts.append(processor.apply_chat_template(user + [{"role": "assistant", "content": [{"type": "text", "text": name}]}]))
        images.append(_color_image(rgb, 24 + 8 * (index % 2), 32 + 8 * (index // 2), rng))
    processor.tokenizer.padding_side = "right"
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    prompt_lengths = [len(ids) for ids in processor(text=prompts, images=images)["input_ids"]]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for row, length in enumerate(prompt_lengths):
        labels[row, :length] = -100
    batch["labels"] = labels
    return batch


def run(steps: int = 25, seed: int = 0, moe_lr: float = 1e-2, peft_lr: float = 4e-3) -> List[float]:
    torch.manual_seed(seed)
    model, processor = build_tiny_llava_onevision(seed=seed)
    model = apply_peft(
        model,
        targets=["q_proj", "k_proj", "v_proj", "o_proj", "out_proj"],
        num_experts=4, rank=2, use_shared_LiME=True, n_gram=1, top_k=1, rep_mode="token",
        jitter_noise=0.1, tokenizer=processor.tokenizer, temperature=0.5, gamma_routing=0.7,
        auto_topk=True, auto_topk_threshold=0.5, peft_dtype=torch.float32, moe_dtype=torch.float32,
    )
    print_lime_summary(model)

    moe = [p for n, p in model.named_parameters() if p.requires_grad and n.rsplit(".", 1)[-1] in ("LiMEs", "LiME_shared", "gamma")]
    peft = [p for n, p in model.named_parameters() if p.requires_grad and n.rsplit(".", 1)[-1] in ("A", "B")]
    optimizer = torch.optim.AdamW([
        {"params": moe, "lr": moe_lr, "weight_decay": 0.0},
        {"params": peft, "lr": peft_lr, "weight_decay": 0.01},
    ])
    batch = demo_batch(processor, seed)
    model.train()
    losses = []
    print(f"{'step':>4}  {'task loss':>9}  {'balance':>8}  {'usage entropy':>13}  {'active experts':>14}")
    for step in range(1, steps + 1):
        optimizer.zero_grad()
        task_loss = model(**batch).loss
        balance = compute_balance_loss(model, importance_coef=0.1, kl_coef=0.01)
        (task_loss + balance).backward()
        optimizer.step()
        usage = get_expert_usage_stats(model)
        losses.append(task_loss.item())
        print(f"{step:>4}  {task_loss.item():>9.4f}  {balance.item():>8.5f}  {usage['entropy']:>13.4f}  {usage['active_experts']:>14.2f}")
    return losses


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lime.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25, help="optimizer steps (default 25)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps must be at least 2; got {args.steps}")
    losses = run(steps=args.steps, seed=args.seed)
    went_down = losses[-1] < losses[0]
    print(f"task loss: {losses[0]:.4f} -> {losses[-1]:.4f} ({'down' if went_down else 'NOT down'})")
    return 0 if went_down else 1


if __name__ == "__main__":
    sys.exit(main())
