"""compat="original": the layers compute what the original LiME code's classes compute.

What compat="original" must do (the oracle is tests/original_lime.py; its docstring lists every
difference from the project's default semantics, step by step):

- Spelling: `lime.apply_peft(model, ..., compat="original")`, `lime.prompt_tuning.apply_peft(..., compat=...)`,
  `LiMEConfig(compat=...)` and every layer class (`LiMELinear`, `LiMELoRAFALinear`, `LiMEDoRALinear`,
  `LiMESliceFineLinear`, `LiMEEmbedding`, `LiMEPromptEncoder`) take `compat="lime"` (default) or `"original"`;
  a layer reports it as `layer.compat`; anything else is a ValueError naming `compat`.
- Routing: maxabs (one max over the whole batch, padding included) and n-gram anchors; the LoRA classes
  (linear and embedding) ignore n_gram. `router`, `ngram_mode` left out take those; an explicit
  `router="cosine"`, `ngram_mode="window"`, `rep_mode` other than "token" (the original ignores it) or,
  for DoRA, `dora_detach_norm=True` (the original's norm takes gradients) is a ValueError naming the option.
- Draws (torch's global generator): the dropout mask of the input first, then the jitter, one
  `Uniform(1 - eps, 1 + eps)` row per routed position (per n-gram anchor), of shape (B, anchors, E), in the
  activation dtype.
- DoRA: `mag = m / max(||W + s B A||_row, 1e-8)`; frozen output `mag * (W x_d + b)` (bias rescaled, the
  dropped input x_d fed to it too); routing's frozen side `mag * (W x_d + b) + mag * delta` (the adapted
  output), adapter side `mag * delta`; masked tokens get `mag * (W x_d + b)`.
- SliceFine: routing from the first E channels of `[part_T; W[r:]] x_d` alone (no bias, no adapter side,
  gamma_routing unused); the frozen rows read x_d too; the first r channels are `part_T x_d * (w @ LiMEs +
  gamma * LiME_shared)[:r] + b`; masked tokens get `[part_T; W[r:]] x_d + b`; the bias trains (`layer.bias`
  requires grad, also after `lime.apply_peft`); LiME_shared starts at zeros.
- Embeddings: LoRA as the linear (no dropout, n_gram ignored); LoRA-FA's delta is the low-rank table
  `(s * B A)[ids]` with `B (num_embeddings, r)` trained and `A (r, H)` frozen, n-gram anchors.
- Prompt tuning: the conditioning mean runs over every input token, padding included (the original's model
  wrapper calls it without the mask); no input projection (the paper's run_prompt.py); jitter per anchor of
  the V virtual tokens; static prompts (input_conditioned=False) are routed once (one jitter draw) for the batch.
- Statistics (`layer.last_stats`): training `importance`, `kl_uniform`, `usage` over the tokens with mask 1
  (every token without a mask); `load` counts the selections at every routed position, padding included, one
  per anchor with n-gram, and every min(2k, E) candidate in sparse AutoTop-K; eval `usage` is the mean over
  every token, padding included.
- Saved in the adapter: `lime.save_adapter` / `lime.load_adapter` keep compat (config and layers).

Float64 comparisons hold to 1e-10 (outputs, the input's gradient, every trainable parameter's gradient, the
statistics), seeded dropout + jitter included; seeded draws in float32 to 1e-4.
"""

import json

import pytest
import torch
from conftest import padding_mask, tolerance_check

import lime
import lime.prompt_tuning
import original_lime as O
from lime_kernels import (
    LiMEDoRALinear,
    LiMEEmbedding,
    LiMELinear,
    LiMELoRAFALinear,
    LiMEPromptEncoder,
    LiMESliceFineLinear,
)

CLASSES = {"lora": LiMELinear, "lora_fa": LiMELoRAFALinear, "dora": LiMEDoRALinear, "slicefine": LiMESliceFineLinear}

