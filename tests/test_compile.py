"""`use_compile=True` compiles every LiME layer, and torch.compile compiles a whole LiME model: both equal
eager (slow: inductor compiles). A whole-model compile of a LiME training step (forward, balance loss,
backward) traces as one graph with no recompile and no host-synchronizing operator; where transformers'
own code breaks the graph (LLaVA-OneVision's image path), LiME adds no break; generate() with a static
cache compiles its decoding step whole. The fused backend's whole-model compile is tested under the Triton
interpreter in test_fused.py, the Trainer's torch_compile in test_trainer.py."""

import pytest
import torch

import lime
from lime_kernels import cpu


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


def _tiny_llava(options, backend="reference"):
    """The tiny LLaVA-OneVision with LiME (the reference backend, or `backend`) as `options` say, and a padded
    text batch. `peft="prompt"`: prompt tuning; `embedding=True`: embed_tokens wrapped too."""
    from llava_helpers import README_TARGETS, text_batch

    import lime.prompt_tuning
    from lime.tiny import build_tiny_llava_onevision

    options = dict(options)
    model, processor = build_tiny_llava_onevision(seed=0)
    torch.manual_seed(1)
    if options.get("peft") == "prompt":
        lime.prompt_tuning.apply_peft(model, num_virtual_tokens=3, backend=backend)
    else:
        targets = README_TARGETS + (["embed_tokens"] if options.pop("embedding", False) else [])
        lime.apply_peft(model, targets=targets, tokenizer=processor.tokenizer, backend=backend, **options)
    batch = text_batch(processor)
    assert (batch["attention_mask"] == 0).any()
    return model, batch


def _family(name, backend="reference", **options):
    """A tiny model of `tests/test_architectures.py` with LiME on its usual targets (the reference backend, or
    `backend`; `options` for apply_peft), and its right-padded training batch."""
    from test_architectures import FAMILIES, PAD, _build

    family = next(f for f in FAMILIES if f.name == name)
    model = _build(family)
    torch.manual_seed(1)
    lime.apply_peft(model, targets=family.targets, pad_token_id=PAD, backend=backend, **options)
    return model, family.batch()


VARIANTS = {"default": dict(), "window3-maxabs": dict(n_gram=3, router="maxabs"),
            "last-sparse": dict(rep_mode="last", sparse_mode=True), "dora": dict(peft="dora"),
            "lora_fa": dict(peft="lora_fa"), "slicefine": dict(peft="slicefine")}
# Every variant on the tiny LLaVA-OneVision (embedding targets and prompt tuning too), the PEFT variants also on
# Qwen2; Llama and T5 as they come. Each compile takes 5-20 s of CPU here: the repeats are slow tests.
SLOW_ON_LLAVA = {"dora", "lora_fa", "slicefine"}
CASES = [pytest.param(lambda options=options: _tiny_llava(options), id=f"llava-{name}",
                      marks=[pytest.mark.slow] if name in SLOW_ON_LLAVA else [])
         for name, options in {**VARIANTS, "embedding": dict(embedding=True), "prompt": dict(peft="prompt")}.items()]
CASES += [pytest.param(lambda name=name: _family("qwen2", **VARIANTS[name]), id=f"qwen2-{name}")
          for name in sorted(SLOW_ON_LLAVA)]
CASES += [pytest.param(lambda: _family("llama"), id="llama"),
          pytest.param(lambda: _family("t5"), id="t5", marks=pytest.mark.slow)]
# backend='cpu' (what 'auto' takes on the CPU), whose layers trace the reference under torch.compile as the reference
# backend's do: per-token routing, pooled routing with maxabs, embeddings and prompt tuning.
ON_CPU_OPERATORS = pytest.mark.skipif(not cpu.available(), reason=str(cpu.unavailable_reason()))
CASES += [pytest.param(lambda options=options: _tiny_llava(options, backend="cpu"), id=f"llava-{name}-cpu",
                       marks=[ON_CPU_OPERATORS])
          for name, options in {"default": dict(), "window3-maxabs": VARIANTS["window3-maxabs"],
                                "embedding": dict(embedding=True), "prompt": dict(peft="prompt")}.items()]
CASES += [pytest.param(lambda: _family("qwen2", backend="cpu", peft="dora"), id="qwen2-dora-cpu",
                       marks=[ON_CPU_OPERATORS, pytest.mark.slow])]


