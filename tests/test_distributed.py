"""Several devices: FSDP2 (`fully_shard`) training, saving and loading on two CPU processes (gloo)
against a single-process run of the same global batch, saves interrupted on one rank, LiMETrainer
under FSDP2 resuming exactly, `lime eval` split across processes, and a model placed over several
devices (`device_map`)."""

import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch

import lime

HERE = os.path.dirname(__file__)
# Sharded and single-process AdamW runs of the same global batch differ only by the order of float32
# sums (per-rank partial sums, gradient reduction); after 3 steps the LiME parameters agree to this
# (measured: 6.7e-6 with the reference backend), while every tensor moves by more than 30 times it.
SHARDED_ATOL = 3e-5


def torchrun(script, *arguments, port, interpret=False, check=True, timeout=600):
    """Two processes of `script` (a file in tests/, or `-m module`) under torch.distributed.run."""
    target = ["-m", script[3:]] if script.startswith("-m ") else [os.path.join(HERE, script)]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", *target,
               *map(str, arguments)]
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]), OMP_NUM_THREADS="1")
    if interpret:
        environment["TRITON_INTERPRET"] = "1"
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def read(path):
    with open(path, "rb") as handle:
        return handle.read()


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.slow)])
def test_fsdp2_trains_like_one_process_saves_loads_and_resumes(tmp_path, backend, monkeypatch):
    import fsdp_run

    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # this process re-creates the saved triton layers on CPU

    torchrun("fsdp_run.py", "train", tmp_path, backend, port=29621, interpret=backend == "triton")
    sharded = safetensors.torch.load_file(str(tmp_path / "sharded.safetensors"))

    # The oracle: one process, the whole global batch, the reference backend.
    model, processor = fsdp_run.wrapped("reference")
    initial = fsdp_run.lime_tensors(model)
    fsdp_run.train(model, processor)
    single = fsdp_run.lime_tensors(model)
    assert sharded.keys() == single.keys() and sharded
    difference = max(float((sharded[k] - single[k]).abs().max()) for k in single)
    moved = min(float((single[k] - initial[k]).abs().max()) for k in single)
    print(f"FSDP2 ({backend}) vs one process: max |difference| {difference:.3g}; every tensor moved >= {moved:.3g}")
    assert difference <= SHARDED_ATOL and moved > 30 * SHARDED_ATOL, (difference, moved)

    # Loaded before sharding and into a sharded model: exactly the trained tensors.
    for name in ("loaded-unsharded", "loaded-sharded"):
        loaded = safetensors.torch.load_file(str(tmp_path / f"{name}.safetensors"))
        assert all(torch.equal(loaded[k], sharded[k]) for k in sharded), name
    # Bit-identical files whichever way they were saved: sharded after training, sharded after a
    # load, and from one process holding the same tensors.
    fresh = lime.load_adapter(fsdp_run.build_tiny_llava_onevision(seed=0)[0], str(tmp_path / "adapter"))
    lime.save_adapter(fresh, str(tmp_path / "one-process"))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        saved = read(tmp_path / "adapter" / name)
        assert saved == read(tmp_path / "resaved" / name) == read(tmp_path / "one-process" / name), name
        assert saved == read(tmp_path / "trainer" / "lime_adapter" / name), f"LiMETrainer.save_model: {name}"
    assert (tmp_path / "trainer" / "training_args.bin").is_file()
    # Resuming under FSDP2 (the adapter, and the optimizer state through torch.distributed.checkpoint)
    # continues exactly: the same tensors as the straight run, bit for bit.
    resumed = safetensors.torch.load_file(str(tmp_path / "resumed.safetensors"))
    assert resumed.keys() == sharded.keys()
    assert all(torch.equal(resumed[k], sharded[k]) for k in sharded), "resumed != straight"
    for rank in (0, 1):
        assert "is sharded (DTensor parameters) but lacks the adapter's LiME layers" in read(
            tmp_path / f"load-into-bare-sharded-rank{rank}.error").decode()
        assert "accelerate did not enable FSDP for distributed type MULTI_CPU" in read(
            tmp_path / f"trainer-fsdp-rank{rank}.error").decode()