# The selection rules of step 8 (the original's dense and sparse paths), as layer keywords.
SELECTIONS = {
    "dense-soft": dict(auto_topk=False, soft_topk=True, sparse_mode=False, top_k=2),
    "dense-auto": dict(auto_topk=True, sparse_mode=False, top_k=2),
    "dense-hard": dict(auto_topk=False, soft_topk=False, sparse_mode=False, top_k=2),
    "sparse-top2": dict(auto_topk=False, sparse_mode=True, top_k=2),
    "sparse-top1": dict(auto_topk=False, sparse_mode=True, top_k=1),
    "sparse-auto": dict(auto_topk=True, sparse_mode=True, top_k=1),
    "sparse-auto-k2": dict(auto_topk=True, sparse_mode=True, top_k=2),
}

ROUTING = dict(num_experts=4, temperature=0.7, gamma_routing=0.6, soft_topk_temperature=0.5, auto_topk_threshold=0.5)
D_IN, D_OUT, RANK = 10, 12, 3


def oracle_options(n_gram, jitter_noise=0.0, **selection):
    keys = ("top_k", "soft_topk", "auto_topk", "sparse_mode")
    chosen = {k: selection[k] for k in keys if k in selection}
    return O.OriginalOptions(n_gram=n_gram, jitter_noise=jitter_noise, **ROUTING, **chosen)


def make_compat_layer(variant, dtype=torch.float64, seed=0, n_gram=1, jitter_noise=0.0, dropout=0.0, rank=RANK,
                      use_shared_LiME=True, **selection):
    """A compat='original' layer with every parameter random (B, gamma start at zero; SliceFine's part_T
    starts equal to W[:r] and its shared vector at zero, which would hide bugs)."""
    torch.manual_seed(seed)
    linear = torch.nn.Linear(D_IN, D_OUT, dtype=dtype)
    layer = CLASSES[variant](
        linear, rank=rank, alpha=6.0, n_gram=n_gram, jitter_noise=jitter_noise, dropout=dropout,
        use_shared_LiME=use_shared_LiME, peft_dtype=dtype, moe_dtype=dtype, backend="reference", compat="original",
        **ROUTING, **selection,
    )
    with torch.no_grad():
        for _, parameter in layer.named_parameters(recurse=False):
            parameter.add_(torch.randn_like(parameter) * 0.3)
        if layer.gamma is not None:
            layer.gamma.fill_(0.4)
    return layer


def oracle_inputs(layer, variant):
    """The layer's tensors under the oracle's names (for SliceFine `b` is the trainable bias)."""
    tensors = {"W": layer.linear.weight, "b": layer.bias if variant == "slicefine" else layer.linear.bias,
               "LiMEs": layer.LiMEs, "LiME_shared": layer.LiME_shared, "gamma": layer.gamma}
    if variant == "slicefine":
        tensors["part_T"] = layer.part_T
    else:
        tensors["A"], tensors["B"] = layer.A, layer.B
    if variant == "dora":
        tensors["m"] = layer.m
    return tensors


def run_oracle(variant, tensors, x, mask, options, training, scaling, dropout=0.0):
    common = dict(attention_mask=mask, training=training, dropout=dropout)
    t = tensors
    if variant in ("lora", "lora_fa"):
        return O.lora_forward(x, t["W"], t["b"], t["A"], t["B"], t["LiMEs"], t["LiME_shared"], t["gamma"], options,
                              scaling, variant=variant, **common)
    if variant == "dora":
        return O.dora_forward(x, t["W"], t["b"], t["A"], t["B"], t["m"], t["LiMEs"], t["LiME_shared"], t["gamma"],
                              options, scaling, **common)
    return O.slicefine_forward(x, t["W"], t["b"], t["part_T"], t["LiMEs"], t["LiME_shared"], t["gamma"], options,
                               **common)


def detached_copies(tensors):
    """Leaf copies that require grad where the layer's tensor does (the frozen W never does)."""
    return {name: None if t is None else t.detach().clone().requires_grad_(t.requires_grad)
            for name, t in tensors.items()}


