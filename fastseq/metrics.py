"""Task metrics that evaluation calls by name, each computed by the package the field reports it
with, as `transformers`' example scripts do:

- `exact_match`: the fraction (0-1) of predictions equal to their target, both stripped.
- `rouge` (`rouge-score`, as `run_summarization.py`): `rouge1`, `rouge2`, `rougeL` and `rougeLsum`,
  the mean F-measure over the examples times 100, with the Porter stemmer.
- `bleu` (`sacrebleu.corpus_bleu`, as `run_translation.py`) and `chrf` (`sacrebleu.corpus_chrf`):
  corpus scores (0-100) with sacrebleu's defaults (13a tokenization, one reference per example).

The packages are optional (`pip install "fastseq[finetune]"`) and imported only when a metric
that needs them is asked for; `check_available` says so before a run starts."""

from __future__ import annotations

import importlib

METRICS = ("exact_match", "rouge", "bleu", "chrf")
# The values each metric reports, by the name records and --metric-for-best-model use.
KEYS = {"exact_match": ("exact_match",), "rouge": ("rouge1", "rouge2", "rougeL", "rougeLsum"), "bleu": ("bleu",),
        "chrf": ("chrf",)}  # fmt: skip
_PACKAGES = {"rouge": ("rouge_score", "rouge-score"), "bleu": ("sacrebleu", "sacrebleu"),
             "chrf": ("sacrebleu", "sacrebleu")}  # fmt: skip


def parse_metrics(value: str) -> tuple[str, ...]:
    """The metric names of `--metric`: one name or several separated by commas ("rouge,bleu"); "none"
    for none (evaluation computes its loss only and generates nothing)."""
    if value.strip() == "none":
        return ()
    names = tuple(dict.fromkeys(name.strip() for name in value.split(",") if name.strip()))
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise ValueError(
            f"--metric {value!r}: unknown metric {', '.join(unknown) or '(none given)'}; use one or more of "
            f"{', '.join(METRICS)} separated by commas (e.g. --metric rouge,bleu), or none (the loss only)"
        )
    return names


def metric_keys(names: tuple[str, ...]) -> tuple[str, ...]:
    """The score names the metrics `names` report (rouge: rouge1, rouge2, rougeL, rougeLsum)."""
    return tuple(key for name in names for key in KEYS[name])


def greater_is_better(key: str) -> bool:
    """Whether a larger value of score `key` is better: losses are lower-is-better, scores higher."""
    return not key.endswith("loss")


def check_available(names: tuple[str, ...]) -> None:
    """Raise, naming the package and how to install it, if a metric's package is missing."""
    for name in names:
        if name in _PACKAGES:
            _import(name)


def _import(name: str):
    module, package = _PACKAGES[name]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(
            f'--metric {name} needs the {package} package, which is not installed; pip install "fastseq[finetune]"'
        ) from None


def exact_match(predictions: list[str], references: list[str]) -> dict[str, float]:
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
    return {"exact_match": hits / max(len(predictions), 1)}


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum F-measures (x100), averaged over examples, with the Porter stemmer.

    rougeLsum splits each text into sentences on "\\n" (rouge-score's own sentence handling, with
    `split_summaries=False`). `run_summarization.py` first puts each sentence nltk's
    `sent_tokenize` finds on a line of its own, which needs nltk's punkt data (a download); here a
    text is scored as written, so targets and outputs written one sentence per line (CNN/DailyMail
    highlights) score as in HF's script, and a one-line text counts as one sentence. The mean is
    what `evaluate`'s BootstrapAggregator estimates (its `mid`), without its resampling noise."""
    _import("rouge")
    from rouge_score import rouge_scorer, tokenizers

    # The scorer's own default tokenizer, passed explicitly so that it does not log that it uses it.
    tokenizer = tokenizers.DefaultTokenizer(use_stemmer=True)
    scorer = rouge_scorer.RougeScorer(list(KEYS["rouge"]), use_stemmer=True, split_summaries=False, tokenizer=tokenizer)
    totals = dict.fromkeys(KEYS["rouge"], 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        for key, score in scorer.score(reference, prediction).items():
            totals[key] += score.fmeasure
    return {key: 100 * total / max(len(predictions), 1) for key, total in totals.items()}


def bleu(predictions: list[str], references: list[str]) -> dict[str, float]:
    """sacrebleu's corpus BLEU with its defaults, as `evaluate.load("sacrebleu")` in `run_translation.py`."""
    sacrebleu = _import("bleu")
    return {"bleu": sacrebleu.corpus_bleu(predictions, [references]).score}


def chrf(predictions: list[str], references: list[str]) -> dict[str, float]:
    """sacrebleu's corpus chrF (character 6-grams, beta 2)."""
    sacrebleu = _import("chrf")
    return {"chrf": sacrebleu.corpus_chrf(predictions, [references]).score}


_FUNCTIONS = {"exact_match": exact_match, "rouge": rouge, "bleu": bleu, "chrf": chrf}


def compute(names: tuple[str, ...], predictions: list[str], references: list[str]) -> dict[str, float]:
    """Every score of the metrics `names` for `predictions` against their `references` (one each)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scores: dict[str, float] = {}
    for name in names:
        scores.update(_FUNCTIONS[name](predictions, references))
    return scores
