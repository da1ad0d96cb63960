"""The PEFT variants: peers as oracles (HF PEFT's DoRA and LoRA), the loop implementation,
parameter counts, prompt tuning's masks and labels, quantized bases, and training on the tiny
LLaVA-OneVision with every variant."""

import pytest
import torch
from conftest import make_layer, padding_mask, tolerance_check
from llava_helpers import README_TARGETS, make_batch
from loop_lime import loop_lime
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear

import lime
import lime.dora
import lime.lora
import lime.lora_fa
import lime.prompt_tuning
import lime.slicefine
from lime.tiny import build_tiny_llava_onevision
from lime_kernels import (
    LiMEDoRALinear,
    LiMEEmbedding,
    LiMELinear,
    LiMELoRAFALinear,
    LiMEPromptEncoder,
    LiMESliceFineLinear,
)


def _one_plain_expert(layer):
    """One all-ones expert, no shared vector, no jitter: LiME reduces to its PEFT method."""
    with torch.no_grad():
        layer.LiMEs.fill_(1.0)
    return layer


def _peft_layer(linear, A, B, rank, alpha, use_dora):
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["linear"], use_dora=use_dora)
    layer = PeftLoraLinear(linear, "default", config, r=rank, lora_alpha=alpha, use_dora=use_dora)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return layer


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-7), (torch.float32, 1e-5)])
def test_dora_with_one_plain_expert_equals_peft_dora(dtype, tolerance):
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 20, dtype=dtype)
    lime_layer = _one_plain_expert(LiMEDoRALinear(
        linear, num_experts=1, rank=4, alpha=8.0, use_shared_LiME=False, jitter_noise=0.0, auto_topk=False,
        soft_topk=False, peft_dtype=dtype, moe_dtype=dtype, dora_detach_norm=True))
    peft_layer = _peft_layer(linear, lime_layer.A.detach(), lime_layer.B.detach(), 4, 8.0, use_dora=True)
    with torch.no_grad():  # train both away from B = 0 so the norm differs from ||W||
        B = torch.randn_like(lime_layer.B)
        lime_layer.B.copy_(B)
        peft_layer.lora_B["default"].weight.copy_(B)
        magnitude = torch.rand(20, dtype=dtype) + 0.5
        lime_layer.m.copy_(magnitude)
        peft_layer.lora_magnitude_vector["default"].weight.copy_(magnitude)
    x = torch.randn(3, 7, 24, dtype=dtype)
    x_lime, x_peft = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_lime, out_peft = lime_layer(x_lime), peft_layer(x_peft)
    torch.testing.assert_close(out_lime, out_peft, rtol=tolerance, atol=tolerance)
    cotangent = torch.randn_like(out_lime)
    (out_lime * cotangent).sum().backward()
    (out_peft * cotangent).sum().backward()
    torch.testing.assert_close(x_lime.grad, x_peft.grad, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(lime_layer.m.grad, peft_layer.lora_magnitude_vector["default"].weight.grad,
                               rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(lime_layer.B.grad, peft_layer.lora_B["default"].weight.grad, rtol=tolerance, atol=tolerance)
    # The bias is added after the magnitude, not rescaled: with m = 2 ||W + sBA||, out - b doubles.
    assert (out_lime - linear(x)).abs().max() > 1e-2


def test_dora_norm_takes_gradients_unless_detached():
    torch.manual_seed(0)
    grads = {}
    for detach in (False, True):
        layer = LiMEDoRALinear(torch.nn.Linear(8, 10, dtype=torch.float64), num_experts=2, peft_dtype=torch.float64,
                               moe_dtype=torch.float64, dora_detach_norm=detach)
        torch.manual_seed(1)
        with torch.no_grad():
            layer.B.normal_()
        layer.eval()(torch.randn(2, 5, 8, dtype=torch.float64)).sum().backward()
        grads[detach] = layer.A.grad.clone()
    assert not torch.allclose(grads[False], grads[True])
    with pytest.raises(ValueError, match="dora_detach_norm='yes'"):
        LiMEDoRALinear(torch.nn.Linear(8, 10), dora_detach_norm="yes")


@pytest.mark.parametrize("rank", [1, 4])
def test_lora_fa_equals_peft_lora_with_a_frozen(rank):
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 20, dtype=torch.float64)
    lime_layer = _one_plain_expert(LiMELoRAFALinear(
        linear, num_experts=1, rank=rank, use_shared_LiME=False, jitter_noise=0.0, auto_topk=False, soft_topk=False,
        peft_dtype=torch.float64, moe_dtype=torch.float64))
    with torch.no_grad():
        lime_layer.B.normal_()
    peft_layer = _peft_layer(linear, lime_layer.A.detach(), lime_layer.B.detach(), rank, 16.0, use_dora=False)
    peft_layer.lora_A["default"].weight.requires_grad_(False)
    assert not lime_layer.A.requires_grad
    x = torch.randn(3, 7, 24, dtype=torch.float64)
    x_lime, x_peft = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_lime, out_peft = lime_layer(x_lime), peft_layer(x_peft)
    torch.testing.assert_close(out_lime, out_peft)
    out_lime.sum().backward()
    out_peft.sum().backward()
    torch.testing.assert_close(x_lime.grad, x_peft.grad)
    torch.testing.assert_close(lime_layer.B.grad, peft_layer.lora_B["default"].weight.grad)
    assert lime_layer.A.grad is None


@pytest.mark.parametrize("rank,experts", [(3, 2), (2, 4)])
def test_slicefine_matches_the_loop_on_the_sliced_weight(rank, experts):
    """SliceFine is the LoRA form with A = the trainable rows, B = their place, scaling 1, and the
    frozen weight's first rows removed (kept only as bias)."""
    torch.manual_seed(0)
    layer = LiMESliceFineLinear(torch.nn.Linear(8, 10, dtype=torch.float64), num_experts=experts, rank=rank,
                                n_gram=2, peft_dtype=torch.float64, moe_dtype=torch.float64).train()
    original = layer.linear.weight.detach().clone()
    assert torch.equal(layer.part_T.detach(), original[:rank]) and torch.equal(layer.linear.weight, original)
    with torch.no_grad():
        layer.part_T.add_(0.3 * torch.randn_like(layer.part_T))
        layer.gamma.fill_(0.5)
    x = torch.randn(3, 6, 8, dtype=torch.float64, requires_grad=True)
    mask = padding_mask("left", 3, 6)
    torch.manual_seed(9)
    out = layer(x, attention_mask=mask)
    sliced = original.clone()
    sliced[:rank] = 0
    torch.manual_seed(9)
    from lime_kernels import sample_jitter

    jitter = sample_jitter(18, experts, layer.routing.jitter_noise, x.device).double()
    expected, _ = loop_lime(x, sliced, layer.linear.bias, layer.part_T, layer.selector, layer.LiMEs, layer.LiME_shared,
                            layer.gamma, options=layer.routing, scaling=1.0, mask=mask, jitter=jitter)
    tolerance_check("slicefine output", out, expected)
    out.sum().backward()
    assert layer.linear.weight.grad is None and layer.part_T.grad is not None
    with pytest.raises(ValueError, match="rank=11"):
        LiMESliceFineLinear(torch.nn.Linear(8, 10), rank=11)


def test_slicefine_with_one_plain_expert_is_the_original_layer():
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 10)
    layer = _one_plain_expert(LiMESliceFineLinear(linear, num_experts=1, rank=3, use_shared_LiME=False,
                                                  jitter_noise=0.0, auto_topk=False, soft_topk=False))
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(layer(x), linear(x))