def run_with_upstream_gradient(module, *inputs, seed=None, **kwargs):
    """`module(*inputs, **kwargs)` after `torch.manual_seed(seed)` when a seed is given, backpropagated with a fixed
    upstream gradient: `(output, module.last_stats, upstream gradient)`, the gradient for the oracle's output."""
    if seed is not None:
        torch.manual_seed(seed)
    output = module(*inputs, **kwargs)
    stats = module.last_stats
    grad_output = torch.randn(output.shape, dtype=output.dtype, generator=torch.Generator().manual_seed(7))
    (output * grad_output).sum().backward()
    return output, stats, grad_output


def compare_stats(actual, expected, training, atol=1e-10):
    if expected is None:
        assert actual is None
        return
    assert actual is not None, "compat='original' with track_aux must record statistics"
    names = ("importance", "kl_uniform", "load", "usage") if training else ("usage",)
    for name in names:
        tolerance_check(f"stats.{name}", getattr(actual, name).detach(), expected[name].detach(), atol=atol)
    if not training:
        assert actual.importance is None and actual.load is None


def check_against_oracle(layer, variant, x, mask, training, n_gram, selection, atol=1e-10, rtol=1e-9, seed=None,
                         dropout=0.0, jitter_noise=0.0):
    layer.train(training)
    tensors = oracle_inputs(layer, variant)
    trainable = {id(p) for p in layer.parameters() if p.requires_grad}
    named = {name for name, t in tensors.items() if t is not None and id(t) in trainable}
    assert trainable == {id(tensors[name]) for name in named}, "trainable parameters other than the original's"

    x_layer = x.clone().requires_grad_(True)
    out, stats, grad_out = run_with_upstream_gradient(layer, x_layer, seed=seed, attention_mask=mask)

    copies = detached_copies(tensors)
    x_oracle = x.clone().requires_grad_(True)
    if seed is not None:
        torch.manual_seed(seed)
    expected, expected_stats = run_oracle(variant, copies, x_oracle, mask,
                                          oracle_options(n_gram, jitter_noise, **selection), training,
                                          1.0 if variant == "slicefine" else layer.adapter.scaling, dropout)
    (expected * grad_out).sum().backward()

    tolerance_check("out", out.detach(), expected.detach(), rtol=rtol, atol=atol)
    tolerance_check("x.grad", x_layer.grad, x_oracle.grad, rtol=rtol, atol=atol)
    for name in sorted(named):
        tolerance_check(f"{name}.grad", tensors[name].grad, copies[name].grad, rtol=rtol, atol=atol)
    compare_stats(stats, expected_stats, training, atol=atol)


# --- float64 against the oracle, every variant and option -------------------------------------------------


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("mask_kind", ["none", "right", "left"])
@pytest.mark.parametrize("n_gram", [1, 3])
@pytest.mark.parametrize("selection", list(SELECTIONS))
@pytest.mark.parametrize("variant", list(CLASSES))
def test_layer_equals_the_original_in_float64(variant, selection, n_gram, mask_kind, training):
    layer = make_compat_layer(variant, n_gram=n_gram, **SELECTIONS[selection])
    assert layer.compat == "original"
    torch.manual_seed(1)
    x = torch.randn(4, 7, D_IN, dtype=torch.float64)  # 7 tokens: a shorter last n-gram group
    check_against_oracle(layer, variant, x, padding_mask(mask_kind, 4, 7), training, n_gram, SELECTIONS[selection])


@pytest.mark.parametrize("variant", list(CLASSES))
def test_without_the_shared_vector(variant):
    layer = make_compat_layer(variant, use_shared_LiME=False, **SELECTIONS["dense-auto"])
    x = torch.randn(3, 5, D_IN, dtype=torch.float64)
    check_against_oracle(layer, variant, x, padding_mask("right", 3, 5), True, 1, SELECTIONS["dense-auto"])


