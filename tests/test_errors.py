"""Invalid hyperparameters and shapes raise a ValueError that names the value."""

import json
import re

import pytest
import torch

import lime
from lime_kernels import LiMEEmbedding, LiMELinear, cpu

INVALID = [
    (dict(num_experts=0), "num_experts=0"),
    (dict(num_experts=2.5), "num_experts=2.5"),
    (dict(num_experts=20), "num_experts=20"),  # more than out_features = 16
    (dict(top_k=0), "top_k=0"),
    (dict(num_experts=4, top_k=5), "top_k=5"),
    (dict(rank=0), "rank=0"),
    (dict(rank=True), "rank=True"),
    (dict(rank=9), "LiMELinear(in_features=8, out_features=16): rank=9 must be <= min(in_features, out_features) = 8"),
    (dict(alpha=0), "alpha=0"),
    (dict(alpha=-1.0), "alpha=-1.0"),
    (dict(temperature=0.0), "temperature=0.0"),
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(gamma_routing=1.5), "gamma_routing=1.5"),
    (dict(gamma_routing=-0.1), "gamma_routing=-0.1"),
    (dict(jitter_noise=1.0), "jitter_noise=1.0"),
    (dict(jitter_noise=-0.01), "jitter_noise=-0.01"),
    (dict(auto_topk_threshold=0.0), "auto_topk_threshold=0.0"),
    (dict(auto_topk_threshold=1.2), "auto_topk_threshold=1.2"),
    (dict(n_gram=0), "n_gram=0"),
    (dict(n_gram=2, rep_mode="mean"), "rep_mode='mean'"),
    (dict(rep_mode="sentence"), "rep_mode='sentence'"),
    (dict(router="softmax"), "router='softmax'"),
    (dict(ngram_mode="sliding"), "ngram_mode='sliding'"),
    (dict(soft_topk_temperature=0), "soft_topk_temperature=0"),
    (dict(dropout=1.0), "dropout=1.0"),
    (dict(LiME_init_std=-1.0), "LiME_init_std=-1.0"),
    (dict(peft_dtype=torch.int8), "peft_dtype=torch.int8"),
    (dict(moe_dtype="float32"), "moe_dtype='float32'"),
    (dict(backend="cuda"), "backend='cuda'"),
    (dict(auto_topk="yes"), "auto_topk='yes'"),
    (dict(sparse_mode=1), "sparse_mode=1"),
]


@pytest.mark.parametrize("kwargs,named", INVALID, ids=[named for _, named in INVALID])
def test_invalid_hyperparameter_names_itself(kwargs, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        LiMELinear(torch.nn.Linear(8, 16), **kwargs)


@pytest.mark.parametrize("kwargs,named", INVALID[:6] + INVALID[-6:], ids=[n for _, n in INVALID[:6] + INVALID[-6:]])
def test_apply_peft_validates_before_touching_the_model(kwargs, named):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))
    with pytest.raises(ValueError, match=re.escape(named)):
        lime.apply_peft(model, **kwargs)
    assert all(p.requires_grad for p in model.parameters()), "a failed apply_peft must leave the model untouched"
    assert not any(True for _ in lime.lime_layers(model))


def test_rank_above_the_layer_sizes_names_the_layer_its_sizes_and_path():
    with pytest.raises(ValueError, match=re.escape(
            "LiMEEmbedding(num_embeddings=6, embedding_dim=16): rank=7 must be <= min(num_embeddings, embedding_dim) = 6")):
        LiMEEmbedding(torch.nn.Embedding(6, 16), rank=7)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 32))
    with pytest.raises(ValueError, match=re.escape("1: LiMELinear(in_features=64, out_features=32): rank=48")):
        lime.apply_peft(model, rank=48)
    assert not any(True for _ in lime.lime_layers(model))
    with pytest.raises(ValueError, match=re.escape("LiMELinear(in_features=32, out_features=32): rank=1000000")):
        LiMELinear(torch.nn.Linear(32, 32), rank=10**6)  # refused before anything is allocated
    assert LiMELinear(torch.nn.Linear(64, 32), rank=32).A.shape == (32, 64)  # the bound itself is allowed


