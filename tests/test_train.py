"""The training loop: resume equality, checkpoints, data files, options and their errors."""

from __future__ import annotations

import json

import pytest
import torch

import fastseq
from fastseq.train import TrainArgs, train
from fastseq.train.state import latest_checkpoint


def _args(tmp_path, **kw) -> TrainArgs:
    base = dict(steps=20, batch_size=8, max_eval_samples=8, quiet=True, output_dir=str(tmp_path / "run"), log_every=5,
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
    assert 0.5 < records[4]["real_token_fraction"] < 1  # padded batches: a few tokens are padding
    assert summary["tokens_per_s"] > 0 and 0.5 < summary["real_token_fraction"] < 1
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
                          steps=4, batch_size=4, max_source_length=16, max_eval_samples=4))  # fmt: skip
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
        train(_args(tmp_path, model="t5-small", random_init=True))


def test_tokenizer_and_model_vocabulary_mismatch(tmp_path, reference_backend):
    from tests.conftest import hf_model

    hf_model("t5_v10_tied").save_pretrained(tmp_path / "model")  # vocabulary of 99
    from fastseq.tokenizers import ByT5Tokenizer

    ByT5Tokenizer().save_pretrained(tmp_path / "model")  # 384 ids
    with pytest.raises(ValueError, match="384 ids but the model's vocabulary has 99"):
        train(_args(tmp_path, model=str(tmp_path / "model"), data="synthetic"))


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
    summary = train(_args(tmp_path, steps=3, precision=precision, force_fp16=force, max_eval_samples=4))
    assert summary["loss"] == summary["loss"] and summary["loss"] < 100  # finite
    model = fastseq.from_pretrained(tmp_path / "run")
    assert next(model.parameters()).dtype == torch.float32  # master weights stay fp32


def test_lr_zero_asks_adafactor_for_its_relative_step_also_when_fine_tuning(tmp_path):
    """`--lr 0` is Adafactor's relative step for a pretrained model too; without --lr a pretrained
    model gets 1e-3, a model from scratch the relative step; AdamW refuses 0."""
    from fastseq.cli import build_parser, train_args

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")

    def rate(*flags: str) -> float | None:
        return train_args(build_parser().parse_args(["train", "--model", str(model), *flags])).learning_rate()

    assert rate("--lr", "0") is None
    assert rate() == 1e-3
    assert rate("--lr", "3e-4") == 3e-4
    assert TrainArgs(lr=None).learning_rate() is None
    with pytest.raises(ValueError, match="adamw needs a learning rate above 0"):
        TrainArgs(optimizer="adamw", lr=0.0).validate()


# ---- data sources through the installed command ------------------------------------------------------

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
CLI_QUICK = ["--batch-size", "4", "--quiet", "--log-every", "1"]


def _rows(n: int) -> list[dict]:
    return [{"translation": {"en": f"copy {WORDS[i % 10]} {i}", "de": f"{WORDS[i % 10]} {i}"}, "id": i}
            for i in range(n)]  # fmt: skip


def _cli(argv: list[str]) -> int:
    from fastseq.cli import main

    return main(["train", *argv])


def _save(kind: str, path, rows: list[dict]):
    import datasets

    if kind == "parquet":
        datasets.Dataset.from_list(rows).to_parquet(path)
    else:
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(path)
    return path


