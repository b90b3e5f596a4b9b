"""The training loop: resume equality, checkpoints, data files, options and their errors."""

from __future__ import annotations

import json

import pytest
import torch

import fastseq
from fastseq.train import TrainArgs, train
from fastseq.train.state import latest_checkpoint


def _args(tmp_path, **kw) -> TrainArgs:
    base = dict(steps=20, batch_size=8, eval_examples=8, quiet=True, output_dir=str(tmp_path / "run"), log_every=5,
                warmup=5, examples_to_show=0)  # fmt: skip
    return TrainArgs(**{**base, **kw})


def _losses(path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("optimizer,lr", [("adamw", 3e-3), ("adafactor", None)])
def test_resume_continues_exactly(tmp_path, optimizer, lr, reference_backend):
    whole = _args(tmp_path / "a", optimizer=optimizer, lr=lr)
    train(whole)
    first = _args(tmp_path / "b", optimizer=optimizer, lr=lr, steps=20, save_every=10)
    # Stop after 10 steps: run 20 with a checkpoint at 10, then drop everything after it.
    train(first)
    out = tmp_path / "b" / "run"
    lines = (out / "metrics.jsonl").read_text().splitlines()[:10]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (out / "checkpoint-20").rename(tmp_path / "discarded")
    assert latest_checkpoint(out).name == "checkpoint-10"
    train(_args(tmp_path / "b", optimizer=optimizer, lr=lr, steps=20, save_every=10, resume="latest"))
    assert _losses(out) == _losses(tmp_path / "a" / "run")  # bit for bit
    a = fastseq.from_pretrained(tmp_path / "a" / "run")
    b = fastseq.from_pretrained(out)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_outputs_of_a_run(tmp_path, reference_backend):
    summary = train(_args(tmp_path, steps=12, eval_every=6, save_every=6, grad_accum=2, gradient_checkpointing=True))
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))
    assert any("exact_match" in r for r in records) and "tokens_per_s" in records[4]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-6", "checkpoint-12"}
    assert not list(out.glob(".*tmp*"))  # no temporary directories left behind
    assert (out / "checkpoint-6" / "trainer_state.safetensors").is_file()
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))  # nothing pickled
    assert 0.0 <= summary["exact_match"] <= 1.0
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    T5ForConditionalGeneration.from_pretrained(out)  # the final model loads in transformers
    AutoTokenizer.from_pretrained(out)


def test_seq2seq_file_and_denoise(tmp_path, reference_backend):
    data = tmp_path / "train.jsonl"
    rows = [{"q": f"copy: {w}", "a": w} for w in ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"] * 4]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = train(_args(tmp_path, data=str(data), eval_data=str(data), source_field="q", target_field="a",
                          steps=4, batch_size=4, max_source_length=16, eval_examples=4))  # fmt: skip
    assert "exact_match" in summary
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(f"document number {i} with some words to corrupt" for i in range(10)) + "\n")
    train(_args(tmp_path, data=str(text), task="denoise", steps=3, batch_size=4, max_source_length=32,
                output_dir=str(tmp_path / "denoise")))  # fmt: skip
    assert (tmp_path / "denoise" / "checkpoint-3").is_dir()


def test_bad_options_are_refused(tmp_path, reference_backend):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="no examples"):
        train(_args(tmp_path, data=str(empty)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "a", "target": "b"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        train(_args(tmp_path, data=str(bad)))
    with pytest.raises(ValueError, match="fp16 is refused for T5-family models"):
        train(_args(tmp_path, precision="fp16"))
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        train(_args(tmp_path / "fresh", resume="latest"))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        train(_args(tmp_path, model="t5-small"))


def test_tokenizer_and_model_vocabulary_mismatch(tmp_path, reference_backend):
    from tests.conftest import hf_model

    hf_model("t5_v10_tied").save_pretrained(tmp_path / "model")  # vocabulary of 99
    from fastseq.tokenizers import ByT5Tokenizer

    ByT5Tokenizer().save_pretrained(tmp_path / "model")  # 384 ids
    with pytest.raises(ValueError, match="384 ids but the model's vocabulary has 99"):
        train(_args(tmp_path, model=str(tmp_path / "model")))


def test_yaml_config_and_flags(tmp_path):
    import argparse

    from fastseq.cli import add_train_arguments, train_args

    config = tmp_path / "c.yaml"
    config.write_text("steps: 7\nlr: 0.01\noptimizer: adafactor\nbatch-size: 3\n")
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = train_args(parser.parse_args(["--config", str(config), "--steps", "9"]))
    assert (args.steps, args.lr, args.optimizer, args.batch_size) == (9, 0.01, "adafactor", 3)
    config.write_text("stepz: 7\n")
    with pytest.raises(ValueError, match=r"unknown training option\(s\) \['stepz'\]"):
        train_args(parser.parse_args(["--config", str(config)]))


def test_shipped_training_configs_parse():
    import argparse
    from pathlib import Path

    from fastseq.cli import add_train_arguments, train_args

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    configs = sorted(Path(__file__).parents[1].joinpath("configs", "train").glob("*.yaml"))
    assert configs
    for config in configs:
        args = train_args(parser.parse_args(["--config", str(config)]))
        assert args.task in ("seq2seq", "denoise") and args.steps > 0


def test_file_stream_reads_a_buffer_at_a_time_and_resumes():
    from fastseq.data import DataSource
    from fastseq.train.data import FileStream

    items = [f"example {i} " + "x" * (i % 7) for i in range(23)]
    opened = []

    def reader():
        opened.append(1)
        yield from items

    source = DataSource("items", reader, True, None, None)
    measure = lambda text: (len(text), 0)
    stream = FileStream(source, measure, batch_size=2, max_tokens=None, seed=3, buffer_size=5)
    assert len(stream._examples) == 5  # one buffer in memory, not the file
    epoch = []
    while stream.epoch == 0:
        batch = stream.next_batch()
        if stream.epoch == 0:
            epoch += batch
    assert sorted(epoch) == sorted(items)  # every example once per epoch
    # Resuming from a position mid-epoch gives the same batches after it.
    first = FileStream(source, measure, batch_size=2, max_tokens=None, seed=3, buffer_size=5)
    for _ in range(4):
        first.next_batch()
    state = first.state_dict()
    expected = [first.next_batch() for _ in range(9)]
    again = FileStream(source, measure, batch_size=2, max_tokens=None, seed=3, buffer_size=5)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert [again.next_batch() for _ in range(9)] == expected


@pytest.mark.slow
def test_the_default_run_learns_its_task(tmp_path, reference_backend):
    """The main job as `fastseq train` runs it: at least 90% held-out exact match. Its time depends on
    the machine and its load: `bench/bench_train.py --default-run` measures it, no test asserts it."""
    summary = train(TrainArgs(quiet=True, output_dir=str(tmp_path / "default"), examples_to_show=0))
    assert summary["exact_match"] >= 0.9, summary


@pytest.mark.parametrize("precision,force", [("bf16", False), ("fp16", True)])
def test_mixed_precision_runs(tmp_path, precision, force, reference_backend):
    """bf16 autocast (the GPU default) and forced fp16 with its gradient scaler, here on the CPU."""
    summary = train(_args(tmp_path, steps=3, precision=precision, force_fp16=force, eval_examples=4))
    assert summary["loss"] == summary["loss"] and summary["loss"] < 100  # finite
    model = fastseq.from_pretrained(tmp_path / "run")
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32
