"""fastseq.patch on real transformers models: same numbers, kernels really called, undoable."""

from __future__ import annotations

import copy
import importlib
import re
import warnings
from pathlib import Path

import pytest
import torch

import fastseq
from tests.conftest import KINDS, T5_BASE, assert_close, batch, hf_model

fpatch = importlib.import_module("fastseq.patch")  # the module (`fastseq.patch` is the function)
fattn = importlib.import_module("fastseq.patch_attention")
ROOT = Path(__file__).resolve().parents[1]

# UMT5 is not a native family, so it is not in KINDS: built here, fed T5 batches.
UMT5_FIELDS = dict(T5_BASE, feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_layers=3)
FAMILIES = [*KINDS, "umt5"]
BACKENDS = ["reference", "triton"]
ENCODER_ONLY = [k for k in FAMILIES if k != "blenderbot_small"]  # transformers has no BlenderbotSmall encoder model


def build(kind: str, *, encoder_only: bool = False):
    if kind != "umt5":
        return hf_model(kind, encoder_only=encoder_only)
    import transformers as tf

    torch.manual_seed(0)
    config = tf.UMT5Config(**UMT5_FIELDS)
    config._attn_implementation = "eager"
    model = (tf.UMT5EncoderModel if encoder_only else tf.UMT5ForConditionalGeneration)(config)
    if not encoder_only:
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.uniform_(0.5, 1.5)
    return model.eval()


def inputs(kind: str, **kw) -> dict[str, torch.Tensor]:
    return batch("t5_v11_untied" if kind == "umt5" else kind, **kw)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(ours, ref) -> None:
    a, b = _grads(ours), _grads(ref)
    assert a.keys() == b.keys()
    # Key-projection biases have an exact gradient of zero (softmax ignores a per-row constant): only
    # rounding is left there, compared on the scale of the other gradients.
    floor = 1e-3 * max(g.abs().max().item() for g in b.values())
    for name in b:
        assert_close(a[name], b[name], floor=floor, what=name)


# Under the interpreter, one configuration per model_type and attention variant (ByT5 is a t5; the
# Triton kernels see nothing the other t5 configurations do not show them).
TRITON_PARITY = [k for k in FAMILIES if k != "byt5_like"]
TRITON_GENERATE = ["t5_v11_untied", "mt5_like", "umt5", "longt5_tglobal", "blenderbot_small"]
# Encoder-only models run the seq2seq encoder's kernels; every encoder class is patched on the reference
# backend, and the interpreter runs the attention variants.
TRITON_ENCODER = ["t5_v11_untied", "longt5_local", "longt5_tglobal"]
QUICK_TRITON = "t5_v11_untied"  # the one interpreter case of the quick run; the others are in the full matrix


def triton_cases(kinds, quick: bool = True) -> list:
    return [pytest.param(k, "triton", marks=() if quick and k == QUICK_TRITON else pytest.mark.slow) for k in kinds]


CASES = [(k, "reference") for k in FAMILIES] + triton_cases(TRITON_PARITY)


@pytest.mark.parametrize(("kind", "backend"), CASES)
def test_patched_equals_unpatched(kind, backend, monkeypatch):
    monkeypatch.setenv("FASTSEQ_BACKEND", backend)
    ref = build(kind).train()
    ours = fastseq.patch(copy.deepcopy(ref))
    assert {"attention", "loss"} <= {p for p in fpatch.REGISTRY[ours.config.model_type]}
    data = inputs(kind)
    expected, got = ref(**data), ours(**data)
    assert got.logits is None  # training with labels: the fused loss never builds the logits
    assert_close(got.loss, expected.loss, what="loss")
    expected.loss.backward()
    got.loss.backward()
    assert_same_grads(ours, ref)
    ref.eval()
    ours.eval()
    with torch.no_grad():
        expected, got = ref(**data), ours(**data)
    assert_close(got.logits, expected.logits, what="logits")
    assert_close(got.loss, expected.loss, what="eval loss")
    assert ours.state_dict().keys() == ref.state_dict().keys()