@pytest.mark.parametrize("build", CASES)
def test_a_compiled_training_step_is_one_graph_without_recompiles_or_host_syncs(build):
    """torch.compile(model, fullgraph=True) over a LiME model's training step (padded batch, mask scopes,
    balance loss, backward): a graph break anywhere fails (fullgraph), three steps of the same shapes
    compile once (a recompile fails), and no forward or backward graph calls an operator that synchronizes
    the host (`lime_kernels.accounting.SYNC_OPS`, what the eager step is tested for in test_properties).
    Graphs: the model's and the balance loss's. Before: the statistics' boolean index and bincount broke the
    model's graph 35 times; the balance loss's grad_fn check broke its own; the mask scopes' bookkeeping
    recompiled the whole model twice; prompt tuning's forward pre-hook compiled as a graph of its own."""
    from compile_helpers import compiled_training_steps, recorded_host_syncs

    model, batch = build()
    record, losses = compiled_training_steps(model, batch)
    assert (len(record.graphs), len(record.fw_graphs), len(record.bw_graphs)) == (2, 2, 2)
    assert recorded_host_syncs(record) == []
    assert all(torch.isfinite(loss) for loss in losses) and not torch.equal(losses[0], losses[-1])  # it trains


def test_graph_host_syncs_reads_the_sync_prone_operators_of_a_compiled_graph():
    """The check the tests above rely on finds what it looks for: operators that wait for the device but break
    no graph (masked_scatter sizes nothing by the data, yet reads a count of the mask on a GPU)."""
    from compile_helpers import recorded_host_syncs
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    record = AotEagerAndRecordGraphs()

    @torch.compile(backend=record, fullgraph=True)
    def scatter(x, mask, values):
        return x.masked_scatter(mask, values).sum() + torch.histc(x, bins=4).sum()

    torch._dynamo.reset()
    x = torch.randn(6, requires_grad=True)
    scatter(x, x.detach() > 0, torch.randn(6)).backward()
    assert sorted(set(recorded_host_syncs(record))) == ["aten::histc", "aten::masked_scatter"]


ROUTE_CASES = {"auto-topk-cosine": dict(), "window3-maxabs-padded": dict(n_gram=3, router="maxabs"),
               "sparse-top2-unshared": dict(auto_topk=False, sparse_mode=True, top_k=2)}


def _route_inputs(case: str):
    """float64 inputs of `reference.route` (2 x 9 tokens, 40 channels, 4 experts) for `ROUTE_CASES[case]`."""
    from lime_kernels import RoutingOptions

    options = RoutingOptions(num_experts=4, jitter_noise=0.1, **ROUTE_CASES[case])
    torch.manual_seed(0)
    shape = (2, 9, 40)
    tensors = dict(base=torch.randn(shape, dtype=torch.float64), delta=torch.randn(shape, dtype=torch.float64),
                   LiMEs=torch.randn(4, 40, dtype=torch.float64),
                   LiME_shared=None if case == "sparse-top2-unshared" else torch.randn(40, dtype=torch.float64),
                   gamma=None if case == "sparse-top2-unshared" else torch.tensor(0.3, dtype=torch.float64))
    leaves = {name: t.requires_grad_() for name, t in tensors.items() if t is not None}
    valid = torch.ones(2, 9, dtype=torch.bool)
    if case == "window3-maxabs-padded":
        valid[0, 6:] = False
    jitter = torch.empty(18, 4, dtype=torch.float64).uniform_(0.9, 1.1)
    return tensors, leaves, options, valid, jitter


@pytest.mark.parametrize("fused_mixture", [True, False], ids=["fused-mixture", "matrix-product"])
@pytest.mark.parametrize("case", list(ROUTE_CASES))
def test_compiled_routing_equals_eager_routing(case, fused_mixture, monkeypatch):
    """`reference.route` under torch.compile (inductor) gives the eager output, probabilities and gradients to
    float64 rounding, with the routing features in their expert-major layout and the mixture `w @ P` written as
    summed products (a small layer) or kept a matrix product (`FUSED_MIXTURE_PRODUCTS` set to 0)."""
    from lime_kernels import reference

    if not fused_mixture:
        monkeypatch.setattr(reference, "FUSED_MIXTURE_PRODUCTS", 0)
    results = []
    for compiled in (False, True):
        tensors, leaves, options, valid, jitter = _route_inputs(case)
        torch._dynamo.reset()
        route = torch.compile(reference.route) if compiled else reference.route
        routed = route(**tensors, options=options, valid=valid, jitter=jitter)
        (routed.out.square().sum() + routed.probs.pow(3).sum()).backward()
        results.append((routed.out.detach(), routed.probs.detach(), {n: t.grad for n, t in leaves.items()}))
    (out, probs, grads), (compiled_out, compiled_probs, compiled_grads) = results
    torch.testing.assert_close(compiled_out, out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(compiled_probs, probs, rtol=1e-10, atol=1e-12)
    for name, grad in grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-9, atol=1e-11,
                                   msg=lambda message, name=name: f"d{name}: {message}")


@pytest.mark.parametrize("tokens,fused", [(16, True), (4096, False)])
def test_the_mixture_is_summed_products_for_small_layers_under_compile(tokens, fused):
    """`reference.expert_mixture` under torch.compile: a small mixture (16 tokens x 4 experts x 64 channels) traces
    no matrix product, a large one (4096 tokens: past `FUSED_MIXTURE_PRODUCTS`) one."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    from lime_kernels import reference

    weights, experts, shared = torch.rand(tokens, 4), torch.randn(4, 64), torch.randn(64)
    record = EagerAndRecordGraphs()
    torch._dynamo.reset()
    compiled = torch.compile(reference.expert_mixture, backend=record, fullgraph=True)(weights, experts, shared)
    torch.testing.assert_close(compiled, weights @ experts + shared)
    products = [node for graph in record.graphs for node in graph.graph.nodes
                if node.op == "call_function" and node.target in (torch._C._nn.linear, torch.nn.functional.linear)]
    assert len(products) == (0 if fused else 1)


def test_the_adapter_scaling_multiplies_the_product_under_compile():
    """`reference.adapter_delta` under torch.compile scales the product `x A^T B^T`, which inductor fuses into the
    kernels that read delta, rather than the rank-r intermediate between the two products (a kernel of its own
    each way); eagerly it scales the intermediate. Both agree to rounding."""
    import operator

    from torch._dynamo.testing import EagerAndRecordGraphs

    from lime_kernels import reference

    torch.manual_seed(0)
    x, A, B = (torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(4, 16, dtype=torch.float64),
               torch.randn(12, 4, dtype=torch.float64))
    record = EagerAndRecordGraphs()
    torch._dynamo.reset()
    compiled = torch.compile(reference.adapter_delta, backend=record, fullgraph=True)(x, A, B, 0.5)
    torch.testing.assert_close(compiled, reference.adapter_delta(x, A, B, 0.5), rtol=1e-12, atol=1e-12)
    nodes = [node for graph in record.graphs for node in graph.graph.nodes if node.op == "call_function"]
    products = [node for node in nodes if node.target in (torch._C._nn.linear, torch.nn.functional.linear)]
    scalings = [node for node in nodes if node.target in (operator.mul, torch.mul)]
    assert len(products) == 2 and len(scalings) == 1
    assert scalings[0].args[0] is products[1], f"the scaling multiplies {scalings[0].args[0]}, not the product"


def test_image_batches_break_only_where_transformers_breaks():
    """An image batch breaks the tiny LLaVA-OneVision's graph inside transformers' own image code (.item()
    calls, data-dependent branches and operators): with LiME (on the vision tower too) the breaks are the same,
    and none is in LiME's code."""
    from llava_helpers import README_TARGETS, make_batch

    from lime.tiny import build_tiny_llava_onevision

    explained = []
    for with_lime in (False, True):
        model, processor = build_tiny_llava_onevision(seed=0)
        if with_lime:
            lime.apply_peft(model, targets=README_TARGETS, tokenizer=processor.tokenizer, backend="reference")
        batch = make_batch(processor, ["What is shown?", "Which option is correct? A B C D"], ["a cat", "B"])
        torch._dynamo.reset()
        explained.append(torch._dynamo.explain(model.train())(**batch))
    without, with_lime = explained
    reasons = [[str(b.reason).splitlines()[0] for b in e.break_reasons] for e in explained]
    assert without.graph_break_count > 0 and reasons[0] == reasons[1]
    assert (with_lime.graph_count, with_lime.graph_break_count) == (without.graph_count, without.graph_break_count)
    frames = [frame.filename for b in with_lime.break_reasons for frame in b.user_stack]
    assert not [f for f in frames if "/lime/" in f or "/lime_kernels/" in f]


def _generation_case(name, backend="reference"):
    """(model with LiME (`backend`) and random adapters, eval mode; left-padded prompts, or T5's padded encoder
    inputs)."""
    from test_architectures import PAD, _randomize_adapters

    if name == "llava":
        from llava_helpers import make_batch

        from lime.tiny import build_tiny_processor

        model = _tiny_llava({}, backend=backend)[0]
        # Images: transformers runs the prefill eagerly (where its image code breaks graphs) and compiles the
        # decoding steps.
        batch = make_batch(build_tiny_processor(), ["What is shown?", "Which option is correct? A B C D"],
                           padding_side="left")
    else:
        model = _family(name, backend=backend)[0]
        ids = torch.tensor([[PAD, PAD, PAD, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]])
        if name == "t5":
            ids = ids.flip(1)  # the encoder's padding on the right
        batch = {"input_ids": ids, "attention_mask": (ids != PAD).long()}
    _randomize_adapters(model)
    return model.eval(), batch


@pytest.mark.parametrize("name,backend", [("qwen2", "reference"), ("llava", "reference"),
                                          pytest.param("t5", "reference", marks=pytest.mark.slow),
                                          pytest.param("llava", "cpu", marks=ON_CPU_OPERATORS)])
def test_generate_with_a_static_cache_compiles_its_decoding_step_as_one_graph(name, backend):
    """transformers compiles the decoding step of generate(cache_implementation="static") with its
    CompileConfig (on a GPU by itself; on a CPU when told to: `_compile_all_devices`). With LiME that step
    traces whole (fullgraph), once for every step and for a second generate of the same shapes, and the
    tokens and scores are eager generation's with the default dynamic cache. transformers then hands the
    model precomputed 4-D masks instead of the 2-D padding mask: LiME's layers route every token (a warning
    says so), which changes nothing under the default per-token routing."""
    from compile_helpers import recording_compile_config

    model, batch = _generation_case(name, backend)
    config, graphs = recording_compile_config()
    settings = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, output_scores=True,
                    return_dict_in_generate=True)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model.generate(**batch, **settings)
        with pytest.warns(UserWarning, match="not a 2-D padding mask"):
            compiled = model.generate(**batch, **settings, cache_implementation="static", compile_config=config)
        again = model.generate(**batch, **settings, cache_implementation="static", compile_config=config)
    assert len(graphs) == 1
    for run in (compiled, again):
        assert torch.equal(run.sequences, eager.sequences)
        for step, expected in zip(run.scores, eager.scores):
            torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-5)


def test_prompt_tuning_refuses_a_static_cache_with_a_clear_error():
    """With a static cache transformers passes precomputed masks, and sizes the cache without the prompts:
    prompt tuning cannot extend either, and says so (it raised on a bool mask-of-a-dict, deep in the encoder)."""
    from llava_helpers import make_batch

    from lime.tiny import build_tiny_processor

    model = _tiny_llava(dict(peft="prompt"))[0].eval()
    batch = make_batch(build_tiny_processor(), ["What is shown?"], padding_side="left")
    with pytest.raises(ValueError, match="2-D attention_mask; got dict.*default dynamic cache"):
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=2, cache_implementation="static")


def _image_batch_llava():
    """The README's apply_peft call on the tiny LLaVA-OneVision (jitter on) and an image batch."""
    from llava_helpers import make_batch, readme_call

    from lime.tiny import build_tiny_llava_onevision

    model, processor = build_tiny_llava_onevision(seed=0)
    torch.manual_seed(1)
    readme_call(model, processor)
    return model, make_batch(processor, ["What is shown?", "Which option is correct? A B C D"], ["a cat", "B"])


@pytest.mark.slow
@pytest.mark.parametrize("build", [
    pytest.param(_image_batch_llava, id="llava-images"),
    pytest.param(lambda: _tiny_llava(dict(peft="prompt")), id="llava-prompt"),
    pytest.param(lambda: _tiny_llava(dict(peft="dora", n_gram=3)), id="llava-dora-window3"),
    pytest.param(lambda: _family("qwen2"), id="qwen2"),
    pytest.param(lambda: _family("t5"), id="t5"),
    pytest.param(lambda: _tiny_llava(dict(), backend="cpu"), id="llava-cpu", marks=ON_CPU_OPERATORS),
    pytest.param(lambda: _family("qwen2", backend="cpu", n_gram=3), id="qwen2-window3-cpu", marks=ON_CPU_OPERATORS),
])
def test_whole_model_compile_trains_as_eager(build):
    """torch.compile (inductor) over a whole LiME model: the padding mask reaches the layers through their
    hooks and a training step's loss and gradients equal eager ones, once inductor draws random numbers as
    eager does (30-60 s of compilation each)."""
    import torch._inductor.config as inductor_config

    results = []
    for compiled in (False, True):
        model, batch = build()
        model.train()
        call = torch.compile(model) if compiled else model
        torch._dynamo.reset()
        torch.manual_seed(7)
        # inductor's config patch, not monkeypatch: undoing monkeypatch deletes the option from the config module.
        with inductor_config.patch(fallback_random=True):  # the backward compiles at its first call
            loss = call(**batch).loss + lime.compute_balance_loss(model)
            loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert set(compiled_grads) == set(eager_grads) and len(eager_grads) > 0
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item(),
                                   msg=lambda message, name=name: f"{name}: {message}")