def test_numpy_scalars_are_numbers_and_tensors_are_refused():
    import numpy as np

    layer = LiMELinear(torch.nn.Linear(8, 16), temperature=np.float32(0.25), num_experts=np.int64(3))
    # Stored as Python numbers, which JSON (adapter_config.json) takes.
    assert type(layer.routing.temperature) is float and type(layer.routing.num_experts) is int
    assert (layer.routing.temperature, layer.routing.num_experts) == (0.25, 3)
    config = lime.LiMEConfig(rank=np.int64(3), pad_token_id=np.int64(0), alpha=np.float32(8))
    assert '"rank": 3' in config.to_json_string() and type(config.pad_token_id) is int
    with pytest.raises(ValueError, match=re.escape("a Python number, not a tensor (use .item()); got temperature=")):
        LiMELinear(torch.nn.Linear(8, 16), temperature=torch.tensor(0.5))
    with pytest.raises(ValueError, match="targets=3"):
        lime.apply_peft(torch.nn.Sequential(torch.nn.Linear(8, 16)), targets=3)


def test_conflicting_or_inapplicable_options_are_refused():
    from types import SimpleNamespace

    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(20, 8)
    tokenizer = SimpleNamespace(pad_token_id=0)
    with pytest.raises(ValueError, match=r"pad_token_id=7 differs from the tokenizer's pad_token_id=0"):
        lime.apply_peft(model, targets=["embed"], tokenizer=tokenizer, pad_token_id=7)
    lime.apply_peft(model, targets=["embed"], tokenizer=tokenizer, pad_token_id=0)  # the same id: no conflict
    assert model.embed.pad_token_id == 0
    with pytest.raises(ValueError, match=r"dora_detach_norm=True applies to peft='dora' only; got peft='lora'"):
        lime.apply_peft(torch.nn.Sequential(torch.nn.Linear(8, 16)), dora_detach_norm=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA refuses backend='triton'")
def test_triton_backend_without_cuda_is_refused_when_built(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"backend='triton' needs a CUDA device.*TRITON_INTERPRET=1"):
        LiMELinear(torch.nn.Linear(8, 16), backend="triton")
    with pytest.raises(ValueError, match=r"backend='triton' needs a CUDA device"):
        LiMEEmbedding(torch.nn.Embedding(10, 16), backend="triton")
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 8))
    with pytest.raises(ValueError, match=r"^0: backend='triton' needs a CUDA device"):
        lime.apply_peft(model, backend="triton")
    assert isinstance(model[0], torch.nn.Linear) and model[0].weight.requires_grad  # the model as it was
    on_cpu = "cpu" if cpu.available() else "reference"  # 'auto' takes the C++ operators for CPU inputs
    assert LiMELinear(torch.nn.Linear(8, 16), backend="auto").resolve_backend(torch.randn(2, 8)) == on_cpu
    # Under the interpreter the kernels run on CPU; a CPU input is then accepted.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert LiMELinear(torch.nn.Linear(8, 16), backend="triton").resolve_backend(torch.randn(2, 8)) == "triton"