def test_embedding_variant_matches_the_loop_and_masks_pad_tokens():
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(30, 10, dtype=torch.float64)
    layer = LiMEEmbedding(embedding, num_experts=3, rank=2, n_gram=2, pad_token_id=0, peft_dtype=torch.float64,
                          moe_dtype=torch.float64)
    with torch.no_grad():
        layer.B.normal_()
    ids = torch.tensor([[5, 6, 7, 0, 0], [0, 3, 4, 9, 11]])
    layer.train()
    torch.manual_seed(4)
    out = layer(ids)
    from lime_kernels import sample_jitter

    torch.manual_seed(4)
    jitter = sample_jitter(10, 3, layer.routing.jitter_noise, ids.device).double()
    base = embedding(ids)
    expected, _ = loop_lime(base, torch.eye(10, dtype=torch.float64), None, layer.A, layer.B, layer.LiMEs,
                            layer.LiME_shared, layer.gamma, options=layer.routing, scaling=layer.adapter.scaling,
                            mask=ids != 0, jitter=jitter)
    tolerance_check("embedding output", out, expected)
    assert torch.equal(out[ids == 0], base[ids == 0])
    layer.eval()
    one = torch.tensor([0, 3, 4, 9, 11])  # (tokens,): one sequence, whose n-gram windows span its tokens
    torch.testing.assert_close(layer(one), layer(one[None])[0])
    keep = torch.tensor([1, 1, 0, 1, 1])
    torch.testing.assert_close(layer(one, keep), layer(one[None], keep[None])[0])
    with pytest.raises(ValueError, match="integer token ids"):
        layer(torch.randn(2, 3))
    with pytest.raises(ValueError, match="peft='dora'"):
        LiMEEmbedding(embedding, peft="dora")