@pytest.mark.parametrize("variant", list(CLASSES))
def test_two_dimensional_input_is_sequences_of_one_token(variant):
    layer = make_compat_layer(variant, **SELECTIONS["dense-soft"])
    x = torch.randn(6, D_IN, dtype=torch.float64)
    check_against_oracle(layer, variant, x, None, True, 1, SELECTIONS["dense-soft"])


@pytest.mark.parametrize("variant", ["dora", "slicefine"])
def test_more_experts_than_the_rank(variant):
    # SliceFine then routes from frozen rows too; DoRA is unaffected but checked alike.
    layer = make_compat_layer(variant, rank=2, **SELECTIONS["dense-soft"])
    x = torch.randn(3, 6, D_IN, dtype=torch.float64)
    check_against_oracle(layer, variant, x, padding_mask("left", 3, 6), True, 1, SELECTIONS["dense-soft"])


# --- seeded draws: the dropout mask, then the jitter -----------------------------------------------------


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.float64, 1e-10)], ids=["float32", "float64"])
@pytest.mark.parametrize("n_gram", [1, 3])
@pytest.mark.parametrize("variant", list(CLASSES))
def test_seeded_dropout_then_jitter(variant, n_gram, dtype, tolerance):
    # The jitter is drawn in the activation dtype, so float64 draws are the original's too.
    selection = SELECTIONS["dense-auto"]
    layer = make_compat_layer(variant, dtype=dtype, n_gram=n_gram, jitter_noise=0.2, dropout=0.3, **selection)
    torch.manual_seed(2)
    x = torch.randn(3, 7, D_IN, dtype=dtype)
    check_against_oracle(layer, variant, x, padding_mask("right", 3, 7), True, n_gram, selection, atol=tolerance,
                         rtol=tolerance, seed=1234, dropout=0.3, jitter_noise=0.2)


def test_the_draws_are_fresh_each_call():
    layer = make_compat_layer("lora", dtype=torch.float32, jitter_noise=0.2, dropout=0.3)
    layer.train()
    x = torch.randn(2, 5, D_IN)
    torch.manual_seed(5)
    first = layer(x)
    second = layer(x)
    assert not torch.allclose(first, second)


# --- initialization in the original's order ----------------------------------------------------------------


@pytest.mark.parametrize("variant", list(CLASSES))
def test_a_seed_gives_the_original_initialization(variant):
    linear = torch.nn.Linear(D_IN, D_OUT)
    torch.manual_seed(9)
    layer = CLASSES[variant](linear, num_experts=4, rank=RANK, backend="reference", compat="original")
    torch.manual_seed(9)
    expected = O.initial_parameters(variant, linear.weight, linear.bias, 4, RANK)
    for name, tensor in expected.items():
        actual = layer.bias if name == "bias" else getattr(layer, name)
        assert torch.equal(actual.detach(), tensor), name
    if variant == "slicefine":
        assert layer.bias.requires_grad


