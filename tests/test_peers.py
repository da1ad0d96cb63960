"""Hugging Face PEFT as an oracle: one expert whose vector is all ones, no shared vector, is LoRA."""

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from lime_kernels import LiMELinear


def _peft_lora(linear, A, B, rank, alpha):
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["linear"], lora_dropout=0.0)
    layer = PeftLoraLinear(linear, "default", config, r=rank, lora_alpha=alpha)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    return layer


@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-7), (torch.float32, 1e-5)])
@pytest.mark.parametrize("selection", [dict(auto_topk=True), dict(auto_topk=False, soft_topk=False), dict(sparse_mode=True)])
@pytest.mark.parametrize("rank,alpha", [(1, 2.0), (4, 16.0)])
def test_one_all_ones_expert_equals_peft_lora(dtype, tolerance, selection, rank, alpha):
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 20, dtype=dtype)
    lime = LiMELinear(
        linear, num_experts=1, rank=rank, alpha=alpha, use_shared_LiME=False, jitter_noise=0.0,
        peft_dtype=dtype, moe_dtype=dtype, **selection,
    )
    with torch.no_grad():
        lime.B.normal_()
        lime.LiMEs.fill_(1.0)
    peft_layer = _peft_lora(linear, lime.A.detach(), lime.B.detach(), rank, alpha)
    lime.train()
    peft_layer.train()

    x = torch.randn(3, 9, 24, dtype=dtype)
    x_lime = x.clone().requires_grad_(True)
    x_peft = x.clone().requires_grad_(True)
    out_lime = lime(x_lime)
    out_peft = peft_layer(x_peft)
    torch.testing.assert_close(out_lime, out_peft, rtol=tolerance, atol=tolerance)

    cotangent = torch.randn_like(out_lime)
    (out_lime * cotangent).sum().backward()
    (out_peft * cotangent).sum().backward()
    torch.testing.assert_close(x_lime.grad, x_peft.grad, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(lime.B.grad, peft_layer.lora_B["default"].weight.grad, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(lime.A.grad, peft_layer.lora_A["default"].weight.grad, rtol=tolerance, atol=tolerance)
    # The adapter must actually contribute, or the comparison says nothing.
    assert (out_lime - linear(x)).abs().max() > 1e-2


@pytest.mark.parametrize("peft_method", ["lora", "dora"])
def test_gpt2_conv1d_with_one_all_ones_expert_equals_peft(peft_method):
    """GPT-2's Conv1D layers (weights stored transposed): HF PEFT adapts them with fan_in_fan_out=True."""
    import copy

    from peft import get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    import lime

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=1,
                                      eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).double()
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    targets = ["c_attn", "c_proj", "c_fc"]
    use_dora = peft_method == "dora"
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=2, lora_alpha=8, target_modules=targets, fan_in_fan_out=True, lora_dropout=0.0, use_dora=use_dora))
    model = lime.apply_peft(base, targets=targets, num_experts=1, rank=2, alpha=8.0, use_shared_LiME=False,
                            jitter_noise=0.0, peft=peft_method, dora_detach_norm=use_dora,
                            peft_dtype=torch.float64, moe_dtype=torch.float64)
    layers = dict(lime.lime_layers(model))
    assert len(layers) == 8
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer in layers.items():
            layer.LiMEs.fill_(1.0)
            layer.B.copy_(torch.randn(layer.B.shape, generator=generator, dtype=torch.float64))
            peft_layer = peft_model.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.A)
            peft_layer.lora_B["default"].weight.copy_(layer.B)
            if use_dora:
                layer.m.mul_(1.0 + 0.1 * torch.rand(layer.m.shape, generator=generator, dtype=torch.float64))
                peft_layer.lora_magnitude_vector["default"].weight.copy_(layer.m)
    model.train()
    peft_model.train()
    out_lime = model(input_ids=ids, labels=ids)
    out_peft = peft_model(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_lime.logits, out_peft.logits, rtol=1e-7, atol=1e-7)
    out_lime.loss.backward()
    out_peft.loss.backward()
    for name, layer in layers.items():
        peft_layer = peft_model.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.B.grad, peft_layer.lora_B["default"].weight.grad, rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(layer.A.grad, peft_layer.lora_A["default"].weight.grad, rtol=1e-7, atol=1e-7)
    assert (out_lime.logits - base_logits).abs().max() > 1e-2  # the adapters matter: the comparison says something
