"""`apply_peft` on a tiny LLaVA-OneVision: wrapping, freezing, training, and the padding mask's path."""

import json
import warnings

import pytest
import torch

import lime
from lime.tiny import build_tiny_llava_onevision
from llava_helpers import LIME_PARAMETER_NAMES, README_TARGETS, image, make_batch, readme_call
from lime_kernels import LiMELinear

def _randomize_adapters(model, seed=0):
    """B is zero at init (LiME starts as the base model); give it values so the adapters matter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lime.lime_layers(model):
            layer.B.copy_(torch.randn(layer.B.shape, generator=generator) * 0.3)


def fresh(**overrides):
    model, processor = build_tiny_llava_onevision(seed=0)
    return readme_call(model, processor, **overrides), processor


def test_readme_call_wraps_the_targets_and_freezes_the_rest():
    model, processor = fresh()
    names = [name for name, _ in lime.lime_layers(model)]
    # 2 SigLIP layers x (q, k, v, out_proj) + 2 Qwen2 layers x (q, k, v, o_proj)
    assert len(names) == 16
    assert sum(".vision_tower." in n for n in names) == 8 and sum(".language_model." in n for n in names) == 8
    assert all(n.rsplit(".", 1)[-1] in README_TARGETS for n in names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[-1] in LIME_PARAMETER_NAMES for n in trainable)
    assert model.lime_config.pad_token_id == processor.tokenizer.pad_token_id
    summary = lime.print_lime_summary(model)
    expected_peft = sum(layer.rank * (layer.in_features + layer.out_features) for _, layer in lime.lime_layers(model))
    expected_moe = sum(4 * layer.out_features + layer.out_features + 1 for _, layer in lime.lime_layers(model))
    assert summary["peft_parameters"] == expected_peft
    assert summary["moe_parameters"] == expected_moe
    assert summary["routing_parameters"] == 0 and summary["other_trainable_parameters"] == 0


def test_forward_backward_and_a_few_steps_lower_the_loss():
    model, processor = fresh()
    batch = make_batch(processor, ["What is shown?", "How many objects are there?"], ["a cat", "3"])
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for step in range(8):
        optimizer.zero_grad()
        out = model(**batch)
        loss = out.loss + lime.compute_balance_loss(model, importance_coef=0.1, kl_coef=0.01)
        loss.backward()
        if step == 0:
            for name, layer in lime.lime_layers(model):
                for pname in ("B", "LiMEs", "LiME_shared", "gamma"):
                    grad = getattr(layer, pname).grad
                    assert grad is not None and torch.isfinite(grad).all(), f"{name}.{pname}"
                assert layer.B.grad.abs().sum() > 0, f"{name}.B got a zero gradient"
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    stats = lime.get_expert_usage_stats(model)
    assert stats["layers"] == 16 and abs(sum(stats["usage_per_expert"]) - 1) < 1e-5


def _context_masks(model):
    """Record, for every LiME layer call, the mask its provider supplies and the input shape."""
    seen = {}

    def hook(layer, args, kwargs):
        context = layer.mask_provider() if layer.mask_provider is not None else None
        mask = None if context is None else context.mask.clone()
        seen.setdefault(layer.qualified_name, []).append((mask, tuple(args[0].shape)))

    handles = []
    for name, layer in lime.lime_layers(model):
        layer.qualified_name = name
        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    return seen, handles


def test_the_padding_mask_reaches_language_layers_only():
    model, processor = fresh()
    batch = make_batch(processor, ["What is shown?", "Which option is correct? A B C D"])
    assert (batch["attention_mask"] == 0).any(), "the batch must be padded"
    seen, handles = _context_masks(model)
    model.eval()
    with torch.no_grad():
        model(**batch)
    for handle in handles:
        handle.remove()
    for name, calls in seen.items():
        mask, shape = calls[0]
        if ".language_model." in name:
            assert torch.equal(mask, batch["attention_mask"]), name
        else:
            assert mask is None, f"{name} (input {shape}) must not see the text mask"
    # Outside any model call a layer sees no context mask, even right after a padded call.
    name, layer = next(lime.lime_layers(model))
    assert layer.mask_provider() is None


def test_embed_tokens_called_before_its_language_model_reads_the_enclosing_call_mask():
    """LLaVA calls the language model's embed_tokens itself, before the language model's call (whose
    scope the layer belongs to) begins: the padding mask comes from the enclosing model's call."""
    model, processor = build_tiny_llava_onevision(seed=0)
    lime.apply_peft(model, targets=["embed_tokens", "q_proj"], jitter_noise=0.0)  # no tokenizer: no pad id
    _randomize_adapters(model)
    embedding = dict(lime.lime_layers(model))["model.language_model.embed_tokens"]
    with torch.no_grad():  # the pad row is zero (padding_idx), whose delta would be zero masked or not
        embedding.embedding.weight[processor.tokenizer.pad_token_id].normal_()
    outputs = []
    embedding.register_forward_hook(lambda module, args, out: outputs.append(out))
    batch = make_batch(processor, ["What is shown?", "How many objects are there in the picture? answer with one number"],
                       padding_side="left")
    padding = batch["attention_mask"] == 0
    assert padding.any()
    model.eval()
    with torch.no_grad():
        model(**batch)
        frozen = embedding.embedding(batch["input_ids"])
    # Invalid tokens keep the frozen output exactly; valid ones are modulated.
    assert torch.equal(outputs[0][padding], frozen[padding])
    assert not torch.allclose(outputs[0][~padding], frozen[~padding])
    with torch.no_grad():
        embedding(batch["input_ids"])  # outside any model call: no mask, every token modulated
    assert not torch.allclose(outputs[1][padding], frozen[padding])