def test_prompt_encoder_routes_the_virtual_tokens():
    torch.manual_seed(0)
    encoder = LiMEPromptEncoder(5, 12, num_experts=3, n_gram=2, peft_dtype=torch.float64, moe_dtype=torch.float64)
    with torch.no_grad():
        encoder.prompt_delta.normal_()
    embeds = torch.randn(2, 7, 12, dtype=torch.float64)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    prompts = encoder.eval()(embeds, mask)
    assert prompts.shape == (2, 5, 12)
    # base' = bank + mean of the valid input embeddings; delta' = prompt_delta[v]: the loop's
    # adapter with one-hot inputs (A = I, B = prompt_delta^T, scaling 1) and W = I on base'.
    context = torch.stack([embeds[0].mean(0), embeds[1, :4].mean(0)]).unsqueeze(1)
    base = encoder.prompt_base.double() + context
    one_hot = torch.eye(5, dtype=torch.float64).expand(2, -1, -1)
    expected, _ = loop_lime(base, torch.eye(12, dtype=torch.float64), None, torch.eye(5, dtype=torch.float64),
                            encoder.prompt_delta.t(), encoder.LiMEs, encoder.LiME_shared, encoder.gamma,
                            options=encoder.routing, scaling=1.0, adapter_input=one_hot)
    tolerance_check("prompts", prompts, expected)
    # Changing a padded token leaves the prompts alone; changing a valid one does not.
    changed = embeds.clone()
    changed[1, 5] += 3
    torch.testing.assert_close(encoder(changed, mask), prompts)
    changed[1, 1] += 3
    assert not torch.allclose(encoder(changed, mask)[1], prompts[1])
    fixed = LiMEPromptEncoder(5, 12, num_experts=3, input_conditioned=False)
    fixed_prompts = fixed.eval()(embeds.float(), mask)
    torch.testing.assert_close(fixed_prompts[0], fixed_prompts[1])


