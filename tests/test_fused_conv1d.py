"""GPT-2's `Conv1D` (a linear layer whose weight is stored transposed) on the fused path: the same
outputs, statistics and gradients as the reference, with the weight read as a transposed view (no
copy of it per call). Like tests/test_fused.py, it runs on a CUDA device or under Triton's
interpreter (`make test` runs it with TRITON_INTERPRET=1)."""

import pytest
import torch
from conftest import padding_mask
from test_fused import CUDA, DEVICE, INTERPRETER, run_both, tie_free_input
from transformers.pytorch_utils import Conv1D

from lime_kernels import LiMEDoRALinear, LiMELinear, LiMESliceFineLinear
from lime_kernels.quantized import frozen_weight

pytestmark = pytest.mark.skipif(not (INTERPRETER or CUDA), reason="needs a CUDA device or TRITON_INTERPRET=1")

IN_FEATURES, OUT_FEATURES = 40, 70
VARIANTS = {
    "lora": lambda backend: LiMELinear(Conv1D(OUT_FEATURES, IN_FEATURES), num_experts=4, backend=backend),
    "dora": lambda backend: LiMEDoRALinear(Conv1D(OUT_FEATURES, IN_FEATURES), num_experts=3, backend=backend),
    "slicefine": lambda backend: LiMESliceFineLinear(Conv1D(OUT_FEATURES, IN_FEATURES), num_experts=2, rank=3,
                                                     backend=backend),
}


def _pair(variant):
    """A reference and a fused layer around the same Conv1D values, adapters moved off their init."""
    torch.manual_seed(0)
    reference = VARIANTS[variant]("reference").to(DEVICE)
    fused = VARIANTS[variant]("triton").to(DEVICE)
    fused.load_state_dict(reference.state_dict())
    with torch.no_grad():
        for layer in (reference, fused):
            torch.manual_seed(1)
            for name, parameter in layer.named_parameters():
                if name in ("B", "m", "part_T", "gamma", "linear.bias"):
                    parameter.add_(0.3 * torch.randn_like(parameter))
    return reference, fused


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_conv1d_matches_the_reference(variant):
    reference, fused = _pair(variant)
    assert fused._plain_linear()  # the fused path computes the frozen product itself, from the view
    mask = padding_mask("left", 3, 13).to(DEVICE)
    x = tie_free_input(reference, (3, 13, IN_FEATURES), torch.float32, mask)
    run_both(reference, fused, x, mask)
    with torch.no_grad():  # masked tokens: the Conv1D's own output, exactly
        out = fused.eval()(x, attention_mask=mask)
        base = reference.linear(x)
    if variant == "lora":
        assert torch.equal(out[mask == 0], base[mask == 0])


def test_fused_conv1d_reads_the_weight_in_place():
    """No operator copies the (in, out) weight into an (out, in) one, forward or backward."""
    from lime_kernels.accounting import account

    _, fused = _pair("lora")
    weight = frozen_weight(fused.linear)
    assert weight.data_ptr() == fused.linear.weight.data_ptr() and not weight.is_contiguous()
    x = torch.randn(2, 9, IN_FEATURES, device=DEVICE, requires_grad=True)
    with account() as recorded:
        out = fused.train()(x)
        (out * torch.randn_like(out)).sum().backward()
    copies = [(op.name, op.output_shapes) for op in recorded.named({"aten::clone", "aten::copy_", "aten::_to_copy"})
              if any(shape in ((OUT_FEATURES, IN_FEATURES), (IN_FEATURES, OUT_FEATURES)) for shape in op.output_shapes)]
    assert copies == [], copies
    assert x.grad is not None and fused.B.grad is not None
