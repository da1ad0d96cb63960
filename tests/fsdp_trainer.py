"""Run by the tests under `torch.distributed.run` with 2 CPU processes (gloo): LiMETrainer with the
Trainer's FSDP version 2 (accelerate's, over torch's `fully_shard`), straight or resumed from a
checkpoint; writes the gathered LiME parameters at the end.

    python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_trainer.py OUTPUT_DIR [CHECKPOINT]
"""

import os
import sys

import safetensors.torch
import torch
from fsdp_run import LIME_OPTIONS, lime_tensors
from llava_helpers import README_TARGETS, TinyCollator, TinyConversations

import lime
from lime.tiny import build_tiny_llava_onevision

FSDP_CONFIG = {"version": 2, "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer", "SiglipEncoderLayer"],
               "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT"}


def main(output, checkpoint=None):
    model, processor = build_tiny_llava_onevision(seed=0)
    torch.manual_seed(0)
    lime.apply_peft(model, targets=README_TARGETS, tokenizer=processor.tokenizer, backend="reference", **LIME_OPTIONS)
    args = lime.LiMEArguments(
        output_dir=output, per_device_train_batch_size=2, max_steps=4, moe_lr=2e-2, peft_lr=1e-2,
        balance_every_n_steps=2, logging_steps=1, save_strategy="steps", save_steps=2, report_to=[], seed=0,
        dataloader_num_workers=0, use_cpu=True, ddp_backend="gloo", disable_tqdm=True, remove_unused_columns=False,
        fsdp="full_shard", fsdp_config=FSDP_CONFIG,
    )
    trainer = lime.LiMETrainer(model=model, args=args, train_dataset=TinyConversations(16),
                               data_collator=TinyCollator(processor), processing_class=processor)
    trainer.train(resume_from_checkpoint=checkpoint)
    print("FSDP", trainer.is_fsdp_enabled, type(trainer.model).__name__, lime.is_sharded(trainer.model) if hasattr(lime, "is_sharded") else None, type(next(trainer.model.parameters())).__name__)
    final = lime_tensors(trainer.model)
    if trainer.args.process_index == 0:
        safetensors.torch.save_file(final, os.path.join(output, "final.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
