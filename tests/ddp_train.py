"""Run by the tests under `torch.distributed.run` with 2 CPU processes (gloo): train the tiny
LLaVA-OneVision with LiMETrainer and write each rank's LiME parameters.

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_train.py OUTPUT_DIR [BACKEND]
"""

import os
import sys

import safetensors.torch
import torch
from llava_helpers import README_TARGETS, TinyCollator, TinyConversations

import lime
from lime.tiny import build_tiny_llava_onevision


def lime_tensors(model):
    names = ("A", "B", "LiMEs", "LiME_shared", "gamma")
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in names}


def main(output: str, backend: str) -> None:
    rank = int(os.environ["RANK"])
    model, processor = build_tiny_llava_onevision(seed=0)
    torch.manual_seed(0)  # the same LiME initialization on every rank (DDP also broadcasts rank 0's)
    lime.apply_peft(model, targets=README_TARGETS, tokenizer=processor.tokenizer, backend=backend)
    if rank == 0:
        safetensors.torch.save_file(lime_tensors(model), os.path.join(output, "initial.safetensors"))
    args = lime.LiMEArguments(
        output_dir=os.path.join(output, "out"), per_device_train_batch_size=2, max_steps=3, moe_lr=2e-2,
        peft_lr=1e-2, balance_every_n_steps=2, logging_steps=1, save_strategy="no", report_to=[], seed=rank,
        dataloader_num_workers=0, use_cpu=True, ddp_backend="gloo", disable_tqdm=True, remove_unused_columns=False,
    )
    trainer = lime.LiMETrainer(model=model, args=args, train_dataset=TinyConversations(16),
                               data_collator=TinyCollator(processor))
    trainer.train()
    safetensors.torch.save_file(lime_tensors(model), os.path.join(output, f"rank{rank}.safetensors"))
    # The Trainer leaves its gloo group up: torn down at interpreter exit, its threads aborted rank 0 once
    # ("terminate called without an active exception") after training had finished. Every rank done, then down.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "auto")
