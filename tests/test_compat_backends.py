"""compat="original" on the backends and in the command line (tests/test_compat_original.py holds the math
against the oracle): which backend runs it, the fused path equal to the reference where it runs, the
refusals naming why, and `lime train/eval` taking compat (and the frame sampling it implies).

The fused comparisons need a CUDA device or Triton's interpreter (`TRITON_INTERPRET=1`); the rest runs anywhere.
"""

import os

import pytest
import torch

import lime
from lime import cli
from lime.adapter import saved_compat
from lime_kernels import (LiMEDoRALinear, LiMEEmbedding, LiMELinear, LiMELoRAFALinear, LiMEPromptEncoder,
                          LiMESliceFineLinear, cpu)
from lime_kernels.testing import assert_close

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
FUSED = INTERPRETER or torch.cuda.is_available()
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETER else "cpu"
needs_fused = pytest.mark.skipif(not FUSED, reason="needs a CUDA device or TRITON_INTERPRET=1")


def _randomized(layer):
    with torch.no_grad():
        for _, parameter in layer.named_parameters(recurse=False):
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return layer


def _run(make, inputs, training, **call):
    """Output, every trainable gradient and the statistics of one seeded call on each backend."""
    results = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        layer = _randomized(make(backend)).to(DEVICE)
        layer.train(training)
        x = inputs.to(DEVICE)
        torch.manual_seed(42)
        out = layer(x, **call)
        stats = layer.last_stats
        loss = out.square().sum() + ((stats.importance + stats.kl_uniform) if training else 0)
        loss.backward()
        results[backend] = (out.detach(), [p.grad for p in layer.parameters() if p.requires_grad], stats)
    return results


def _assert_backends_agree(results, training):
    (out, grads, stats), (fused_out, fused_grads, fused_stats) = results["reference"], results["triton"]
    assert_close("out", fused_out, out, torch.float32)
    for index, (fused, expected) in enumerate(zip(fused_grads, grads)):
        assert_close(f"grad {index}", fused, expected, torch.float32)
    assert_close("usage", fused_stats.usage, stats.usage, torch.float32)
    if training:
        assert_close("load", fused_stats.load, stats.load, torch.float32)
        assert_close("importance", fused_stats.importance, stats.importance, torch.float32)


@needs_fused
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("n_gram", [1, 3])
@pytest.mark.parametrize("cls", [LiMELinear, LiMELoRAFALinear], ids=["lora", "lora_fa"])
def test_fused_linear_equals_the_reference(cls, n_gram, training):
    # 6 tokens: n = 3 divides them, so the kernels' load (every token) equals the original's (every anchor).
    x = torch.randn(2, 6, 16)
    results = _run(lambda backend: cls(torch.nn.Linear(16, 12), num_experts=4, rank=3, n_gram=n_gram, jitter_noise=0.2,
                                       dropout=0.3, compat="original", backend=backend), x, training)
    _assert_backends_agree(results, training)


@needs_fused
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("peft", ["lora", "lora_fa"])
def test_fused_embedding_equals_the_reference(peft, training):
    ids = torch.randint(0, 20, (2, 6))
    results = _run(lambda backend: LiMEEmbedding(torch.nn.Embedding(20, 12), num_experts=4, rank=3, n_gram=3,
                                                 jitter_noise=0.2, peft=peft, compat="original", backend=backend),
                   ids, training)
    _assert_backends_agree(results, training)


@needs_fused
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("input_conditioned", [True, False], ids=["conditioned", "static"])
def test_fused_prompts_equal_the_reference(input_conditioned, training):
    embeds = torch.randn(2, 5, 12)
    results = _run(lambda backend: LiMEPromptEncoder(6, 12, num_experts=4, n_gram=3, jitter_noise=0.2,
                                                     input_conditioned=input_conditioned, prompt_dropout=0.1,
                                                     compat="original", backend=backend), embeds, training)
    _assert_backends_agree(results, training)


@pytest.mark.parametrize("cls,reason", [(LiMEDoRALinear, "routes DoRA from its adapted output"),
                                        (LiMESliceFineLinear, "routes SliceFine from the whole product")])
