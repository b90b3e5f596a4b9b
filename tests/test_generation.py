"""Generation with the KV cache against transformers' generate, and the cache against full decoding."""

from __future__ import annotations

import re

import numpy as np
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
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        sample(0, temperature=0.0)
    assert torch.equal(ours.generate(*args, max_new_tokens=10, temperature=0.0), greedy)  # greedy reads none
    assert torch.equal(ours.generate(*args, max_new_tokens=np.int64(10)), greedy)  # numpy's integers are integers
    with pytest.raises(ValueError, match="max_new_tokens must be between 1 and"):
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


@pytest.mark.slow
def test_greedy_with_triton_kernels_equals_reference(tmp_path, monkeypatch):
    _, ours = _pair("t5_v11_untied", tmp_path)
    inputs = batch("t5_v11_untied")
    args = (inputs["input_ids"], inputs["attention_mask"])
    monkeypatch.setenv("FASTSEQ_BACKEND", "reference")
    expected = ours.generate(*args, max_new_tokens=6)
    monkeypatch.setenv("FASTSEQ_BACKEND", "triton")
    assert torch.equal(ours.generate(*args, max_new_tokens=6), expected)


@pytest.mark.parametrize("kind", KIND_NAMES)
@pytest.mark.parametrize("beams,length_penalty,early_stopping",
                         [(3, 1.0, False), (4, 2.0, True), (2, 0.5, False), (3, 1.5, "never")])  # fmt: skip
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


def test_generate_applies_generation_config_json_as_transformers_reads_it(tmp_path, capfd, reference_backend):
    """`fastseq generate` with no flags gives the tokens `transformers`' `generate` gives from the same
    generation_config.json (beams, length penalty, n-gram ban, early_stopping "never", and max_length
    and min_length, which count the decoder start token); a flag overrides the file."""
    import json

    from fastseq.cli import main
    from fastseq.tokenizers import ByT5Tokenizer

    ref, _ = _pair("byt5_like", tmp_path, sharpen=True)
    tokenizer = ByT5Tokenizer()
    tokenizer.save_pretrained(tmp_path)
    file = tmp_path / "generation_config.json"
    settings = dict(num_beams=3, length_penalty=1.5, no_repeat_ngram_size=2, early_stopping="never", max_length=9,
                    min_length=5)  # fmt: skip
    file.write_text(json.dumps({**json.loads(file.read_text()), **settings}))
    texts = ["the cat sat on the mat", "a dog", "zebras and giraffes at noon"]
    enc = tokenizer(texts, padding=True)

    def cli(*flags: str) -> list[str]:
        assert main(["generate", "--model", str(tmp_path), *texts, "--quiet", *flags]) == 0
        return capfd.readouterr().out.splitlines()[-len(texts) :]  # after anything an import printed

    def lines(ids: torch.Tensor) -> list[str]:  # as the command prints them: one line each
        return [" ".join(text.splitlines()) for text in tokenizer.batch_decode(ids[:, 1:], skip_special_tokens=True)]

    theirs = type(ref).from_pretrained(tmp_path).eval()
    transformers_ids = theirs.generate(**enc)  # the settings from the file only
    assert transformers_ids.shape[1] <= 9
    assert cli() == lines(transformers_ids)
    plain = ref.generate(**enc, num_beams=1, max_new_tokens=8, no_repeat_ngram_size=0, min_length=0)
    assert lines(transformers_ids) != lines(plain)  # the file's settings mattered
    overridden = theirs.generate(**enc, num_beams=1, max_new_tokens=4)  # the file's n-gram ban and min_length stay
    assert cli("--num-beams", "1", "--max-new-tokens", "4") == lines(overridden)


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


# ---- the logits processors: repetition_penalty, no_repeat_ngram_size, min_new_tokens -----------------------

PROCESSOR_SETTINGS = [
    dict(repetition_penalty=1.8),
    dict(repetition_penalty=0.6),
    dict(no_repeat_ngram_size=1),
    dict(no_repeat_ngram_size=2),
    dict(min_new_tokens=7),
    dict(repetition_penalty=1.3, no_repeat_ngram_size=3, min_new_tokens=4, length_penalty=0.7),
]
PROCESSOR_EFFECTS: list = []


