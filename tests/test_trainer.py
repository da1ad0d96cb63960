"""LiMETrainer and adapters: parameter groups, the balance loss schedule, logs, 8-bit AdamW,
save/load round trips, mismatch errors, atomic saves, exact resume, and DDP on two CPU processes."""

import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch
from llava_helpers import README_TARGETS, TinyCollator, TinyConversations, make_batch

import lime
import lime.prompt_tuning
from lime import LiMEArguments, LiMETrainer, load_adapter, save_adapter
from lime.trainer import checkpointing_arguments
from lime.tiny import build_tiny_llava_onevision
from lime_kernels import LiMEDoRALinear

HERE = os.path.dirname(__file__)


def _wrapped(peft="lora", seed=0, **kwargs):
    model, processor = build_tiny_llava_onevision(seed=seed)
    torch.manual_seed(seed)
    if peft == "prompt":
        lime.prompt_tuning.apply_peft(model, num_virtual_tokens=4, **kwargs)
    elif peft == "embedding":
        lime.apply_peft(model, targets=README_TARGETS + ["embed_tokens"], tokenizer=processor.tokenizer, **kwargs)
    else:
        lime.apply_peft(model, targets=README_TARGETS, peft=peft, tokenizer=processor.tokenizer, **kwargs)
    return model, processor


def _args(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-3,
                  moe_lr=2e-2, peft_lr=1e-2, weight_decay=0.01, logging_steps=1, save_strategy="no", report_to=[],
                  seed=0, dataloader_num_workers=0, balance_every_n_steps=2, use_cpu=True,
                  disable_tqdm=True, remove_unused_columns=False)
    values.update(overrides)
    return LiMEArguments(**values)


def _lime_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if n.rsplit(".", 1)[-1] in ("A", "B", "m", "part_T", "prompt_delta", "LiMEs", "LiME_shared", "gamma")}


def test_arguments_validate_and_default_to_the_readme():
    args = LiMEArguments(output_dir="unused", report_to=[])
    assert (args.moe_lr, args.peft_lr, args.importance_coef, args.kl_coef, args.balance_every_n_steps) == (
        1e-3, 4e-4, 0.1, 0.01, 50)
    for bad, named in [(dict(moe_lr=0), "moe_lr=0"), (dict(peft_lr=-1.0), "peft_lr=-1.0"),
                       (dict(kl_coef=-0.1), "kl_coef=-0.1"), (dict(balance_every_n_steps=0), "balance_every_n_steps=0")]:
        with pytest.raises(ValueError, match=named.replace("(", r"\(")):
            LiMEArguments(output_dir="unused", report_to=[], **bad)
    with pytest.raises(ValueError, match="no LiME layer"):
        LiMETrainer(model=build_tiny_llava_onevision()[0], args=args)
    model, processor = _wrapped()
    trainer = LiMETrainer(model=model, args=args, tokenizer=processor.tokenizer)  # the original README's call
    assert trainer.processing_class is processor.tokenizer
    with pytest.raises(ValueError, match="either tokenizer or processing_class"):
        LiMETrainer(model=model, args=args, tokenizer=processor.tokenizer, processing_class=processor)


@pytest.mark.parametrize("peft", ["lora", "dora"])
def test_parameter_groups_and_learning_rates(tmp_path, peft):
    model, processor = _wrapped(peft)
    trainer = LiMETrainer(model=model, args=_args(tmp_path, weight_decay=0.05), train_dataset=TinyConversations(),
                          data_collator=TinyCollator(processor), processing_class=processor)
    optimizer = trainer.create_optimizer()
    moe, adapter = optimizer.param_groups
    names = {id(p): n.rsplit(".", 1)[-1] for n, p in model.named_parameters()}
    assert {names[id(p)] for p in moe["params"]} == {"LiMEs", "LiME_shared", "gamma"}
    assert {names[id(p)] for p in adapter["params"]} == ({"A", "B", "m"} if peft == "dora" else {"A", "B"})
    assert (moe["lr"], moe["weight_decay"], adapter["lr"], adapter["weight_decay"]) == (2e-2, 0.0, 1e-2, 0.05)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == trainable


def test_adamw_bnb_8bit_step_runs(tmp_path):
    pytest.importorskip("bitsandbytes")
    model, processor = _wrapped()
    trainer = LiMETrainer(model=model, args=_args(tmp_path, optim="adamw_bnb_8bit", max_steps=2),
                          train_dataset=TinyConversations(), data_collator=TinyCollator(processor))
    before = _lime_state(model)
    trainer.train()
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    assert type(optimizer).__module__.startswith("bitsandbytes")
    # 8-bit states (bitsandbytes keeps tensors under min_8bit_size, like this tiny model's, in 32 bits).
    assert optimizer.args.optim_bits == 8
    after = _lime_state(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.isfinite(t).all() for t in after.values())