@pytest.mark.parametrize(("kind", "backend"), [(k, "reference") for k in ENCODER_ONLY] + triton_cases(TRITON_ENCODER))
def test_encoder_only(kind, backend, monkeypatch):
    monkeypatch.setenv("FASTSEQ_BACKEND", backend)
    ref = build(kind, encoder_only=True).train()
    ours = fastseq.patch(copy.deepcopy(ref))
    data = inputs(kind)
    real = data["attention_mask"].bool()
    outs = []
    for model in (ref, ours):
        hidden = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).last_hidden_state
        # Real positions only: LongT5's local attention lets a padded query attend to nothing but
        # padding-masked keys, which transformers resolves as a uniform average; no real output sees it.
        (hidden[real] * torch.linspace(-1, 1, hidden.shape[-1])).sum().backward()
        outs.append(hidden[real].detach())
    assert_close(outs[1], outs[0], what="last_hidden_state")
    assert_same_grads(ours, ref)


@pytest.mark.parametrize(
    ("kind", "backend"), [(k, "reference") for k in FAMILIES] + triton_cases(TRITON_GENERATE, quick=False)
)
def test_generate_identical(kind, backend, monkeypatch):
    """Every family generates the unpatched model's tokens, greedy and beam, under the transformers
    that is installed: CI installs the newest release pip resolves and the oldest of the tested range,
    so a release that changes what the patch replaces fails here, not for users."""
    monkeypatch.setenv("FASTSEQ_BACKEND", backend)
    ref = build(kind)
    ours = fastseq.patch(copy.deepcopy(ref))
    # The interpreter runs each decoding step's kernels one by one: two rows (right and left padding), few steps.
    data = inputs(kind, B=2) if backend == "triton" else inputs(kind)
    for num_beams in (1, 2):
        steps = 3 if backend == "triton" else 5
        args = dict(attention_mask=data["attention_mask"], max_new_tokens=steps, do_sample=False, num_beams=num_beams)
        expected = ref.generate(data["input_ids"], **args)
        assert torch.equal(ours.generate(data["input_ids"], **args), expected), f"num_beams={num_beams}"


OPS = ("bucketed_attention", "local_attention", "global_aggregate", "rms_norm", "gated_ffn", "relu_ffn")