def test_triton_backend_refuses_what_it_cannot_fuse(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # built without CUDA (refused otherwise)
    for layer, reason in [(LiMELinear(torch.nn.Linear(200, 200), rank=129, backend="triton"), "rank=129"),
                          (LiMELinear(torch.nn.Linear(8, 200), num_experts=65, backend="triton"), "num_experts=65")]:
        with pytest.raises(ValueError, match=reason):
            layer.resolve_backend(torch.randn(2, 8))


def test_only_linear_layers_are_wrapped():
    with pytest.raises(ValueError, match="Conv1d"):
        LiMELinear(torch.nn.Conv1d(8, 16, 1))


@pytest.mark.parametrize("shape", [(8,), (3, 7), (2, 5, 9)])
def test_wrong_input_shape_names_both_shapes(shape):
    layer = LiMELinear(torch.nn.Linear(8, 16))
    with pytest.raises(ValueError, match=re.escape("(..., 8)")) as error:
        layer(torch.randn(shape))
    assert str(tuple(shape)) in str(error.value)


@pytest.mark.parametrize(
    "x_shape,mask_shape",
    [((2, 5, 8), (2, 4)), ((2, 5, 8), (5, 2)), ((2, 5, 8), (10,)), ((6, 8), (6, 2)), ((6, 8), (3,))],
)
def test_mask_shape_mismatch_names_both_shapes(x_shape, mask_shape):
    layer = LiMELinear(torch.nn.Linear(8, 16))
    with pytest.raises(ValueError) as error:
        layer(torch.randn(x_shape), attention_mask=torch.ones(mask_shape, dtype=torch.long))
    assert str(tuple(mask_shape)) in str(error.value) and str(tuple(x_shape)) in str(error.value)


def test_floating_masks_are_refused():
    layer = LiMELinear(torch.nn.Linear(8, 16))
    with pytest.raises(ValueError, match="float32"):
        layer(torch.randn(2, 3, 8), attention_mask=torch.zeros(2, 3))


def test_balance_loss_without_a_graph_names_reentrant_checkpointing():
    from torch.utils.checkpoint import checkpoint

    model = lime.apply_peft(torch.nn.Sequential(torch.nn.Linear(8, 16))).train()
    x = torch.randn(2, 3, 8, requires_grad=True)
    checkpoint(model, x, use_reentrant=True)  # the forward runs under no_grad
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        lime.compute_balance_loss(model)
    checkpoint(model, x, use_reentrant=False)
    assert lime.compute_balance_loss(model).requires_grad
    with torch.no_grad():  # statistics recorded and read without grad on purpose
        model(x)
        lime.compute_balance_loss(model)


def test_targets_matching_nothing_list_existing_names():
    model = torch.nn.Sequential()
    model.add_module("encoder", torch.nn.Sequential())
    model.encoder.add_module("query", torch.nn.Linear(8, 8))
    model.encoder.add_module("value", torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"q_proj.*query, value"):
        lime.apply_peft(model, targets=["q_proj"])


def test_runtime_switches_validate():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16))
    lime.apply_peft(model)
    with pytest.raises(ValueError, match="temperature=0"):
        lime.set_temperature(model, 0)
    with pytest.raises(ValueError, match="gamma_routing=2"):
        lime.set_gamma_routing(model, 2)
    with pytest.raises(ValueError, match="auto_topk_threshold=0"):
        lime.set_auto_topk(model, True, threshold=0)
    with pytest.raises(ValueError, match="num_experts"):
        model[0].update_routing(num_experts=2)
    with pytest.raises(ValueError, match="has no LiME layer"):
        lime.set_jitter(torch.nn.Linear(2, 2), 0.1)


def test_every_entry_point_has_the_same_defaults():
    """LiMELinear, apply_peft, LiMEConfig and the option dataclasses declare each default once each:
    they must agree, and they must be the LiME README's recommended values."""
    import dataclasses
    import inspect

    from lime_kernels.options import AdapterOptions, RoutingOptions

    def signature_defaults(function):
        return {n: p.default for n, p in inspect.signature(function).parameters.items() if p.default is not p.empty}

    layer = signature_defaults(LiMELinear.__init__)
    injector = signature_defaults(lime.apply_peft)
    config = {f.name: f.default for f in dataclasses.fields(lime.LiMEConfig)}
    options = {f.name: f.default for cls in (RoutingOptions, AdapterOptions) for f in dataclasses.fields(cls)}
    assert layer == options
    for name, value in layer.items():
        assert injector[name] == value, name
        assert config[name] == value, name
    assert set(injector) - {"tokenizer"} == set(config)
    # The embedding layer, the prompt encoder and prompt tuning's injector repeat the shared keywords.
    from lime.prompt_tuning import apply_peft as apply_prompt_tuning
    from lime_kernels.embedding import LiMEEmbedding
    from lime_kernels.prompt import LiMEPromptEncoder

    for entry in (LiMEEmbedding.__init__, LiMEPromptEncoder.__init__, apply_prompt_tuning):
        defaults = signature_defaults(entry)
        shared = set(defaults) & set(layer)
        assert len(shared) >= 20, (entry.__qualname__, sorted(shared))
        assert {name: defaults[name] for name in shared} == {name: layer[name] for name in shared}, entry.__qualname__
    readme = dict(num_experts=4, rank=2, n_gram=1, top_k=1, temperature=0.5, gamma_routing=0.7,
                  auto_topk_threshold=0.5, jitter_noise=0.1)
    assert {k: layer[k] for k in readme} == readme


def _small_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("embed", torch.nn.Embedding(20, 16))
    model.add_module("encoder", torch.nn.Sequential())
    model.encoder.add_module("query", torch.nn.Linear(16, 16))
    model.encoder.add_module("value", torch.nn.Linear(16, 16))
    return model.eval()


def test_applying_lime_twice_says_so_and_how_to_undo_it():
    model = lime.apply_peft(_small_model(), targets=["query"])
    with pytest.raises(ValueError) as error:
        lime.apply_peft(model, targets=["value"])
    message = str(error.value)
    assert "already has 1 LiME layer(s): encoder.query" in message
    assert "lime.remove_lime(model)" in message and "lime.load_adapter" in message
    assert "linear" not in message.replace("LiME", "")  # LiME's own internals are never offered as targets
    assert not isinstance(model.encoder.value, LiMELinear)


