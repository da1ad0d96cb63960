"""A tiny LLaVA-OneVision (SigLIP vision tower without head, Qwen2 language model) and its
processor, built from configs with no download: for tests, the demo and quick experiments.

The tokenizer is a byte-level BPE trained here on a fixed corpus, with the Qwen2 chat markers and
the `<image>` / `<video>` placeholders, so any text (including unseen words) can be encoded.
"""

from __future__ import annotations

from typing import Tuple

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
    SiglipVisionConfig,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

# The Qwen2 conversation format LLaVA-OneVision uses: media placeholders first, then the text.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + ' ' -}}"
    "{%- if message['content'] is string -%}{{- '\\n' + message['content'] -}}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{- '<image>' -}}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'video' -%}{{- '<video>' -}}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}"
    "{%- if message['role'] == 'assistant' -%}{% generation %}{{- '\\n' + part['text'] -}}{% endgeneration %}"
    "{%- else -%}{{- '\\n' + part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_CORPUS = [
    "user assistant system question answer image video frame describe what is shown in the picture",
    "yes no true false maybe positive negative neutral entailment contradiction duplicate not_duplicate",
    "acceptable unacceptable equivalent not_equivalent the a an of to and in is are was were it this that",
    "which option is correct A B C D E answer with the letter only choose one of the following options",
    "how many objects are there count the red green blue yellow cube sphere cylinder left right above below",
    "a cat a dog a car a bird a person a tree a house the sky the sea moving still action motion",
    "0 1 2 3 4 5 6 7 8 9 10 100 0.5 1.5 2.5 3.75 similarity score sentence premise hypothesis",
]

# Short answers begin a line (after the assistant header): their words at line starts get tokens.
_ANSWER_WORDS = ("yes no true false positive negative neutral entailment contradiction duplicate not_duplicate "
                 "acceptable unacceptable equivalent not_equivalent red green blue yellow left right still cat dog "
                 "car bird A B C D E").split()

IMAGE_SIZE = 32
PATCH_SIZE = 8


def build_tiny_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a small fixed corpus (deterministic, offline)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS * 4 + list(_ANSWER_WORDS) * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        padding_side="right",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_processor() -> LlavaOnevisionProcessor:
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    pinpoints = [[IMAGE_SIZE * h, IMAGE_SIZE * w] for h in (1, 2) for w in (1, 2)]
    image_processor = LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints)
    video_processor = LlavaOnevisionVideoProcessor(size=size)
    return LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=build_tiny_tokenizer(),
        video_processor=video_processor,
        num_image_tokens=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_llava_onevision(
    seed: int = 0, dtype: torch.dtype = torch.float32
) -> Tuple[LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor]:
    """A randomly initialized LLaVA-OneVision with the real architecture at toy sizes."""
    processor = build_tiny_processor()
    tokenizer = processor.tokenizer
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=processor.image_processor.image_grid_pinpoints,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, processor