@pytest.mark.parametrize("mode", ["failing-save", "killed-save"])
def test_a_save_interrupted_on_one_rank_keeps_the_previous_adapter(tmp_path, mode):
    result = torchrun("fsdp_run.py", mode, tmp_path, port=29622, check=False)
    adapter = tmp_path / "adapter"
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = safetensors.torch.load_file(str(adapter / "adapter_model.safetensors"))
    # The previous save: B still as initialized (zeros), not the changed one (+1).
    b_tensors = [v for k, v in saved.items() if k.endswith(".B")]
    assert b_tensors and all(torch.equal(v, torch.zeros_like(v)) for v in b_tensors)
    if mode == "failing-save":
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert read(tmp_path / "rank0.error").decode() == "OSError: disk full"
        assert read(tmp_path / "rank1.error").decode().startswith("RuntimeError: saving the LiME adapter to ")
        assert "failed on rank 0: OSError: disk full" in read(tmp_path / "rank1.error").decode()
        assert sorted(os.listdir(tmp_path)) == ["adapter", "rank0.error", "rank1.error"], "no staging directory left"
    else:
        assert result.returncode != 0, "the job fails when a rank dies"
        assert not any(name.startswith(".adapter.") for name in os.listdir(tmp_path)), os.listdir(tmp_path)


def test_lime_eval_on_two_processes_writes_the_single_process_results(tmp_path):
    from lime import cli
    from lime.demo import write_demo_dataset
    from lime.tiny import build_tiny_llava_onevision

    model, processor = build_tiny_llava_onevision(seed=0)
    model_dir = str(tmp_path / "model")
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    torch.manual_seed(0)
    lime.apply_peft(model, targets=["q_proj", "k_proj", "v_proj", "o_proj"], tokenizer=processor.tokenizer)
    with torch.no_grad():  # an adapter that changes the answers (B starts at zero)
        for name, parameter in model.named_parameters():
            if name.endswith(".B"):
                parameter.normal_(0.0, 0.5)
    adapter = lime.save_adapter(model, str(tmp_path / "adapter"))
    data_dir, root = write_demo_dataset(str(tmp_path / "data"))
    # 5 rows in batches of 2: 3 batches per split, so the two processes get unequal shares.
    options = ["--model", model_dir, "--adapter", adapter, "--data", data_dir, "--data-root", root, "--num-samples", "5",
               "--batch-size", "2", "--max-new-tokens", "4", "--num-video-frames", "4", "--max-length", "512"]
    assert cli.main(["eval", *options, "--out", str(tmp_path / "one")]) == 0
    result = torchrun("-m lime", "eval", *options, "--out", tmp_path / "two", port=29623)
    assert result.stdout.count("overall: accuracy") == 1, "only rank 0 reports"
    assert "(2 processes shared the batches)" in result.stdout
    for name in ("results.csv", "results.json"):
        assert read(tmp_path / "two" / name) == read(tmp_path / "one" / name), name
    predictions = json.loads(read(tmp_path / "one" / "results.json"))["predictions"]
    assert all(len(rows) == 5 for rows in predictions.values()) and len(predictions) > 1
    answers = [row["prediction"] for rows in predictions.values() for row in rows]
    assert len(set(answers)) > 1, "the answers differ from row to row, so their order is checked"


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_like_one_process_and_saves_the_adapter(tmp_path, stage):
    """ZeRO-2 / ZeRO-3 through LiMETrainer on DeepSpeed's CPU accelerator (gloo). DeepSpeed is no
    dependency of this project: the test runs where it is installed."""
    pytest.importorskip("deepspeed")
    from lime.tiny import build_tiny_llava_onevision

    torchrun("deepspeed_train.py", tmp_path / "zero", stage, port=29624 + stage)
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    single = subprocess.run([sys.executable, os.path.join(HERE, "deepspeed_train.py"), str(tmp_path / "one"), "0"],
                            capture_output=True, text=True, env=environment, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    for rank in (0, 1):
        error = read(tmp_path / "zero" / f"optimizer-section-rank{rank}.error").decode()
        assert "has an \"optimizer\" section" in error and "moe_lr, peft_lr" in error
    zero = safetensors.torch.load_file(str(tmp_path / "zero" / "final.safetensors"))
    one = safetensors.torch.load_file(str(tmp_path / "one" / "final.safetensors"))
    assert zero.keys() == one.keys() and zero
    difference = max(float((zero[k] - one[k]).abs().max()) for k in one)
    print(f"ZeRO-{stage} vs one process: max |difference| {difference:.3g}")
    assert difference <= SHARDED_ATOL
    # LiMETrainer.save_model wrote exactly the trained tensors, in the file one process writes for them.
    adapter = tmp_path / "zero" / "saved" / "lime_adapter"
    saved = safetensors.torch.load_file(str(adapter / "adapter_model.safetensors"))
    assert saved.keys() == zero.keys() and all(torch.equal(saved[k], zero[k]) for k in zero)
    fresh = lime.load_adapter(build_tiny_llava_onevision(seed=0)[0], str(adapter))
    lime.save_adapter(fresh, str(tmp_path / "one-process"))
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert read(adapter / name) == read(tmp_path / "one-process" / name), name


def _placed_model():
    """The tiny model with LiME layers whose adapter changes the outputs (B starts at zero)."""
    from llava_helpers import README_TARGETS
    from lime.tiny import build_tiny_llava_onevision

    model, processor = build_tiny_llava_onevision(seed=0)
    torch.manual_seed(0)
    lime.apply_peft(model, targets=README_TARGETS, tokenizer=processor.tokenizer)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".B"):
                parameter.normal_(0.0, 0.5)
    return model.eval(), processor