def test_balance_loss_every_n_steps_with_accumulation(tmp_path, monkeypatch):
    import lime.trainer as trainer_module

    model, processor = _wrapped()
    seen = []
    original = trainer_module.compute_balance_loss

    def spy(model_, importance_coef, kl_coef):
        stats = [layer.last_stats for _, layer in lime.lime_layers(model_)]
        expected = (importance_coef * torch.stack([s.importance for s in stats]).mean()
                    + kl_coef * torch.stack([s.kl_uniform for s in stats]).mean())
        value = original(model_, importance_coef, kl_coef)
        torch.testing.assert_close(value, expected)
        seen.append((trainer.state.global_step, importance_coef, kl_coef))
        return value

    monkeypatch.setattr(trainer_module, "compute_balance_loss", spy)
    tracking = []

    def record_tracking(layer, args, kwargs):
        tracking.append((trainer.state.global_step, layer.adapter.track_aux))

    next(iter(lime.lime_layers(model)))[1].register_forward_pre_hook(record_tracking, with_kwargs=True)
    trainer = LiMETrainer(model=model, args=_args(tmp_path, max_steps=7, balance_every_n_steps=3,
                                                  gradient_accumulation_steps=2, importance_coef=0.3, kl_coef=0.05),
                          train_dataset=TinyConversations(32), data_collator=TinyCollator(processor))
    trainer.train()
    assert [step for step, _, _ in seen] == [0, 0, 3, 3, 6, 6]  # every micro-batch of steps 0, 3, 6
    assert all((i, k) == (0.3, 0.05) for _, i, k in seen)
    assert all(on == (step % 3 == 0) for step, on in tracking) and len(tracking) == 14
    logged = [entry for entry in trainer.state.log_history if "task_loss" in entry]
    assert logged and all(k in logged[0] for k in ("balance_loss", "lime/importance", "lime/kl_uniform", "lime/load",
                                                   "lime/usage_entropy", "lime/imbalance_ratio", "lime/active_experts"))