def test_prompt_tuning_extends_masks_labels_and_positions():
    model, processor = build_tiny_llava_onevision(seed=0)
    lime.prompt_tuning.apply_peft(model, num_virtual_tokens=4, tokenizer=processor.tokenizer,
                                  init_text="describe the picture")
    injector_seen = {}

    def spy(module, args, kwargs):
        injector_seen.update(kwargs)

    model.model.register_forward_pre_hook(spy, with_kwargs=True)
    batch = make_batch(processor, ["What is shown?", "Which option is correct? A B C D answer"], ["a cat", "B"])
    out = model.train()(**batch)
    tokens = batch["input_ids"].shape[1]
    assert out.logits.shape[1] == tokens + 4
    mask = injector_seen["attention_mask"]
    assert torch.equal(mask[:, :4], torch.ones(2, 4, dtype=mask.dtype)) and torch.equal(mask[:, 4:], batch["attention_mask"])
    assert injector_seen["input_ids"] is None and injector_seen["inputs_embeds"].shape[1] == tokens + 4
    # The loss counts the answer tokens only: labels were extended with -100 in front.
    manual = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
        torch.cat([torch.full((2, 4), -100), batch["labels"]], dim=1)[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, manual)
    out.loss.backward()
    encoder = model.lime_prompt_encoder
    assert encoder.prompt_delta.grad is not None and encoder.LiMEs.grad is not None
    assert all(p.grad is None for n, p in model.named_parameters() if "lime_prompt_encoder" not in n)
    assert "prompt_base" in encoder.state_dict() and not encoder.prompt_base.requires_grad
    embeddings = model.get_input_embeddings().weight
    ids = processor.tokenizer("describe the picture", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(encoder.prompt_base[0], embeddings[ids[0]].float())


def test_prompt_tuning_generates_the_same_with_and_without_a_cache():
    model, processor = build_tiny_llava_onevision(seed=0)
    lime.prompt_tuning.apply_peft(model, num_virtual_tokens=5)
    with torch.no_grad():
        model.lime_prompt_encoder.prompt_delta.normal_(0, 0.5)
    batch = make_batch(processor, ["What is shown?", "How many objects are there in the picture? answer with one number"],
                       padding_side="left")
    assert (batch["attention_mask"] == 0).any()
    model.eval()
    single = processor(text=["a cat"], return_tensors="pt")  # one unpadded prompt
    for inputs in (batch, single):
        runs = []
        with torch.no_grad():
            for use_cache in (True, False):
                runs.append(model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=use_cache,
                                           output_scores=True, return_dict_in_generate=True))
        # Without a cache every step runs the whole sequence again: its prompts still read the first call's
        # tokens only, so the scores (not just the greedy ids) agree.
        assert torch.equal(runs[0].sequences, runs[1].sequences)
        for cached, uncached in zip(runs[0].scores, runs[1].scores):
            torch.testing.assert_close(cached, uncached, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="already has LiME prompt tuning"):
        lime.prompt_tuning.apply_peft(model)
    lime.remove_lime(model)
    assert "generate" not in model.__dict__ and not hasattr(model, "lime_prompt_encoder")


def test_input_conditioned_prompts_read_the_question_not_the_answer():
    model, processor = build_tiny_llava_onevision(seed=0)
    lime.prompt_tuning.apply_peft(model, num_virtual_tokens=4, jitter_noise=0.0)
    with torch.no_grad():
        model.lime_prompt_encoder.prompt_delta.normal_(0, 0.5)
    prompts = []
    model.lime_prompt_encoder.register_forward_hook(lambda module, args, out: prompts.append(out.detach()))
    questions = ["What is shown?", "How many objects are there?"]
    for answers in (["a cat", "3"], ["the dog runs in the park", "a red car"]):
        batch = make_batch(processor, questions, answers, labels_on_answers_only=True)
        model.train()(**batch)
        model(**{k: v for k, v in batch.items() if k != "labels"})
    trained_on_first, unlabelled_first, trained_on_second, unlabelled_second = prompts
    # The answers would leak into the prompts in front of them: with labels the prompts read the question only.
    torch.testing.assert_close(trained_on_first, trained_on_second, rtol=0, atol=0)
    assert not torch.allclose(unlabelled_first, unlabelled_second)  # without labels every valid token counts
    with torch.no_grad():
        model.eval()(**make_batch(processor, questions))
    torch.testing.assert_close(prompts[-1], trained_on_first)  # what generation will read


def test_prompt_encoder_takes_the_model_mode(tmp_path):
    model, processor = build_tiny_llava_onevision(seed=0)
    model.eval()
    lime.prompt_tuning.apply_peft(model, num_virtual_tokens=4)
    assert not model.lime_prompt_encoder.training
    with torch.no_grad():
        model.lime_prompt_encoder.prompt_delta.normal_(0, 0.5)
        batch = make_batch(processor, ["What is shown?"], padding_side="left")
        assert torch.equal(model(**batch).logits, model(**batch).logits)  # no routing jitter
    lime.save_adapter(model, str(tmp_path))
    for training in (False, True):
        fresh, _ = build_tiny_llava_onevision(seed=0)
        lime.load_adapter(fresh.train(training), str(tmp_path))
        assert fresh.lime_prompt_encoder.training == training