def _count_kernel_calls(monkeypatch) -> dict[str, int]:
    calls = dict.fromkeys((*OPS, "linear_cross_entropy"), 0)
    for name in calls:
        real = getattr(fpatch.kernels, name)

        def counting(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(fpatch.kernels, name, counting)
    return calls


def _expected_calls(model) -> dict[str, int]:
    """Kernel calls one training forward of `model` makes, counted from its config."""
    c = model.config
    if c.model_type == "blenderbot-small":
        enc, dec = c.encoder_layers, c.decoder_layers
        return dict(bucketed_attention=enc + 2 * dec, linear_cross_entropy=1)
    enc, dec = c.num_layers, c.num_decoder_layers
    ffn = "gated_ffn" if c.is_gated_act else "relu_ffn"
    local = getattr(c, "encoder_attention_type", None) in ("local", "transient-global")
    counts = {
        "bucketed_attention": 2 * dec + (0 if local else enc),
        "local_attention": enc if local else 0,
        "global_aggregate": enc if getattr(c, "encoder_attention_type", None) == "transient-global" else 0,
        # a norm before every attention and FFN, the final norms, and the global tokens' norm
        "rms_norm": 2 * enc + 3 * dec + 2,
        ffn: enc + dec,
        "linear_cross_entropy": 1,
    }
    counts["rms_norm"] += counts["global_aggregate"]
    return counts


@pytest.mark.parametrize("kind", ["t5_v10_tied", "t5_v11_untied", "longt5_local", "longt5_tglobal", "blenderbot_small"])
def test_the_patch_really_calls_the_kernels_and_unpatch_restores(kind, monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    model = fastseq.patch(build(kind)).train()
    assert fpatch.patched_modules(model)
    model(**inputs(kind)).loss.backward()
    expected = dict.fromkeys(calls, 0) | _expected_calls(model)
    assert calls == expected
    fastseq.unpatch(model)
    assert fpatch.patched_modules(model) == []
    before = dict(calls)
    model(**inputs(kind)).loss.backward()
    assert calls == before  # the originals run again


def _record_tables(monkeypatch) -> list:
    """The bias table of every attention call the patched models make from now on."""
    seen = []
    real = fpatch.kernels.bucketed_attention

    def recording(q, k, v, table, **kw):
        seen.append(table)
        return real(q, k, v, table, **kw)

    monkeypatch.setattr(fpatch.kernels, "bucketed_attention", recording)
    return seen


def test_umt5_uses_each_layers_own_table(monkeypatch):
    seen = _record_tables(monkeypatch)
    model = fastseq.patch(build("umt5"))
    with torch.no_grad():
        model(**inputs("umt5"))
    encoder_tables = [blk.layer[0].SelfAttention.relative_attention_bias.weight for blk in model.encoder.block]
    assert len(seen) == 3 * len(encoder_tables)  # encoder, decoder self- and cross-attention
    for layer, (used, own) in enumerate(zip(seen, encoder_tables, strict=False)):
        assert torch.equal(used.table, own), f"encoder layer {layer} did not use its own table"
    assert not torch.equal(encoder_tables[0], encoder_tables[1])


def test_t5_layers_share_one_prepared_table(monkeypatch):
    """The first layer's table, handed on to the others, is made ready for the kernels once per forward:
    every self-attention layer of a stack reads the same `PositionBias`, and the next forward makes a new one."""
    seen = _record_tables(monkeypatch)
    model = fastseq.patch(build("t5_v11_untied"))
    layers = len(model.encoder.block)
    firsts = []
    for _ in range(2):
        seen.clear()
        with torch.no_grad():
            model(**inputs("t5_v11_untied"))
        encoder, decoder = seen[:layers], seen[layers::2]  # the decoder's cross-attention takes no table
        assert all(isinstance(t, fastseq.kernels.PositionBias) for t in encoder + decoder)
        assert all(t is encoder[0] for t in encoder) and all(t is decoder[0] for t in decoder)
        assert encoder[0].bidirectional and not decoder[0].bidirectional
        assert seen[layers + 1 :: 2] == [None] * layers
        firsts.append(encoder[0])
    assert firsts[0] is not firsts[1]


@pytest.mark.parametrize("kind", ["longt5_local", "longt5_tglobal"])
def test_longt5_encoder_layers_share_prepared_tables(kind, monkeypatch):
    """LongT5's encoder layers read the first layer's tables, handed on to them, as the same `PositionBias`es."""
    seen = []
    real = fpatch.kernels.local_attention

    def recording(q, k, v, table, **kw):
        seen.append((table, kw.get("global_bias_table")))
        return real(q, k, v, table, **kw)

    monkeypatch.setattr(fpatch.kernels, "local_attention", recording)
    model = fastseq.patch(build(kind))
    with torch.no_grad():
        model(**inputs(kind))
    assert len(seen) == len(model.encoder.block) > 1
    for table, global_table in seen:
        assert isinstance(table, fastseq.kernels.PositionBias) and table is seen[0][0]
        assert global_table is seen[0][1]
    assert (seen[0][1] is None) == (kind == "longt5_local")


@pytest.mark.parametrize("kind", ["t5_v11_untied", "longt5_local", "longt5_tglobal", "blenderbot_small"])
def test_output_attentions_runs_the_modules_own_forward(kind, monkeypatch):
    ref = build(kind)
    ours = fastseq.patch(copy.deepcopy(ref))
    calls = _count_kernel_calls(monkeypatch)
    data = inputs(kind)
    with torch.no_grad():
        expected = ref(**data, output_attentions=True)
        got = ours(**data, output_attentions=True)
    assert calls["bucketed_attention"] == calls["local_attention"] == 0
    for name in ("encoder_attentions", "decoder_attentions", "cross_attentions"):
        assert len(getattr(got, name)) == len(getattr(expected, name)) > 0
        for a, b in zip(getattr(got, name), getattr(expected, name), strict=True):
            assert_close(a, b, what=name)
    assert_close(got.logits, expected.logits, what="logits")


def test_a_mask_that_is_not_padding_runs_the_modules_own_forward(monkeypatch):
    ref = build("t5_v11_untied", encoder_only=True)
    ours = fastseq.patch(copy.deepcopy(ref))
    calls = _count_kernel_calls(monkeypatch)
    ids = inputs("t5_v11_untied")["input_ids"]
    B, L = ids.shape
    blocks = torch.zeros(B, 1, L, L, dtype=torch.bool)  # two blocks that do not see each other
    blocks[:, :, :12, :12] = True
    blocks[:, :, 12:, 12:] = True
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=blocks).last_hidden_state
        got = ours(input_ids=ids, attention_mask=blocks).last_hidden_state
    assert calls["bucketed_attention"] == 0
    assert_close(got, expected, what="block-diagonal mask")
    with torch.no_grad():
        ours(input_ids=ids, attention_mask=(ids != 0).long())
    assert calls["bucketed_attention"] == ref.config.num_layers  # a padding mask goes to the kernel


def test_a_layer_that_cannot_follow_the_first_one_raises(monkeypatch):
    model = fastseq.patch(build("t5_v11_untied"))
    state = {"calls": 0}

    def flips():
        state["calls"] += 1
        return state["calls"] > 1  # the first layer runs the kernel, the second must not

    monkeypatch.setattr(fattn, "capturing_attentions", flips)
    with pytest.raises(RuntimeError, match="an earlier layer ran the kernel"):
        model(**inputs("t5_v11_untied"))


@pytest.mark.parametrize("kind", ["t5_v10_tied", "longt5_tglobal", "blenderbot_small"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing(kind, reentrant):
    ref = build(kind).train()
    ours = fastseq.patch(copy.deepcopy(ref))
    # Re-entrant checkpointing passes gradients only through tensors a layer returns: the bias
    # table the first layer hands on must be one for the other layers' bias gradients to reach it.
    ours.activation_checkpointing_enable({"use_reentrant": reentrant})
    data = inputs(kind)
    expected, got = ref(**data).loss, ours(**data).loss
    assert_close(got, expected, what="loss")
    expected.backward()
    got.backward()
    assert_same_grads(ours, ref)


@pytest.mark.slow
def test_torch_compile(reference_backend):
    ref = build("t5_v11_untied").train()
    ours = fastseq.patch(copy.deepcopy(ref))
    data = inputs("t5_v11_untied")
    expected, got = ref(**data).loss, torch.compile(ours)(**data).loss
    assert_close(got, expected, what="loss")
    expected.backward()
    got.backward()
    assert_same_grads(ours, ref)


def _train(model, steps: int, kind: str) -> list[float]:
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(steps):
        loss = model(**inputs(kind, seed=100 + step % 2)).loss  # two batches, learnt by heart
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("kind", ["t5_v11_untied", "longt5_tglobal", "blenderbot_small"])
def test_30_steps_patched_and_unpatched_give_the_same_losses(kind, reference_backend):
    """Thirty AdamW steps: the patched model's losses stay as close to the unpatched model's in float64
    as the unpatched model's own fp32 losses do (rounding grows over the steps, by an amount that
    depends on the CPU's summation order; the float64 run is the yardstick, not a fixed tolerance)."""
    ref = build(kind).train()
    ours = fastseq.patch(copy.deepcopy(ref))
    exact = _train(copy.deepcopy(ref).double(), 30, kind)
    expected, got = _train(ref, 30, kind), _train(ours, 30, kind)
    assert expected[-1] < 0.9 * expected[0]  # it learns
    drift = 0.0  # the unpatched fp32 run's largest distance from float64 so far
    for step, (a, b, e) in enumerate(zip(got, expected, exact, strict=True)):
        drift = max(drift, abs(b - e))
        assert abs(a - e) <= 2 * drift + 1e-5 * abs(e), f"step {step}: patched {a}, unpatched {b}, float64 {e}"


@pytest.mark.slow
def test_training_through_the_triton_kernels_follows_the_unpatched_model(triton_backend):
    ref = build("t5_v11_untied").train()
    ours = fastseq.patch(copy.deepcopy(ref))
    expected, got = _train(ref, 2, "t5_v11_untied"), _train(ours, 2, "t5_v11_untied")
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: patched {a} vs unpatched {b}"


def test_seq2seq_trainer(tmp_path, reference_backend):
    import transformers as tf

    data = [
        {k: v[i] for k, v in inputs("t5_v11_untied", seed=s).items() if k != "decoder_attention_mask"}
        for s in range(4)
        for i in range(3)
    ]

    def run(model, name):
        args = tf.Seq2SeqTrainingArguments(
            output_dir=str(tmp_path / name),
            max_steps=4,
            per_device_train_batch_size=3,
            learning_rate=3e-3,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            seed=0,
            dataloader_num_workers=0,
        )
        trainer = tf.Seq2SeqTrainer(model=model, args=args, train_dataset=data)
        trainer.train()
        return [e["loss"] for e in trainer.state.log_history if "loss" in e]

    ref = build("t5_v11_untied")
    ours = fastseq.patch(copy.deepcopy(ref))
    expected, got = run(ref, "ref"), run(ours, "patched")
    assert len(got) == 4
    for a, b in zip(got, expected, strict=True):
        assert abs(a - b) <= 1e-4 * abs(b)
    assert fpatch.patched_modules(ours)


def test_patch_transformers_patches_models_built_later_and_undoes():
    ref = build("t5_v11_untied")
    fastseq.patch_transformers("t5")
    try:
        later = build("t5_v11_untied")
        names = fpatch.patched_modules(later)
        assert "encoder.block.0.layer.0.SelfAttention" in names and "" in names
        data = inputs("t5_v11_untied")
        with torch.no_grad():
            assert_close(later(**data).logits, ref(**data).logits, what="logits")
        later.train()
        expected, got = ref.train()(**data), later(**data)
        assert got.logits is None
        assert_close(got.loss, expected.loss, what="loss")
    finally:
        fastseq.unpatch_transformers()
    assert fpatch.patched_modules(build("t5_v11_untied")) == []


def test_generate_and_ffn_fallback():
    model = build("t5_v11_untied")
    data = inputs("t5_v11_untied")
    args = dict(attention_mask=data["attention_mask"], max_new_tokens=6, do_sample=False)
    expected = model.generate(data["input_ids"], num_beams=2, **args)
    fpatch.patch(model)
    assert torch.equal(model.generate(data["input_ids"], num_beams=2, **args), expected)
    # An output projection kept in another dtype (FLAN-T5 keeps `wo` in fp32): the module's own forward.
    ffn = model.encoder.block[0].layer[-1].DenseReluDense
    ffn.wo.to(torch.float64)
    x = torch.randn(2, 3, model.config.d_model)
    assert ffn(x).dtype == torch.float64


def test_refusals(monkeypatch):
    import transformers as tf

    bart = tf.BartForConditionalGeneration(
        tf.BartConfig(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                      decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32)
    )  # fmt: skip
    with pytest.raises(ValueError, match="'bart' is not supported; supported: blenderbot-small, longt5"):
        fpatch.patch(bart)
    with pytest.raises(ValueError, match="unsupported model_type"):
        fastseq.patch_transformers("bart")
    (a, b), (c, d) = fpatch.TRANSFORMERS_TESTED
    monkeypatch.setattr(fpatch, "installed_transformers", lambda: "4.46.0")
    with pytest.raises(ValueError, match=rf"supports transformers {a}\.{b} to {c}\.{d} \(tested\); found 4\.46\.0"):
        fpatch.patch(build("t5_v10_tied"))
    monkeypatch.setattr(fpatch, "installed_transformers", lambda: "5.22.1")
    with pytest.raises(ValueError, match="found 5.22.1"):
        fastseq.patch_transformers()


def test_transformers_range_declared_once_and_checked(monkeypatch):
    """The tested range lives in fastseq.patch; pyproject's lower bound is its oldest release; a
    release newer than the range is patched with one warning that names the range."""
    (major, minor), (newest_major, newest_minor) = fpatch.TRANSFORMERS_TESTED
    declared = re.findall(r'"transformers>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert declared == [f"{major}.{minor}"]
    assert (newest_major, newest_minor) >= (5, 25)  # the release pip resolves today, with Hugging Face's `kernels`
    for version in ("5.23.0", "5.24.0", "5.25.0"):
        monkeypatch.setattr(fpatch, "installed_transformers", lambda v=version: v)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fpatch.patch(build("t5_v10_tied"))
    monkeypatch.setattr(fpatch, "installed_transformers", lambda: "5.99.0.dev0")
    monkeypatch.setattr(fpatch, "_WARNED", set())
    rng = rf"{major}\.{minor} to {newest_major}\.{newest_minor}"
    with pytest.warns(UserWarning, match=rf"tested with transformers {rng}; found 5\.99\.0\.dev0"):
        fpatch.patch(build("t5_v10_tied"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per version
        fpatch.patch(build("t5_v10_tied"))


@pytest.mark.parametrize("kind", ["t5_v11_untied", "longt5_tglobal", "blenderbot_small"])
def test_base_model_without_a_head(kind):
    import transformers as tf

    model_type, fields = KINDS[kind]
    prefix = {"t5": "T5", "longt5": "LongT5", "blenderbot-small": "BlenderbotSmall"}[model_type]
    config = getattr(tf, f"{prefix}Config")(**fields)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = getattr(tf, f"{prefix}Model")(config).train()
    ours = fastseq.patch(copy.deepcopy(ref))
    assert any(name.startswith("decoder.") for name in fpatch.patched_modules(ours))
    data = inputs(kind)
    decoder_ids = data["labels"].clamp(min=0)
    outs = []
    for model in (ref, ours):
        out = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"], decoder_input_ids=decoder_ids)
        (out.last_hidden_state * torch.linspace(-1, 1, out.last_hidden_state.shape[-1])).sum().backward()
        outs.append(out.last_hidden_state.detach())
    assert_close(outs[1], outs[0], what="decoder last_hidden_state")
    assert_same_grads(ours, ref)


# ---- issue 23: rows that are all padding, and patch_transformers with patch -----------------------------------


@pytest.mark.parametrize("kind", FAMILIES)
def test_a_row_of_padding_gives_the_unpatched_numbers(kind, reference_backend):
    """A row whose attention mask is all zeros: transformers averages over every key there (its mask's
    minimum swamps the scores) where the kernels give zeros; the patched model runs the modules' own
    forwards for such a batch, so its logits, loss and gradients are the unpatched model's."""
    ref = build(kind)
    ours = fastseq.patch(copy.deepcopy(ref))
    data = inputs(kind)
    data["attention_mask"][1] = 0
    data["input_ids"][1] = 0
    with torch.no_grad():
        expected, got = ref(**data).logits, ours(**data).logits
    assert expected.isfinite().all()
    assert_close(got, expected, what="logits")
    ref.train()
    ours.train()
    ref(**data).loss.backward()
    ours(**data).loss.backward()
    assert_same_grads(ours, ref)


def test_a_row_of_padding_leaves_other_batches_on_the_kernels(monkeypatch, reference_backend):
    """The fallback is decided per batch: the next batch without such a row runs the kernels again."""
    calls = _count_kernel_calls(monkeypatch)
    model = fastseq.patch(build("t5_v11_untied"))
    data = inputs("t5_v11_untied")
    padded = {k: v.clone() for k, v in data.items()}
    padded["attention_mask"][0] = 0
    with torch.no_grad():
        model(**padded)
        fallback_calls = calls["bucketed_attention"]
        model(**data)
    assert fallback_calls == model.config.num_decoder_layers  # only the decoder's self-attention (its mask is full)
    assert calls["bucketed_attention"] - fallback_calls == 2 * model.config.num_decoder_layers + model.config.num_layers


def test_patch_then_unpatch_transformers_leaves_the_model_fully_patched(reference_backend):
    """patch_transformers(), then patch(m), then unpatch_transformers(): m keeps every patched forward
    (patch gives each module its own, with the class's own forward as its original); unpatch(m) then
    gives transformers' model back. A model patched through its classes alone is fully unpatched."""
    ref = build("t5_v11_untied")
    explicit = fpatch.patched_modules(fastseq.patch(build("t5_v11_untied")))
    fastseq.patch_transformers()
    try:
        model = fastseq.patch(build("t5_v11_untied"))
        only_classes = build("t5_v11_untied").train()
        data = inputs("t5_v11_untied")
        only_classes(**data).loss.backward()  # the fused loss path, through the classes alone
    finally:
        fastseq.unpatch_transformers()
    assert fpatch.patched_modules(model) == explicit
    assert fpatch.patched_modules(only_classes) == []
    assert all(fattn.ORIGINAL not in m.__dict__ for m in only_classes.modules())
    model.train()
    got, expected = model(**data), ref.train()(**data)
    assert got.logits is None  # the fused loss: the model is still patched
    assert_close(got.loss, expected.loss, what="loss")
    fastseq.unpatch(model)
    assert fpatch.patched_modules(model) == [] and not fattn.CLASS_ORIGINALS
    assert_close(model(**data).logits, ref(**data).logits, what="unpatched logits")


def test_seq2seq_trainer_label_smoothing(tmp_path, reference_backend, monkeypatch):
    """Seq2SeqTrainer(label_smoothing_factor=0.1) takes the labels away from the model and smooths the loss
    from the full logits: a patched model gives the same losses and warns once that the fused loss is
    bypassed. fastseq.patch(model, label_smoothing=0.1) with label_smoothing_factor=0 gives the same
    training and evaluation losses through the fused kernel, without a warning."""
    import transformers as tf

    ref = build("t5_v11_untied")
    data = []
    for s in range(2):
        batch_ = inputs("t5_v11_untied", seed=s)
        batch_["decoder_input_ids"] = ref._shift_right(batch_["labels"])  # the LabelSmoother path needs them
        data += [{k: v[i] for k, v in batch_.items() if k != "decoder_attention_mask"} for i in range(3)]

    def run(model, name, factor):
        args = tf.Seq2SeqTrainingArguments(
            output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=3, learning_rate=3e-3,
            logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
            label_smoothing_factor=factor, per_device_eval_batch_size=3,
        )  # fmt: skip
        trainer = tf.Seq2SeqTrainer(model=model, args=args, train_dataset=data, eval_dataset=data)
        trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        return losses + [trainer.evaluate()["eval_loss"]]

    smoothings = []
    real = fpatch.kernels.linear_cross_entropy
    monkeypatch.setattr(fpatch.kernels, "linear_cross_entropy",
                        lambda *a, **k: smoothings.append(k.get("label_smoothing")) or real(*a, **k))  # fmt: skip
    expected = run(copy.deepcopy(ref), "ref", 0.1)
    plain = run(copy.deepcopy(ref), "plain", 0.0)
    with pytest.warns(UserWarning, match="label_smoothing_factor > 0; to keep the fused loss") as caught:
        unfused = run(fastseq.patch(copy.deepcopy(ref)), "unfused", 0.1)
    assert len([w for w in caught if "fused loss" in str(w.message)]) == 1 and smoothings == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fused = run(fastseq.patch(copy.deepcopy(ref), label_smoothing=0.1), "fused", 0.0)
    assert smoothings == [0.1] * 3  # one fused loss per training step
    assert len(fused) == 4
    for got in (unfused, fused):
        for a, b in zip(got, expected, strict=True):
            assert abs(a - b) <= 1e-4 * abs(b), (got, expected)
    assert all(abs(a - b) > 1e-3 for a, b in zip(plain, expected, strict=True))  # smoothing changed every loss
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\); got 1.0"):
        fastseq.patch(copy.deepcopy(ref), label_smoothing=1.0)
    with pytest.raises(ValueError, match="needs the loss patched"):
        fastseq.patch(copy.deepcopy(ref), loss=False, label_smoothing=0.1)