# --- embeddings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("n_gram", [1, 3])
@pytest.mark.parametrize("peft", ["lora", "lora_fa"])
def test_embedding_equals_the_original_in_float64(peft, n_gram, training):
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(20, D_OUT, dtype=torch.float64)
    layer = LiMEEmbedding(embedding, rank=RANK, alpha=6.0, n_gram=n_gram, jitter_noise=0.0, pad_token_id=0, peft=peft,
                          peft_dtype=torch.float64, moe_dtype=torch.float64, backend="reference", compat="original",
                          **ROUTING, **SELECTIONS["dense-soft"])
    assert layer.compat == "original"
    if peft == "lora_fa":
        assert layer.B.shape == (20, RANK) and layer.A.shape == (RANK, D_OUT) and not layer.A.requires_grad
    with torch.no_grad():
        for _, parameter in layer.named_parameters(recurse=False):
            parameter.add_(torch.randn_like(parameter) * 0.3)
        layer.gamma.fill_(0.4)
    layer.train(training)
    ids = torch.randint(1, 20, (3, 7))
    ids[0, :2] = 0
    ids[1, 4:] = 0
    out, stats, grad_out = run_with_upstream_gradient(layer, ids)
    names = ("A", "B", "LiMEs", "LiME_shared", "gamma")
    copies = detached_copies({n: getattr(layer, n) for n in names})
    expected, expected_stats = O.embedding_forward(
        ids, embedding.weight, copies["A"], copies["B"], copies["LiMEs"], copies["LiME_shared"], copies["gamma"],
        oracle_options(n_gram, **SELECTIONS["dense-soft"]), layer.adapter.scaling, pad_token_id=0,
        training=training, variant=peft)
    (expected * grad_out).sum().backward()
    tolerance_check("out", out.detach(), expected.detach())
    for name in names:
        if getattr(layer, name).requires_grad:
            tolerance_check(f"{name}.grad", getattr(layer, name).grad, copies[name].grad)
    compare_stats(stats, expected_stats, training)


# --- prompt tuning ------------------------------------------------------------------------------------------


def make_compat_prompts(n_gram=1, jitter_noise=0.0, input_conditioned=True, dtype=torch.float64, prompt_dropout=0.0,
                        **selection):
    torch.manual_seed(0)
    extra = {"prompt_dropout": prompt_dropout} if prompt_dropout else {}
    encoder = LiMEPromptEncoder(7, D_OUT, n_gram=n_gram, jitter_noise=jitter_noise, input_conditioned=input_conditioned,
                                peft_dtype=dtype, moe_dtype=dtype, backend="reference", compat="original",
                                **ROUTING, **selection, **extra)
    encoder.prompt_base = encoder.prompt_base.to(dtype)
    with torch.no_grad():
        encoder.prompt_delta.normal_(0.0, 0.5)
        encoder.LiMEs.add_(torch.randn_like(encoder.LiMEs) * 0.3)
        encoder.gamma.fill_(0.4)
        projection = getattr(encoder, "input_proj", None)
        if projection is not None:  # the original class's conditioning projection (identity at init)
            projection.to(dtype)
            projection.weight.add_(torch.randn_like(projection.weight) * 0.1)
    return encoder


def check_prompts(encoder, embeds, mask, training, n_gram, selection, input_conditioned=True, atol=1e-10, seed=None,
                  jitter_noise=0.0, prompt_dropout=0.0):
    encoder.train(training)
    prompts, stats, grad_out = run_with_upstream_gradient(encoder, embeds, seed=seed, attention_mask=mask)
    tensors = {n: getattr(encoder, n) for n in ("prompt_delta", "LiMEs", "LiME_shared", "gamma")}
    projection = getattr(encoder, "input_proj", None)
    if projection is not None:
        tensors["input_proj"] = projection.weight
    trainable = {id(p) for p in encoder.parameters() if p.requires_grad}
    assert trainable == {id(t) for t in tensors.values()}, "trainable parameters other than the original's"
    copies = detached_copies(tensors)  # every one of them trains (asserted above)
    if seed is not None:
        torch.manual_seed(seed)
    # The original's model wrapper gives the conditioning no mask: padding is averaged in.
    expected, expected_stats = O.prompt_forward(
        embeds, encoder.prompt_base, copies["prompt_delta"], copies["LiMEs"], copies["LiME_shared"], copies["gamma"],
        oracle_options(n_gram, jitter_noise, **selection), attention_mask=None, input_proj=copies.get("input_proj"),
        input_conditioned=input_conditioned, training=training, prompt_dropout=prompt_dropout)
    (expected * grad_out).sum().backward()
    tolerance_check("prompts", prompts.detach(), expected.detach(), rtol=atol, atol=atol)
    for name in tensors:
        tolerance_check(f"{name}.grad", tensors[name].grad, copies[name].grad, rtol=atol, atol=atol)
    compare_stats(stats, expected_stats, training, atol=atol)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("n_gram", [1, 3])
