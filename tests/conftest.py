import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from lime_kernels import LiMELinear, sample_jitter  # noqa: E402
from loop_lime import loop_lime  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run natively on a CUDA device only (never under Triton's CPU interpreter)."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; run natively by python -m benchmarks.gpu_report")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


# Every selection rule of step 9 of the semantics, as LiMELinear keywords.
SELECTIONS = {
    "dense-auto": dict(auto_topk=True, top_k=1),
    "dense-soft": dict(auto_topk=False, soft_topk=True, top_k=2),
    "dense-hard": dict(auto_topk=False, soft_topk=False, top_k=2),
    "sparse-auto": dict(auto_topk=True, sparse_mode=True, top_k=1),
    "sparse-hard": dict(auto_topk=False, sparse_mode=True, top_k=3),
}


def make_layer(d_in=8, d_out=10, dtype=torch.float64, seed=0, bias=True, **kwargs):
    """A LiMELinear with every parameter random (B and gamma are zero at init, which would hide bugs)."""
    torch.manual_seed(seed)
    linear = torch.nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
    kwargs.setdefault("peft_dtype", dtype)
    kwargs.setdefault("moe_dtype", dtype)
    layer = LiMELinear(linear, **kwargs)
    with torch.no_grad():
        layer.B.normal_(0.0, 0.5)
        if layer.gamma is not None:
            layer.gamma.fill_(0.7)
    return layer


def padding_mask(kind, batch, tokens):
    """None, or a (batch, tokens) long mask with left or right padding of different lengths."""
    if kind == "none":
        return None
    mask = torch.ones(batch, tokens, dtype=torch.long)
    for b in range(batch):
        pad = (b * 2) % tokens  # 0, 2, 4, ... padded positions (the first sequence is full)
        if b == batch - 1:
            pad = tokens  # one sequence entirely padding
        if pad:
            if kind == "left":
                mask[b, :pad] = 0
            else:
                mask[b, tokens - pad :] = 0
    return mask


def tolerance_check(name, actual, expected, rtol=1e-9, atol=1e-10):
    # A gradient that never reached a tensor (None) equals a gradient of zeros.
    if expected is None and actual is None:
        return
    if expected is None:
        expected = torch.zeros_like(actual)
    if actual is None:
        actual = torch.zeros_like(expected)
    if not torch.allclose(actual, expected, rtol=rtol, atol=atol):
        diff = (actual - expected).abs()
        worst = diff.argmax()
        raise AssertionError(
            f"{name}: max |diff| {diff.max().item():.3e} at flat index {worst.item()} "
            f"(actual {actual.flatten()[worst].item():.6e}, expected {expected.flatten()[worst].item():.6e})"
        )


def _layer_parameters(layer):
    return [layer.A, layer.B, layer.LiMEs] + ([layer.LiME_shared, layer.gamma] if layer.gamma is not None else [])


def compare_with_loop(layer, x, mask, training, seed=1234):
    """Run the layer and the loop version with the same jitter; compare outputs, stats and gradients."""
    options = layer.routing
    layer.train(training)
    tokens = x.shape[0] * (x.shape[1] if x.dim() == 3 else 1)
    torch.manual_seed(seed)
    jitter = sample_jitter(tokens, options.num_experts, options.jitter_noise, x.device).double() if training and options.jitter_noise > 0 else None
    torch.manual_seed(seed)
    x_layer = x.clone().requires_grad_(True)
    out = layer(x_layer, attention_mask=mask)
    stats = layer.last_stats

    x_loop = x.clone().requires_grad_(True)
    params = _layer_parameters(layer)
    loop_params = [p.detach().clone().requires_grad_(True) for p in params]
    shared = loop_params[3] if len(loop_params) == 5 else None
    gamma = loop_params[4] if len(loop_params) == 5 else None
    x3 = x_loop if x_loop.dim() == 3 else x_loop.unsqueeze(1)
    mask3 = None if mask is None else mask.reshape(x3.shape[:2])
    expected, expected_stats = loop_lime(
        x3, layer.linear.weight, layer.linear.bias, loop_params[0], loop_params[1], loop_params[2], shared, gamma,
        options=options, scaling=layer.adapter.scaling, mask=mask3, jitter=jitter,
    )
    expected = expected.reshape(out.shape)
    tolerance_check("output", out, expected)

    if training:
        for key in ("importance", "kl_uniform", "load", "active_experts"):
            tolerance_check(key, getattr(stats, key), torch.as_tensor(expected_stats[key], dtype=torch.float64))
        assert stats.active_histogram.tolist() == expected_stats["active_histogram"]
    tolerance_check("usage", stats.usage.double(), expected_stats["usage"].detach())

    torch.manual_seed(seed + 1)
    cotangent = torch.randn_like(out)
    loss = (out * cotangent).sum()
    expected_loss = (expected * cotangent).sum()
    if training:
        loss = loss + 0.3 * stats.importance + 0.7 * stats.kl_uniform
        expected_loss = expected_loss + 0.3 * expected_stats["importance"] + 0.7 * expected_stats["kl_uniform"]
    for p in params:
        p.grad = None
    loss.backward()
    expected_loss.backward()
    tolerance_check("grad x", x_layer.grad, x_loop.grad)
    for name, p, q in zip(["A", "B", "LiMEs", "LiME_shared", "gamma"], params, loop_params):
        tolerance_check(f"grad {name}", p.grad, q.grad)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny LLaVA-OneVision (weights and processor), for the command line's --model."""
    from lime.tiny import build_tiny_llava_onevision

    directory = tmp_path_factory.mktemp("model")
    model, processor = build_tiny_llava_onevision(seed=0)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return str(directory)