def test_targets_naming_unwrappable_modules_say_what_they_are():
    model = _small_model()
    with pytest.raises(ValueError, match=r"encoder is a Sequential, not a layer LiME wraps .*layers that exist: embed, "
                                         r"query, value"):
        lime.apply_peft(model, targets=["encoder"])


def test_remove_lime_needs_lime_layers():
    with pytest.raises(ValueError, match="Sequential has no LiME layer to remove"):
        lime.remove_lime(_small_model())


def test_remove_lime_gives_back_the_original_modules_hooks_and_flags():
    model = _small_model()
    model.encoder.value.weight.requires_grad_(False)  # the user's own choice, restored as it was
    originals = {name: module for name, module in model.named_modules()}
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    expected = model(ids)
    lime.apply_peft(model, targets=["embed", "query", "value"], preserve_tying=False)
    with torch.no_grad():
        for _, layer in lime.lime_layers(model):
            layer.B.normal_()
    assert not torch.equal(model(ids), expected)
    assert lime.remove_lime(model) is model
    assert {name: module for name, module in model.named_modules()} == originals
    assert torch.equal(model(ids), expected)
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not hasattr(model, "lime_config") and not hasattr(model, "_lime_mask_scopes")
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    assert flags == {"embed.weight": True, "encoder.query.weight": True, "encoder.query.bias": True,
                     "encoder.value.weight": False, "encoder.value.bias": True}
    lime.apply_peft(model, targets=["query"])  # applied again, from scratch
    assert [name for name, _ in lime.lime_layers(model)] == ["encoder.query"]


def _truncate(path):
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])


def _garbage(path):
    with open(path, "wb") as handle:
        handle.write(b"\xff" * 64)


@pytest.mark.parametrize("damage", [_truncate, _garbage], ids=["truncated", "garbage"])
@pytest.mark.parametrize("file_name", ["adapter_model.safetensors", "adapter_config.json"])
def test_corrupt_adapter_files_are_named_before_the_model_changes(tmp_path, damage, file_name):
    lime.save_adapter(lime.apply_peft(_small_model(), targets=["query"]), str(tmp_path / "adapter"))
    path = tmp_path / "adapter" / file_name
    damage(str(path))
    fresh = _small_model()
    flags = [p.requires_grad for p in fresh.parameters()]
    with pytest.raises(ValueError, match=re.escape(str(path))) as error:
        lime.load_adapter(fresh, str(tmp_path / "adapter"))
    assert "corrupt or truncated" in str(error.value)
    assert not list(lime.lime_layers(fresh)) and [p.requires_grad for p in fresh.parameters()] == flags


def _edit_config(path, edit):
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    edit(config)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle)


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c["lime_config"].update(use_rslora=False), "its lime_config is not one this version writes: unknown "
                                                           "LiMEConfig field"),
    (lambda c: c["layers"]["encoder.query"].pop("routing"), r"layer encoder.query .*missing keys \['routing'\]"),
    (lambda c: c["layers"]["encoder.query"]["routing"].update(foo=1), "layer encoder.query .*unexpected keyword "
                                                                       "argument 'foo'"),
    (lambda c: c["layers"]["encoder.query"]["routing"].update(temperature=-1.0), "temperature"),
    (lambda c: c["layers"]["encoder.query"]["base"].pop("out_features"), r"base lacks \['out_features'\]"),
    (lambda c: c["layers"]["encoder.query"].update({"class": "LiMEMystery"}), "unknown class 'LiMEMystery'"),
], ids=["lime-config-field", "missing-key", "unknown-option", "invalid-value", "base-shape", "class"])
def test_adapter_configs_this_version_did_not_write_are_named_before_the_model_changes(tmp_path, edit, expected):
    """A record or a lime_config from another writer is a ValueError naming the file, raised before any
    layer is added (not a KeyError / TypeError from half-way through, with the model already wrapped)."""
    model = lime.apply_peft(_small_model(), targets=["query"])
    directory = lime.save_adapter(model, str(tmp_path / "adapter"))
    _edit_config(str(tmp_path / "adapter" / "adapter_config.json"), edit)
    fresh = _small_model()
    flags = [p.requires_grad for p in fresh.parameters()]
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "adapter" / "adapter_config.json")) + ".*" + expected):
        lime.load_adapter(fresh, directory)
    assert not list(lime.lime_layers(fresh)) and [p.requires_grad for p in fresh.parameters()] == flags
    assert not hasattr(fresh, "lime_config")


