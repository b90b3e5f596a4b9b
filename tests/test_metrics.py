"""Task metrics (fastseq.metrics) against rouge-score and sacrebleu called directly on the same texts."""

from __future__ import annotations

import sys

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from fastseq.metrics import compute, metric_keys, parse_metrics

PREDICTIONS = [
    "the cats are sitting on the mat.\nthey look happy today.",
    "a quick brown fox jumped over lazy dogs",
    "the north gets rain. tomorrow rain is expected.",
    "",
]
REFERENCES = [
    "the cat sat on the mat.\nit was happy.",
    "the quick brown fox jumps over the lazy dog",
    "tomorrow rain is expected.\nthe north gets the most.",
    "nothing here",
]


def test_rouge_is_rouge_score_with_the_stemmer_and_newline_sentences():
    ours = compute(("rouge",), PREDICTIONS, REFERENCES)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        scores = [scorer.score(r, p)[key].fmeasure for p, r in zip(PREDICTIONS, REFERENCES, strict=True)]
        assert ours[key] == pytest.approx(100 * sum(scores) / len(scores), rel=1e-12), key
    # Sentences are split on newlines: rougeLsum differs from rougeL on these texts, and joining the
    # sentences with spaces gives rougeLsum = rougeL.
    assert ours["rougeLsum"] != pytest.approx(ours["rougeL"])
    flat = compute(("rouge",), [p.replace("\n", " ") for p in PREDICTIONS], [r.replace("\n", " ") for r in REFERENCES])
    assert flat["rougeLsum"] == pytest.approx(flat["rougeL"])
    # The stemmer is on: "cats"/"cat" and "sitting"/"sat" are not the same, "jumped"/"jumps" are.
    unstemmed = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
    assert scorer.score(REFERENCES[1], PREDICTIONS[1])["rouge1"].fmeasure > (
        unstemmed.score(REFERENCES[1], PREDICTIONS[1])["rouge1"].fmeasure
    )


def test_bleu_and_chrf_are_sacrebleu_corpus_scores():
    ours = compute(("bleu", "chrf"), PREDICTIONS, REFERENCES)
    assert ours["bleu"] == sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score
    assert ours["chrf"] == sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score
    assert 0 < ours["bleu"] < 100 and 0 < ours["chrf"] < 100


def test_exact_match_strips_and_counts():
    scores = compute(("exact_match",), [" yes ", "no", "maybe"], ["yes", "No", "maybe\n"])
    assert scores == {"exact_match": pytest.approx(2 / 3)}
    assert compute(("exact_match",), [], []) == {"exact_match": 0.0}


def test_metric_names_parse_comma_separated():
    assert parse_metrics("rouge,bleu") == ("rouge", "bleu")
    assert parse_metrics(" bleu , bleu,chrf") == ("bleu", "chrf")
    assert metric_keys(("exact_match", "rouge")) == ("exact_match", "rouge1", "rouge2", "rougeL", "rougeLsum")
    with pytest.raises(ValueError, match="unknown metric rogue; use one or more of exact_match, rouge, bleu, chrf"):
        parse_metrics("rouge,rogue")
    with pytest.raises(ValueError, match=r"\(none given\)"):
        parse_metrics(",")


@pytest.mark.parametrize("name,module", [("rouge", "rouge_score"), ("bleu", "sacrebleu"), ("chrf", "sacrebleu")])
def test_a_missing_package_names_the_extra(monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    with pytest.raises(ValueError, match=rf'--metric {name} needs the .* package.*pip install "fastseq\[finetune\]"'):
        compute((name,), ["a"], ["a"])
