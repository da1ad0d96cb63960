"""`use_compile=True` compiles every LiME layer; compiled equals eager (slow: ~30 s of compilation)."""

import pytest
import torch

import lime


@pytest.mark.slow
def test_use_compile_matches_eager():
    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
        return model

    compiled, eager = build(), build()
    torch.manual_seed(1)
    lime.apply_peft(compiled, use_compile=True, n_gram=2)
    torch.manual_seed(1)
    lime.apply_peft(eager, n_gram=2)
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    grads = []
    for model in (compiled, eager):
        model.train()
        torch.manual_seed(2)  # the same jitter for both
        out = model[0](x, attention_mask=mask)
        out.square().sum().backward()
        grads.append((out.detach(), model[0].B.grad.clone(), model[0].LiMEs.grad.clone()))
    for got, expected in zip(*grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