VARIANT_COUNTS = {
    # trainable PEFT parameters per wrapped linear layer (Din, Dout, r); MoE: E*Dout + Dout + 1
    "lora": lambda d_in, d_out, r: r * (d_in + d_out),
    "dora": lambda d_in, d_out, r: r * (d_in + d_out) + d_out,
    "lora_fa": lambda d_in, d_out, r: r * d_out,
    "slicefine": lambda d_in, d_out, r: r * d_in,
}


@pytest.mark.parametrize("peft", list(VARIANT_COUNTS))
def test_summary_counts_follow_the_variant_formulas(peft):
    model, _ = build_tiny_llava_onevision(seed=0)
    lime.apply_peft(model, targets=README_TARGETS, peft=peft, rank=2, num_experts=4)
    summary = lime.lime_summary(model)
    layers = [layer for _, layer in lime.lime_layers(model)]
    assert summary["peft"] == peft and len(layers) == 16
    assert summary["peft_parameters"] == sum(VARIANT_COUNTS[peft](l.in_features, l.out_features, 2) for l in layers)
    assert summary["moe_parameters"] == sum(4 * l.out_features + l.out_features + 1 for l in layers)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == summary["peft_parameters"] + summary["moe_parameters"]


def test_summary_reports_prompt_tokens_apart_from_the_layers_rank(tmp_path):
    model, processor = build_tiny_llava_onevision(seed=0)
    lime.prompt_tuning.apply_peft(model, num_virtual_tokens=20)
    summary = lime.lime_summary(model)
    assert (summary["rank"], summary["alpha"], summary["virtual_tokens"]) == ("-", "-", "20")
    lime.apply_peft(model, targets=README_TARGETS, rank=2, alpha=16.0)
    summary = lime.lime_summary(model)
    assert (summary["rank"], summary["alpha"], summary["virtual_tokens"]) == ("2", "16.0", "20")


def test_an_adapter_saved_with_use_compile_loads_compiled(tmp_path):
    model = lime.apply_peft(torch.nn.Sequential(torch.nn.Linear(8, 8)), use_compile=True)
    lime.save_adapter(model, str(tmp_path))
    loaded = lime.load_adapter(torch.nn.Sequential(torch.nn.Linear(8, 8)), str(tmp_path))
    assert loaded.lime_config.use_compile and loaded[0].compiled


def test_variant_modules_default_to_their_variant():
    for module, cls in ((lime.lora, LiMELinear), (lime.dora, LiMEDoRALinear), (lime.lora_fa, LiMELoRAFALinear),
                        (lime.slicefine, LiMESliceFineLinear)):
        model = torch.nn.Sequential(torch.nn.Linear(8, 16))
        module.apply_peft(model)
        assert type(model[0]) is cls
    with pytest.raises(ValueError, match="peft='qlora'"):
        lime.apply_peft(torch.nn.Sequential(torch.nn.Linear(8, 16)), peft="qlora")