def test_padding_does_not_change_valid_tokens():
    """With rep_mode='mean' padding would enter every token's routing unless the mask reaches the layers."""
    model, processor = fresh(rep_mode="mean", jitter_noise=0.0)
    _randomize_adapters(model)
    model.eval()
    questions = ["What is shown?", "Which option is correct? answer with the letter only"]
    batch = make_batch(processor, questions)
    with torch.no_grad():
        together = model(**batch).logits
        for index in range(2):
            alone = make_batch(processor, [questions[index]])
            # the image of sequence `index` in the batch: rebuild it alone with the same pixels
            alone = processor(
                text=[processor.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": questions[index]}]}],
                    add_generation_prompt=True)],
                images=[image(index, 24 + 8 * index, 40 - 6 * index)], return_tensors="pt",
            )
            logits = model(**alone).logits[0]
            valid = batch["attention_mask"][index].bool()
            torch.testing.assert_close(together[index][valid], logits, rtol=1e-4, atol=1e-4)


def test_generate_with_cache_equals_generate_without():
    """Left-padded batch: decoding steps see (B, 1) inputs and the tail of the growing mask."""
    model, processor = fresh()
    _randomize_adapters(model, seed=1)
    model.eval()
    questions = ["What is shown?", "How many objects are there in the picture? answer with one number"]
    batch = make_batch(processor, questions, padding_side="left")
    assert (batch["attention_mask"][:, 0] == 0).any(), "the batch must be left-padded"
    seen, handles = _context_masks(model)
    with torch.no_grad():
        cached = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=True)
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        uncached = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    q_proj = seen["model.language_model.layers.0.self_attn.q_proj"]
    prompt_length = batch["input_ids"].shape[1]
    assert q_proj[0][1][1] == prompt_length and q_proj[1][1][1] == 1  # prefill, then one token per step
    assert q_proj[1][0].shape == (2, prompt_length + 1)


