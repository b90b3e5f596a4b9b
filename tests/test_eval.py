"""Evaluation and logging through the `fastseq train` command on tiny models: task metrics, the
predictions files, the best checkpoint and --save-total-limit, the metrics.jsonl schema,
TensorBoard, the summary line, and the options' errors."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from fastseq.cli import main
from fastseq.tokenizers import ByT5Tokenizer
from fastseq.train.loop import shorten
from fastseq.train.rotation import best_checkpoint, prune_checkpoints
from tests.conftest import refused

WORDS = ["cat", "dog", "cow", "pig", "hen", "fox", "owl", "bee"]


def _model_dir(path: Path) -> Path:
    """A tiny T5 v1.1 (d_model 32) with the ByT5 vocabulary, saved with its tokenizer."""
    from fastseq.models import T5ForConditionalGeneration
    from fastseq.train.engine import default_config

    config = dataclasses.replace(default_config(), d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2,
                                 num_decoder_layers=2, extra={})  # fmt: skip
    T5ForConditionalGeneration(config).save_pretrained(path)
    ByT5Tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _model_dir(tmp_path_factory.mktemp("model") / "tiny")


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _predictions(out: Path, step: int) -> list[dict]:
    return [json.loads(line) for line in (out / f"eval_predictions-{step}.jsonl").read_text().splitlines()]


def _train(capfd, tiny: Path | None, out: Path, *argv: str) -> tuple[int, str]:
    """`fastseq train` on the tiny model (None: the embedded default model, trained from scratch)."""
    model = ["--model", str(tiny), "--data", "synthetic"] if tiny is not None else []  # argv's --data wins
    code = main(["train", *model, "--output-dir", str(out), "--batch-size", "4", "--quiet", "--max-source-length",
                 "48", "--max-target-length", "24", *argv])  # fmt: skip
    captured = capfd.readouterr()
    assert code == 0, captured.err
    return code, captured.out


def test_summarization_with_rouge_keeps_the_best_checkpoint(tmp_path, capfd, tiny, reference_backend):
    rows = [{"document": f"the {w} sat on the mat. it was a happy {w}.", "summary": f"the {w} sat.\nit was happy."}
            for w in WORDS]  # fmt: skip
    data = _jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "out"
    _, printed = _train(capfd, tiny, out, "--data", str(data), "--eval-data", str(data), "--source-field",
                        "document", "--target-field", "summary", "--steps", "6", "--eval-every", "2", "--save-every",
                        "2", "--eval-examples", "3", "--metric", "rouge", "--metric-for-best-model", "rougeLsum",
                        "--save-total-limit", "1", "--max-new-tokens", "6", "--num-beams", "2",
                        "--lr", "3e-3")  # fmt: skip
    records = _records(out)
    evals = {r["step"]: r for r in records if "eval_loss" in r}
    assert sorted(evals) == [2, 4, 6]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    for step, record in evals.items():
        rows_out = _predictions(out, step)
        assert [(r["source"], r["target"]) for r in rows_out] == [(x["document"], x["summary"]) for x in rows[:3]]
        assert all(len(r["prediction"].encode()) <= 6 for r in rows_out)  # at most 6 byte tokens
        for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            direct = [scorer.score(r["target"], r["prediction"])[key].fmeasure for r in rows_out]
            assert record[key] == pytest.approx(100 * sum(direct) / 3, rel=1e-12), (step, key)
    final = _predictions(out, 6)
    assert (out / "generated_predictions.txt").read_text() == "\n".join(r["prediction"].strip() for r in final)
    # The best checkpoint by rougeLsum (the earliest of equal scores) is kept with the latest; the rest is pruned.
    best_step = max(sorted(evals), key=lambda s: (evals[s]["rougeLsum"], -s))
    assert evals[6]["best_checkpoint"] == f"checkpoint-{best_step}"
    assert evals[6]["best_metric"] == evals[best_step]["rougeLsum"]
    assert {p.name for p in out.glob("checkpoint-*")} == {f"checkpoint-{best_step}", "checkpoint-6"}
    assert not list(out.glob(".*"))  # nothing half-removed left behind
    summary = printed.splitlines()[1]  # after the settings line
    assert f"best_checkpoint checkpoint-{best_step} (rougeLsum " in summary
    assert f"held-out rouge1 {evals[6]['rouge1']:.2f}, rouge2 " in summary
    assert f"rougeL {evals[6]['rougeL']:.2f}" in summary
    assert f"eval_loss {evals[6]['eval_loss']:.4f} (3 examples)" in summary


def test_translation_with_bleu_chrf_and_the_record_schema(tmp_path, capfd, tiny, reference_backend):
    rows = [{"en": f"the {w} is here", "de": f"der {w} ist hier"} for w in WORDS]
    data = _jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "out"
    _train(capfd, tiny, out, "--data", str(data), "--eval-data", str(data), "--source-field", "en",
           "--target-field", "de", "--steps", "4", "--eval-every", "2", "--eval-examples", "4", "--metric",
           "bleu,chrf", "--max-new-tokens", "5", "--log-every", "2")  # fmt: skip
    records = _records(out)
    for record in records:  # train and eval records alike
        assert {"step", "epoch", "elapsed", "lr"} <= set(record), record
        assert record["lr"] == 1e-3  # adafactor's fixed rate for a pretrained directory
        assert record["elapsed"] >= 0
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    elapsed = [r["elapsed"] for r in records]
    assert elapsed == sorted(elapsed)
    for step in (2, 4):
        (record,) = [r for r in records if r["step"] == step and "eval_loss" in r]
        rows_out = _predictions(out, step)
        predictions, targets = [r["prediction"] for r in rows_out], [r["target"] for r in rows_out]
        assert record["bleu"] == sacrebleu.corpus_bleu(predictions, [targets]).score
        assert record["chrf"] == sacrebleu.corpus_chrf(predictions, [targets]).score
        assert "exact_match" not in record and "rouge1" not in record  # only the metrics asked for


def test_tensorboard_holds_the_metrics_jsonl_scalars_grouped_as_hfs(tmp_path, capfd, reference_backend):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    _train(capfd, None, out, "--steps", "3", "--eval-every", "2", "--eval-examples", "2", "--max-new-tokens", "4",
           "--report-to", "tensorboard", "--optimizer", "adafactor")  # fmt: skip
    records = _records(out)
    # From scratch Adafactor runs on its relative step size, min(1e-2, 1/sqrt(step)): no longer null.
    assert [r["lr"] for r in records] == [1e-2] * len(records)
    expected: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                # HF's Trainer's groups: evaluation's numbers under eval/ (eval_loss as eval/loss), the rest train/
                tag = f"eval/{key.removeprefix('eval_')}" if key in ("eval_loss", "exact_match") else f"train/{key}"
                expected.setdefault(tag, {})[record["step"]] = value
    assert {"train/loss", "train/lr", "eval/loss", "eval/exact_match"} <= set(expected)
    (events,) = (out / "runs").iterdir()
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    assert set(accumulator.Tags()["scalars"]) == set(expected)
    for key, values in expected.items():
        logged = {event.step: event.value for event in accumulator.Scalars(key)}
        assert logged.keys() == values.keys(), key
        for step, value in values.items():
            assert logged[step] == pytest.approx(value, rel=1e-6), (key, step)


def test_elapsed_continues_across_resume(tmp_path, capfd, tiny, reference_backend):
    out = tmp_path / "out"
    common = ["--steps", "4", "--save-every", "2", "--eval-examples", "0", "--report-to", "tensorboard"]
    _train(capfd, tiny, out, *common)
    first = _records(out)
    (out / "checkpoint-4").rename(tmp_path / "later")  # as if the run had stopped after step 2's checkpoint
    _train(capfd, tiny, out, *common, "--resume")
    again = _records(out)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    assert again[:2] == first[:2]
    assert again[2]["elapsed"] >= first[1]["elapsed"]  # counted from the run's start, not the resume's


def test_the_summary_line_shortens_long_texts(tmp_path, capfd, tiny, reference_backend):
    long_source = "a very long document " * 30
    data = _jsonl(tmp_path / "d.jsonl", [{"source": long_source, "target": "short"}] * 4)
    _, printed = _train(capfd, tiny, tmp_path / "out", "--data", str(data), "--eval-data", str(data), "--steps",
                        "1", "--eval-examples", "1", "--max-new-tokens", "3",
                        "--max-source-length", "600")  # fmt: skip
    summary, shown = printed.splitlines()[1:3]  # after the settings line
    assert "held-out exact match 0.0%, eval_loss " in summary or "held-out exact match 100.0%, eval_loss" in summary
    assert repr(long_source[:199] + "…") in shown and long_source not in shown
    assert shorten("x" * 200) == "x" * 200 and shorten("x" * 201) == "x" * 199 + "…"


def test_prune_keeps_the_best_and_the_latest(tmp_path):
    for step in (2, 4, 6, 8, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-x").mkdir()  # not a checkpoint name: never touched

    def left() -> list[int]:
        return sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("checkpoint-*") if p.name[11:].isdigit())

    assert prune_checkpoints(tmp_path, 3, {tmp_path / "checkpoint-4"}) == [tmp_path / "checkpoint-2",
                                                                            tmp_path / "checkpoint-6"]  # fmt: skip
    assert left() == [4, 8, 10]
    prune_checkpoints(tmp_path, 1, {tmp_path / "checkpoint-4"})  # a limit of 1 keeps the best and the latest
    assert left() == [4, 10]
    prune_checkpoints(tmp_path, 1, set())
    assert left() == [10] and (tmp_path / "checkpoint-x").is_dir()
    assert prune_checkpoints(tmp_path / "checkpoint-x", 1, set()) == []


def test_best_checkpoint_by_direction(tmp_path):
    for step in (2, 4, 6):
        (tmp_path / f"checkpoint-{step}").mkdir()
    evaluated = {2: {"eval_loss": 3.0, "bleu": 5.0}, 4: {"eval_loss": 2.0, "bleu": 9.0},
                 6: {"eval_loss": 2.0, "bleu": 1.0}, 8: {"eval_loss": 0.5, "bleu": 99.0}}  # fmt: skip
    # Step 8 has no checkpoint; of equal losses the earliest wins.
    assert best_checkpoint(tmp_path, evaluated, "eval_loss", greater=False) == (tmp_path / "checkpoint-4", 2.0)
    assert best_checkpoint(tmp_path, evaluated, "bleu", greater=True) == (tmp_path / "checkpoint-4", 9.0)
    assert best_checkpoint(tmp_path, evaluated, "bleu", greater=False) == (tmp_path / "checkpoint-6", 1.0)
    assert best_checkpoint(tmp_path, {}, "bleu", greater=True) is None


def test_greater_is_better_and_loss_as_the_best_metric(tmp_path, capfd, tiny, reference_backend):
    out = tmp_path / "out"
    _, printed = _train(capfd, tiny, out, "--steps", "4", "--eval-every", "2", "--save-every", "2",
                        "--eval-examples", "2", "--max-new-tokens", "3", "--metric-for-best-model", "loss",
                        "--greater-is-better", "True")  # fmt: skip
    evals = {r["step"]: r["eval_loss"] for r in _records(out) if "eval_loss" in r}
    best = max(sorted(evals), key=lambda s: (evals[s], -s))  # greater is better, as asked
    assert f"best_checkpoint checkpoint-{best} (eval_loss " in printed


def test_overwrite_removes_the_evaluation_files(tmp_path, capfd, tiny, reference_backend):
    out = tmp_path / "out"
    argv = ["--steps", "2", "--eval-every", "1", "--eval-examples", "1", "--max-new-tokens", "2", "--report-to",
            "tensorboard"]  # fmt: skip
    _train(capfd, tiny, out, *argv)
    assert (out / "eval_predictions-1.jsonl").is_file() and (out / "runs").is_dir()
    (out / "notes.txt").write_text("mine")
    _train(capfd, tiny, out, "--overwrite", "--steps", "1", "--eval-examples", "0")
    assert sorted(p.name for p in out.iterdir() if "predictions" in p.name or p.name == "runs") == []
    assert (out / "notes.txt").read_text() == "mine"


BAD = {
    "unknown metric": (["--metric", "rouge,rogue"], ("--metric 'rouge,rogue': unknown metric rogue", "rouge, bleu")),
    "zero beams": (["--num-beams", "0"], ("--num-beams must be at least 1; got 0",)),
    "zero new tokens": (["--max-new-tokens", "0"], ("--max-new-tokens must be at least 1; got 0",)),
    "zero checkpoints kept": (["--save-total-limit", "0"], ("--save-total-limit must be at least 1; got 0",)),
    "best metric not computed": (["--metric", "rouge", "--metric-for-best-model", "bleu"],
                                 ("--metric-for-best-model 'bleu' is not a score", "eval_loss, rouge1")),
    "best metric without held-out data": (["--data", "DATA", "--metric-for-best-model", "loss"],
                                          ("needs held-out examples", "--eval-data")),
    "saves between evaluations": (["--metric-for-best-model", "exact_match", "--save-every", "3", "--eval-every",
                                   "2"], ("--save-every 3 must be a multiple of --eval-every 2",)),
    "bad boolean": (["--greater-is-better", "maybe"], ("invalid choice",)),
    "unknown reporter": (["--report-to", "mlflow"], ("invalid choice",)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_evaluation_options_are_one_line(tmp_path, capfd, name):
    argv, expected = BAD[name]
    data = _jsonl(tmp_path / "d.jsonl", [{"source": "a", "target": "b"}])
    argv = [str(data) if a == "DATA" else a for a in argv]
    out = tmp_path / "out"
    if "invalid choice" in expected:  # argparse's own refusal: exit 2 with usage
        with pytest.raises(SystemExit) as exit_:
            main(["train", *argv, "--output-dir", str(out)])
        assert exit_.value.code == 2 and "invalid choice" in capfd.readouterr().err
    else:
        refused(capfd, ["train", *argv, "--output-dir", str(out)], *expected)
    assert not out.exists() or not any(out.iterdir())  # refused before any work


@pytest.mark.parametrize("option,module", [(["--metric", "rouge"], "rouge_score"), (["--metric", "chrf"], "sacrebleu"),
                                           (["--report-to", "tensorboard"], "tensorboard")])  # fmt: skip
def test_a_missing_package_is_one_line_naming_the_extra(tmp_path, capfd, monkeypatch, option, module):
    monkeypatch.setitem(sys.modules, module, None)
    refused(
        capfd, ["train", *option, "--output-dir", str(tmp_path / "out")], "needs the", 'pip install "fastseq[finetune]"'
    )
    assert not (tmp_path / "out").exists()


def test_metrics_jsonl_stays_strict_json(tmp_path, capfd, tiny, reference_backend):
    out = tmp_path / "out"
    _train(capfd, tiny, out, "--steps", "2", "--eval-every", "1", "--eval-examples", "1", "--max-new-tokens", "2",
           "--metric", "rouge,bleu,chrf,exact_match")  # fmt: skip

    def refuse(constant):
        raise AssertionError(constant)

    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line, parse_constant=refuse)
        assert all(not isinstance(v, float) or math.isfinite(v) for v in record.values())


def test_save_total_limit_keeps_the_resumed_branch(tmp_path, capfd, caplog):
    """Train to 6 saving every 2, then resume checkpoint-2 to step 4 with --save-total-limit 1: the
    summary's checkpoint-4 is kept (it was deleted, and the other branch's checkpoint-6 kept as the
    "latest"); the other branch's checkpoints are set aside whole, and `--resume` alone continues this one."""
    from fastseq.cli import main

    out = tmp_path / "out"
    quick = ["--batch-size", "4", "--eval-examples", "4", "--quiet", "--save-every", "2", "--output-dir", str(out)]
    assert main(["train", "--steps", "6", *quick]) == 0
    old = {step: (out / f"checkpoint-{step}" / "model.safetensors").read_bytes() for step in (4, 6)}
    capfd.readouterr()
    with caplog.at_level("WARNING", logger="fastseq.train"):
        assert main(["train", "--steps", "4", "--resume", str(out / "checkpoint-2"), "--save-total-limit", "1",
                     *quick]) == 0  # fmt: skip
    assert f"checkpoint in {out} (checkpoint-4)" in capfd.readouterr().out
    names = sorted(p.name for p in out.iterdir() if "checkpoint" in p.name)
    assert names == ["checkpoint-4", "checkpoint-4.abandoned", "checkpoint-6.abandoned"], names
    for step, weights in old.items():  # the other branch, byte for byte
        assert (out / f"checkpoint-{step}.abandoned" / "model.safetensors").read_bytes() == weights
    assert "is of the branch that --resume left at step 2" in caplog.text
    # A later --resume (latest) continues this branch, from checkpoint-4.
    assert main(["train", "--steps", "6", "--resume", *quick]) == 0
    assert "steps 4-6" in capfd.readouterr().out
    # --overwrite removes the set-aside checkpoints with the rest of the old run.
    assert main(["train", "--steps", "1", "--overwrite", *quick]) == 0
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]