def test_dora_and_slicefine_run_on_the_reference(cls, reason, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # backend='triton' is built without CUDA then
    x = torch.randn(2, 5, 16)
    on_cpu = "cpu" if cpu.available() else "reference"  # 'auto' takes the C++ operators for CPU inputs
    assert cls(torch.nn.Linear(16, 12), compat="original", backend="auto").resolve_backend(x) == on_cpu
    layer = cls(torch.nn.Linear(16, 12), compat="original", backend="triton")
    with pytest.raises(ValueError, match=f"backend='triton' cannot run this layer: compat='original' {reason}"):
        layer(x)
    # compat='lime' keeps them fused.
    assert cls(torch.nn.Linear(16, 12), backend="triton").resolve_backend(x) == "triton"


def test_statistics_the_kernels_count_otherwise_take_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(2, 7, 16)
    mask = torch.ones(2, 7, dtype=torch.long)
    layer = LiMELinear(torch.nn.Linear(16, 12), compat="original", backend="triton")
    with pytest.raises(ValueError, match="counts padding in the statistics"):
        layer(x, attention_mask=mask)
    layer.set_track_aux(False)  # no statistics: nothing differs
    assert layer.resolve_backend(x, mask.bool()) == "triton"
    layer = LiMELoRAFALinear(torch.nn.Linear(16, 12), n_gram=3, compat="original", backend="triton").train()
    with pytest.raises(ValueError, match="one load selection per n-gram anchor"):
        layer.resolve_backend(x)  # 3 does not divide 7
    assert layer.resolve_backend(x[:, :6]) == "triton"
    layer = LiMELinear(torch.nn.Linear(16, 12), sparse_mode=True, compat="original", backend="triton").train()
    with pytest.raises(ValueError, match="sparse AutoTop-K candidate"):
        layer.resolve_backend(x)


def test_compat_is_not_a_runtime_switch():
    layer = LiMELinear(torch.nn.Linear(16, 12), compat="original")
    with pytest.raises(ValueError, match="cannot switch compat"):
        layer.update_routing(compat="lime")
    with pytest.raises(ValueError, match="router"):
        layer.update_routing(router="cosine")
    layer.update_routing(temperature=0.3)
    assert layer.routing.temperature == 0.3 and layer.compat == "original"


def test_loading_into_layers_of_the_other_compat_is_refused(tmp_path):
    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Linear(12, 16))

    original = lime.apply_peft(model(), compat="original")
    directory = lime.save_adapter(original, str(tmp_path / "adapter"))
    assert saved_compat(directory) == "original"
    assert saved_compat(lime.save_adapter(lime.apply_peft(model()), str(tmp_path / "lime"))) == "lime"
    with pytest.raises(ValueError, match="routing.compat: adapter 'original', model 'lime'"):
        lime.load_adapter(lime.apply_peft(model()), directory)
    assert lime.load_adapter(lime.apply_peft(model(), compat="original"), directory)[0].compat == "original"


def test_prompt_dropout_is_the_originals():
    with pytest.raises(ValueError, match="prompt_dropout"):
        LiMEPromptEncoder(4, 12, prompt_dropout=0.1)
    encoder = LiMEPromptEncoder(4, 12, prompt_dropout=0.1, compat="original").train()
    assert not torch.equal(encoder(torch.randn(2, 3, 12)), encoder.eval()(torch.randn(2, 3, 12)))


def test_the_command_line_takes_compat_and_floors_frames_with_it():
    parser = cli.build_parser()
    base = ["--model", "m", "--data", "d"]
    args = parser.parse_args(["train", *base, "--compat", "original"])
    assert args.compat == "original" and cli._frame_sampling(args, args.compat) == "floor"
    args = parser.parse_args(["train", *base, "--compat", "original", "--frame-sampling", "round"])
    assert cli._frame_sampling(args, args.compat) == "round"
    args = parser.parse_args(["train", *base])
    assert args.compat == "lime" and cli._frame_sampling(args, args.compat) == "round"
    with pytest.raises(SystemExit):
        parser.parse_args(["train", *base, "--compat", "paper"])


def test_lime_train_and_eval_with_compat_original(tmp_path, monkeypatch, model_dir):
    """`lime train --compat original` trains original-semantics layers and floors the video frames; `lime eval`
    takes compat from the adapter and floors them too."""
    import lime.data
    from lime.demo import write_demo_dataset

    roundings = []
    indices = lime.data.frame_indices
    monkeypatch.setattr(lime.data, "frame_indices",
                        lambda total, num_frames, frame_rounding="round": roundings.append(frame_rounding)
                        or indices(total, num_frames, frame_rounding))
    data_dir, root = write_demo_dataset(str(tmp_path / "data"))
    output = str(tmp_path / "run")
    common = ["--model", model_dir, "--data", data_dir, "--data-root", root, "--num-video-frames", "4",
              "--max-length", "512"]
    assert cli.main(["train", *common, "--output", output, "--max-steps", "2", "--batch-size", "2", "--peft",
                     "slicefine", "--compat", "original", "--save-steps", "1000"]) == 0
    adapter = os.path.join(output, "adapter")
    assert saved_compat(adapter) == "original"
    assert roundings and set(roundings) == {"floor"}
    roundings.clear()
    assert cli.main(["eval", *common, "--adapter", adapter, "--out", str(tmp_path / "eval"), "--num-samples", "2",
                     "--max-new-tokens", "2"]) == 0
    assert roundings and set(roundings) == {"floor"}
