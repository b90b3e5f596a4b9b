"""Generation with the KV cache against transformers' generate, and the cache against full decoding."""

from __future__ import annotations

import pytest
import torch

import fastseq
from tests.conftest import KINDS, assert_close, batch, hf_model

KIND_NAMES = list(KINDS)


def _pair(kind, tmp_path, sharpen: bool = False):
    """transformers' model and fastseq's loaded from its checkpoint. `sharpen` scales the weights
    (norms and biases aside) so that the tiny random model's next-token distributions depend on
    the input and are peaked: tokens then differ between rows and steps, and beams diverge."""
    ref = hf_model(kind)
    if sharpen:
        with torch.no_grad():
            if hasattr(ref, "final_logits_bias"):
                ref.final_logits_bias.zero_()
            factor = 10.0 if KINDS[kind][0] == "blenderbot-small" else 4.0
            for name, p in ref.named_parameters():
                if "norm" not in name and name.split(".")[-1] != "bias":
                    p.mul_(factor)
    ref.save_pretrained(tmp_path)
    return ref, fastseq.from_pretrained(tmp_path)


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_greedy_matches_transformers(kind, tmp_path, reference_backend):
    ref, ours = _pair(kind, tmp_path, sharpen=True)
    inputs = batch(kind)
    args = (inputs["input_ids"], inputs["attention_mask"])
    expected = ref.generate(args[0], attention_mask=args[1], max_new_tokens=12, do_sample=False, num_beams=1)
    got = ours.generate(*args, max_new_tokens=12)
    assert torch.equal(got, expected), (got, expected)
    # With an eos that row 0 produces early, that row finishes and is padded, the others go on.
    eos = int(expected[0, 4])
    expected = ref.generate(
        args[0], attention_mask=args[1], max_new_tokens=12, do_sample=False, num_beams=1, eos_token_id=eos
    )
    got = ours.generate(*args, max_new_tokens=12, eos_token_id=eos)
    assert torch.equal(got, expected), (got, expected)
    assert (got[0, 5:] == ref.config.pad_token_id).all() or got.shape[1] <= 5


@pytest.mark.parametrize("kind", ["t5_v11_untied", "longt5_tglobal", "blenderbot_small"])
def test_cached_steps_equal_full_decoding(kind, tmp_path, reference_backend):
    from fastseq.models.cache import KVCache

    _, ours = _pair(kind, tmp_path)
    inputs = batch(kind)
    decoder_ids = inputs["labels"].clamp(min=0)
    enc = ours.encode(inputs["input_ids"], inputs["attention_mask"])
    with torch.no_grad():
        full = ours.decode(decoder_ids, enc, inputs["attention_mask"])  # (B, Ld, d)
        cache = KVCache(ours.num_decoder_layers(), capacity=decoder_ids.shape[1])
        steps = [ours.decode(decoder_ids[:, i : i + 1], enc, inputs["attention_mask"], cache=cache)
                 for i in range(decoder_ids.shape[1])]  # fmt: skip
    assert_close(torch.cat(steps, 1), full, rel=1e-5, what="cached decoder states")
    with pytest.raises(ValueError, match="does not fit"):
        ours.decode(decoder_ids[:, :1], enc, inputs["attention_mask"], cache=cache)