def test_cosine_schedule_with_a_warmup_ratio(tmp_path, capfd, reference_backend):
    """--schedule cosine --warmup-ratio 0.25 over 8 steps: 2 warm-up steps (0.25 * 8, rounded up as HF's
    Trainer rounds it), then half a cosine to 0 at step 8; each record's lr is the next step's rate."""
    import math

    out = tmp_path / "out"
    _train(capfd, None, out, "--steps", "8", "--log-every", "1", "--optimizer", "adamw", "--lr", "1e-3",
           "--schedule", "cosine", "--warmup-ratio", "0.25", "--eval-examples", "0")  # fmt: skip
    expected = [1e-3 * (s / 2 if s < 2 else 0.5 * (1 + math.cos(math.pi * (s - 2) / 6))) for s in range(1, 9)]
    assert [r["lr"] for r in _records(out)] == pytest.approx(expected, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize(
    "argv,message",
    [(["--warmup-ratio", "1.5"], "--warmup-ratio must be in [0, 1]"),
     (["--warmup-ratio", "nan"], "--warmup-ratio must be in [0, 1]"),
     (["--warmup", "3", "--warmup-ratio", "0.1"], "--warmup and --warmup-ratio both set the warm-up; pass one")],
)  # fmt: skip
def test_a_bad_warmup_ratio_is_one_line(argv, message, tmp_path, capfd):
    code = main(["train", "--output-dir", str(tmp_path / "out"), "--steps", "2", *argv])
    err = capfd.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_metric_none_evaluates_the_loss_only(tmp_path, capfd, reference_backend):
    """--metric none: each evaluation gives eval_loss and generates nothing (no prediction files), as
    HF's evaluation without --predict_with_generate; the best checkpoint goes by eval_loss."""
    out = tmp_path / "out"
    _train(capfd, None, out, "--steps", "4", "--eval-every", "2", "--eval-examples", "3", "--save-every", "2",
           "--metric", "none", "--metric-for-best-model", "eval_loss")  # fmt: skip
    evaluated = [r for r in _records(out) if "eval_loss" in r]
    assert [r["step"] for r in evaluated] == [2, 4]
    assert all(r["eval_loss"] > 0 and "exact_match" not in r for r in evaluated)
    assert evaluated[-1]["best_checkpoint"] in ("checkpoint-2", "checkpoint-4")
    assert not list(out.glob("eval_predictions-*")) and not (out / "generated_predictions.txt").exists()
    code = main(["train", "--output-dir", str(tmp_path / "other"), "--steps", "2", "--metric", ""])
    assert code == 2 and "or none (the loss only)" in capfd.readouterr().err


def test_every_held_out_example_is_evaluated_unless_max_eval_samples_says(tmp_path, capfd, tiny, reference_backend):
    """A 300-line --eval-data is evaluated whole (256 of them were, silently); --max-eval-samples N (HF's
    name; --eval-examples, the older one) keeps the first N; --max-train-samples N trains on the first N
    examples of every epoch."""
    rows = [{"source": f"copy {WORDS[i % 8]} {i}", "target": f"{WORDS[i % 8]} {i}"} for i in range(300)]
    data = _jsonl(tmp_path / "rows.jsonl", rows)
    common = ["--data", str(data), "--eval-data", str(data), "--max-new-tokens", "2"]
    _, printed = _train(capfd, tiny, tmp_path / "all", *common, "--steps", "1")
    assert len(_predictions(tmp_path / "all", 1)) == 300 and "(300 examples)" in printed
    for flag in ("--max-eval-samples", "--eval-examples"):
        _train(capfd, tiny, tmp_path / flag, *common, "--steps", "1", flag, "5")
        assert [p["target"] for p in _predictions(tmp_path / flag, 1)] == [r["target"] for r in rows[:5]]
    # 6 examples a epoch in batches of 4: 2 batches; 3 epochs, 6 steps.
    _, printed = _train(capfd, tiny, tmp_path / "few", *common, "--max-train-samples", "6", "--epochs", "3",
                        "--max-eval-samples", "0")  # fmt: skip
    assert [r["step"] for r in _records(tmp_path / "few")][-1] == 6
    code = main(["train", "--output-dir", str(tmp_path / "bad"), *common, "--max-train-samples", "0"])
    assert code == 2 and "--max-train-samples must be at least 1" in capfd.readouterr().err


def test_the_first_line_states_the_effective_settings(tmp_path, capfd, tiny, reference_backend):
    """The run's first line: the steps --epochs gives, the optimizer and its rate, the schedule and its
    warm-up (--warmup-ratio's, rounded up), the batch with accumulation, and the source and target lengths."""
    data = _jsonl(tmp_path / "d.jsonl", [{"source": f"copy {w}", "target": w} for w in WORDS * 2])  # 16 examples
    _, printed = _train(capfd, tiny, tmp_path / "out", "--data", str(data), "--epochs", "2", "--grad-accum", "2",
                        "--schedule", "linear", "--warmup-ratio", "0.3", "--optimizer", "adamw", "--lr", "1e-3",
                        "--max-eval-samples", "0")  # fmt: skip
    assert printed.splitlines()[0] == (
        "fastseq train: 4 steps; adamw, lr 0.001, linear schedule, warm-up 2 step(s); batch 4 examples x 2 "
        "accumulated x 1 data-parallel = 8 examples a step; source 48 tokens, target 24")  # fmt: skip
    _, printed = _train(capfd, None, tmp_path / "default", "--steps", "1", "--max-eval-samples", "0")
    assert printed.splitlines()[0] == (
        "fastseq train: 1 steps; adafactor, relative step size, constant schedule; batch 4 examples x 1 accumulated "
        "x 1 data-parallel = 4 examples a step; source 48 tokens, target 24")  # fmt: skip


def _assert_resumed_from_2_as_before(tmp_path, capfd, tiny, out, argv: list[str], first: list[dict]) -> None:
    """Checkpoints 4 and 6 set aside, the run resumed (from checkpoint-2) writes `first`'s records again
    (times apart)."""
    for step in (4, 6):
        (out / f"checkpoint-{step}").rename(tmp_path / f"set-aside-{step}")
    _train(capfd, tiny, out, *argv, "--resume")
    kept = [{k: v for k, v in r.items() if k not in ("elapsed", "tokens_per_s")} for r in _records(out)]
    assert kept == [{k: v for k, v in r.items() if k not in ("elapsed", "tokens_per_s")} for r in first]


def test_eval_strategy_epoch_evaluates_and_saves_at_each_epochs_end_and_resumes_exactly(
    tmp_path, capfd, tiny, reference_backend
):
    """--eval-strategy epoch (HF's name): 8 examples in batches of 4 are 2 steps an epoch, so 3 epochs
    evaluate and save at steps 2, 4 and 6; resumed from checkpoint-2, the run gives the same records."""
    data = _jsonl(tmp_path / "d.jsonl", [{"source": f"copy {w}", "target": w} for w in WORDS])
    out = tmp_path / "out"
    argv = ["--data", str(data), "--eval-data", str(data), "--epochs", "3", "--eval-strategy", "epoch",
            "--max-new-tokens", "2", "--optimizer", "adamw", "--lr", "1e-3"]  # fmt: skip
    _train(capfd, tiny, out, *argv)
    first = _records(out)
    assert [r["step"] for r in first if "eval_loss" in r] == [2, 4, 6]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    _assert_resumed_from_2_as_before(tmp_path, capfd, tiny, out, argv, first)


def test_early_stopping_patience_ends_the_run_at_the_step_hfs_callback_would(tmp_path, capfd, tiny, reference_backend):
    """--early-stopping-patience 2 on eval_loss with --greater-is-better true (a falling loss is no
    better): the run ends after two evaluations without a better score, with its final checkpoint and
    model there, and says so in the summary."""
    out = tmp_path / "out"
    _, printed = _train(capfd, tiny, out, "--steps", "10", "--eval-every", "1", "--eval-examples", "2",
                        "--max-new-tokens", "2", "--metric-for-best-model", "eval_loss", "--greater-is-better",
                        "true", "--early-stopping-patience", "2", "--optimizer", "adamw", "--lr", "1e-2")  # fmt: skip
    evals = [(r["step"], r["eval_loss"]) for r in _records(out) if "eval_loss" in r]
    best, waited, expected = None, 0, None
    for step, value in evals:
        best, waited = (value, 0) if best is None or value > best else (best, waited + 1)
        if waited == 2:
            expected = step
            break
    assert expected is not None and expected < 10 and evals[-1][0] == expected, evals
    assert (out / f"checkpoint-{expected}").is_dir() and (out / "model.safetensors").is_file()
    assert f"stopped early at step {expected} (--early-stopping-patience 2: no better eval_loss)" in printed


@pytest.mark.parametrize(
    "argv,message",
    [(["--eval-strategy", "epoch"], "--eval-strategy epoch needs epochs: the synthetic task has none"),
     (["--eval-strategy", "no", "--eval-every", "2"], "--eval-every counts steps for --eval-strategy steps"),
     (["--early-stopping-patience", "2"], "--early-stopping-patience counts evaluations without a better"),
     (["--metric-for-best-model", "loss", "--early-stopping-patience", "0"],
      "--early-stopping-patience must be at least 1; got 0"),
     (["--test-data", "missing.jsonl"], "--test-data missing.jsonl does not exist; pass the path of a data file"),
     (["--max-predict-samples", "2"], "--max-predict-samples limits --test-data's examples: pass --test-data FILE"),
     (["--test-data", "TEST", "--max-predict-samples", "0"], "--max-predict-samples must be at least 1; got 0"),
     (["--test-data", "TEST", "--task", "denoise", "--data", "TEST"],
      "--test-data predicts seq2seq examples; --task denoise has none to predict"),
     (["--eval-data", "TEST", "--task", "denoise", "--data", "TEST"],
      "--eval-data holds seq2seq examples to evaluate; --task denoise evaluates none: drop --eval-data"),
     (["--source-prefix", "zz: ", "--task", "denoise", "--data", "TEST"],
      "--source-prefix goes before seq2seq sources; --task denoise corrupts spans of plain text"),
     (["--load-best-model-at-end"], "--load-best-model-at-end loads the best checkpoint by --metric-for-best-model: "
      "pass --metric-for-best-model"),
     (["--load-best-model-at-end", "--metric-for-best-model", "loss", "--eval-every", "2"],
      "--load-best-model-at-end picks among the checkpoints of evaluated steps, and this run evaluates none before "
      "the end: pass --eval-every N and --save-every N")],
)  # fmt: skip
def test_bad_eval_strategy_and_patience_are_one_line(argv, message, tmp_path, capfd):
    test = _jsonl(tmp_path / "test.jsonl", [{"source": "a", "target": "b"}])
    argv = [str(test) if a == "TEST" else a for a in argv]
    refused(capfd, ["train", "--output-dir", str(tmp_path / "out"), *argv], message)


def test_bf16_on_a_cpu_without_it_is_one_line(tmp_path, capfd, monkeypatch):
    """--precision bf16 where oneDNN reports no bf16 (monkeypatched: this machine may have it): one line
    naming the fix, before anything is written; a CPU with bf16 trains."""
    import torch

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    out = tmp_path / "out"
    refused(capfd, ["train", "--precision", "bf16", "--device", "cpu", "--steps", "1", "--output-dir", str(out)],
            "--precision bf16: this CPU (oneDNN reports no bf16 support) does not compute in bf16; use --precision "
            "fp32 (what auto takes on a CPU)")  # fmt: skip
    assert not out.exists() or not any(out.iterdir())
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert main(["train", "--precision", "bf16", "--device", "cpu", "--steps", "1", "--batch-size", "2",
                 "--max-eval-samples", "0", "--quiet", "--output-dir", str(out)]) == 0  # fmt: skip


def _best_run(tmp_path: Path, *extra: str) -> list[str]:
    """--load-best-model-at-end on eval_loss with --greater-is-better true: the loss falls, so an early
    checkpoint is the best one, not the last."""
    data = _jsonl(tmp_path / "d.jsonl", [{"source": f"copy {w}", "target": w} for w in WORDS])
    return ["--data", str(data), "--eval-data", str(data), "--steps", "6", "--eval-every", "2", "--save-every", "2",
            "--max-new-tokens", "3", "--metric-for-best-model", "eval_loss", "--greater-is-better", "true",
            "--load-best-model-at-end", "--optimizer", "adamw", "--lr", "1e-2", *extra]  # fmt: skip


def _evaluations(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in records if "eval_loss" in r and "best_model_step" not in r}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_load_best_model_at_end_puts_the_best_checkpoints_model_at_the_top(tmp_path, capfd, tiny, reference_backend,
                                                                           lora):  # fmt: skip
    """OUTPUT's model files are the best checkpoint's (under LoRA its adapters), --save-total-limit 1
    keeps that checkpoint and the last, and the final evaluation (the last metrics.jsonl record,
    generated_predictions.txt, the summary) is the best model's, evaluated again after loading it."""
    out = tmp_path / "out"
    argv = _best_run(tmp_path, "--save-total-limit", "1", *(["--lora-r", "4"] if lora else []))
    _, printed = _train(capfd, tiny, out, *argv)
    records = _records(out)
    evals = _evaluations(records)
    assert sorted(evals) == [2, 4, 6]
    best = max(sorted(evals), key=lambda s: (evals[s]["eval_loss"], -s))
    assert best != 6, evals  # the test needs a best checkpoint that is not the last one
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{best}", "checkpoint-6"]
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    top = (out / weights).read_bytes()
    assert top == (out / f"checkpoint-{best}" / weights).read_bytes()
    assert top != (out / "checkpoint-6" / weights).read_bytes()
    assert {k: v for k, v in records[-1].items() if k not in ("elapsed", "epoch")} == {
        "step": 6, "best_model_step": best, "best_model_checkpoint": f"checkpoint-{best}",
        "eval_loss": evals[best]["eval_loss"], "exact_match": evals[best]["exact_match"]}  # fmt: skip
    assert records[-2]["step"] == 6 and records[-2]["best_checkpoint"] == f"checkpoint-{best}"
    generated = (out / "generated_predictions.txt").read_text().split("\n")
    assert generated == [row["prediction"].strip() for row in _predictions(out, best)]
    assert f"model of checkpoint-{best} (--load-best-model-at-end)" in printed
    assert f"held-out exact match {evals[best]['exact_match']:.1%}" in printed


def test_load_best_model_at_end_resumes_exactly(tmp_path, capfd, tiny, reference_backend):
    """Resumed from checkpoint-2, the run gives the same records and the same model at the top."""
    out = tmp_path / "out"
    argv = _best_run(tmp_path)
    _train(capfd, tiny, out, *argv)
    first, model = _records(out), (out / "model.safetensors").read_bytes()
    assert first[-1]["best_model_step"] != 6
    _assert_resumed_from_2_as_before(tmp_path, capfd, tiny, out, argv, first)
    assert (out / "model.safetensors").read_bytes() == model


def test_test_data_is_predicted_by_the_best_model_at_the_end(tmp_path, capfd, tiny, reference_backend):
    """--test-data with --max-predict-samples 3 under --load-best-model-at-end: the first 3 test
    examples are predicted and scored by the best checkpoint's model (OUTPUT's), as evaluation
    would, into test_predictions.jsonl and predict_results.json (HF's keys), and the summary gives
    the scores; the last step's model would score otherwise."""
    import torch

    import fastseq
    from fastseq.data import Seq2SeqCollator
    from fastseq.train import evaluate

    rows = [{"source": f"copy {w} {w}", "target": f"{w} {w}"} for w in WORDS[:5]]
    test = _jsonl(tmp_path / "test.jsonl", rows)
    out = tmp_path / "out"
    _, printed = _train(capfd, tiny, out, *_best_run(tmp_path, "--test-data", str(test), "--max-predict-samples", "3"))
    best = _records(out)[-1]["best_model_step"]
    assert best != 6
    examples = [(r["source"], r["target"]) for r in rows[:3]]
    collator = Seq2SeqCollator(ByT5Tokenizer(), max_source_length=48, max_target_length=24)

    def scores(model_dir: Path) -> tuple[dict, list[str]]:
        return evaluate(fastseq.from_pretrained(model_dir), ByT5Tokenizer(), examples, collator, torch.device("cpu"),
                        max_new_tokens=3)  # fmt: skip

    expected, outputs = scores(out / f"checkpoint-{best}")
    results = json.loads((out / "predict_results.json").read_text())
    assert results == {"predict_loss": expected["eval_loss"], "predict_exact_match": expected["exact_match"],
                       "predict_samples": 3}  # fmt: skip
    assert scores(out / "checkpoint-6")[0]["eval_loss"] != expected["eval_loss"]
    written = [json.loads(line) for line in (out / "test_predictions.jsonl").read_text().splitlines()]
    assert written == [{"source": s, "target": t, "prediction": p} for (s, t), p in zip(examples, outputs, strict=True)]
    assert (f"test exact match {expected['exact_match']:.1%}, predict_loss {expected['eval_loss']:.4f} (3 examples, "
            "predict_results.json)") in printed  # fmt: skip


def _wandb_rows(run_file: Path) -> tuple[list[dict], dict]:
    """The history rows and the last summary of a W&B run file (`run-ID.wandb`), once it holds the
    run's exit record (wandb-core writes it on its own after `finish()` returns). The file is a
    LevelDB log (32 KiB blocks of chunks, each after a 7-byte header: checksum, little-endian
    length, kind 1 full, 2 first, 3 middle, 4 last) of `wandb_internal_pb2.Record`s, after wandb's
    7-byte file header; wandb ships no public reader of it."""
    import struct
    import time

    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + 60
    while True:
        data, pos, parts, records = run_file.read_bytes(), 7, b"", []
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            length, kind = struct.unpack_from("<HB", data, pos + 4)
            parts, pos = parts + data[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind in (1, 4):
                records.append(wandb_internal_pb2.Record.FromString(parts))
                parts = b""
        if any(record.HasField("exit") for record in records):
            break
        assert time.monotonic() < deadline, f"{run_file} holds no exit record after 60 s"
        time.sleep(0.2)
    rows, summary = [], {}
    for record in records:
        if record.HasField("history"):
            rows.append({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item})
        elif record.HasField("summary"):
            summary.update({"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.summary.update})
    return rows, summary


def test_report_to_wandb_logs_the_metrics_jsonl_scalars_and_a_resume_continues_its_run(
    tmp_path, capfd, monkeypatch, reference_backend
):
    """--report-to wandb in offline mode: the W&B run (files under OUTPUT/wandb) holds every number of
    metrics.jsonl, tagged as TensorBoard's, against train/global_step, and its summary the final
    loss; resumed from checkpoint-2, the run continues the same W&B run id from step 3."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    argv = ["--steps", "4", "--save-every", "2", "--eval-every", "2", "--eval-examples", "2", "--max-new-tokens", "4",
            "--report-to", "wandb", "--optimizer", "adamw", "--lr", "1e-3"]  # fmt: skip
    _train(capfd, None, out, *argv)
    run_id = (out / "wandb_run_id.txt").read_text().strip()
    (first,) = (out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    expected: dict[int, dict[str, float]] = {}
    for record in _records(out):
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                tag = f"eval/{key.removeprefix('eval_')}" if key in ("eval_loss", "exact_match") else f"train/{key}"
                expected.setdefault(record["step"], {})[tag] = value
    rows, summary = _wandb_rows(first)
    logged: dict[int, dict[str, float]] = {}
    for row in rows:
        logged.setdefault(row["train/global_step"], {}).update(
            {k: v for k, v in row.items() if not k.startswith("_") and k != "train/global_step"})  # fmt: skip
    assert logged == expected
    assert {"train/loss", "train/lr", "eval/loss", "eval/exact_match"} <= set(logged[4])
    assert summary["train/loss"] == [r["loss"] for r in _records(out) if "loss" in r][-1]

    (out / "checkpoint-4").rename(tmp_path / "later")  # as if the run had stopped after step 2's checkpoint
    _train(capfd, None, out, *argv, "--resume")
    assert (out / "wandb_run_id.txt").read_text().strip() == run_id  # the same W&B run
    (second,) = set((out / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")) - {first}
    rows, _ = _wandb_rows(second)
    assert sorted({row["train/global_step"] for row in rows}) == [3, 4]
    assert [row["train/loss"] for row in rows if "train/loss" in row] == [expected[3]["train/loss"],
                                                                          expected[4]["train/loss"]]  # fmt: skip


def test_report_to_wandb_without_wandb_is_one_line(tmp_path, capfd, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    refused(capfd, ["train", "--report-to", "wandb", "--output-dir", str(tmp_path / "out")],
            "--report-to wandb needs the wandb package, which is not installed; pip install wandb")  # fmt: skip
    assert not (tmp_path / "out").exists()
