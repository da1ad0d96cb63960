"""Run by the tests under `torch.distributed.run` with 2 CPU processes (gloo): the tiny LLaVA-OneVision
with LiME layers sharded by FSDP2 (`torch.distributed.fsdp.fully_shard`), trained with torch's own loop
on a global batch split across the ranks, saved and loaded both ways.

    python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_run.py MODE OUTPUT_DIR [BACKEND]

MODE train: 3 steps of AdamW; writes `sharded.safetensors` (the gathered LiME tensors after training),
`adapter/` (save_adapter from the sharded model), `loaded-unsharded.safetensors` /
`loaded-sharded.safetensors` (the adapter loaded into a fresh model before / after sharding),
`resaved/` (save_adapter again from the model sharded and then loaded), `trainer/` (LiMETrainer's
save_model from it), `resumed.safetensors` (1 step, a checkpoint, 2 steps resumed from it) and
`trainer-fsdp-rank{r}.error` (LiMETrainer refusing the Trainer's FSDP config on CPU processes) and
`load-into-bare-sharded-rank{r}.error` (load_adapter refusing a model sharded without LiME layers).
MODE failing-save: saves `adapter/` once, changes the parameters, then saves again with rank 0's write
failing: every rank must raise, and writes `rank{r}.error`.
MODE killed-save: saves `adapter/` once, changes the parameters, then rank 1 dies as the second save
begins (the job ends without a second save).
"""

import os
import sys

import safetensors.torch
import torch
import torch.distributed as dist
from llava_helpers import LIME_PARAMETER_NAMES, README_TARGETS, TinyCollator, TinyConversations
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import lime
from lime.tiny import build_tiny_llava_onevision

GLOBAL_BATCH = 4
STEPS = 3
# No routing noise and no dropout: a sharded run and a single-process run then compute the same function.
LIME_OPTIONS = dict(jitter_noise=0.0, dropout=0.0)


def wrapped(backend, seed=0):
    model, processor = build_tiny_llava_onevision(seed=0)
    torch.manual_seed(seed)
    lime.apply_peft(model, targets=README_TARGETS, tokenizer=processor.tokenizer, backend=backend, **LIME_OPTIONS)
    return model, processor


def shard(model):
    """FSDP2 the way a 7B model is sharded: each decoder / encoder layer, then the rest at the root."""
    for layer in [*model.model.language_model.layers, *model.model.vision_tower.encoder.layers]:
        fully_shard(layer)
    fully_shard(model)
    return model


def lime_tensors(model):
    """The LiME parameters in full, on CPU (a collective on a sharded model)."""
    result = {}
    for name, parameter in model.named_parameters():
        if name.rsplit(".", 1)[-1] in LIME_PARAMETER_NAMES:
            value = parameter.full_tensor() if isinstance(parameter, DTensor) else parameter
            result[name] = value.detach().to("cpu", copy=True).contiguous()
    return result


def global_batches(processor):
    """STEPS batches of GLOBAL_BATCH conversations: the rows every run sees, in the same order."""
    data, collate = TinyConversations(GLOBAL_BATCH * STEPS), TinyCollator(processor)
    return [[data[i] for i in range(s * GLOBAL_BATCH, (s + 1) * GLOBAL_BATCH)] for s in range(STEPS)], collate


def make_optimizer(model):
    moe = [p for n, p in model.named_parameters() if p.requires_grad and n.rsplit(".", 1)[-1] in ("LiMEs", "LiME_shared", "gamma")]
    peft = [p for n, p in model.named_parameters() if p.requires_grad and n.rsplit(".", 1)[-1] in ("A", "B")]
    return torch.optim.AdamW([{"params": moe, "lr": 2e-2, "weight_decay": 0.0},
                              {"params": peft, "lr": 1e-2, "weight_decay": 0.01}])