def test_loading_into_layers_set_up_differently_names_every_difference(tmp_path):
    """Only the tensors would be loaded into a model already wrapped: a layer whose adapter options
    differ from the saved ones would compute another function than the saved one. Its routing options
    are runtime switches: they are set from the adapter."""
    saved = lime.apply_peft(_small_model(), targets=["query"], temperature=2.0, alpha=64.0, dropout=0.1)
    directory = lime.save_adapter(saved, str(tmp_path / "adapter"))
    other = lime.apply_peft(_small_model(), targets=["query"], top_k=2, auto_topk=False)
    before = {name: tensor.clone() for name, tensor in other.state_dict().items()}
    with pytest.raises(ValueError) as error:
        lime.load_adapter(other, directory)
    assert str(error.value).startswith("adapter layer encoder.query: the model's LiME layer there is set up differently "
                                       "(adapter.alpha: adapter 64.0, model 16.0; adapter.dropout: adapter 0.1, model "
                                       "0.0)"), str(error.value)
    assert all(torch.equal(tensor, before[name]) for name, tensor in other.state_dict().items())
    assert other.encoder.query.routing.top_k == 2, "a refused load changes nothing"
    # What does not change the function (statistics, backend) may differ; the routing is the adapter's.
    same = lime.apply_peft(_small_model(), targets=["query"], alpha=64.0, dropout=0.1, top_k=2, auto_topk=False,
                           track_aux=False, backend="reference")
    lime.load_adapter(same, directory)
    assert same.encoder.query.routing == saved.encoder.query.routing
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.equal(same.encoder.query(x), saved.encoder.query(x))


def test_a_module_shared_by_two_parents_is_loaded_under_both(tmp_path):
    """apply_peft wraps a shared module once, under every parent; save_adapter records it under its
    first name; load_adapter must put the loaded layer under every parent too."""
    def build():
        torch.manual_seed(0)
        shared = torch.nn.Linear(8, 8)
        return torch.nn.Sequential(torch.nn.Sequential(shared, torch.nn.ReLU()),
                                   torch.nn.Sequential(shared, torch.nn.ReLU())).eval()

    model = lime.apply_peft(build(), targets=["0"], num_experts=2)
    assert model[0][0] is model[1][0]
    with torch.no_grad():
        model[0][0].B.normal_(0, 0.5)
    loaded = lime.load_adapter(build(), lime.save_adapter(model, str(tmp_path / "adapter")))
    assert isinstance(loaded[0][0], LiMELinear) and loaded[0][0] is loaded[1][0]
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_target_its_variant_refuses_leaves_the_model_as_it_was():
    """SliceFine's rank must fit every target's rows: the check of the narrower target, after the wider
    one was accepted, must leave neither a wrapped layer nor frozen parameters behind, and name the path."""
    model = _small_model()
    model.encoder.value = torch.nn.Linear(16, 4)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"^encoder\.value: rank must be <= out_features \(4\) for SliceFine"):
        lime.apply_peft(model, targets=["query", "value"], peft="slicefine", rank=8, num_experts=2)
    assert not list(lime.lime_layers(model)) and not hasattr(model, "lime_config")
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    lime.apply_peft(model, targets=["query", "value"], peft="slicefine", rank=4, num_experts=2)  # a corrected retry
    assert [name for name, _ in lime.lime_layers(model)] == ["encoder.query", "encoder.value"]


@pytest.mark.parametrize("layer", [torch.nn.Linear(8, 8), torch.nn.Embedding(10, 8)], ids=["Linear", "Embedding"])
def test_a_bare_layer_given_as_the_model_says_what_to_do(layer):
    wrapper = "LiMEEmbedding" if isinstance(layer, torch.nn.Embedding) else "LiMELinear"
    for targets in (None, ["weight"], lambda path, module: True):
        with pytest.raises(ValueError, match=(rf"the model is itself a {type(layer).__name__}: apply_peft wraps the layers "
                                              rf"inside a model.*lime_kernels\.{wrapper}\(layer, \.\.\.\).*nn\.Sequential")):
            lime.apply_peft(layer, targets=targets)
    model = lime.apply_peft(torch.nn.Sequential(layer), targets=None if wrapper == "LiMELinear" else ["0"])
    assert len(list(lime.lime_layers(model))) == 1  # the advice works