@pytest.mark.parametrize("selection", ["dense-soft", "dense-auto", "sparse-top2", "sparse-auto-k2"])
@pytest.mark.parametrize("input_conditioned", [True, False], ids=["conditioned", "static"])
def test_prompts_equal_the_original_in_float64(input_conditioned, selection, n_gram, training):
    encoder = make_compat_prompts(n_gram=n_gram, input_conditioned=input_conditioned, **SELECTIONS[selection])
    assert encoder.compat == "original"
    torch.manual_seed(1)
    embeds = torch.randn(3, 5, D_OUT, dtype=torch.float64)
    check_prompts(encoder, embeds, padding_mask("left", 3, 5), training, n_gram, SELECTIONS[selection],
                  input_conditioned=input_conditioned)


@pytest.mark.parametrize("prompt_dropout", [0.0, 0.3])
@pytest.mark.parametrize("n_gram", [1, 3])
@pytest.mark.parametrize("input_conditioned", [True, False], ids=["conditioned", "static"])
def test_prompt_jitter_then_dropout_in_float32(input_conditioned, n_gram, prompt_dropout):
    selection = SELECTIONS["dense-auto"]
    encoder = make_compat_prompts(n_gram=n_gram, jitter_noise=0.2, input_conditioned=input_conditioned,
                                  dtype=torch.float32, prompt_dropout=prompt_dropout, **selection)
    torch.manual_seed(1)
    embeds = torch.randn(3, 5, D_OUT)
    check_prompts(encoder, embeds, padding_mask("right", 3, 5), True, n_gram, selection,
                  input_conditioned=input_conditioned, atol=1e-4, seed=99, jitter_noise=0.2,
                  prompt_dropout=prompt_dropout)


# --- through lime.apply_peft, saved and loaded ----------------------------------------------------------------


class Tiny(torch.nn.Module):
    """Two projections that take a padding mask, as Hugging Face models do."""

    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(D_IN, D_OUT, dtype=torch.float64)
        self.o_proj = torch.nn.Linear(D_OUT, D_IN, dtype=torch.float64)

    def forward(self, x, attention_mask=None):
        return self.o_proj(self.q_proj(x))


def _randomize(model):
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.3)


