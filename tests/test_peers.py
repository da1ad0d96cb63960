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