def test_embedding_targets_and_tied_embeddings():
    model = torch.nn.Module()
    model.embed = torch.nn.Embedding(20, 8)
    model.head = torch.nn.Linear(8, 20)
    model.proj = torch.nn.Linear(8, 8)
    lime.apply_peft(model, targets=["embed", "proj"], pad_token_id=0)
    assert isinstance(model.embed, LiMEEmbedding) and model.embed.pad_token_id == 0
    tied = torch.nn.Module()
    tied.embed = torch.nn.Embedding(20, 8)
    tied.head = torch.nn.Linear(8, 20)
    tied.head.weight = tied.embed.weight
    with pytest.warns(UserWarning, match="tied to head"):
        lime.apply_peft(tied, targets=["embed", "head"])
    assert isinstance(tied.embed, torch.nn.Embedding) and isinstance(tied.head, LiMELinear)
    with pytest.raises(ValueError, match="embedding targets take peft='lora' or 'lora_fa'"):
        other = torch.nn.Module()
        other.embed = torch.nn.Embedding(20, 8)
        lime.apply_peft(other, targets=["embed"], peft="dora")


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_quantized_base_layers(kind):
    """QLoRA-style LiME: bitsandbytes computes the frozen output; LiME matches a float layer
    holding the dequantized weight, and DoRA takes its norms from the dequantized weight."""
    bnb = pytest.importorskip("bitsandbytes")
    from lime_kernels.quantized import frozen_weight

    torch.manual_seed(0)
    float_linear = torch.nn.Linear(32, 24)
    if kind == "8bit":
        quantized = bnb.nn.Linear8bitLt(32, 24, has_fp16_weights=False)
    else:
        quantized = bnb.nn.Linear4bit(32, 24, compute_dtype=torch.float32, quant_type="nf4")
    quantized.load_state_dict(float_linear.state_dict())
    quantized = quantized.to("cpu")  # moving a 4-bit layer to its device quantizes it
    x = torch.randn(2, 5, 32)
    quantized(x)  # the first call quantizes an 8-bit layer
    dequantized = frozen_weight(quantized).float()
    assert dequantized.shape == (24, 32) and (dequantized - float_linear.weight).abs().max() < 0.2
    reference_linear = torch.nn.Linear(32, 24)
    with torch.no_grad():
        reference_linear.weight.copy_(dequantized)
        reference_linear.bias.copy_(float_linear.bias)
    for peft in ("lora", "dora"):
        torch.manual_seed(1)
        lime_q = lime.apply_peft(torch.nn.Sequential(quantized), peft=peft, jitter_noise=0.0)[0]
        torch.manual_seed(1)
        lime_f = lime.apply_peft(torch.nn.Sequential(reference_linear), peft=peft, jitter_noise=0.0)[0]
        with torch.no_grad():
            lime_q.B.normal_(0, 0.1)
            lime_f.B.copy_(lime_q.B)
        out_q, out_f = lime_q(x), lime_f(x)
        torch.testing.assert_close(out_q, out_f, rtol=1e-3, atol=1e-3)
        out_q.sum().backward()
        assert lime_q.B.grad is not None and lime_q.LiMEs.grad is not None
        quantized = lime_q.linear
        reference_linear = lime_f.linear
    with pytest.raises(ValueError, match="quantized"):
        LiMESliceFineLinear(quantized, rank=2)


@pytest.mark.parametrize("variant", ["lora", "dora", "lora_fa", "slicefine", "embedding", "prompt"])
def test_tiny_llava_onevision_trains_with_every_variant(variant):
    model, processor = build_tiny_llava_onevision(seed=0)
    if variant == "prompt":
        lime.prompt_tuning.apply_peft(model, num_virtual_tokens=4, jitter_noise=0.0)
    elif variant == "embedding":
        lime.apply_peft(model, targets=README_TARGETS + ["embed_tokens"], tokenizer=processor.tokenizer)
        assert isinstance(model.get_input_embeddings(), LiMEEmbedding)
    else:
        lime.apply_peft(model, targets=README_TARGETS, peft=variant, tokenizer=processor.tokenizer)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    batch = make_batch(processor, ["What is shown?", "How many objects are there?"], ["a cat", "3"])
    model.train()
    losses = []
    for step in range(10):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_dora_is_lora_on_the_rescaled_weight():
    """DoRA's reference against LoRA's (itself checked against the loop): scaling W and B by
    m / ||W + sBA|| row-wise and keeping the bias is the DoRA layer."""
    torch.manual_seed(0)
    dora = LiMEDoRALinear(torch.nn.Linear(8, 10, dtype=torch.float64), num_experts=3, peft_dtype=torch.float64,
                          moe_dtype=torch.float64).eval()
    with torch.no_grad():
        dora.B.normal_()
        dora.m.mul_(1.5)
    scale = dora.channel_scale().detach()
    lora = make_layer(num_experts=3).eval()
    with torch.no_grad():
        lora.linear.weight.copy_(scale[:, None] * dora.linear.weight)
        lora.linear.bias.copy_(dora.linear.bias)
        lora.A.copy_(dora.A)
        lora.B.copy_(scale[:, None] * dora.B)
        lora.LiMEs.copy_(dora.LiMEs)
        lora.LiME_shared.copy_(dora.LiME_shared)
        lora.gamma.copy_(dora.gamma)
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    torch.testing.assert_close(dora(x), lora(x))