def _compat_model(peft, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = Tiny()
    lime.apply_peft(model, peft=peft, compat="original", backend="reference", peft_dtype=torch.float64,
                    moe_dtype=torch.float64, jitter_noise=0.0, n_gram=3, **ROUTING, **kwargs)
    _randomize(model)
    return model


@pytest.mark.parametrize("peft", list(CLASSES))
def test_apply_peft_builds_original_layers(peft):
    model = _compat_model(peft, **SELECTIONS["dense-auto"]).eval()
    assert model.lime_config.compat == "original"
    for _, layer in lime.lime_layers(model):
        assert layer.compat == "original"
    layer = model.q_proj
    if peft == "slicefine":
        assert layer.bias.requires_grad, "the original trains SliceFine's bias"
    x = torch.randn(3, 7, D_IN, dtype=torch.float64)
    mask = padding_mask("right", 3, 7)
    expected, _ = run_oracle(peft, oracle_inputs(layer, peft), x, mask, oracle_options(3, **SELECTIONS["dense-auto"]),
                             False, 1.0 if peft == "slicefine" else layer.adapter.scaling)
    tolerance_check("q_proj", layer(x, attention_mask=mask).detach(), expected.detach())
    # The model's mask reaches the layers: the same output as the explicit mask.
    seen = {}
    handle = layer.register_forward_hook(lambda module, args, output: seen.setdefault("out", output))
    model(x, attention_mask=mask)
    handle.remove()
    tolerance_check("q_proj in the model", seen["out"].detach(), expected.detach())


@pytest.mark.parametrize("peft", list(CLASSES))
def test_save_and_load_keep_compat(peft, tmp_path):
    model = _compat_model(peft, **SELECTIONS["sparse-auto-k2"]).eval()
    directory = lime.save_adapter(model, str(tmp_path / "adapter"))
    saved = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert saved["lime_config"]["compat"] == "original"
    torch.manual_seed(0)
    fresh = lime.load_adapter(Tiny(), directory).eval()
    assert fresh.lime_config.compat == "original"
    for _, layer in lime.lime_layers(fresh):
        assert layer.compat == "original"
    x = torch.randn(3, 7, D_IN, dtype=torch.float64)
    mask = padding_mask("left", 3, 7)
    tolerance_check("loaded", fresh(x, attention_mask=mask).detach(), model(x, attention_mask=mask).detach())
    layer = fresh.q_proj
    expected, _ = run_oracle(peft, oracle_inputs(layer, peft), x, mask,
                             oracle_options(3, **SELECTIONS["sparse-auto-k2"]), False,
                             1.0 if peft == "slicefine" else layer.adapter.scaling)
    tolerance_check("loaded q_proj", layer(x, attention_mask=mask).detach(), expected.detach())


def test_the_default_is_lime():
    model = lime.apply_peft(Tiny())
    assert model.lime_config.compat == "lime"
    assert model.q_proj.compat == "lime"
    assert lime.LiMEConfig().compat == "lime"


def test_config_round_trips_compat():
    config = lime.LiMEConfig(compat="original")
    assert lime.LiMEConfig.from_json_string(config.to_json_string()).compat == "original"


# --- refusals ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option,value", [("router", "cosine"), ("ngram_mode", "window"), ("rep_mode", "mean"),
                                          ("rep_mode", "last")])
def test_options_it_overrides_are_refused(option, value):
    with pytest.raises(ValueError, match=option):
        lime.apply_peft(Tiny(), compat="original", **{option: value})
    with pytest.raises(ValueError, match=option):
        lime.LiMEConfig(compat="original", **{option: value})
    with pytest.raises(ValueError, match=option):
        LiMELinear(torch.nn.Linear(D_IN, D_OUT), compat="original", **{option: value})
    with pytest.raises(ValueError, match=option):
        LiMEPromptEncoder(4, D_OUT, compat="original", **{option: value})


def test_the_options_it_takes_are_accepted():
    layer = LiMELinear(torch.nn.Linear(D_IN, D_OUT), compat="original", router="maxabs", ngram_mode="anchor",
                       rep_mode="token")
    assert layer.routing.router == "maxabs" and layer.routing.ngram_mode == "anchor"
    layer = LiMELinear(torch.nn.Linear(D_IN, D_OUT), compat="original")
    assert layer.routing.router == "maxabs" and layer.routing.ngram_mode == "anchor"


def test_dora_detach_norm_is_refused():
    with pytest.raises(ValueError, match="dora_detach_norm"):
        lime.apply_peft(Tiny(), peft="dora", compat="original", dora_detach_norm=True)
    with pytest.raises(ValueError, match="dora_detach_norm"):
        LiMEDoRALinear(torch.nn.Linear(D_IN, D_OUT), compat="original", dora_detach_norm=True)


@pytest.mark.parametrize("value", ["paper", "Original", None, True])
def test_an_unknown_compat_is_refused(value):
    with pytest.raises(ValueError, match="compat"):
        lime.apply_peft(Tiny(), compat=value)
    with pytest.raises(ValueError, match="compat"):
        LiMELinear(torch.nn.Linear(D_IN, D_OUT), compat=value)


def test_prompt_tuning_entry_point_takes_compat():
    from lime.tiny import build_tiny_llava_onevision

    model, _ = build_tiny_llava_onevision()
    lime.prompt_tuning.apply_peft(model, num_virtual_tokens=4, compat="original", backend="reference")
    assert model.lime_prompt_encoder.compat == "original"
    assert model.lime_prompt_encoder.routing.router == "maxabs"