def test_sampling_is_seeded_and_filters(tmp_path, reference_backend):
    _, ours = _pair("t5_v11_untied", tmp_path)
    inputs = batch("t5_v11_untied")
    args = (inputs["input_ids"], inputs["attention_mask"])

    def sample(seed, **kw):
        return ours.generate(*args, max_new_tokens=10, do_sample=True, generator=torch.Generator().manual_seed(seed),
                             **kw)  # fmt: skip

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0, temperature=5.0), sample(1, temperature=5.0))
    greedy = ours.generate(*args, max_new_tokens=10)
    assert torch.equal(sample(2, top_k=1), greedy)
    assert torch.equal(sample(3, top_p=1e-6), greedy)
    assert torch.equal(sample(4, temperature=1e-4), greedy)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        sample(0, temperature=0.0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        ours.generate(*args, max_new_tokens=0)


def test_sampling_follows_the_distribution(tmp_path, reference_backend):
    """First-step frequencies over many draws match the softmax of the model's logits."""
    _, ours = _pair("t5_v10_tied", tmp_path)
    inputs = batch("t5_v10_tied", B=1)
    ids = inputs["input_ids"].expand(4000, -1)
    mask = inputs["attention_mask"].expand(4000, -1)
    tokens = ours.generate(ids, mask, max_new_tokens=1, do_sample=True, top_k=5, eos_token_id=-1,
                           generator=torch.Generator().manual_seed(0))[:, 1]  # fmt: skip
    with torch.no_grad():
        start = torch.zeros(1, 1, dtype=torch.long)
        h = ours.decode(start, ours.encode(inputs["input_ids"], inputs["attention_mask"]), inputs["attention_mask"])
        logits = ours.lm_head(h[0, -1]).double()
    top = torch.topk(logits, 5)
    expected = torch.softmax(top.values, -1)
    counts = torch.stack([(tokens == t).sum() for t in top.indices])
    assert counts.sum() == len(tokens)  # nothing outside the top 5
    counts = counts.double() / len(tokens)
    assert (counts - expected).abs().max() < 0.03, (counts, expected)


def test_greedy_with_triton_kernels_equals_reference(tmp_path, monkeypatch):
    _, ours = _pair("t5_v11_untied", tmp_path)
    inputs = batch("t5_v11_untied")
    args = (inputs["input_ids"], inputs["attention_mask"])
    monkeypatch.setenv("FASTSEQ_BACKEND", "reference")
    expected = ours.generate(*args, max_new_tokens=6)
    monkeypatch.setenv("FASTSEQ_BACKEND", "triton")
    assert torch.equal(ours.generate(*args, max_new_tokens=6), expected)


@pytest.mark.parametrize("kind", KIND_NAMES)
@pytest.mark.parametrize("beams,length_penalty,early_stopping", [(3, 1.0, False), (4, 2.0, True), (2, 0.5, False)])
def test_beam_search_matches_transformers(kind, beams, length_penalty, early_stopping, tmp_path, reference_backend):
    ref, ours = _pair(kind, tmp_path, sharpen=True)
    inputs = batch(kind)
    args = (inputs["input_ids"], inputs["attention_mask"])
    greedy = ref.generate(args[0], attention_mask=args[1], max_new_tokens=10, do_sample=False, num_beams=1)
    # eos among the likely tokens, so that hypotheses finish at different lengths.
    for eos in (int(greedy[0, 3]), int(greedy[1, 6])):
        settings = dict(max_new_tokens=10, num_beams=beams, length_penalty=length_penalty,
                        early_stopping=early_stopping, eos_token_id=eos)  # fmt: skip
        expected = ref.generate(args[0], attention_mask=args[1], do_sample=False, **settings)
        got = ours.generate(*args, **settings)
        assert torch.equal(got, expected), (got, expected)
        BEAM_OUTCOMES.append((kind, got.shape[1], bool((got == eos).any(-1).all())))


BEAM_OUTCOMES: list = []


def test_beam_cases_were_not_trivial():
    """The beam cases above ran to several lengths, and in some every row ended on its eos."""
    if not BEAM_OUTCOMES:
        pytest.skip("the beam-search cases did not run in this session")
    assert len({length for _, length, _ in BEAM_OUTCOMES}) >= 3
    assert any(ended for *_, ended in BEAM_OUTCOMES) and not all(ended for *_, ended in BEAM_OUTCOMES)


@pytest.mark.parametrize("kind", ["t5_v11_untied", "blenderbot_small"])
def test_gradient_checkpointing_gives_the_same_gradients(kind, tmp_path, reference_backend, monkeypatch):
    import importlib

    family = "t5" if kind.startswith("t5") else "blenderbot_small"
    module = importlib.import_module(f"fastseq.models.{family}")
    calls = []
    real = module.checkpoint
    monkeypatch.setattr(module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, ours = _pair(kind, tmp_path)
    ours.train()
    inputs = batch(kind)
    grads = []
    for enabled in (False, True):
        ours.gradient_checkpointing_enable(enabled)
        ours.zero_grad()
        torch.manual_seed(0)
        ours(**inputs).loss.backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert len(calls) == ours.num_decoder_layers() + _encoder_layers(ours)  # every layer, once, when enabled
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], rtol=1e-5, atol=1e-7), name


def _encoder_layers(model) -> int:
    encoder = model.encoder if hasattr(model, "encoder") else model.model.encoder
    return len(encoder.block) if hasattr(encoder, "block") else len(encoder.layers)