class _TinyRegression(torch.nn.Module):
    """A LiME layer and a squared error: the Trainer's loop in milliseconds."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x, labels):
        return {"loss": (self.proj(x) - labels).square().mean()}


def test_balance_schedule_leaves_the_layers_track_aux_as_configured(tmp_path):
    import json

    model = lime.apply_peft(_TinyRegression())
    generator = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(3, 8, generator=generator), "labels": torch.randn(3, 8, generator=generator)}
            for _ in range(4)]
    trainer = LiMETrainer(model=model, args=_args(tmp_path, max_steps=2, balance_every_n_steps=2),
                          train_dataset=data, eval_dataset=data[:2])
    trainer.train()  # the last step, 1, is not a balance step
    assert model.proj.adapter.track_aux
    trainer.evaluate()
    assert model.proj.adapter.track_aux
    trainer.save_model(str(tmp_path / "saved"))
    with open(tmp_path / "saved" / "lime_adapter" / "adapter_config.json") as file:
        assert json.load(file)["layers"]["proj"]["adapter"]["track_aux"]


@pytest.mark.parametrize("peft", ["lora", "dora", "lora_fa", "slicefine", "embedding", "prompt"])
def test_save_and_load_round_trip_is_bit_identical(tmp_path, peft):
    model, processor = _wrapped(peft, n_gram=2, router="maxabs")
    trainer = LiMETrainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=TinyConversations(),
                          data_collator=TinyCollator(processor))
    trainer.train()
    lime.set_temperature(model, 0.8)  # a runtime switch is part of what is saved
    directory = save_adapter(model, str(tmp_path / "adapter"))
    assert sorted(os.listdir(directory)) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = safetensors.torch.load_file(os.path.join(directory, "adapter_model.safetensors"))
    assert not any(".linear." in key or ".embedding." in key for key in saved), "only LiME's own tensors"

    fresh, _ = build_tiny_llava_onevision(seed=0)  # the same pretrained base
    base_state = {n: p.clone() for n, p in fresh.named_parameters()}
    torch.manual_seed(123)  # other random LiME initializations: everything must come from the file
    load_adapter(fresh, directory)
    assert all(torch.equal(p, base_state[n]) for n, p in fresh.named_parameters() if n in base_state)
    batch = make_batch(processor, ["What is shown?", "Which option is correct? A B C D"], padding_side="left")
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, fresh(**batch).logits)
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {n for n, p in model.named_parameters()
                                                                           if p.requires_grad}


def test_load_mismatches_name_the_module_and_the_shapes(tmp_path):
    model, _ = _wrapped("dora")
    directory = save_adapter(model, str(tmp_path / "adapter"))

    class Other(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = torch.nn.Linear(4, 4)

    with pytest.raises(ValueError, match=r"adapter layer model\.\S+_proj: Other has no module at that path"):
        load_adapter(Other(), directory)
    wider, _ = build_tiny_llava_onevision()
    name = "model.language_model.layers.0.self_attn.q_proj"
    parent = wider.get_submodule(name.rsplit(".", 1)[0])
    parent.q_proj = torch.nn.Linear(64, 96)
    before = {n: p.clone() for n, p in wider.named_parameters()}
    with pytest.raises(ValueError, match=r"q_proj.*\(64, 64\) in the adapter and \(64, 96\) in the model"):
        load_adapter(wider, directory)
    assert not any(True for _ in lime.lime_layers(wider)), "a failed load leaves the model unchanged"
    assert all(torch.equal(p, before[n]) and p.requires_grad == before[n].requires_grad
               for n, p in wider.named_parameters())
    other_variant, _ = _wrapped("lora")
    with pytest.raises(ValueError, match=r"LiMEDoRALinear \(peft='dora'\).*LiMELinear \(peft='lora'\)"):
        load_adapter(other_variant, directory)
    same_variant, _ = _wrapped("dora", seed=5)
    load_adapter(same_variant, directory)  # a model already holding the same layers takes the tensors
    layer = same_variant.get_submodule(name)
    assert isinstance(layer, LiMEDoRALinear) and torch.equal(layer.m, model.get_submodule(name).m)
    with pytest.raises(FileNotFoundError, match="no LiME adapter"):
        load_adapter(same_variant, str(tmp_path))


def test_a_failed_save_never_replaces_a_good_one(tmp_path, monkeypatch):
    model, _ = _wrapped()
    # A run's output directory: what else it holds stays (a save replaces the adapter's two files only).
    (tmp_path / "adapter" / "checkpoint-100").mkdir(parents=True)
    (tmp_path / "adapter" / "notes.txt").write_text("keep me")
    directory = save_adapter(model, str(tmp_path / "adapter"))
    assert sorted(os.listdir(directory)) == ["adapter_config.json", "adapter_model.safetensors", "checkpoint-100",
                                             "notes.txt"]
    assert (tmp_path / "adapter" / "notes.txt").read_text() == "keep me"
    good = open(os.path.join(directory, "adapter_model.safetensors"), "rb").read()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with torch.no_grad():
        next(iter(lime.lime_layers(model)))[1].B.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, directory)
    assert open(os.path.join(directory, "adapter_model.safetensors"), "rb").read() == good
    assert sorted(os.listdir(directory)) == ["adapter_config.json", "adapter_model.safetensors", "checkpoint-100",
                                             "notes.txt"], "no staging file is left behind"
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_resume_from_checkpoint_continues_exactly(tmp_path):
    """2N steps straight == N steps, a checkpoint, a new trainer resuming, N more steps."""
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, balance_every_n_steps=2)

    def run(output, resume=None):
        model, processor = _wrapped(dropout=0.1)
        trainer = LiMETrainer(model=model, args=_args(tmp_path, output_dir=str(tmp_path / output), **common),
                              train_dataset=TinyConversations(16), data_collator=TinyCollator(processor),
                              processing_class=processor)
        trainer.train(resume_from_checkpoint=resume)
        return _lime_state(model)

    straight = run("straight")
    checkpoint = tmp_path / "straight" / "checkpoint-3"
    assert (checkpoint / "lime_adapter" / "adapter_config.json").exists()
    assert not (checkpoint / "model.safetensors").exists(), "checkpoints hold the adapter, not the model"
    resumed = run("resumed", resume=str(checkpoint))
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def run_ddp_training(output, backend="auto", port=29517, interpret=False):
    """Two CPU processes (gloo) train the tiny model; returns (initial, [rank 0, rank 1]) LiME tensors."""
    script = os.path.join(HERE, "ddp_train.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", script,
               str(output), backend]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]), OMP_NUM_THREADS="1")
    if interpret:
        environment["TRITON_INTERPRET"] = "1"
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [safetensors.torch.load_file(os.path.join(output, f"rank{rank}.safetensors")) for rank in (0, 1)]
    return safetensors.torch.load_file(os.path.join(output, "initial.safetensors")), ranks


def assert_ranks_agree_and_trained(initial, ranks):
    assert ranks[0].keys() == ranks[1].keys() == initial.keys() and ranks[0]
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    assert any(not torch.equal(ranks[0][n], initial[n]) for n in initial), "the parameters trained"


def test_ddp_on_two_cpu_processes_ends_with_identical_parameters(tmp_path):
    assert_ranks_agree_and_trained(*run_ddp_training(tmp_path))


def test_gradient_checkpointing_and_bf16_autocast(tmp_path):
    """Trainer options the paper's recipe uses: gradient checkpointing gives the same training as
    without; bf16 autocast (a float32 model on CPU here) trains, LiME's math staying in float32."""
    results = {}
    for name, overrides in {"plain": {}, "checkpointing": checkpointing_arguments(use_reentrant=False),
                            "bf16": dict(bf16=True)}.items():
        model, processor = _wrapped()
        trainer = LiMETrainer(model=model, args=_args(tmp_path, max_steps=3, **overrides),
                              train_dataset=TinyConversations(), data_collator=TinyCollator(processor),
                              processing_class=processor)
        trainer.train()
        results[name] = (_lime_state(model), [e["loss"] for e in trainer.state.log_history if "loss" in e])
    plain, checkpointed = results["plain"][0], results["checkpointing"][0]
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-4, atol=1e-5, msg=key)
    bf16_state, bf16_losses = results["bf16"]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in bf16_state.values())
    assert bf16_losses[-1] < bf16_losses[0]
    assert any(not torch.allclose(bf16_state[k], plain[k]) for k in plain), "autocast did run in bf16"