def test_gradient_checkpointing_recomputes_with_the_same_mask():
    grads = []
    for checkpointing in (False, True):
        model, processor = fresh(rep_mode="mean", jitter_noise=0.1)
        _randomize_adapters(model)
        if checkpointing:
            _enable_checkpointing(model)
        model.train()
        batch = make_batch(processor, ["What is shown?", "How many objects are there in the picture?"], ["a dog", "2"])
        torch.manual_seed(5)
        loss = model(**batch).loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def _enable_checkpointing(model):
    if hasattr(model, "activation_checkpointing_enable"):  # the newer transformers name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def test_checkpointing_two_training_calls_with_different_masks_before_one_backward_raises():
    """Two batches, one summed loss: the recomputation cannot tell whose padding mask it needs (it
    used the second call's for both: gradients 42% off), so it raises; one forward per backward, and
    two calls sharing their mask, still train; after the error the record starts afresh."""
    model, processor = fresh(jitter_noise=0.0)
    _randomize_adapters(model)
    _enable_checkpointing(model)
    model.train()
    first = make_batch(processor, ["What is shown?", "How many objects are there in the picture?"], ["a dog", "2"])
    second = {key: value.clone() for key, value in first.items()}
    second["attention_mask"][1, -6:] = 0
    second["labels"][1, -6:] = -100
    with pytest.raises(RuntimeError, match="several training calls with different padding masks ran before this "
                                           "backward"):
        (model(**first).loss + model(**second).loss).backward()
    model.zero_grad()
    (model(**first).loss + model(**first).loss).backward()  # the same mask twice: either call's is right
    for batch in (first, second):
        model(**batch).loss.backward()
    with torch.no_grad():  # a call that takes no gradient is not one backward could recompute
        model(**second)
    model(**first).loss.backward()


def test_language_model_called_directly_uses_its_own_mask():
    model, processor = fresh()
    seen, handles = _context_masks(model)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    embeds = torch.randn(2, 4, model.config.text_config.hidden_size)
    with torch.no_grad():
        model.model.language_model(inputs_embeds=embeds, attention_mask=mask)
    for handle in handles:
        handle.remove()
    calls = seen["model.language_model.layers.1.self_attn.o_proj"]
    assert len(calls) == 1 and torch.equal(calls[0][0], mask)


def test_callable_targets_and_balance_loss_value():
    model, processor = build_tiny_llava_onevision(seed=0)
    lime.apply_peft(model, targets=lambda path, module: path.endswith("mlp.down_proj"), num_experts=3, jitter_noise=0.0)
    layers = list(lime.lime_layers(model))
    assert [n for n, _ in layers] == [f"model.language_model.layers.{i}.mlp.down_proj" for i in range(2)]
    model.train()
    model(**make_batch(processor, ["What is shown?"], ["a car"]))
    importance = torch.stack([layer.last_stats.importance for _, layer in layers]).mean()
    kl = torch.stack([layer.last_stats.kl_uniform for _, layer in layers]).mean()
    loss = lime.compute_balance_loss(model, importance_coef=0.3, kl_coef=0.05)
    torch.testing.assert_close(loss, 0.3 * importance + 0.05 * kl)
    with pytest.raises(RuntimeError, match="no LiME layer holds balance statistics"):
        lime.compute_balance_loss(model)


def test_runtime_switches_reach_every_layer():
    model, _ = fresh()
    assert lime.set_temperature(model, 2.0) == 16
    lime.set_gamma_routing(model, 0.25)
    lime.set_auto_topk(model, False)
    lime.set_soft_topk(model, False)
    lime.set_jitter(model, 0.0)
    lime.set_sparse_mode(model, True)
    lime.set_track_aux(model, False)
    for _, layer in lime.lime_layers(model):
        r = layer.routing
        assert (r.temperature, r.gamma_routing, r.auto_topk, r.soft_topk, r.jitter_noise, r.sparse_mode) == (
            2.0, 0.25, False, False, 0.0, True)
        assert layer.adapter.track_aux is False
    config = model.lime_config  # what save_adapter writes follows the layers
    assert (config.temperature, config.gamma_routing, config.auto_topk, config.soft_topk, config.jitter_noise,
            config.sparse_mode, config.track_aux) == (2.0, 0.25, False, False, 0.0, True, False)


