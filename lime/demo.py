"""`lime demo --out DIR` (`make demo`): LiME end to end on a tiny LLaVA-OneVision, offline, on CPU.

Builds a tiny LLaVA-OneVision (the real architecture at toy sizes) and its processor from configs,
writes a small MMT-47-format dataset to a temporary folder (real PNG images and MPEG-4 videos;
text, image and video rows; test splits in every group, one of them a regression), wraps every
linear layer with LiME (the README's hyperparameters; a random toy model needs the capacity),
trains it with `LiMETrainer`, evaluates every test split and writes `DIR/adapter/`,
`DIR/eval/results.csv`, `DIR/eval/results.json` and `DIR/routing.png`; returns the evaluation summary with
`training_loss` (the first and last logged values) added. The base model is random:
the accuracies show the pipeline at work, not what LiME achieves on a pretrained model.
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import Dict, List, Tuple

import av
import datasets
import numpy as np
import torch
from PIL import Image

from .adapter import save_adapter
from .balance import routing_report
from .data import MultiModalCollator, MultiModalDataset, load_mmt47, validate_split
from .evaluation import run_full_evaluation
from .injection import apply_peft
from .plots import plot_routing
from .summary import print_lime_summary
from .tiny import build_tiny_llava_onevision
from .trainer import LiMEArguments, LiMETrainer

COLORS = {"red": (220, 40, 40), "green": (40, 190, 70), "blue": (50, 70, 220), "yellow": (230, 210, 40)}
GOOD = ["a wonderful film", "a delightful story", "great acting", "a joy to watch", "truly moving"]
BAD = ["a boring film", "a dull story", "terrible acting", "a waste of time", "truly awful"]
PHRASES = ["the cat sits on the mat", "a cat is on the mat", "the dog runs in the park", "a dog plays outside",
           "the sky is blue today", "it is a sunny day", "the car is red", "a red car drives by"]


def _square_image(rgb, rng: random.Random, size: int = 32) -> Image.Image:
    pixels = np.full((size, size, 3), rng.randint(90, 160), dtype=np.uint8)
    side = size // 2
    top, left = rng.randint(0, size - side), rng.randint(0, size - side)
    pixels[top:top + side, left:left + side] = rgb
    return Image.fromarray(pixels)


def _moving_square_video(path: str, direction: str, rng: random.Random, frames: int = 6, size: int = 32) -> None:
    container = av.open(path, mode="w")
    stream = container.add_stream("mpeg4", rate=4)
    stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
    color = COLORS[rng.choice(list(COLORS))]
    top = rng.randint(0, size - 8)
    for step in range(frames):
        pixels = np.full((size, size, 3), 120, dtype=np.uint8)
        offset = step * (size - 8) // (frames - 1)
        left = offset if direction == "right" else size - 8 - offset
        pixels[top:top + 8, left:left + 8] = color
        for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def _similarity(first: str, second: str) -> str:
    a, b = set(first.split()), set(second.split())
    return f"{5 * len(a & b) / len(a | b):.1f}"


def write_demo_dataset(directory: str, seed: int = 0) -> Tuple[str, str]:
    """A small MMT-47-format dataset: returns (the `save_to_disk` directory, the media root)."""
    rng = random.Random(seed)
    media = os.path.join(directory, "media")
    os.makedirs(os.path.join(media, "images"), exist_ok=True)
    os.makedirs(os.path.join(media, "videos"), exist_ok=True)

    def image_row(index: int) -> Dict:
        color = rng.choice(list(COLORS))
        path = f"images/square_{index}.png"
        _square_image(COLORS[color], rng).save(os.path.join(media, path))
        return {"source_type": "image", "media_path": path, "answer": color,
                "question": "What color is the square? Answer with one word."}

    def video_row(index: int) -> Dict:
        direction = rng.choice(["left", "right"])
        path = f"videos/motion_{index}.mp4"
        _moving_square_video(os.path.join(media, path), direction, rng)
        return {"source_type": "video", "media_path": path, "answer": direction,
                "question": "Which way does the square move, left or right?"}

    def parity_row(_: int) -> Dict:
        number = rng.randint(1, 99)
        return {"source_type": "text", "media_path": "", "answer": "yes" if number % 2 == 0 else "no",
                "question": f"Is {number} an even number? Answer yes or no."}

    def sentiment_row(_: int) -> Dict:
        positive = rng.random() < 0.5
        phrase = rng.choice(GOOD if positive else BAD)
        return {"source_type": "text", "media_path": "", "answer": "positive" if positive else "negative",
                "question": f"Sentence: {phrase}. Is the sentiment positive or negative?"}

    def similarity_row(_: int) -> Dict:
        first, second = rng.sample(PHRASES, 2)
        return {"source_type": "text", "media_path": "", "answer": _similarity(first, second),
                "question": f"How similar are '{first}' and '{second}' from 0 to 5?"}

    makers = {"image_test_color": image_row, "video_test_motion": video_row, "text_test_parity": parity_row,
              "glue_test_sst2": sentiment_row, "glue_test_stsb": similarity_row}
    counter = iter(range(10_000))
    train: List[Dict] = []
    for maker in makers.values():
        train += [maker(next(counter)) for _ in range(12)]
    rng.shuffle(train)
    splits = {"train": train}
    for name, maker in makers.items():
        splits[name] = [maker(next(counter)) for _ in range(6)]
    data = datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})
    data_dir = os.path.join(directory, "mmt47")
    data.save_to_disk(data_dir)
    return data_dir, media


def run(out: str, steps: int = 300, seed: int = 0) -> Dict:
    """The whole demo; returns the evaluation summary."""
    torch.manual_seed(seed)
    model, processor = build_tiny_llava_onevision(seed=seed)
    model = apply_peft(
        model, targets=None, num_experts=4, rank=2, use_shared_LiME=True, n_gram=1, top_k=1,
        rep_mode="token", jitter_noise=0.1, tokenizer=processor.tokenizer, temperature=0.5, gamma_routing=0.7,
        auto_topk=True, auto_topk_threshold=0.5, peft_dtype=torch.float32, moe_dtype=torch.float32,
    )
    print_lime_summary(model)
    with tempfile.TemporaryDirectory(prefix="lime-demo-") as scratch:
        data_dir, data_root = write_demo_dataset(scratch, seed)
        data = load_mmt47(data_dir)
        train_split, _ = validate_split(data["train"], "train", data_root)
        train_set = MultiModalDataset(train_split, processor, data_root, num_video_frames=4, max_length=512)
        args = LiMEArguments(
            output_dir=os.path.join(scratch, "trainer"), per_device_train_batch_size=4, max_steps=steps,
            moe_lr=1e-2, peft_lr=5e-3, weight_decay=0.0, warmup_steps=0.05, balance_every_n_steps=5,
            logging_steps=10, save_strategy="no", report_to=[], seed=seed, dataloader_num_workers=0,
            remove_unused_columns=False, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
            dataloader_pin_memory=torch.cuda.is_available(),
        )
        trainer = LiMETrainer(model=model, args=args, train_dataset=train_set,
                              data_collator=MultiModalCollator(processor, max_length=512), processing_class=processor)
        trainer.train()
        logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        adapter = save_adapter(model, os.path.join(out, "adapter"))
        summary = run_full_evaluation(
            model, processor, data, data_root, batch_size=6, max_new_tokens=8, num_video_frames=4, max_length=512,
            save_csv=os.path.join(out, "eval", "results.csv"), save_json=os.path.join(out, "eval", "results.json"),
        )
        collate = MultiModalCollator(processor, max_length=512)
        device = next(model.parameters()).device
        batches = [{k: v.to(device) for k, v in collate([train_set[i] for i in range(start, start + 6)]).items()}
                   for start in range(0, 36, 6)]
        plot_routing(routing_report(model, batches), os.path.join(out, "routing.png"),
                     title=f"LiME routing after {steps} steps (tiny LLaVA-OneVision, demo data)")
    print(f"\n{'split':<22} {'samples':>7} {'accuracy':>9}  extra")
    for name, metrics in summary["splits"].items():
        extra = ""
        if "pearson" in metrics:
            extra = f"pearson {metrics['pearson']:.3f}  spearman {metrics['spearman']:.3f}  parsed {metrics['parsed']:.2f}"
        print(f"{name:<22} {metrics['samples']:>7} {metrics['accuracy']:>9.3f}  {extra}")
    for group, metrics in summary["groups"].items():
        print(f"{'group ' + group:<22} {'':>7} {metrics['accuracy']:>9.3f}")
    print(f"{'overall':<22} {summary['overall']['samples']:>7} {summary['overall']['accuracy']:>9.3f}")
    if logged:
        summary["training_loss"] = {"first_logged": logged[0], "last_logged": logged[-1]}
        print(f"\ntraining loss: {logged[0]:.3f} over the first {args.logging_steps} steps, "
              f"{logged[-1]:.3f} over the last {args.logging_steps}")
    print(f"\nwrote {adapter}, {os.path.join(out, 'eval')}/results.csv and results.json, {os.path.join(out, 'routing.png')}")
    return summary
