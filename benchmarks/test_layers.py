"""Layer micro-benchmarks with pytest-benchmark:

    python -m pytest benchmarks/ --benchmark-only          # CUDA if present (then with lime-fused)

One forward + backward of each provider on LLaVA-OneVision-0.5B's q_proj; `benchmarks/run.py` runs the
full sweeps and writes the CSV, the plots and the summary.
"""

import pytest
import torch
from providers import LAYER_PROVIDERS, available, build_layer

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
TOKENS = 4096 if DEVICE.type == "cuda" else 256


@pytest.mark.parametrize("provider", available(LAYER_PROVIDERS, DEVICE)[0])
@pytest.mark.parametrize("n_gram", [1, 3])
def test_layer_forward_backward(benchmark, provider, n_gram):
    torch.manual_seed(0)
    layer = build_layer(provider, torch.nn.Linear(896, 896, device=DEVICE, dtype=DTYPE), rank=8, experts=4,
                        n_gram=n_gram)
    x = torch.randn(4, TOKENS // 4, 896, device=DEVICE, dtype=DTYPE, requires_grad=True)
    grad = torch.randn(4, TOKENS // 4, 896, device=DEVICE, dtype=DTYPE)

    def step():
        layer(x).backward(grad)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark(step)
    assert torch.isfinite(x.grad).all()