def test_multihead_attention_out_proj_is_left_alone_with_its_reason():
    """nn.MultiheadAttention's forward reads out_proj.weight directly: an adapter there would never run."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.attention = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    model.out_proj = torch.nn.Linear(16, 16)
    with pytest.raises(ValueError, match=r"reads out_proj.weight directly"):
        lime.apply_peft(model.attention, targets=["out_proj"])
    assert not isinstance(model.attention.out_proj, LiMELinear)
    with pytest.warns(UserWarning, match=r"attention.out_proj: torch.nn.MultiheadAttention reads out_proj.weight"):
        lime.apply_peft(model, targets=["out_proj"])
    assert [name for name, _ in lime.lime_layers(model)] == ["out_proj"]
    assert type(model.attention.out_proj) is torch.nn.modules.linear.NonDynamicallyQuantizableLinear


def test_config_round_trips_through_json():
    model, _ = fresh(peft_dtype=torch.bfloat16, n_gram=3, ngram_mode="anchor")
    text = model.lime_config.to_json_string()
    data = json.loads(text)
    assert data["peft_dtype"] == "bfloat16" and data["n_gram"] == 3 and data["targets"] == README_TARGETS
    assert lime.LiMEConfig.from_json_string(text) == model.lime_config
    with pytest.raises(ValueError, match="unknown LiMEConfig field"):
        lime.LiMEConfig.from_dict({**data, "experts": 4})


def test_every_linear_with_targets_none_and_the_composite_rule():
    """targets=None wraps all 29 linears; the projector (image features) and lm_head belong to the
    composite model: they take the text mask only when their input has its exact shape."""
    model, processor = build_tiny_llava_onevision(seed=0)
    lime.apply_peft(model, targets=None)
    layers = dict(lime.lime_layers(model))
    assert len(layers) == 29
    resolved = {}

    def hook(layer, args, kwargs):
        resolved.setdefault(layer.qualified_name, []).append(layer._valid_tokens(args[0], None))

    for name, layer in layers.items():
        layer.qualified_name = name
        layer.register_forward_pre_hook(hook, with_kwargs=True)
    batch = make_batch(processor, ["What is shown?", "Which option is correct? A B C D"], padding_side="left")
    model.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(**batch)
            model.generate(**batch, max_new_tokens=2, do_sample=False)
    assert not [w for w in caught if "LiME" in str(w.message)], "every mismatch here is expected: no warning"
    mask = batch["attention_mask"].bool()
    assert torch.equal(resolved["lm_head"][0], mask)
    assert resolved["lm_head"][1] is None  # generate keeps only the last position: not the mask's shape
    assert all(v is None for v in resolved["model.multi_modal_projector.linear_1"])
    assert torch.equal(resolved["model.language_model.layers.0.mlp.up_proj"][0], mask)
    assert all(v is None for v in resolved["model.vision_tower.encoder.layers.0.mlp.fc1"])


def test_context_mask_alignment_rules():
    from lime_kernels.inputs import ContextMask, context_valid_mask

    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])
    valid, matched = context_valid_mask(ContextMask(mask, True), torch.Size([2, 1, 8]))
    assert matched and torch.equal(valid, torch.tensor([[True], [False]]))
    assert context_valid_mask(ContextMask(mask, False), torch.Size([2, 1, 8])) == (None, False)
    valid, matched = context_valid_mask(ContextMask(mask, False), torch.Size([2, 4, 8]))
    assert matched and torch.equal(valid, mask.bool())
    assert context_valid_mask(ContextMask(mask, True), torch.Size([3, 4, 8])) == (None, False)
    assert context_valid_mask(ContextMask(mask, True), torch.Size([2, 5, 8])) == (None, False)
    assert context_valid_mask(ContextMask(mask, True), torch.Size([2, 8])) == (None, False)
    # The flattened sequence (B * T, Din) of an MoE block: one row per token, in the mask's order.
    valid, matched = context_valid_mask(ContextMask(mask, True), torch.Size([8, 8]))
    assert matched and torch.equal(valid, mask.reshape(8, 1).bool())
    assert context_valid_mask(ContextMask(mask, False), torch.Size([8, 8])) == (None, False)


def test_a_floating_model_mask_of_zeros_and_ones_is_a_padding_mask():
    class Masked(torch.nn.Module):  # takes a padding mask, as Hugging Face models do
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 16)

        def forward(self, x, attention_mask=None):
            return self.proj(x)

    torch.manual_seed(0)
    model = lime.apply_peft(Masked(), n_gram=2).eval()
    _randomize_adapters(model)
    x = torch.randn(2, 4, 8)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        assert not torch.allclose(model(x, attention_mask=mask), model(x))
        torch.testing.assert_close(model(x, attention_mask=mask.float()), model(x, attention_mask=mask))
        with pytest.raises(ValueError, match="got -inf in a torch.float32 mask"):
            model(x, attention_mask=torch.zeros(2, 4).masked_fill(mask == 0, float("-inf")))
