"""What an adapter records besides its layers: the base model it was trained on (a model of another class
gets a warning naming both), and a backend that the loading machine may replace."""

import warnings

import pytest
import torch
import transformers as tf

import lime
from lime_kernels import LiMELinear

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)


def _causal_lm(model_class, config_class, **changes):
    torch.manual_seed(0)
    return model_class(config_class(**dict(SIZES, **changes)))


def test_an_adapter_of_a_qwen2_loaded_into_a_llama_of_the_same_shapes_warns_naming_both(tmp_path):
    qwen = lime.apply_peft(_causal_lm(tf.Qwen2ForCausalLM, tf.Qwen2Config), targets=["q_proj", "v_proj"])
    directory = lime.save_adapter(qwen, str(tmp_path / "adapter"))
    with pytest.warns(UserWarning, match=r"another base model: the adapter was saved from a Qwen2ForCausalLM, this "
                                         r"model is a LlamaForCausalLM"):
        lime.load_adapter(_causal_lm(tf.LlamaForCausalLM, tf.LlamaConfig), directory)
    with pytest.warns(UserWarning, match=r"intermediate_size: 64 in the adapter's base model, 96 here"):
        lime.load_adapter(_causal_lm(tf.Qwen2ForCausalLM, tf.Qwen2Config, intermediate_size=96), directory)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same class and sizes: silent
        lime.load_adapter(_causal_lm(tf.Qwen2ForCausalLM, tf.Qwen2Config), directory)


def test_the_base_model_record_names_the_class_type_and_sizes(tmp_path):
    import json

    qwen = lime.apply_peft(_causal_lm(tf.Qwen2ForCausalLM, tf.Qwen2Config), targets=["q_proj"])
    lime.save_adapter(qwen, str(tmp_path / "adapter"))
    record = json.load(open(tmp_path / "adapter" / "adapter_config.json"))["base_model"]
    assert record["class"] == "Qwen2ForCausalLM" and record["model_type"] == "qwen2"
    assert {key: record["sizes"][key] for key in ("hidden_size", "intermediate_size", "vocab_size")} == {
        "hidden_size": 32, "intermediate_size": 64, "vocab_size": 64}
    bare = lime.apply_peft(torch.nn.Sequential(torch.nn.Linear(8, 8)))
    lime.save_adapter(bare, str(tmp_path / "bare"))
    assert json.load(open(tmp_path / "bare" / "adapter_config.json"))["base_model"] == {
        "class": "Sequential", "model_type": None, "sizes": {}}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA refuses backend='triton'")
def test_an_adapter_saved_with_the_triton_backend_loads_on_cpu_with_another_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # built (not run) where the kernels could run
    model = lime.apply_peft(torch.nn.Sequential(torch.nn.Linear(8, 8)), backend="triton")
    directory = lime.save_adapter(model, str(tmp_path / "adapter"))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match=r"backend='triton' needs a CUDA device"):
        lime.load_adapter(torch.nn.Sequential(torch.nn.Linear(8, 8)), directory)
    loaded = lime.load_adapter(torch.nn.Sequential(torch.nn.Linear(8, 8)), directory, backend="auto")
    layer = loaded[0]
    assert isinstance(layer, LiMELinear) and layer.adapter.backend == "auto" and loaded.lime_config.backend == "auto"
    assert torch.equal(layer.A, model[0].A)
    with pytest.raises(ValueError, match=r"backend must be one of 'auto', 'reference', 'triton', 'cpu'; got backend='cuda'"):
        lime.load_adapter(torch.nn.Sequential(torch.nn.Linear(8, 8)), directory, backend="cuda")
