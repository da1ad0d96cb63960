"""Helpers for tests on the tiny LLaVA-OneVision: the README's apply_peft call and image batches."""

import numpy as np
import torch
from PIL import Image

import lime

README_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "out_proj"]
LIME_PARAMETER_NAMES = ("A", "B", "LiMEs", "LiME_shared", "gamma")


def readme_call(model, processor, **overrides):
    kwargs = dict(
        targets=README_TARGETS, num_experts=4, rank=2, use_shared_LiME=True, n_gram=1, top_k=1,
        rep_mode="token", jitter_noise=0.1, tokenizer=processor.tokenizer, temperature=0.5,
        gamma_routing=0.7, auto_topk=True, auto_topk_threshold=0.5, peft_dtype=torch.float32,
        moe_dtype=torch.float32,
    )
    kwargs.update(overrides)
    return lime.apply_peft(model, **kwargs)


def image(seed, height, width):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8))


def make_batch(processor, questions, answers=None, padding_side="right", labels_on_answers_only=False):
    """A batch of one image per conversation, padded on `padding_side`. With answers, labels on every
    token; `labels_on_answers_only`: as `MultiModalDataset` writes training rows, the generation prompt
    followed by the answer and the end-of-turn token, labels on those last two only."""
    texts, answer_lengths = [], []
    for index, question in enumerate(questions):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if labels_on_answers_only:
            prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
            suffix = answers[index] + processor.tokenizer.eos_token
            answer_lengths.append(len(processor.tokenizer(suffix, add_special_tokens=False)["input_ids"]))
            texts.append(prompt + suffix)
            continue
        if answers is not None:
            conversation.append({"role": "assistant", "content": [{"type": "text", "text": answers[index]}]})
        texts.append(processor.apply_chat_template(conversation, add_generation_prompt=answers is None))
    images = [image(i, 24 + 8 * i, 40 - 6 * i) for i in range(len(questions))]
    processor.tokenizer.padding_side = padding_side
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True)
    if answers is not None:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    if labels_on_answers_only:
        ends = batch["attention_mask"].sum(dim=1) if padding_side == "right" else torch.full(
            (len(texts),), batch["input_ids"].shape[1])
        positions = torch.arange(batch["input_ids"].shape[1])
        answer = (positions >= (ends - torch.tensor(answer_lengths))[:, None]) & (positions < ends[:, None])
        batch["labels"] = batch["input_ids"].masked_fill(~answer, -100)
    return batch


def text_batch(processor, padding_side="left"):
    """Two text-only conversations of different lengths, padded on `padding_side`, labels on every valid token."""
    processor.tokenizer.padding_side = padding_side
    batch = processor(text=["What is shown? a cat", "Is it a dog? no, it is a cat on a mat"], return_tensors="pt",
                      padding=True)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


QUESTIONS = [
    ("What is shown?", "a cat"), ("How many objects are there?", "3"), ("What color is the image?", "red"),
    ("Which option is correct? A B C D", "B"), ("Describe the motion", "still"), ("Is it a dog?", "no"),
    ("Count the cubes", "2"), ("What is in the sky?", "a bird"),
]


class TinyConversations(torch.utils.data.Dataset):
    """Image questions with short answers (each sample has its own image)."""

    def __init__(self, size=8):
        self.samples = [(QUESTIONS[i % len(QUESTIONS)][0], QUESTIONS[i % len(QUESTIONS)][1], i) for i in range(size)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        question, answer, seed = self.samples[index]
        return {"question": question, "answer": answer, "seed": seed}


class TinyCollator:
    """Right-padded batches with labels on the whole conversation except padding. `images=False`: the text
    alone, padded to `text_length` tokens (every batch of one shape, as a compiled model likes)."""

    def __init__(self, processor, images=True, text_length=48):
        self.processor = processor
        self.images = images
        self.text_length = text_length

    def __call__(self, samples):
        media = [{"type": "image"}] if self.images else []
        texts = [self.processor.apply_chat_template([
            {"role": "user", "content": media + [{"type": "text", "text": s["question"]}]},
            {"role": "assistant", "content": [{"type": "text", "text": s["answer"]}]}]) for s in samples]
        self.processor.tokenizer.padding_side = "right"
        if self.images:
            images = [image(s["seed"], 24 + 8 * (s["seed"] % 3), 40 - 6 * (s["seed"] % 2)) for s in samples]
            batch = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        else:
            batch = self.processor(text=texts, return_tensors="pt", padding="max_length", max_length=self.text_length)
            assert batch["input_ids"].shape[1] == self.text_length, "a conversation longer than text_length"
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch
