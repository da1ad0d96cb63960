"""Cached generation routes as uncached generation (and training) does: with a causal n-gram window
(`ngram_mode="window"`, `n_gram > 1`) every LiME layer carries the routing features of the last n-1
positions next to the KV cache (`lime_kernels.decoding`), so `generate()` with its cache equals
`generate(use_cache=False)` in tokens, and in scores to float rounding (float64 here), greedy and with
beams. The history starts afresh with each generate call, follows beam search's reordering and never holds
padding; the non-causal modes (anchors, mean, last, maxabs) warn once per cached generation instead."""

import warnings
from dataclasses import replace

import pytest
import torch

import lime
from lime_kernels import eager, reference
from lime_kernels.decoding import DecodingState
from lime_kernels.layer import triton_interpreting
from lime_kernels.options import RoutingOptions
from lime_kernels.reference import RoutingHistory

NEW_TOKENS = 5
SETTINGS = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                return_dict_in_generate=True)


def _llava(**options):
    """The tiny LLaVA-OneVision in float64 with LiME on the README's targets and random adapters."""
    from llava_helpers import README_TARGETS
    from test_architectures import _randomize_adapters

    from lime.tiny import build_tiny_llava_onevision

    model, processor = build_tiny_llava_onevision(seed=0, dtype=torch.float64)
    torch.manual_seed(1)
    options = {"targets": README_TARGETS, **options}
    lime.apply_peft(model, tokenizer=processor.tokenizer, backend="reference", **options)
    _randomize_adapters(model)
    return model.eval(), processor


def _text_prompts(processor, texts=("What is shown? a cat", "Is it a dog? no, it is a cat on a mat")):
    """Left-padded prompts of different lengths."""
    processor.tokenizer.padding_side = "left"
    batch = dict(processor(text=list(texts), return_tensors="pt", padding=True))
    assert (batch["attention_mask"] == 0).any()
    return batch


def _image_prompts(processor):
    from llava_helpers import make_batch
    from test_architectures import _double

    return _double(dict(make_batch(processor, ["What is shown?", "Which option is correct? A B C D"],
                                   padding_side="left")))


def _family(name, **options):
    """A tiny model of tests/test_architectures.py in float64 with LiME and random adapters."""
    from test_architectures import FAMILIES, PAD, _build, _randomize_adapters

    family = next(f for f in FAMILIES if f.name == name)
    model = _build(family).double()
    torch.manual_seed(1)
    lime.apply_peft(model, targets=family.targets, num_experts=4, rank=2, pad_token_id=PAD, backend="reference",
                    **options)
    _randomize_adapters(model)
    return model.eval()


def _left_padded(lengths=(7, 1), seed=5):
    """Left-padded token ids of the given prompt lengths (a 1-token prompt: its window is mostly padding)."""
    from test_architectures import PAD, VOCAB

    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), PAD)
    for row, length in enumerate(lengths):
        ids[row, ids.shape[1] - length:] = torch.randint(3, VOCAB, (length,), generator=generator)
    return {"input_ids": ids, "attention_mask": (ids != PAD).long()}


def _generate(model, batch, **settings):
    with torch.no_grad():
        return model.generate(**batch, **{**SETTINGS, **settings})


def _assert_same_generation(got, expected, tolerance=1e-9):
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.scores) == len(expected.scores) == NEW_TOKENS
    for step, reference_step in zip(got.scores, expected.scores):
        torch.testing.assert_close(step, reference_step, rtol=tolerance, atol=tolerance)


def _assert_cached_equals_uncached(model, batch, **settings):
    cached = _generate(model, batch, **settings)
    uncached = _generate(model, batch, use_cache=False, **settings)
    _assert_same_generation(cached, uncached)
    return cached


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("n_gram", [1, 2, 3])
def test_cached_generation_equals_uncached_on_the_tiny_llava(n_gram, num_beams):
    """Left-padded text prompts of different lengths, greedy and beam search. Before the routing history,
    n_gram=3 differed in most scores (by up to 27.9 on a float32 model)."""
    model, processor = _llava(n_gram=n_gram)
    cached = _assert_cached_equals_uncached(model, _text_prompts(processor), num_beams=num_beams)
    if n_gram > 1:
        assert DecodingState.of(cached.cache).histories  # the windows did carry across the steps


def test_cached_generation_equals_uncached_with_images():
    model, processor = _llava(n_gram=3)
    _assert_cached_equals_uncached(model, _image_prompts(processor), num_beams=2)


def test_cached_generation_equals_uncached_with_an_embedding_target():
    """LLaVA calls its language model's embed_tokens outside the language model's call: the layer reads the
    wrapper's call, which shares the cache's history."""
    from llava_helpers import README_TARGETS

    model, processor = _llava(n_gram=3, targets=README_TARGETS + ["embed_tokens"])
    _assert_cached_equals_uncached(model, _text_prompts(processor))


@pytest.mark.parametrize("num_beams", [1, 2])
@pytest.mark.parametrize("name", ["qwen2", "llama", "t5"])
def test_cached_generation_equals_uncached_on_other_families(name, num_beams):
    """Llama also wraps its MLP projections (seven targets per layer); T5's decoder carries the history of its
    own tokens, while its cross-attention projections read the encoder's states (no history)."""
    model = _family(name, n_gram=3)
    _assert_cached_equals_uncached(model, _left_padded(), num_beams=num_beams)


def test_each_generate_starts_a_fresh_history():
    """A second generate call (a new cache, or the same cache object reset) equals a fresh model's."""
    from transformers import DynamicCache

    model, processor = _llava(n_gram=3)
    fresh, _ = _llava(n_gram=3)
    first = _text_prompts(processor, ("Count the cubes", "Describe the motion of the red ball"))
    second = _text_prompts(processor)
    expected = _generate(fresh, second)
    _generate(model, first)
    _assert_same_generation(_generate(model, second), expected, tolerance=0)
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    _generate(model, first, cache=cache)
    cache.reset()
    _assert_same_generation(_generate(model, second, cache=cache), expected, tolerance=0)


def test_padding_never_enters_the_history():
    """After the prefill of a 1-token prompt left-padded to 7, its n-1 = 2 earlier positions are a pad
    (invalid, zero features) and its token; the padded batch generates what each prompt generates alone."""
    model = _family("qwen2", n_gram=3)
    padded = _left_padded()
    prefill = _generate(model, padded, max_new_tokens=1, min_new_tokens=1)
    histories = DecodingState.of(prefill.cache).histories
    assert len(histories) == 4  # q, k, v, o of the one layer
    for history in histories.values():
        assert history.valid.tolist() == [[True, True], [False, True]]
        assert (history.frozen[1, 0] == 0).all() and (history.adapted[1, 0] == 0).all()
    together = _generate(model, padded)
    for row in range(2):
        valid = padded["attention_mask"][row].bool()
        alone = {"input_ids": padded["input_ids"][row, valid][None],
                 "attention_mask": torch.ones(1, int(valid.sum()), dtype=torch.long)}
        single = _generate(model, alone)
        assert torch.equal(together.sequences[row, -NEW_TOKENS:], single.sequences[0, -NEW_TOKENS:])
        for step, alone_step in zip(together.scores, single.scores):
            torch.testing.assert_close(step[row], alone_step[0], rtol=1e-9, atol=1e-9)


def test_a_decoding_loop_of_ones_own_carries_the_history_of_the_cache_it_passes():
    """Calls without generate(): given a cache object from the first call on, the history goes with it; a
    cache LiME did not see being filled (the model made it itself) gets a warning."""
    from transformers import DynamicCache

    model = _family("qwen2", n_gram=3)

    def decode(first_cache):
        batch = _left_padded()
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, cache=first_cache)
            for _ in range(3):
                token = out.logits[:, -1:].argmax(dim=-1)
                ids = torch.cat([ids, token], dim=1)
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                out = model(input_ids=token, attention_mask=mask, cache=out.cache)
            whole = model(input_ids=ids, attention_mask=mask, use_cache=False)
        return out.logits[:, -1], whole.logits[:, -1]

    messages = _messages(lambda: torch.testing.assert_close(
        *decode(DynamicCache(config=model.config)), rtol=1e-9, atol=1e-9))
    assert not [text for text in messages if "LiME" in text]
    messages = _messages(lambda: decode(None))
    assert len([text for text in messages if "that LiME did not see being filled" in text]) == 1


def test_a_compiled_static_cache_decoding_step_carries_the_history_in_one_graph():
    """generate(cache_implementation="static") with a compile config (as tests/test_compile.py): the history
    is traced state of the cache, so the decoding step compiles once (its strides do not change between the
    eager prefill and the compiled steps) and generates what uncached generation does. Unpadded prompts: a
    static cache passes no 2-D padding mask (see test_compile)."""
    from compile_helpers import recording_compile_config

    model = _family("qwen2", n_gram=3).float()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [9, 10, 11, 12, 13, 14, 15]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    config, graphs = recording_compile_config()
    torch._dynamo.reset()
    uncached = _generate(model, batch, use_cache=False)
    for _ in range(2):
        compiled = _generate(model, batch, cache_implementation="static", compile_config=config)
        assert torch.equal(compiled.sequences, uncached.sequences)
        for step, expected in zip(compiled.scores, uncached.scores):
            torch.testing.assert_close(step, expected, rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1


@pytest.mark.skipif(not (torch.cuda.is_available() or triton_interpreting()),
                    reason="needs a CUDA device or TRITON_INTERPRET=1 (the fused backend)")
def test_the_fused_backend_decodes_on_the_reference():
    """The fused kernels carry no history: a cached generation's layers run on the reference (`backend='triton'`
    warns once per layer), and still generate what uncached generation on the fused kernels does."""
    device = "cuda" if torch.cuda.is_available() and not triton_interpreting() else "cpu"
    model = _family("qwen2", n_gram=3).float().to(device)
    for _, layer in lime.lime_layers(model):
        layer.adapter = replace(layer.adapter, backend="triton")
    batch = {name: value.to(device) for name, value in _left_padded().items()}
    uncached = _generate(model, batch, use_cache=False)
    messages = _messages(lambda: _assert_same_generation(_generate(model, batch), uncached, tolerance=1e-4))
    assert len([text for text in messages if "cannot carry the n-gram routing history" in text]) == 4


NON_CAUSAL = [
    (dict(n_gram=2, ngram_mode="anchor"), "ngram_mode='anchor'"),
    (dict(router="maxabs"), "router='maxabs'"),
    (dict(rep_mode="mean"), "rep_mode='mean'"),
    (dict(rep_mode="last"), "rep_mode='last'"),
]


def _messages(run):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    return [str(w.message) for w in caught]


@pytest.mark.parametrize("options, named", NON_CAUSAL, ids=[named for _, named in NON_CAUSAL])
def test_non_causal_routing_warns_once_per_cached_generation(options, named):
    model = _family("qwen2", **options)
    batch = _left_padded()
    for _ in range(2):  # once per generate call
        found = [text for text in _messages(lambda: _generate(model, batch)) if named in text]
        assert len(found) == 1, found
        assert "cached generation differs from uncached generation" in found[0]
    assert not [text for text in _messages(lambda: _generate(model, batch, use_cache=False)) if named in text]


def test_causal_routing_does_not_warn():
    model = _family("qwen2", n_gram=3)
    assert not [text for text in _messages(lambda: _generate(model, _left_padded())) if "LiME" in text]


def test_the_history_follows_the_caches_batch_edits():
    """reorder_cache (beam search), batch_select_indices, batch_repeat_interleave, reset and crop, called on
    the cache, change the history alike; a step of another batch size is refused, naming both."""
    from transformers import DynamicCache

    cache = DynamicCache()
    state = DecodingState().attach(cache)
    layer = torch.nn.Linear(2, 2)
    options = RoutingOptions(num_experts=2, n_gram=3)
    rows = torch.arange(3, dtype=torch.float32).view(3, 1, 1).expand(3, 2, 2)
    state.store(layer, RoutingHistory(rows, -rows, torch.ones(3, 2, dtype=torch.bool)))
    assert DecodingState.of(cache) is state
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    assert state.history(layer, 3, options, "cpu").frozen[:, 0, 0].tolist() == [2, 2, 0]
    cache.batch_select_indices(torch.tensor([2, 0]))
    cache.batch_repeat_interleave(2)
    history = state.history(layer, 4, options, "cpu")
    assert history.frozen[:, 0, 0].tolist() == [0, 0, 2, 2] and history.adapted[:, 0, 0].tolist() == [0, 0, -2, -2]
    with pytest.raises(ValueError, match="holds 4 sequences.*this decoding step has 3 sequences"):
        state.history(layer, 3, options, "cpu")
    cache.crop(0)  # nothing removed
    assert state.histories and state.lost is None
    cache.crop(-1)
    assert not state.histories and "cropped" in state.lost
    state.store(layer, history)
    cache.reset()
    assert not state.histories and state.lost is None
    empty = state.history(layer, 2, options, "cpu")
    assert empty.frozen.shape == (2, 2, 2) and not empty.valid.any()


def _route_in_chunks(route, inputs, options, chunks):
    """`route` over consecutive chunks of the tokens, each continuing the history of the one before."""
    base, delta, LiMEs, shared, gamma, valid = inputs
    history = RoutingHistory.empty(base.shape[0], options.n_gram, options.num_experts, base.device, base.dtype)
    outs, probs = [], []
    for start, stop in chunks:
        routed = route(base[:, start:stop], delta[:, start:stop], LiMEs, shared, gamma, options, valid[:, start:stop],
                       history=history)
        outs.append(routed.out)
        probs.append(routed.probs)
        history = routed.history
    return torch.cat(outs, dim=1), torch.cat(probs, dim=1), history


@pytest.mark.parametrize("n_gram", [2, 3, 5])
@pytest.mark.parametrize("path", ["reference", "eager"])
def test_routing_in_chunks_with_history_equals_one_call(path, n_gram):
    """The window over a call's tokens continuing the history equals the window over the whole sequence,
    with padding on the left and an invalid token in the middle (windows are positions, not valid tokens)."""
    generator = torch.Generator().manual_seed(0)
    batch, tokens, experts, width = 3, 9, 4, 6
    options = RoutingOptions(num_experts=experts, top_k=2, n_gram=n_gram)
    base = torch.randn(batch, tokens, width, generator=generator, dtype=torch.float64)
    delta = torch.randn(batch, tokens, width, generator=generator, dtype=torch.float64)
    LiMEs = torch.rand(experts, width, generator=generator, dtype=torch.float64) + 0.5
    shared = torch.randn(width, generator=generator, dtype=torch.float64)
    gamma = torch.tensor([0.3], dtype=torch.float64)
    valid = torch.ones(batch, tokens, dtype=torch.bool)
    valid[0, :4] = False
    valid[1, 5] = False
    valid[2, :8] = False
    if path == "eager":  # recording a graph: the one-node autograd path
        delta.requires_grad_(True)
    route = reference.route if path == "reference" else eager.route
    whole = route(base, delta, LiMEs, shared, gamma, options, valid)
    out, probs, history = _route_in_chunks(route, (base, delta, LiMEs, shared, gamma, valid), options,
                                           [(0, 3), (3, 4), (4, 6), (6, 7), (7, 9)])
    torch.testing.assert_close(out, whole.out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(probs, whole.probs, rtol=1e-12, atol=1e-12)
    assert history.valid.tolist() == valid[:, tokens - n_gram + 1:].tolist()
    if path == "eager":  # gradients reach the earlier chunks' features through the history
        (grad,) = torch.autograd.grad(out.square().sum(), delta)
        (expected,) = torch.autograd.grad(whole.out.square().sum(), delta)
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_the_scopes_answer_which_routing_needs_a_history_afresh_when_a_layers_options_change():
    """`MaskScope._routing_kinds` (asked at every generation step) is kept between calls, and follows the layers'
    options: switching one layer to a causal window or to maxabs routing changes the answer at once."""
    model, _ = _llava()
    scope = next(scope for scope in model._lime_mask_scopes.values() if scope.enclosing is None)  # the model's
    assert scope._routing_kinds() == (False, []) and scope._routing_kinds() is scope._routing_kinds()
    layer = scope.layers[0]
    layer.update_routing(n_gram=3, ngram_mode="window")
    assert scope._routing_kinds() == (True, [])
    layer.update_routing(n_gram=1, router="maxabs")
    assert scope._routing_kinds() == (False, ["router='maxabs'"])
    scope.layers = scope.layers[1:]  # the layers below change (a replaced adapter): asked afresh too
    assert scope._routing_kinds() == (False, [])
