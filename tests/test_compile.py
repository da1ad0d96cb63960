"""`use_compile=True` compiles every LiME layer, and torch.compile compiles a whole LiME model: both equal
eager (slow: they compile), and a training forward of a LiME model traces as one graph."""

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


@pytest.mark.slow
def test_whole_model_compile_trains_as_eager(monkeypatch):
    """torch.compile over a whole LiME model (the tiny LLaVA-OneVision, the README's call): the padding
    mask reaches the layers through their hooks and a training step's loss and gradients equal eager
    ones, once inductor draws random numbers as eager does (~60 s of compilation)."""
    import torch._inductor.config as inductor_config
    from llava_helpers import make_batch, readme_call

    from lime.tiny import build_tiny_llava_onevision

    monkeypatch.setattr(inductor_config, "fallback_random", True)
    results = []
    for compiled in (False, True):
        model, processor = build_tiny_llava_onevision(seed=0)
        torch.manual_seed(1)
        readme_call(model, processor)
        batch = make_batch(processor, ["What is shown?", "Which option is correct? A B C D"], ["a cat", "B"])
        model.train()
        call = torch.compile(model) if compiled else model
        torch.manual_seed(7)
        loss = call(**batch).loss + lime.compute_balance_loss(model)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert set(compiled_grads) == set(eager_grads) and len(eager_grads) > 0
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item(),
                                   msg=lambda message, name=name: f"{name}: {message}")


@pytest.mark.parametrize("options", [dict(), dict(n_gram=3, router="maxabs"), dict(rep_mode="last", sparse_mode=True),
                                     dict(peft="dora"), dict(peft="lora_fa"), dict(peft="slicefine"),
                                     dict(embedding=True)],
                         ids=["default", "window3-maxabs", "last-sparse", "dora", "lora_fa", "slicefine", "embedding"])
def test_a_text_training_forward_of_the_tiny_llava_is_one_graph(options):
    """torch.compile traces a whole LiME model's training forward (padded text, reference backend) as one
    graph: LiME adds no graph break (the statistics' boolean index and bincount broke it 35 times; the
    embedding layer, which reads the enclosing model's mask, once asked the autograd engine whether a
    backward was running). Image batches still break inside transformers' own LLaVA-OneVision image code,
    not LiME's. (Prompt tuning's hook is traced as a frame of its own: two graphs, not covered here.)"""
    from llava_helpers import README_TARGETS

    from lime.tiny import build_tiny_llava_onevision

    options = dict(options)
    targets = README_TARGETS + (["embed_tokens"] if options.pop("embedding", False) else [])
    model, processor = build_tiny_llava_onevision(seed=0)
    lime.apply_peft(model, targets=targets, tokenizer=processor.tokenizer, backend="reference", **options)
    processor.tokenizer.padding_side = "left"
    batch = processor(text=["What is shown? a cat", "Is it a dog? no, it is a cat on a mat"], return_tensors="pt",
                      padding=True)
    assert (batch["attention_mask"] == 0).any()
    model.train()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(**batch, labels=batch["input_ids"])
    reasons = [str(b.reason).splitlines()[0] for b in explanation.break_reasons]
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), reasons
