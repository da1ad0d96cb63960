"""LiMETrainer with DeepSpeed ZeRO (stage 2 or 3) on 2 CPU processes (DeepSpeed's CPU accelerator,
gloo), or the same training in one process without DeepSpeed; writes the LiME tensors at the end
and the adapter through LiMETrainer.save_model.

    python -m torch.distributed.run --nproc_per_node=2 tests/deepspeed_train.py OUTPUT_DIR STAGE
    python tests/deepspeed_train.py OUTPUT_DIR 0        # one process, the same global batch

The two learning rates are LiMETrainer's optimizer groups (the DeepSpeed config has no "optimizer"
section, so DeepSpeed takes the Trainer's optimizer). No routing noise, dropout nor balance loss
(whose batch statistics differ between one batch of 4 and two of 2), so both runs compute the same
function of the same rows.
"""

import os
import sys

import safetensors.torch
import torch
from fsdp_run import LIME_OPTIONS
from llava_helpers import LIME_PARAMETER_NAMES, README_TARGETS, TinyCollator, TinyConversations

import lime
from lime.tiny import build_tiny_llava_onevision

GLOBAL_BATCH = 4


def main(output, stage):
    os.makedirs(output, exist_ok=True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model, processor = build_tiny_llava_onevision(seed=0)
    torch.manual_seed(0)
    lime.apply_peft(model, targets=README_TARGETS, tokenizer=processor.tokenizer, backend="reference", **LIME_OPTIONS)
    extra = {}
    if stage:
        extra = dict(ddp_backend="gloo", deepspeed={
            "zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto"})
    if stage:  # a config with its own optimizer would drop LiME's two learning rates: refused
        refused = dict(extra["deepspeed"], optimizer={"type": "AdamW", "params": {"lr": "auto"}})
        try:
            lime.LiMETrainer(model=model, args=lime.LiMEArguments(output_dir=output, report_to=[], use_cpu=True,
                                                                  ddp_backend="gloo", deepspeed=refused))
        except ValueError as error:
            with open(os.path.join(output, f"optimizer-section-rank{os.environ['RANK']}.error"), "w") as handle:
                handle.write(str(error))
    args = lime.LiMEArguments(
        output_dir=output, per_device_train_batch_size=GLOBAL_BATCH // world, max_steps=3, moe_lr=2e-2, peft_lr=1e-2,
        importance_coef=0.0, kl_coef=0.0, logging_steps=1, save_strategy="no", report_to=[], seed=0,
        dataloader_num_workers=0, use_cpu=True, disable_tqdm=True, remove_unused_columns=False, **extra)
    trainer = lime.LiMETrainer(model=model, args=args, train_dataset=TinyConversations(12),
                               data_collator=TinyCollator(processor))
    assert trainer.is_deepspeed_enabled == bool(stage)
    trainer.train()
    trainer.save_model(os.path.join(output, "saved"))
    if stage == 3:  # the partitioned parameters, gathered the way save_adapter does
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            final = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
                     if n.rsplit(".", 1)[-1] in LIME_PARAMETER_NAMES}
    else:
        final = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()
                 if n.rsplit(".", 1)[-1] in LIME_PARAMETER_NAMES}
    if trainer.args.process_index == 0:
        safetensors.torch.save_file(final, os.path.join(output, "final.safetensors"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