@pytest.mark.slow  # several runs of the installed command
@pytest.mark.parametrize("kind", ["parquet", "datasets"])
def test_parquet_and_datasets_directories_resume_exactly(tmp_path, kind, reference_backend):
    """3 steps, a resume and 3 more give the losses of 6 steps: the stream's position is restored,
    with a buffer smaller than the data so that the position crosses a buffer."""
    data = _save(kind, tmp_path / ("train.parquet" if kind == "parquet" else "train_ds"), _rows(30))
    fields = ["--data", str(data), "--source-field", "translation.en", "--target-field", "translation.de",
              "--buffer-size", "8", *CLI_QUICK]  # fmt: skip
    assert _cli([*fields, "--steps", "6", "--output-dir", str(tmp_path / "whole")]) == 0
    assert _cli([*fields, "--steps", "3", "--output-dir", str(tmp_path / "part")]) == 0
    assert _cli([*fields, "--steps", "6", "--output-dir", str(tmp_path / "part"), "--resume"]) == 0
    assert _losses(tmp_path / "part") == _losses(tmp_path / "whole")
    state = json.loads((tmp_path / "part" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["run"]["data"]["train"] not in ("synthetic", "a pipe, not fingerprinted")


def _hub_cache(home, name: str, rows: dict[str, list[dict]]) -> None:
    """A dataset in the `datasets` cache under `home` as `load_dataset(name)` leaves it there (the
    Arrow files of each split and dataset_info.json), which offline mode reads."""
    import shutil

    script = (
        "import datasets, json, sys\n"
        "rows = json.loads(sys.argv[1])\n"
        "d = datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in rows.items()})\n"
        "d.save_to_disk(sys.argv[2])\n"
    )
    import subprocess
    import sys

    built = home / "built"
    subprocess.run([sys.executable, "-c", script, json.dumps(rows), str(built)], check=True)
    owner, dataset = name.split("/")
    target = home / "datasets" / f"{owner}___{dataset}" / "default" / "0.0.0" / "0123abcd"
    target.mkdir(parents=True)
    info = None
    for split in rows:
        for i, arrow in enumerate(sorted((built / split).glob("*.arrow"))):
            suffix = "" if i == 0 else f"-{i:05d}"
            shutil.copy(arrow, target / f"{dataset}-{split}{suffix}.arrow")
        info = json.loads((built / split / "dataset_info.json").read_text())
    info["splits"] = {s: {"name": s, "num_examples": len(v)} for s, v in rows.items()}
    info["builder_name"], info["config_name"], info["dataset_name"] = "cache", "default", dataset
    (target / "dataset_info.json").write_text(json.dumps(info))


@pytest.mark.slow  # several runs of the installed command
def test_a_hub_dataset_offline_with_nested_fields_prefix_and_epochs(tmp_path):
    """`--dataset-name` resolved by `datasets.load_dataset` from the cache under HF_HOME with
    HF_HUB_OFFLINE=1; translation.en/de fields; a source prefix; --epochs sets the steps."""
    import os
    import subprocess

    _hub_cache(tmp_path / "hf", "someone/tiny-translation", {"train": _rows(12), "validation": _rows(3)})
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "FASTSEQ_BACKEND": "reference"}  # fmt: skip
    argv = ["fastseq", "train", "--dataset-name", "someone/tiny-translation", "--dataset-config-name", "default",
            "--source-field", "translation.en", "--target-field", "translation.de", "--eval-split", "validation",
            "--source-prefix", "translate English to German: ", "--epochs", "2", "--batch-size", "4", "--quiet",
            "--output-dir", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "--epochs 2: 6 steps (3 batches an epoch)" in done.stderr  # 12 examples, 4 a batch
    assert len(_losses(tmp_path / "out")) == 6
    assert "'translate English to German: copy alpha 0' ->" in done.stdout  # the held-out split, prefixed
    state = json.loads((tmp_path / "out" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["run"]["data"]["prefix"] == "translate English to German: "
    assert state["run"]["data"]["train"].startswith("sha256:")  # the cache directory's fingerprint


@pytest.mark.slow  # several runs of the installed command
def test_compressed_json_arrays_bom_csv_and_process_substitution(tmp_path, reference_backend):
    """Each format trains through the command; a pipe (`<(gzip -dc train.jsonl.gz)`) too."""
    import gzip
    import subprocess

    rows = [{"source": r["translation"]["en"], "target": r["translation"]["de"]} for r in _rows(12)]
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "train.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (tmp_path / "train.json").write_text(json.dumps(rows, indent=1))
    (tmp_path / "train.csv").write_bytes(("\ufeffsource,target\n" + "".join(
        f"{r['source']},{r['target']}\n" for r in rows)).encode())  # fmt: skip
    for name in ("train.jsonl.gz", "train.json", "train.csv"):
        out = ["--output-dir", str(tmp_path / name.replace(".", "_"))]
        assert _cli(["--data", str(tmp_path / name), "--steps", "2", *CLI_QUICK, *out]) == 0, name
    # --max-tokens counts the tokenizer's tokens: ByT5 gives a CJK character 3.
    cjk = [{"source": "漢字" * (1 + i % 4), "target": "訳" * (1 + i % 3)} for i in range(12)]
    (tmp_path / "cjk.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in cjk))
    argv = ["--data", str(tmp_path / "cjk.jsonl"), "--max-tokens", "40", "--steps", "3", "--quiet"]
    assert _cli([*argv, "--output-dir", str(tmp_path / "cjk")]) == 0
    command = (f"fastseq train --data <(gzip -dc {tmp_path}/train.jsonl.gz) --steps 2 {' '.join(CLI_QUICK)} "
               f"--output-dir {tmp_path}/piped")  # fmt: skip
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "FASTSEQ_BACKEND": "reference"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(_losses(tmp_path / "piped")) == 2


def test_a_pipe_that_ends_before_the_steps_is_one_line(tmp_path, capfd, reference_backend):
    import os
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    rows = "".join(json.dumps({"source": f"s{i}", "target": f"t{i}"}) + "\n" for i in range(8))
    writer = threading.Thread(target=lambda: fifo.write_text(rows))
    writer.start()
    code = _cli(["--data", str(fifo), "--steps", "5", *CLI_QUICK, "--output-dir", str(tmp_path / "out")])
    writer.join()
    err = capfd.readouterr().err
    assert code == 2, err
    assert "is a pipe, read once, and it ended after 8 examples (one epoch)" in err


def test_truncation_is_counted_and_longt5_defaults_to_its_length(tmp_path, caplog, reference_backend):
    import dataclasses

    from fastseq import presets
    from fastseq.train.data import max_source_length
    from fastseq.train.engine import default_config

    longt5 = presets.config("google/long-t5-tglobal-base")
    assert max_source_length(TrainArgs(), longt5) == 4096
    named = longt5.from_hf_dict({**longt5.to_hf_dict(), "n_positions": 16384})
    assert max_source_length(TrainArgs(), named) == 16384
    assert max_source_length(TrainArgs(), default_config()) == 512
    assert max_source_length(TrainArgs(max_source_length=64), longt5) == 64
    assert dataclasses.fields(TrainArgs)  # the default is None: decided by the model
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"source": "x" * (40 if i % 2 else 5), "target": "y"}) + "\n"
                            for i in range(8)))  # fmt: skip
    with caplog.at_level("WARNING"):
        train(_args(tmp_path, data=str(data), eval_data=str(data), steps=2, batch_size=4, max_source_length=16))
    lines = [r.getMessage() for r in caplog.records if "longer than" in r.getMessage()]
    assert any("(held out): 4 of 8 sources are longer than --max-source-length 16 tokens" in x for x in lines), lines
    assert any(f"--data {data} (8 examples read): 4 of 8 sources" in x for x in lines), lines


def test_epoch_is_reported_by_the_data(tmp_path, reference_backend):
    from fastseq.tokenizers import ByT5Tokenizer
    from fastseq.train.data import build_data
    from fastseq.train.engine import default_config

    data_file = tmp_path / "d.jsonl"
    data_file.write_text("".join(json.dumps({"source": f"s{i}", "target": "t"}) + "\n" for i in range(10)))
    args = _args(tmp_path, data=str(data_file), batch_size=5, epochs=1.5, grad_accum=1)
    data = build_data(args, ByT5Tokenizer(), default_config())
    assert args.steps == 3  # 2 batches an epoch, 1.5 epochs
    assert data.epoch == 0.0
    data.micro_batch(1, 0)
    data.micro_batch(1, 0)
    assert data.epoch == 1.0  # known after the first pass
    data.micro_batch(1, 0)
    assert data.epoch == 1.5
    synthetic = build_data(_args(tmp_path), ByT5Tokenizer(), default_config())
    assert synthetic.epoch is None


def test_pack_builds_packed_batches_for_every_task_and_refuses_what_cannot_pack(tmp_path):
    from fastseq import presets
    from fastseq.data import Seq2SeqCollator
    from fastseq.tokenizers import ByT5Tokenizer
    from fastseq.train.data import build_data
    from fastseq.train.engine import default_config

    assert TrainArgs.from_dict({"pack": "yes"}).pack and not TrainArgs().pack
    with pytest.raises(ValueError, match="option pack: 2 is not a bool"):
        TrainArgs.from_dict({"pack": 2})
    rows = [{"source": f"question {i} " + "words " * (i % 9), "target": f"answer {i}"} for i in range(40)]
    data_file = tmp_path / "d.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"document {i} " + "text " * (i % 6) + "\n" for i in range(40)))
    tok, config = ByT5Tokenizer(), default_config()
    runs = {"file": dict(data=str(data_file), eval_data=str(data_file)), "synthetic": {},
            "denoise": dict(data=str(corpus), task="denoise")}  # fmt: skip
    for name, options in runs.items():
        args = _args(tmp_path, pack=True, batch_size=2, max_source_length=64, max_target_length=32, **options)
        data = build_data(args, tok, config)
        batch, (real, padded) = data.micro_batch(1, 0)
        assert batch["segment_ids"].shape[0] == 2 and batch["segment_ids"].max() > 1, name  # rows of examples
        assert batch["input_ids"].shape[1] <= 64 and batch["labels"].shape[1] <= 32, name
        assert real == int((batch["segment_ids"] > 0).sum() + (batch["decoder_segment_ids"] > 0).sum()), name
        assert padded == batch["input_ids"].numel() + batch["labels"].numel() >= real, name
        assert data.eval_collator is None or type(data.eval_collator) is Seq2SeqCollator  # evaluation unpacked
        assert (data.epoch is None) == (name == "synthetic"), name
    longt5 = presets.config("google/long-t5-local-base")
    with pytest.raises(ValueError, match="LongT5 model does not pack; train it without --pack"):
        build_data(_args(tmp_path, pack=True, data=str(data_file)), tok, longt5)
    # BlenderbotSmall's positions restart per example: an example may be as long as the table, not longer.
    blenderbot = presets.config("facebook/blenderbot_small-90M", max_position_embeddings=128)
    with pytest.raises(ValueError, match="past the model's max_position_embeddings 128; lower those lengths to at"):
        build_data(_args(tmp_path, pack=True, data=str(data_file), max_source_length=256), tok, blenderbot)
    args = _args(tmp_path, pack=True, data=str(data_file), batch_size=2, max_source_length=128, max_target_length=64)
    batch, _ = build_data(args, tok, blenderbot).micro_batch(1, 0)
    assert batch["positions"].max() < 128


@pytest.mark.parametrize("task", ["seq2seq", "synthetic", "denoise"])
def test_a_packed_run_resumes_exactly(tmp_path, task, reference_backend):
    options = dict(pack=True, steps=6, batch_size=2, buffer_size=40, max_source_length=48, max_target_length=16,
                   log_every=1, max_eval_samples=4)  # fmt: skip
    if task == "seq2seq":
        data = tmp_path / "d.jsonl"
        data.write_text("".join(json.dumps({"source": f"copy: {i} " + "ab " * (i % 9), "target": f"{i}"}) + "\n"
                                for i in range(60)))  # fmt: skip
        options.update(data=str(data), eval_data=str(data))
    elif task == "denoise":
        data = tmp_path / "c.txt"
        data.write_text("".join(f"document {i} " + "some words " * (i % 5) + "\n" for i in range(60)))
        options.update(data=str(data), task="denoise")
    train(_args(tmp_path / "a", **options))
    train(_args(tmp_path / "b", **{**options, "steps": 3}))
    train(_args(tmp_path / "b", **options, resume="latest"))
    assert _losses(tmp_path / "b" / "run") == _losses(tmp_path / "a" / "run")  # bit for bit
    records = [json.loads(line) for line in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["real_token_fraction"] <= 1 for r in records if "loss" in r)
