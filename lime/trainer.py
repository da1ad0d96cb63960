"""`LiMETrainer` / `LiMEArguments`: Hugging Face's Trainer, trained the way the LiME paper trains.

- Two learning rates: the expert vectors, the shared vector and its scale (`moe_lr`, no weight
  decay) and the adapter's weights (`peft_lr`, `weight_decay`), with any optimizer the Trainer
  offers (`optim="adamw_bnb_8bit"` included).
- The balance loss `importance_coef * importance + kl_coef * kl_uniform` (means over the LiME layers)
  is added on every `balance_every_n_steps`-th optimizer step (every micro-batch of that step); on
  the other steps the layers skip their statistics, so those cost nothing.
- The Trainer's logs (hence `report_to`) get the task loss, the balance terms, the entropy of the
  expert usage, its imbalance ratio and AutoTop-K's mean number of active experts.
- Checkpoints and `save_model` hold the LiME adapter (`lime_adapter/` inside the output directory,
  see `lime.save_adapter`), and `resume_from_checkpoint` reloads it: resuming continues exactly.
  A checkpoint is complete once its `trainer_state.json`, the Trainer's last write, is: an
  interrupted checkpoint save leaves a `checkpoint-N` without it, which `resume_from_checkpoint=True`
  passes over (with a warning) for the newest complete one, an explicit path to it is refused, and
  the next checkpoint save removes it.
- Multi-device: run under `torchrun` / `accelerate launch` (DDP). Each rank adds the balance loss of
  its own batch; DDP averages the gradients, so the effective balance term is the mean over ranks.
  A model sharded by FSDP2 is saved by every process together (see `lime.save_adapter`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import torch
import torch.nn as nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from lime_kernels.options import positive_integer, python_number

from .adapter import TRAINER_ADAPTER_DIR, is_sharded, load_adapter, save_adapter
from .balance import compute_balance_loss
from .injection import lime_layers
from .summary import LIME_BIAS, MOE_PARAMETERS, PEFT_PARAMETERS


# The Trainer's checkpoint folders (`checkpoint-<global step>`) and the file it writes last into each.
CHECKPOINT = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
TRAINER_STATE = "trainer_state.json"


def checkpoint_problem(path: str) -> Optional[str]:
    """None if `path` is a complete Trainer checkpoint (its trainer_state.json, written after every other
    file of the checkpoint, reads whole and names its step), else what is wrong with it."""
    state_path = os.path.join(path, TRAINER_STATE)
    if not os.path.isdir(path):
        return "it is not a directory"
    try:
        with open(state_path, encoding="utf-8") as handle:
            step = json.load(handle).get("global_step")
    except FileNotFoundError:
        return f"it has no {TRAINER_STATE}: its save was interrupted"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return f"its {TRAINER_STATE} is truncated or corrupt: its save was interrupted"
    match = CHECKPOINT.fullmatch(os.path.basename(os.path.normpath(path)))
    if match is not None and step != int(match.group(1)):
        return f"its {TRAINER_STATE} is of step {step}, not {match.group(1)}"
    return None


def _checkpoints(directory: str) -> List[str]:
    """The `checkpoint-N` folders of `directory`, newest (highest N) first."""
    if not os.path.isdir(directory):
        return []
    found = [(int(match.group(1)), entry) for entry in os.listdir(directory)
             if (match := CHECKPOINT.fullmatch(entry)) and os.path.isdir(os.path.join(directory, entry))]
    return [os.path.join(directory, entry) for _, entry in sorted(found, reverse=True)]


def last_complete_checkpoint(directory: str) -> str:
    """The newest complete checkpoint of `directory` (a warning names each newer incomplete one), or a
    ValueError naming the directory and every checkpoint it holds."""
    incomplete = []
    for path in _checkpoints(directory):
        problem = checkpoint_problem(path)
        if problem is None:
            if incomplete:
                warnings.warn(f"resuming from {path}, passing over {'; '.join(incomplete)}", stacklevel=3)
            return path
        incomplete.append(f"{os.path.basename(path)} ({problem})")
    raise ValueError(f"no complete checkpoint to resume from in {directory}"
                     + (f": {'; '.join(incomplete)}" if incomplete else ""))


@dataclass
class LiMEArguments(TrainingArguments):
    """TrainingArguments plus LiME's (defaults: the LiME README's)."""

    moe_lr: float = field(default=1e-3, metadata={"help": "learning rate of LiMEs, LiME_shared and gamma (no weight decay)"})
    peft_lr: float = field(default=4e-4, metadata={"help": "learning rate of the adapter's weights (A, B, m, part_T, prompt_delta)"})
    importance_coef: float = field(default=0.1, metadata={"help": "weight of the importance (squared coefficient of variation) loss"})
    kl_coef: float = field(default=0.01, metadata={"help": "weight of the KL divergence of expert usage to uniform"})
    balance_every_n_steps: int = field(default=50, metadata={"help": "add the balance loss on every n-th optimizer step"})

    def __post_init__(self):
        for name in ("moe_lr", "peft_lr"):
            value = python_number(name, getattr(self, name))
            setattr(self, name, value)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number; got {name}={value!r}")
        for name in ("importance_coef", "kl_coef"):
            value = python_number(name, getattr(self, name))
            setattr(self, name, value)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0; got {name}={value!r}")
        self.balance_every_n_steps = positive_integer("balance_every_n_steps", self.balance_every_n_steps)
        super().__post_init__()


def checkpointing_arguments(**checkpoint_kwargs) -> Dict[str, object]:
    """The `TrainingArguments` options that turn on activation (gradient) checkpointing, under the names
    this transformers takes: `activation_checkpointing[_kwargs]` where it has them (transformers 5.2x,
    which warns on the old names), `gradient_checkpointing[_kwargs]` before. `checkpoint_kwargs` (e.g.
    `use_reentrant=False`) go to `torch.utils.checkpoint` when given."""
    fields = {item.name for item in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: True, **({f"{name}_kwargs": checkpoint_kwargs} if checkpoint_kwargs else {})}


@contextlib.contextmanager
def _track_aux_set_to(model: nn.Module, track_aux: bool):
    """Every LiME layer's `track_aux` set to `track_aux` inside the block; the layers' own values after it
    (the user's configuration, which `save_adapter` writes)."""
    changed = [layer for _, layer in lime_layers(model) if layer.adapter.track_aux != track_aux]
    for layer in changed:
        layer.set_track_aux(track_aux)
    try:
        yield
    finally:
        for layer in changed:
            layer.set_track_aux(not track_aux)


# The logged LiME metrics, averaged over the balance micro-batches since the last log.
METRICS = ("task_loss", "balance_loss", "lime/importance", "lime/kl_uniform", "lime/load", "lime/usage_entropy",
           "lime/imbalance_ratio", "lime/active_experts")


class LiMETrainer(Trainer):
    """Trainer for a model wrapped by `lime.apply_peft` (or `lime.prompt_tuning.apply_peft`).

    Takes `LiMEArguments`; everything else is the Trainer's (`processing_class`, data collator, ...);
    `tokenizer=` (the original LiME README's call) is taken as `processing_class`.
    """

    def __init__(self, model: nn.Module = None, args: LiMEArguments = None, **kwargs):
        # The original LiME README passes `tokenizer=`; transformers 5 calls it `processing_class`.
        if "tokenizer" in kwargs:
            if kwargs.get("processing_class") is not None:
                raise ValueError("give either tokenizer or processing_class, not both")
            kwargs["processing_class"] = kwargs.pop("tokenizer")
        if args is not None and not isinstance(args, LiMEArguments):
            raise ValueError(f"LiMETrainer takes LiMEArguments; got {type(args).__name__}")
        if model is not None and not any(True for _ in lime_layers(model)):
            raise ValueError(f"{type(model).__name__} has no LiME layer; call lime.apply_peft first")
        super().__init__(model=model, args=args, **kwargs)
        if self.args.fsdp and not self.is_fsdp_enabled:
            # accelerate (1.15, 1.16) turns FSDP on for accelerator processes only; CPU processes would
            # quietly train with DDP instead.
            raise ValueError(
                f"fsdp={self.args.fsdp!r} was asked for, but accelerate did not enable FSDP for distributed type "
                f"{self.accelerator.distributed_type.value}: its FSDP runs on GPUs (or other accelerators) only. On CPU "
                "processes, shard the model with torch.distributed.fsdp.fully_shard and train it with torch's own loop")
        if self.is_deepspeed_enabled and "optimizer" in self.accelerator.state.deepspeed_plugin.deepspeed_config:
            # DeepSpeed would build that optimizer over all parameters with one learning rate.
            raise ValueError(
                "the DeepSpeed config has an \"optimizer\" section, which would replace LiMETrainer's parameter "
                "groups (moe_lr, peft_lr): remove it, and DeepSpeed takes the optimizer LiMETrainer builds (optim=...)")
        self._metric_sums = torch.zeros(len(METRICS), dtype=torch.float64)
        self._metric_count = 0

    # --- optimizer --------------------------------------------------------------------------------

    def lime_parameter_groups(self) -> List[Dict]:
        """[MoE group (moe_lr, no decay), PEFT group (peft_lr, weight_decay)] plus, if the model has
        other trainable parameters, the Trainer's own learning rate and decay rules for them."""
        moe, peft, other = [], [], []
        # A LiME layer's own bias (compat="original" SliceFine) is PEFT; a base model's trained bias is not.
        lime_biases = {id(layer._parameters[LIME_BIAS]) for _, layer in lime_layers(self.model)
                       if layer._parameters.get(LIME_BIAS) is not None}
        for name, parameter in self.model.named_parameters():
            if not parameter.requires_grad:
                continue
            leaf = name.rsplit(".", 1)[-1]
            is_peft = leaf in PEFT_PARAMETERS or id(parameter) in lime_biases
            (moe if leaf in MOE_PARAMETERS else peft if is_peft else other).append((name, parameter))
        groups = [
            {"params": [p for _, p in moe], "lr": self.args.moe_lr, "weight_decay": 0.0},
            {"params": [p for _, p in peft], "lr": self.args.peft_lr, "weight_decay": self.args.weight_decay},
        ]
        if other:
            decay = set(self.get_decay_parameter_names(self.model))
            groups += [
                {"params": [p for n, p in other if n in decay], "lr": self.args.learning_rate,
                 "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in other if n not in decay], "lr": self.args.learning_rate, "weight_decay": 0.0},
            ]
        return [group for group in groups if group["params"]]

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            optimizer_kwargs.pop("lr", None)  # each group has its own
            self.optimizer = optimizer_cls(self.lime_parameter_groups(), **optimizer_kwargs)
        return self.optimizer

    # --- loss -------------------------------------------------------------------------------------

    def is_balance_step(self) -> bool:
        return self.state.global_step % self.args.balance_every_n_steps == 0

    def _loss_is_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Whether the Trainer will leave the loss undivided by the accumulation steps (as it decides)."""
        decided = getattr(self, "loss_is_scaled_for_ga", None)
        if decided is not None:
            return decided
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def training_step(self, model, inputs, num_items_in_batch=None):
        # Through the backward too: checkpointing recomputes the forward there, and must do the same.
        with _track_aux_set_to(self.accelerator.unwrap_model(model), self.is_balance_step()):
            return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with _track_aux_set_to(self.accelerator.unwrap_model(model), False):  # evaluation needs no statistics
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)
        balance_step = model.training and self.is_balance_step()
        task_loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        loss = task_loss
        if balance_step:
            metrics = self._balance_metrics(unwrapped)
            balance = compute_balance_loss(unwrapped, self.args.importance_coef, self.args.kl_coef)
            # Like the task loss: per micro-batch, divided by the accumulation steps where the Trainer won't.
            if self._loss_is_scaled_for_accumulation(num_items_in_batch):
                balance = balance / self.current_gradient_accumulation_steps
            loss = task_loss + balance
            self._record(task_loss, balance, metrics)
        return (loss, outputs) if return_outputs else loss

    @staticmethod
    def _balance_metrics(model: nn.Module) -> Dict[str, torch.Tensor]:
        """Per-layer means of the statistics of this forward, detached, for the logs: of the layers that ran
        in it (a layer this batch did not reach, the vision tower's for a text-only batch, still holds an
        earlier forward's statistics, whose differentiable part the balance loss has consumed)."""
        stats = [layer.last_stats for _, layer in lime_layers(model)
                 if layer.last_stats is not None and layer.last_stats.importance is not None]
        if not stats:
            raise RuntimeError("no LiME layer recorded balance statistics in this training forward")
        device = stats[0].importance.device

        def mean(values):
            return torch.stack([v.detach().float().to(device) for v in values]).mean(dim=0)

        usage = mean(s.usage for s in stats)
        return {
            "importance": mean(s.importance for s in stats),
            "kl_uniform": mean(s.kl_uniform for s in stats),
            "load": mean(s.load for s in stats),
            "usage_entropy": -(usage * usage.clamp_min(1e-12).log()).sum(),
            "imbalance_ratio": usage.max() / usage.min().clamp_min(1e-12),
            "active_experts": mean(s.active_experts for s in stats),
        }

    def _record(self, task_loss: torch.Tensor, balance: torch.Tensor, metrics: Dict[str, torch.Tensor]) -> None:
        values = torch.stack([
            task_loss.detach().float(), balance.detach().float(), metrics["importance"], metrics["kl_uniform"],
            metrics["load"], metrics["usage_entropy"], metrics["imbalance_ratio"], metrics["active_experts"],
        ]).cpu().double()
        self._metric_sums += values
        self._metric_count += 1

    def log(self, logs: Dict[str, float], start_time: Optional[float] = None) -> None:
        if "loss" in logs and self._metric_count:
            local = torch.cat([self._metric_sums, torch.tensor([float(self._metric_count)], dtype=torch.float64)])
            gathered = self.accelerator.gather(local.to(self.args.device)).reshape(-1, local.numel()).cpu()
            count = gathered[:, -1].sum()
            if count > 0:
                means = gathered[:, :-1].sum(dim=0) / count
                logs.update({name: round(float(value), 6) for name, value in zip(METRICS, means)})
            self._metric_sums.zero_()
            self._metric_count = 0
        super().log(logs, start_time)

    # --- checkpoints ------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: Union[str, bool, None] = None, *args, **kwargs):
        """The Trainer's `train`; `resume_from_checkpoint=True` takes the newest *complete* checkpoint, and a
        path to an incomplete one is refused (see the module's docstring)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
        elif resume_from_checkpoint:
            problem = checkpoint_problem(resume_from_checkpoint)
            if problem is not None:
                raise ValueError(f"cannot resume from {resume_from_checkpoint}: {problem}")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _save_checkpoint(self, model, trial) -> None:
        # Checkpoints an interrupted save left (none is being written now: every process is here, and the
        # one about to be written, which another process may already have started, is left alone).
        if self.args.should_save:
            current = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            for path in _checkpoints(self._get_output_dir(trial=trial)):
                if os.path.basename(path) != current and checkpoint_problem(path) is not None:
                    shutil.rmtree(path)
        super()._save_checkpoint(model, trial)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        model = self.accelerator.unwrap_model(self.model)
        if not is_sharded(model):
            return super().save_model(output_dir, _internal_call)
        # Sharded (FSDP2): every process joins save_adapter's gathers, whatever the Trainer's own
        # FSDP saving would do with the whole model's state dict; rank 0 writes.
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_adapter(model, os.path.join(output_dir, TRAINER_ADAPTER_DIR))
        if self.args.should_save:
            self._save_alongside(output_dir)

    def _save(self, output_dir: Optional[str] = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_adapter(self.accelerator.unwrap_model(self.model), os.path.join(output_dir, TRAINER_ADAPTER_DIR))
        self._save_alongside(output_dir)

    def _save_alongside(self, output_dir: str) -> None:
        """What a checkpoint holds beside the adapter: the processor and the arguments."""
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_adapter(model if model is not None else self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load_adapter(self.model, self.state.best_model_checkpoint)