def test_balance_step_after_a_batch_that_reached_other_layers(tmp_path):
    """LiME on every linear layer, the vision tower's included: a text-only balance step after an image one
    logs the statistics of the layers it ran (the vision layers keep the image step's, consumed), and trains."""
    model, processor = build_tiny_llava_onevision(seed=0)
    lime.apply_peft(model, targets=None, tokenizer=processor.tokenizer)
    model.train()
    lime.set_track_aux(model, True)
    model(**make_batch(processor, ["What is shown?", "Is it a dog?"], ["a cat", "no"]))
    lime.compute_balance_loss(model)
    text = processor(text=["Is 4 even? yes", "Is 3 even? no"], return_tensors="pt", padding=True)
    model(**text, labels=text["input_ids"])
    ran = [name for name, layer in lime.lime_layers(model) if layer.last_stats.importance is not None]
    assert ran and all(".language_model." in name or "lm_head" in name for name in ran), ran
    metrics = LiMETrainer._balance_metrics(model)
    expected = torch.stack([layer.last_stats.importance.detach() for name, layer in lime.lime_layers(model)
                            if name in ran]).mean()
    torch.testing.assert_close(metrics["importance"], expected)
    assert lime.compute_balance_loss(model).requires_grad


def test_torch_compile_trains_as_eager_in_one_graph(tmp_path):
    """LiMETrainer with torch_compile=True (what `lime train --compile` sets): the Trainer compiles the whole
    model; the LiME training step (padded text batches of one shape, the balance loss every step) traces as one
    graph with no break, three steps compile once, and the losses and trained parameters are the eager run's.
    (aot_eager: the graph as traced, run without inductor's code generation, which test_compile covers.)"""
    from torch._dynamo.utils import counters

    results = []
    for compiled in (False, True):
        model, processor = _wrapped()
        torch._dynamo.reset()
        counters.clear()
        overrides = dict(torch_compile=True, torch_compile_backend="aot_eager") if compiled else {}
        # SGD: Adam's normalized steps would turn the rounding of near-zero gradients into whole steps.
        trainer = LiMETrainer(model=model, args=_args(tmp_path, max_steps=3, balance_every_n_steps=1, optim="sgd",
                                                      **overrides),
                              train_dataset=TinyConversations(), data_collator=TinyCollator(processor, images=False))
        with torch._dynamo.config.patch(error_on_recompile=True):
            trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        results.append((losses, _lime_state(model)))
        if compiled:
            assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] == 1
    (eager_losses, eager_state), (compiled_losses, compiled_state) = results
    assert len(eager_losses) == 3
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=1e-6)
    for name, value in eager_state.items():
        torch.testing.assert_close(compiled_state[name], value, rtol=1e-4, atol=1e-5 * value.abs().max().item(),
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_cli_compile_flags_reach_the_trainer_and_the_evaluation():
    """`lime train --compile` sets the Trainer's torch_compile; `lime eval --compile` generates through a
    static cache and a compiled decoding step."""
    from lime.cli import build_parser
    from lime.evaluation import compiled_generation

    parser = build_parser()
    train = parser.parse_args(["train", "--model", "m", "--data", "d", "--compile"])
    assert train.compile and not parser.parse_args(["train", "--model", "m", "--data", "d"]).compile
    assert parser.parse_args(["eval", "--model", "m", "--adapter", "a", "--data", "d", "--compile"]).compile
    options = compiled_generation()
    assert options["cache_implementation"] == "static" and options["compile_config"]._compile_all_devices