@pytest.mark.parametrize("kind", ["t5_v10_tied", "longt5_tglobal", "blenderbot_small"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_processors_match_transformers(kind, num_beams, tmp_path, reference_backend):
    """Each option gives transformers' tokens, greedy and beam, with an eos the model emits in row 0
    (so min_new_tokens has something to hold back); PROCESSOR_EFFECTS records whether it changed them."""
    ref, ours = _pair(kind, tmp_path, sharpen=True)
    inputs = batch(kind)
    args = (inputs["input_ids"], inputs["attention_mask"])
    greedy = ref.generate(args[0], attention_mask=args[1], max_new_tokens=12, do_sample=False, num_beams=1)
    base = dict(max_new_tokens=12, num_beams=num_beams, eos_token_id=int(greedy[0, 6]))
    plain = ours.generate(*args, **base)
    for settings in PROCESSOR_SETTINGS:
        expected = ref.generate(args[0], attention_mask=args[1], do_sample=False, **base, **settings)
        got = ours.generate(*args, **base, **settings)
        assert torch.equal(got, expected), (settings, got, expected)
        PROCESSOR_EFFECTS.append((tuple(settings), num_beams, not torch.equal(got, plain)))


def test_processor_cases_were_not_trivial():
    """Each option (by name; repetition_penalty at 1.8 or 0.6) changed the tokens of some case, greedy and
    beam alike."""
    if not PROCESSOR_EFFECTS:
        pytest.skip("the processor cases did not run in this session")
    changed = {(names, beams) for names, beams, effect in PROCESSOR_EFFECTS if effect}
    assert changed == {(tuple(s), b) for s in PROCESSOR_SETTINGS for b in (1, 3)}, changed


def test_sampling_sees_the_processed_scores(tmp_path, reference_backend):
    """Sampling sees the processed scores: with no_repeat_ngram_size=1 no sampled row repeats a token."""
    _, ours = _pair("t5_v11_untied", tmp_path, sharpen=True)
    inputs = batch("t5_v11_untied")
    seeded = torch.Generator().manual_seed(0)
    out = ours.generate(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=10, do_sample=True,
                        no_repeat_ngram_size=1, eos_token_id=-1, generator=seeded)  # fmt: skip
    for row in out.tolist():
        assert len(set(row)) == len(row), row


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(max_new_tokens=10**9), "max_new_tokens must be between 1 and 65536"),
        (dict(temperature=float("nan"), do_sample=True), "temperature must be a finite number > 0; got nan"),
        (dict(top_k=-5), "top_k must be >= 0"),
        (dict(top_p=1.5), "top_p must be in (0, 1]"),
        (dict(top_p=float("nan")), "top_p must be in (0, 1]"),
        (dict(num_beams=0), "num_beams must be >= 1"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size must be >= 0"),
        (dict(min_new_tokens=-2), "min_new_tokens must be >= 0"),
        (dict(length_penalty=float("inf"), num_beams=2), "length_penalty must be a finite number"),
        (dict(max_new_tokens=2.5), "max_new_tokens must be an integer; got 2.5"),
        (dict(num_beams=True), "num_beams must be an integer; got True"),
        (dict(input_ids=torch.zeros(2, 0, dtype=torch.long), attention_mask=torch.zeros(2, 0, dtype=torch.long)),
         "input_ids (2, 0) holds no token; give each row at least one"),
        (dict(input_ids=torch.zeros(2, 3)), "input_ids must be an integer tensor (batch, length); got torch.float32"),
        (dict(input_ids=torch.zeros(3, dtype=torch.long)), "input_ids must be an integer tensor (batch, length)"),
        (dict(input_ids=torch.full((1, 3), 10**6)), "input_ids hold 1000000, outside the model's vocabulary"),
        (dict(input_ids=torch.full((1, 3), -1)), "input_ids hold -1, outside the model's vocabulary"),
        (dict(attention_mask=torch.ones(1, 1)), "attention_mask must have input_ids' shape"),
    ],
)  # fmt: skip
def test_bad_settings_are_refused_before_any_work(settings, message, tmp_path):
    _, ours = _pair("t5_v10_tied", tmp_path)
    inputs = batch("t5_v10_tied")
    args = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    if "input_ids" in settings:
        args["attention_mask"] = None
    args.update(settings)
    with pytest.raises(ValueError, match=re.escape(message)):
        ours.generate(**args)


def test_learned_positions_bound_max_new_tokens(tmp_path):
    _, ours = _pair("blenderbot_small", tmp_path)
    inputs = batch("blenderbot_small")
    limit = ours.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"between 1 and {limit} .*learned positions cover {limit} tokens"):
        ours.generate(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=limit + 1)