def train(model, processor, rank=0, world=1, steps=range(STEPS), optimizer=None):
    """AdamW on the sum of the token losses over the global batch divided by its token count; each of
    `world` processes takes its contiguous share of the rows. FSDP averages the gradients over the
    ranks, so each rank's loss is scaled by `world`: the sharded gradient is the global batch's."""
    optimizer = optimizer if optimizer is not None else make_optimizer(model)
    batches, collate = global_batches(processor)
    share = GLOBAL_BATCH // world
    model.train()
    for step in steps:
        rows = batches[step]
        tokens = int((collate(rows)["labels"][:, 1:] != -100).sum())  # the model shifts the labels by one
        batch = collate(rows[rank * share:(rank + 1) * share])
        loss = model(**batch, num_items_in_batch=tokens).loss * world
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def resumed_run(output, backend, rank, world):
    """The first step, a checkpoint (the adapter, and the sharded optimizer state through
    torch.distributed.checkpoint), then a new model and optimizer resuming from it for the others."""
    model, processor = wrapped(backend)
    optimizer = train(shard(model), processor, rank, world, steps=range(1))
    checkpoint = os.path.join(output, "checkpoint")
    lime.save_adapter(model, checkpoint)
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=os.path.join(checkpoint, "optimizer"))
    del model, optimizer

    model = shard(wrapped(backend, seed=123)[0])
    lime.load_adapter(model, checkpoint)
    optimizer = make_optimizer(model)
    state = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=os.path.join(checkpoint, "optimizer"))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    train(model, processor, rank, world, steps=range(1, STEPS), optimizer=optimizer)
    return lime_tensors(model)


def main(mode, output, backend):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if mode == "train":
        model, processor = wrapped(backend)
        train(shard(model), processor, rank, world)
        trained = lime_tensors(model)
        lime.save_adapter(model, os.path.join(output, "adapter"))
        # Into a fresh model before it is sharded (every rank), then into one sharded first.
        before = lime.load_adapter(build_tiny_llava_onevision(seed=0)[0], os.path.join(output, "adapter"))
        after = shard(wrapped(backend, seed=123)[0])
        lime.load_adapter(after, os.path.join(output, "adapter"))
        loaded_after = lime_tensors(after)
        # A model sharded before it had LiME layers cannot take new ones (FSDP would not manage them).
        try:
            lime.load_adapter(shard(build_tiny_llava_onevision(seed=0)[0]), os.path.join(output, "adapter"))
        except ValueError as error:
            with open(os.path.join(output, f"load-into-bare-sharded-rank{rank}.error"), "w") as handle:
                handle.write(str(error))
        lime.save_adapter(after, os.path.join(output, "resaved"))
        # LiMETrainer's own save from a sharded model (collective, like save_adapter).
        lime.LiMETrainer(model=after, args=lime.LiMEArguments(output_dir=os.path.join(output, "trainer"), report_to=[],
                                                             use_cpu=True, ddp_backend="gloo")).save_model()
        resumed = resumed_run(output, backend, rank, world)
        # The Trainer's FSDP config on CPU processes: accelerate would quietly use DDP; LiMETrainer refuses.
        try:
            lime.LiMETrainer(model=wrapped(backend)[0], args=lime.LiMEArguments(
                output_dir=os.path.join(output, "unused"), report_to=[], use_cpu=True, ddp_backend="gloo", fsdp=True,
                fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"]}))
        except ValueError as error:
            with open(os.path.join(output, f"trainer-fsdp-rank{rank}.error"), "w") as handle:
                handle.write(str(error))
        if rank == 0:
            safetensors.torch.save_file(resumed, os.path.join(output, "resumed.safetensors"))
            safetensors.torch.save_file(trained, os.path.join(output, "sharded.safetensors"))
            safetensors.torch.save_file(lime_tensors(before), os.path.join(output, "loaded-unsharded.safetensors"))
            safetensors.torch.save_file(loaded_after, os.path.join(output, "loaded-sharded.safetensors"))
    else:
        model, processor = wrapped(backend)
        shard(model)
        lime.save_adapter(model, os.path.join(output, "adapter"))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name.endswith(".B"):
                    parameter.add_(1.0)
        if mode == "killed-save":
            if rank == 1:
                os._exit(3)  # dies where the second save would begin; rank 0 waits in the gather
            lime.save_adapter(model, os.path.join(output, "adapter"))
        elif mode == "failing-save":
            if rank == 0:
                def broken(*args, **kwargs):
                    raise OSError("disk full")

                safetensors.torch.save_file = broken
            try:
                lime.save_adapter(model, os.path.join(output, "adapter"))
            except (OSError, RuntimeError) as error:
                with open(os.path.join(output, f"rank{rank}.error"), "w") as handle:
                    handle.write(f"{type(error).__name__}: {error}")
        else:
            raise ValueError(f"unknown mode {mode!r}")
    # Every rank done with every collective (rank 0's broadcast of a failed save may still be sending)
    # before the group is torn down: a teardown racing a send aborted rank 0 once in a full `make test`.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "reference")
