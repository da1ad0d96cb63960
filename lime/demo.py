"""`lime demo --out DIR` (`make demo`): LiME end to end on a tiny LLaVA-OneVision, offline, on CPU.

Builds a tiny LLaVA-OneVision (the real architecture at toy sizes, randomly initialized and frozen)
and its processor from configs, writes a small MMT-47-format dataset to a temporary folder, wraps the
language model's attention projections and output head with LiME (`lime_targets`), trains them with
`LiMETrainer`, evaluates every test split with `run_full_evaluation` and writes `DIR/adapter/`,
`DIR/eval/results.csv`, `DIR/eval/results.json` and `DIR/routing.png`. It prints each split's, group's
and the overall accuracy next to its majority-answer rate (the evaluation's `majority`: the share of
the split's most common reference answer, the accuracy of always giving that answer; a group's is the
mean over its splits, as its accuracy is). The returned summary also gets `training_loss` (the first
and last logged values).

The tasks are toy tasks, chosen so that small adapters on a random frozen model can learn them
(`write_demo_dataset`; 36 training rows and 24 test rows per task, answers balanced in both):

- `image_test_color` (image): "What color is the square?" A 32x32 PNG with a large square (3/4 of
  the side) in red, green, blue or yellow, its shade jittered, at a random place on a grey background
  of random brightness. Every image, training or test, is drawn anew: the test images are unseen, and
  the answer is a strong pixel signal. Majority rate 0.25.
- `video_test_color` (video): "What color is the moving block?" A 6-frame 32x32 MPEG-4 video of a
  full-height block half the frame wide, in one of the four colours (shade jittered), sliding left
  or right across a grey background. The question is the same for every row, so the answer is only in the video's
  pixels (the block's colour; its direction is not asked). Every video is drawn anew. Majority 0.25.
- `text_test_clue` (text): "It <clue>. Cat, dog, car or bird?" with 12 clues, 3 per answer ("It
  purrs on the sofa." is a cat). Majority rate 0.25.
- `glue_test_sst2` (glue, SST-2-like): "Review: <phrase>. Positive or negative?" with 12 short
  phrases, 6 per label. Majority rate 0.5.
- `glue_test_stsb` (glue, STS-B-like regression): "Similarity from 0 to 5: '<a>' / '<b>'?" with 6
  sentence pairs, one per integer score 0-5; scored by accuracy (the exact number) and Pearson /
  Spearman. Majority rate 1/6.

The text and glue questions come from those small fixed pools, and every test question also appears
in the training rows: these three splits measure whether the model memorised the mappings it was
trained on, not generalization (a random model knows no language). The image and video splits do
test generalization, to new renderings of the same colours.

The base model is random: the accuracies show the pipeline at work, not what LiME achieves on a
pretrained model.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from typing import Callable, Dict, List, Sequence, Tuple

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
CLUES = {
    "cat": ["purrs on the sofa", "chases mice", "meows at night"],
    "dog": ["barks at the door", "wags its tail", "fetches a stick"],
    "car": ["has four wheels", "drives on the road", "needs fuel"],
    "bird": ["flies over the sea", "lays eggs in a nest", "has feathers"],
}
SENTIMENT = {
    "positive": ["a wonderful film", "a delightful story", "great acting", "a joy to watch", "truly moving",
                 "a clever plot"],
    "negative": ["a boring film", "a dull story", "terrible acting", "a waste of time", "truly awful",
                 "a silly plot"],
}
# Sentence pairs with a similarity score from 0 (unrelated) to 5 (same meaning), one per score.
PAIRS = [
    ("a cat sits on a mat", "a cat is on a mat", 5),
    ("a dog runs in the park", "a dog plays in the park", 4),
    ("the sky is blue", "the sea is blue", 3),
    ("a boy rides a bike", "a girl rides a horse", 2),
    ("the sun is hot", "the tea is cold", 1),
    ("the train is late", "a child draws a tree", 0),
]

TRAIN_ROWS = 36  # training rows per task
TEST_ROWS = 24  # rows per test split: a split's accuracy at chance has a standard error of at most 0.1


def lime_targets(name: str, module) -> bool:
    """LiME on the language model's attention projections and its output head: layers that every row
    (text, image or video) runs through. The frozen random vision tower and projector already separate
    colours; the attention lets the answer position pick out the question's distinguishing tokens, and
    the head turns that into confident answer tokens (a random frozen head cannot)."""
    return name == "lm_head" or (name.startswith("model.language_model.") and ".self_attn." in name)


# A large alpha (LoRA scale alpha / rank = 16) with a small adapter learning rate: the random model's
# distinguishing signal is small, and this learns it within 300 steps for seeds 0-3, where alpha 16
# (learning rates 2e-3 to 1e-2) learned the text tasks slowly and unevenly across seeds, and
# diverged at 1e-2.
LIME_OPTIONS = dict(
    num_experts=4, rank=8, alpha=128.0, use_shared_LiME=True, n_gram=1, top_k=1, rep_mode="token",
    jitter_noise=0.1, temperature=0.5, gamma_routing=0.7, auto_topk=True, auto_topk_threshold=0.5,
)
# 300 steps of 16 rows: about 27 epochs of the 180 training rows.
TRAIN_OPTIONS = dict(per_device_train_batch_size=16, moe_lr=1e-2, peft_lr=1e-3, warmup_steps=0.05,
                     balance_every_n_steps=5)


def _square_image(rgb, rng: random.Random, size: int = 32) -> Image.Image:
    pixels = np.full((size, size, 3), rng.randint(90, 160), dtype=np.uint8)
    side = 3 * size // 4
    top, left = rng.randint(0, size - side), rng.randint(0, size - side)
    pixels[top:top + side, left:left + side] = _jitter(rgb, rng)
    return Image.fromarray(pixels)


def _jitter(rgb, rng: random.Random, amount: int = 20) -> Tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.randint(-amount, amount), 0, 255)) for c in rgb)


def _moving_block_video(path: str, rgb, direction: str, rng: random.Random, frames: int = 6, size: int = 32) -> None:
    container = av.open(path, mode="w")
    stream = container.add_stream("mpeg4", rate=4)
    stream.width, stream.height, stream.pix_fmt = size, size, "yuv420p"
    color, width = _jitter(rgb, rng), size // 2
    background = rng.randint(90, 160)
    for step in range(frames):
        pixels = np.full((size, size, 3), background, dtype=np.uint8)
        offset = step * (size - width) // (frames - 1)
        left = offset if direction == "right" else size - width - offset
        pixels[:, left:left + width] = color
        for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()


def _balanced(labels: Sequence, count: int, rng: random.Random) -> List:
    """`count` labels cycling through `labels` (so each appears equally often, up to one), shuffled."""
    chosen = [labels[i % len(labels)] for i in range(count)]
    rng.shuffle(chosen)
    return chosen


def write_demo_dataset(directory: str, seed: int = 0) -> Tuple[str, str]:
    """A small MMT-47-format dataset: returns (the `save_to_disk` directory, the media root)."""
    rng = random.Random(seed)
    media = os.path.join(directory, "media")
    os.makedirs(os.path.join(media, "images"), exist_ok=True)
    os.makedirs(os.path.join(media, "videos"), exist_ok=True)
    counter = iter(range(100_000))

    def image_row(color: str) -> Dict:
        path = f"images/square_{next(counter)}.png"
        _square_image(COLORS[color], rng).save(os.path.join(media, path))
        return {"source_type": "image", "media_path": path, "answer": color,
                "question": "What color is the square? Answer with one word."}

    def video_row(color: str) -> Dict:
        path = f"videos/block_{next(counter)}.mp4"
        _moving_block_video(os.path.join(media, path), COLORS[color], rng.choice(["left", "right"]), rng)
        return {"source_type": "video", "media_path": path, "answer": color,
                "question": "What color is the moving block? Answer with one word."}

    def clue_row(item: Tuple[str, str]) -> Dict:
        answer, clue = item
        return {"source_type": "text", "media_path": "", "answer": answer,
                "question": f"It {clue}. Cat, dog, car or bird?"}

    def sentiment_row(item: Tuple[str, str]) -> Dict:
        answer, phrase = item
        return {"source_type": "text", "media_path": "", "answer": answer,
                "question": f"Review: {phrase}. Positive or negative?"}

    def similarity_row(item: Tuple[str, str, int]) -> Dict:
        first, second, score = item
        return {"source_type": "text", "media_path": "", "answer": str(score),
                "question": f"Similarity from 0 to 5: '{first}' / '{second}'?"}

    clues = [(answer, clue) for answer, items in CLUES.items() for clue in items]
    phrases = [(answer, phrase) for answer, items in SENTIMENT.items() for phrase in items]
    # split: (row maker, pool of items, training rows); media pools are labels, rendered anew per row.
    tasks: Dict[str, Tuple[Callable, List, int]] = {
        "image_test_color": (image_row, list(COLORS), TRAIN_ROWS),
        "video_test_color": (video_row, list(COLORS), TRAIN_ROWS),
        "text_test_clue": (clue_row, clues, TRAIN_ROWS),
        "glue_test_sst2": (sentiment_row, phrases, TRAIN_ROWS),
        "glue_test_stsb": (similarity_row, PAIRS, TRAIN_ROWS),
    }
    train: List[Dict] = []
    for maker, pool, rows in tasks.values():
        train += [maker(item) for item in _balanced(pool, rows, rng)]
    rng.shuffle(train)
    splits = {"train": train}
    for name, (maker, pool, _) in tasks.items():
        splits[name] = [maker(item) for item in _balanced(pool, TEST_ROWS, rng)]
    data = datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})
    data_dir = os.path.join(directory, "mmt47")
    data.save_to_disk(data_dir)
    return data_dir, media


def run(out: str, steps: int = 300, seed: int = 0) -> Dict:
    """The whole demo; returns the evaluation summary."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    model, processor = build_tiny_llava_onevision(seed=seed)
    model = apply_peft(model, targets=lime_targets, tokenizer=processor.tokenizer, peft_dtype=torch.float32,
                       moe_dtype=torch.float32, **LIME_OPTIONS)
    print_lime_summary(model)
    with tempfile.TemporaryDirectory(prefix="lime-demo-") as scratch:
        data_dir, data_root = write_demo_dataset(scratch, seed)
        data = load_mmt47(data_dir)
        train_split, _ = validate_split(data["train"], "train", data_root)
        train_set = MultiModalDataset(train_split, processor, data_root, num_video_frames=4, max_length=512)
        args = LiMEArguments(
            output_dir=os.path.join(scratch, "trainer"), max_steps=steps, weight_decay=0.0,
            logging_steps=10, save_strategy="no", report_to=[], seed=seed, dataloader_num_workers=0,
            remove_unused_columns=False, disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
            dataloader_pin_memory=torch.cuda.is_available(), **TRAIN_OPTIONS,
        )
        trainer = LiMETrainer(model=model, args=args, train_dataset=train_set,
                              data_collator=MultiModalCollator(processor, max_length=512), processing_class=processor)
        trainer.train()
        logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        adapter = save_adapter(model, os.path.join(out, "adapter"))
        summary = run_full_evaluation(
            model, processor, data, data_root, batch_size=TEST_ROWS, max_new_tokens=8, num_video_frames=4,
            max_length=512, save_csv=os.path.join(out, "eval", "results.csv"),
            save_json=os.path.join(out, "eval", "results.json"),
        )
        collate = MultiModalCollator(processor, max_length=512)
        device = next(model.parameters()).device
        batches = [{k: v.to(device) for k, v in collate([train_set[i] for i in range(start, start + 6)]).items()}
                   for start in range(0, 36, 6)]
        plot_routing(routing_report(model, batches), os.path.join(out, "routing.png"),
                     title=f"LiME routing after {steps} steps (tiny LLaVA-OneVision, demo data)")
    print(f"\n{'split':<22} {'samples':>7} {'accuracy':>9} {'majority':>9} {'original':>9}  extra")
    for name, metrics in summary["splits"].items():
        extra = ""
        if "pearson" in metrics:
            extra = (f"pearson {metrics['pearson']:.3f}  spearman {metrics['spearman']:.3f}  parsed {metrics['parsed']:.2f}"
                     f"  original pearson {metrics['pearson_original']:.3f}")
        print(f"{name:<22} {metrics['samples']:>7} {metrics['accuracy']:>9.3f} {metrics['majority']:>9.3f}"
              f" {metrics['accuracy_original']:>9.3f}  {extra}")
    for group, metrics in summary["groups"].items():
        print(f"{'group ' + group:<22} {'':>7} {metrics['accuracy']:>9.3f} {metrics['majority']:>9.3f}"
              f" {metrics['accuracy_original']:>9.3f}")
    overall = summary["overall"]
    print(f"{'overall':<22} {overall['samples']:>7} {overall['accuracy']:>9.3f} {overall['majority']:>9.3f}"
          f" {overall['accuracy_original']:>9.3f}")
    print("(majority: the share of the most common reference answer, the accuracy of always giving it; "
          "a group's is the mean over its splits, as its accuracy is. original: the original LiME code's "
          "lenient scoring; a group's and overall are its micro average over the classification splits, "
          "STS-B left out, as the paper's table)")
    if logged:
        summary["training_loss"] = {"first_logged": logged[0], "last_logged": logged[-1]}
        print(f"\ntraining loss: {logged[0]:.3f} over the first {args.logging_steps} steps, "
              f"{logged[-1]:.3f} over the last {args.logging_steps}")
    print(f"\nwrote {adapter}, {os.path.join(out, 'eval')}/results.csv and results.json, {os.path.join(out, 'routing.png')}")
    summary["seconds"] = time.perf_counter() - started
    print(f"the demo took {summary['seconds']:.0f} s (seed {seed}, {steps} steps)")
    return summary