def _device_map(second_layer):
    """Everything on the CPU but the second decoder layer (and what follows it, for "meta")."""
    language = "model.language_model"
    device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu", "model.image_newline": "cpu",
                  f"{language}.embed_tokens": "cpu", f"{language}.rotary_emb": "cpu", f"{language}.layers.0": "cpu",
                  f"{language}.layers.1": second_layer, f"{language}.norm": "cpu", "lm_head": "cpu"}
    if second_layer == "meta":  # nothing computed on meta can come back
        device_map.update({f"{language}.norm": "meta", "lm_head": "meta"})
    return device_map


# accelerate names parameter keys (model.image_newline, which the map must place) as "not matching any
# submodule" although it places them: its warning is a false positive here.
_PARAMETER_KEY_WARNING = pytest.mark.filterwarnings(
    "ignore:The following device_map keys do not match any submodules:UserWarning")


def _padded_batch(processor):
    from llava_helpers import make_batch

    batch = make_batch(processor, ["What is shown?", "Which option is correct? A B C D"], padding_side="left")
    assert (batch["attention_mask"] == 0).any(), "the mask has padding to route around"
    return batch


@_PARAMETER_KEY_WARNING
def test_device_map_with_an_offloaded_layer_computes_like_one_device(tmp_path):
    """accelerate's device_map dispatch with one decoder layer offloaded: its weights (LiME's
    included) wait on the meta device and come to the CPU for its forward; outputs are bit-identical."""
    from accelerate import dispatch_model

    model, processor = _placed_model()
    batch = _padded_batch(processor)
    with torch.no_grad():
        expected = model(**batch).logits
    dispatch_model(model, _device_map("disk"), main_device="cpu", offload_dir=str(tmp_path / "offload"))
    offloaded = [(name, layer) for name, layer in lime.lime_layers(model) if ".language_model.layers.1." in name]
    assert offloaded and all(layer.LiMEs.device.type == "meta" for _, layer in offloaded), "weights wait on meta"
    with torch.no_grad():
        placed = model(**batch).logits
    assert torch.equal(placed, expected)


@_PARAMETER_KEY_WARNING
def test_device_map_each_lime_layer_computes_on_its_weights_device():
    """A decoder layer (and the rest after it) placed on the meta device: its LiME layers compute
    there, with the padding mask recorded on the CPU moved to them (a CPU mask would fail there)."""
    from accelerate import dispatch_model

    model, processor = _placed_model()
    batch = _padded_batch(processor)
    dispatch_model(model, _device_map("meta"), main_device="cpu")
    seen = {}

    def record(layer, inputs, output):
        seen[layer] = (inputs[0].device.type, output.device.type, layer.LiMEs.device.type)

    for _, layer in lime.lime_layers(model):
        layer.register_forward_hook(record)
    with torch.no_grad():  # the inner model: the outer one's hook would bring the output back to the CPU
        hidden = model.model(**batch).last_hidden_state
    assert hidden.device.type == "meta" and hidden.shape[:2] == batch["input_ids"].shape
    names = {layer: name for name, layer in lime.lime_layers(model)}
    assert set(seen) == set(names)
    for layer, devices in seen.items():
        device = "meta" if ".language_model.layers.1." in names[layer] else "cpu"
        assert devices == (device, device, device), (names[layer], devices)
        # The routing statistics over the valid tokens were computed where the layer computes.
        assert layer.last_stats.usage.device.type == device
