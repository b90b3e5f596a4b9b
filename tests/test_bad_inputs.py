"""Bad input to `fastseq train` (and `convert`), as a new user would give it: each is refused
before any work starts, in one line that names the problem and the fix (exit status 2, no
traceback), and loses nothing. The launcher's side of the same cases is in
tests/distributed/test_bad_inputs.py."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastseq
from fastseq.cli import main
from fastseq.tokenizers import ByT5Tokenizer
from tests.conftest import refused

ROOT = Path(__file__).resolve().parents[1]
# The built-in task, asked for by name so that a --model given with QUICK trains on it (a later --data wins).
QUICK = ["--steps", "3", "--batch-size", "4", "--eval-examples", "4", "--quiet", "--data", "synthetic"]


def _model_dir(path: Path, d_model: int = 64) -> Path:
    """A small T5 v1.1 with the ByT5 vocabulary, saved with its tokenizer."""
    import dataclasses

    from fastseq.models import T5ForConditionalGeneration
    from fastseq.train.engine import default_config

    config = dataclasses.replace(default_config(), d_model=d_model, extra={})
    T5ForConditionalGeneration(config).save_pretrained(path)
    ByT5Tokenizer().save_pretrained(path)
    return path


def _strict_json(line: str):
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON: {line}")

    return json.loads(line, parse_constant=refuse)


# ---- 1 and 5: every count, size, rate and path is checked before any work ----------------------------


def _cases(tmp: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    out = ["--output-dir", str(tmp / "out")]
    plain = tmp / "plain_dir"  # a directory that is not a `datasets` one
    plain.mkdir(exist_ok=True)
    dangling = tmp / "dangling"
    if not dangling.is_symlink():
        dangling.symlink_to(tmp / "nowhere")
    bad_yaml = tmp / "list.yaml"
    bad_yaml.write_text("- steps\n- 3\n")
    typo_yaml = tmp / "typo.yaml"
    typo_yaml.write_text("steps: many\n")
    surrogate = tmp / "surrogate.jsonl"
    surrogate.write_text('{"source": "a", "target": "b"}\n{"source": "x \\ud800", "target": "y"}\n')
    latin1 = tmp / "latin1.jsonl"
    latin1.write_bytes(b'{"source": "caf\xe9", "target": "x"}\n')
    # The text handle decodes in 8 KiB chunks: a bad byte far into the first one was reported at line 1.
    late = tmp / "late.jsonl"
    late.write_bytes(b"".join(b'{"source": "%d", "target": "x"}\n' % i for i in range(64))
                     + b'{"source": "caf\xe9", "target": "x"}\n' * 2)  # fmt: skip
    listed = tmp / "listed"
    listed.mkdir()
    (listed / "config.json").write_text("[1, 2]\n")
    ds_list = tmp / "ds.json"
    ds_list.write_text("[]\n")
    a_file = tmp / "a_file"
    a_file.write_text("x")
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps({"source": f"s{i}", "target": f"t{i}"}) + "\n" for i in range(8)))
    deep = tmp / "deep.jsonl"
    deep.write_text('{"source": "a", "target": "b"}\n{"source": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    bad_eval = tmp / "dev.jsonl"
    bad_eval.write_text('{"source": "a", "target": "b"}\n\n{"source": "a", "target": \n')
    nested = tmp / "nested.jsonl"
    nested.write_text('{"translation": {"en": "a", "fr": "b"}}\n')
    long = tmp / "long.jsonl"
    long.write_text('{"source": "abcdefgh", "target": "x"}\n')  # 9 ByT5 tokens with eos
    fifo = tmp / "fifo"
    os.mkfifo(fifo)
    datasets_dir = tmp / "ds"
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"source": "a", "target": "b"}])}).save_to_disk(
        datasets_dir
    )
    on = ["--data", str(data), *out]
    return {
        "negative batch size": (["--batch-size", "-3", *out], ("--batch-size must be at least 1", "-3")),
        "zero batch size": (["--batch-size", "0", *out], ("--batch-size must be at least 1",)),
        "zero steps": (["--steps", "0", *out], ("--steps must be at least 1",)),
        "zero accumulation": (["--grad-accum", "0", *out], ("--grad-accum must be at least 1",)),
        "zero token budget": (["--max-tokens", "0", *out], ("--max-tokens must be at least 1",)),
        "zero log interval": (["--log-every", "0", *out], ("--log-every must be at least 1",)),
        "NaN learning rate": (["--lr", "nan", *out], ("--lr must be a finite number", "nan")),
        "infinite learning rate": (["--lr", "inf", *out], ("--lr must be a finite number",)),
        "negative learning rate": (["--lr=-1e-3", *out], ("--lr must be a finite number >= 0",)),
        "NaN clipping": (["--clip", "nan", *out], ("--clip must be a finite number",)),
        "adamw without a rate": (["--optimizer", "adamw", *out], ("adamw needs a learning rate", "--lr")),
        "a directory as data": (["--data", str(plain), *out], ("is a directory but not one `datasets.save_to_disk`",)),
        "missing data": (["--data", str(tmp / "nope.jsonl"), *out], ("does not exist",)),
        "a directory as eval data": (["--eval-data", str(plain), *on], ("is a directory but not one",)),
        "steps and epochs": (["--steps", "3", "--epochs", "1", *on], ("--steps and --epochs", "pass one")),
        "zero epochs": (["--epochs", "0", *on], ("--epochs must be a finite number > 0", "0.0")),
        "NaN epochs": (["--epochs", "nan", *on], ("--epochs must be a finite number > 0", "nan")),
        "epochs of the synthetic task": (["--epochs", "2", *out], ("the synthetic task has no end", "--steps")),
        "buffer smaller than a batch": (
            ["--buffer-size", "1", "--batch-size", "4", *on],
            ("--buffer-size 1 is smaller than --batch-size 4", "at least 4"),
        ),
        "data and a dataset name": (["--dataset-name", "x/y", *on], ("--data and --dataset-name", "pass one")),
        "deeply nested JSON": (["--data", str(deep), *out], ("deep.jsonl:2", "nested too deeply")),
        "bad held-out line": (["--eval-data", str(bad_eval), *on], ("dev.jsonl:3", "not valid JSON")),
        "missing nested field": (
            ["--data", str(nested), "--source-field", "translation.en", "--target-field", "translation.de", *out],
            ("nested.jsonl:1", "['translation.de']"),
        ),
        "an example over the token budget": (
            ["--max-tokens", "8", "--data", str(long), *out],
            ("long.jsonl", "an example has 9 tokens on one side", "more than --max-tokens 8", "raise --max-tokens"),
        ),
        "epochs of a pipe": (["--data", str(fifo), "--epochs", "1", *out], ("is a pipe, read once", "--steps")),
        "a split the directory lacks": (
            ["--data", str(datasets_dir), "--train-split", "training", *out],
            ("has the splits ['train'], not 'training'", "--train-split"),
        ),
        "denoise without data": (["--task", "denoise", *out], ("--task denoise needs a text corpus",)),
        "lone surrogate": (["--data", str(surrogate), *out], ("surrogate.jsonl:2", "lone surrogate")),
        "not UTF-8": (["--data", str(latin1), *out], ("latin1.jsonl:1", "not UTF-8", "convert the file")),
        "not UTF-8 on line 65": (["--data", str(late), *out], ("late.jsonl:65: not UTF-8", "convert the file")),
        "a file as output directory": (["--output-dir", str(a_file)], ("is a file; pass a directory",)),
        "YAML list": (["--config", str(bad_yaml), *out], ("expected a mapping of options",)),
        "YAML word for a count": (["--config", str(typo_yaml), *out], ("option steps", "'many' is not a int")),
        "unknown model": (
            ["--model", "t5-smol", "--data", "synthetic", *out],
            ("neither a directory nor a model in the Hugging Face cache", "--random-init"),
        ),  # fmt: skip
        "config.json that is a list": (
            ["--model", str(listed), "--data", "synthetic", *out],
            ("holds a JSON list", "re-save"),
        ),  # fmt: skip
        "a pretrained model without data": (
            ["--model", "t5-small", *out],
            (
                "--model t5-small is fine-tuned on data, and none is given: pass --data FILE",
                "or --data synthetic for the built-in task",
            ),
        ),  # fmt: skip
        "missing tokenizer": (["--tokenizer", str(tmp / "none"), *out], ("--tokenizer", "is not a directory")),
        "no CUDA": (["--device", "cuda", *out], ("--device cuda", "no CUDA device", "--device cpu")),
        "not a device": (["--device", "tpu0", *out], ("--device 'tpu0' is not a device",)),
        "resume nothing": (["--resume", *out], ("no checkpoint to resume from",)),
        "resume a non-directory": (["--resume", str(a_file), *out], ("is not a checkpoint directory",)),
        "resume an empty path": (["--resume", "", *out], ("--resume is given an empty path",)),
        "a dangling link as output directory": (
            ["--output-dir", str(dangling)],
            (f"is a link to {tmp / 'nowhere'}, which does not exist",),
        ),
        "resume and overwrite": (["--resume", "--overwrite", *out], ("pass one",)),
        "missing DeepSpeed config": (["--deepspeed", str(tmp / "ds.nope"), *out], ("--deepspeed", "does not exist")),
        "DeepSpeed config that is a list": (["--deepspeed", str(ds_list), *out], ("JSON object, not a list",)),
    }


CASE_NAMES = [
    "negative batch size", "zero batch size", "zero steps", "zero accumulation", "zero token budget",
    "zero log interval", "NaN learning rate", "infinite learning rate", "negative learning rate", "NaN clipping",
    "adamw without a rate", "a directory as data", "missing data", "a directory as eval data", "steps and epochs",
    "zero epochs", "NaN epochs", "epochs of the synthetic task", "buffer smaller than a batch",
    "data and a dataset name", "deeply nested JSON", "bad held-out line", "missing nested field", "epochs of a pipe",
    "an example over the token budget",
    "a split the directory lacks",
    "denoise without data", "lone surrogate", "not UTF-8", "not UTF-8 on line 65", "a file as output directory",
    "YAML list",
    "YAML word for a count", "unknown model", "config.json that is a list",
    "a pretrained model without data", "missing tokenizer", "no CUDA",
    "not a device", "resume nothing", "resume a non-directory", "resume and overwrite", "missing DeepSpeed config",
    "resume an empty path", "a dangling link as output directory",
    "DeepSpeed config that is a list",
]  # fmt: skip


def test_the_case_table_is_complete(tmp_path):
    assert sorted(_cases(tmp_path)) == sorted(CASE_NAMES)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_a_bad_option_is_one_line_before_any_work(tmp_path, capfd, name):
    if name == "no CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    argv, expected = _cases(tmp_path)[name]
    refused(capfd, ["train", *argv], *expected)
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # nothing was run or written


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="--batch-size must be at least 1"):
        main(["train", "--batch-size", "0", "--debug", "--output-dir", str(tmp_path / "out")])


def test_yaml_numbers_written_as_text_are_numbers(tmp_path):
    import argparse

    from fastseq.cli import add_train_arguments, train_args

    config = tmp_path / "c.yaml"
    config.write_text("lr: 1e-3\nsteps: '12'\nquiet: yes\n")  # YAML 1.1 reads 1e-3 as a string
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = train_args(parser.parse_args(["--config", str(config)]))
    assert (args.lr, args.steps, args.quiet) == (1e-3, 12, True)


def test_the_hang_is_gone_through_the_installed_command(tmp_path):
    """`fastseq train --batch-size -3` hung at full CPU; it is now an immediate one-line error."""
    exe = shutil.which("fastseq")
    argv = [exe, "train", "--batch-size", "-3", "--output-dir", str(tmp_path / "out")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("fastseq train: error: --batch-size must be at least 1")
    assert "Traceback" not in proc.stderr


# ---- 2: another run's files --------------------------------------------------------------------------------


def test_a_fresh_run_refuses_a_used_output_directory_unless_overwrite(tmp_path, capfd):
    out = tmp_path / "out"
    assert main(["train", *QUICK, "--output-dir", str(out)]) == 0
    before = (out / "metrics.jsonl").read_text()
    (out / "notes.txt").write_text("mine")
    capfd.readouterr()
    refused(capfd, ["train", *QUICK, "--output-dir", str(out)], "already holds files", "--overwrite", "--resume")
    assert (out / "metrics.jsonl").read_text() == before  # the other run's log is untouched
    assert main(["train", *QUICK, "--steps", "2", "--overwrite", "--output-dir", str(out)]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]  # the old run's are gone
    assert (out / "notes.txt").read_text() == "mine"  # what a run does not write is kept
    # A directory of the user's under a checkpoint's name is no run's checkpoint: refused, not removed.
    (out / "checkpoint-5").mkdir()
    (out / "checkpoint-5" / "data.txt").write_text("mine")
    refused(capfd, ["train", *QUICK, "--overwrite", "--output-dir", str(out)],
            f"--output-dir {out} holds checkpoint-5, which is not a checkpoint of a run (no trainer_state.json of "
            "fastseq's)",
            "move it out of --output-dir")  # fmt: skip
    assert (out / "checkpoint-5" / "data.txt").read_text() == "mine" and (out / "checkpoint-2").is_dir()
    shutil.rmtree(out / "checkpoint-5")
    (out / "checkpoint-7").mkdir()  # another trainer's: a trainer_state.json without fastseq's format
    (out / "checkpoint-7" / "trainer_state.json").write_text('{"global_step": 7}')
    refused(capfd, ["train", *QUICK, "--overwrite", "--output-dir", str(out)], "holds checkpoint-7, which is not")
    shutil.rmtree(out / "checkpoint-7")
    # Resuming a checkpoint into another used directory is a fresh start there: refused the same way.
    used = tmp_path / "used"
    used.mkdir()
    (used / "x").write_text("theirs")
    argv = ["train", *QUICK, "--steps", "4", "--resume", str(out / "checkpoint-2"), "--output-dir", str(used)]
    refused(capfd, argv, "already holds files")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]


def test_every_file_a_run_writes_has_the_mode_of_a_new_file(tmp_path):
    """safetensors writes its files 0600: the run's weights, checkpoints' optimizer and RNG states and a
    LoRA run's adapters get the mode the umask gives every other file (0644 under umask 022), so that
    the other users of a shared machine who read the run's logs can read its weights too."""
    from fastseq.files import save_safetensors

    old = os.umask(0o027)
    try:
        save_safetensors({"a": torch.zeros(1)}, tmp_path / "x.safetensors")
        assert (tmp_path / "x.safetensors").stat().st_mode & 0o777 == 0o640
        os.umask(0o022)
        out = tmp_path / "out"
        assert main(["train", *QUICK, "--save-every", "2", "--output-dir", str(out)]) == 0
    finally:
        os.umask(old)
    modes = {str(p.relative_to(out)): oct(p.stat().st_mode & 0o777) for p in out.rglob("*") if p.is_file()}
    assert any(name.endswith("rng-0.safetensors") for name in modes) and "model.safetensors" in modes, modes
    assert {name: mode for name, mode in modes.items() if mode != "0o644"} == {}


def test_resume_of_an_output_directory_names_its_latest_checkpoint(tmp_path, capfd):
    out = tmp_path / "out"
    assert main(["train", *QUICK, "--save-every", "2", "--output-dir", str(out)]) == 0
    refused(capfd, ["train", *QUICK, "--resume", str(out), "--output-dir", str(tmp_path / "next")],
            f"--resume: {out} has no trainer_state.json", f"it is a run's output directory: pass --resume "
            f"{out / 'checkpoint-3'} (its latest checkpoint)")  # fmt: skip


def test_resume_refuses_another_runs_checkpoint(tmp_path, capfd):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"source": f"copy {w}", "target": w}) + "\n" for w in "abcdefgh"))
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"source": f"swap {w}", "target": w}) + "\n" for w in "abcdefgh"))
    out = tmp_path / "out"
    assert main(["train", *QUICK, "--data", str(data), "--output-dir", str(out)]) == 0
    capfd.readouterr()
    line = refused(capfd, ["train", *QUICK, "--steps", "5", "--data", str(other), "--resume", "--output-dir",
                            str(out)], "belongs to another run", "data.train")  # fmt: skip
    assert "start a fresh run" in line
    small = _model_dir(tmp_path / "small")  # d_model 64, the default model's is 128
    refused(capfd, ["train", *QUICK, "--steps", "5", "--data", str(data), "--model", str(small), "--resume",
                     str(out / "checkpoint-3"), "--output-dir", str(tmp_path / "elsewhere")],
             "belongs to another run", "model.d_model 128 there, 64 here")  # fmt: skip
    # The same run resumes.
    assert main(["train", *QUICK, "--steps", "5", "--data", str(data), "--resume", "--output-dir", str(out)]) == 0


# ---- 3: NaN and infinity -----------------------------------------------------------------------------------


def test_a_diverging_run_stops_before_saving_and_keeps_valid_metrics(tmp_path, capfd):
    out = tmp_path / "out"
    argv = ["train", "--steps", "6", "--batch-size", "4", "--eval-examples", "4", "--quiet", "--optimizer", "adamw",
            "--lr", "1e30", "--save-every", "1", "--output-dir", str(out)]  # fmt: skip
    line = refused(capfd, argv, "the loss is nan", "stopped before saving anything of it", "checkpoint-1")
    assert "lower --lr" in line
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "metrics.jsonl"]  # no model of the bad step
    records = [_strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]
    model = fastseq.from_pretrained(out / "checkpoint-1")
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- 5: damaged checkpoints --------------------------------------------------------------------------------


def test_damaged_trainer_state_is_one_line(tmp_path, capfd):
    out = tmp_path / "out"
    assert main(["train", *QUICK, "--save-every", "2", "--output-dir", str(out)]) == 0
    state = out / "checkpoint-3" / "trainer_state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    capfd.readouterr()
    refused(capfd, ["train", *QUICK, "--steps", "5", "--resume", "--output-dir", str(out)],
             "trainer_state.safetensors is truncated or corrupted", f"--resume {out / 'checkpoint-2'}")  # fmt: skip
    (out / "checkpoint-3" / "trainer_state.json").write_text('{"step": 3, "da')
    refused(capfd, ["train", *QUICK, "--steps", "5", "--resume", "--output-dir", str(out)],
             "trainer_state.json is truncated or corrupted")  # fmt: skip
    # The earlier checkpoint still resumes.
    assert main(["train", *QUICK, "--steps", "5", "--resume", str(out / "checkpoint-2"), "--output-dir",
                 str(out)]) == 0  # fmt: skip


def _edited_checkpoint(source: Path, to: Path, edit) -> Path:
    shutil.copytree(source, to)
    edit(to / "checkpoint-2")
    return to


def _scheduler_word(checkpoint: Path) -> None:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["engine"]["scheduler"]["last_epoch"] = "abc"
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))


def _rng_of(size: int, dtype: torch.dtype):
    def edit(checkpoint: Path) -> None:
        save_file({"torch": torch.zeros(size, dtype=dtype)}, str(checkpoint / "rng-0.safetensors"))

    return edit


def _optimizer_tensor_longer(checkpoint: Path) -> None:
    state = load_file(checkpoint / "trainer_state.safetensors")
    key = next(k for k in sorted(state) if k.endswith("exp_avg_sq_col"))
    state[key] = torch.zeros(state[key].numel() + 3)
    save_file(state, str(checkpoint / "trainer_state.safetensors"))


@pytest.mark.parametrize("edit,expected", [
    pytest.param(_scheduler_word, "scheduler.last_epoch is 'abc', not a whole number", id="scheduler word"),
    pytest.param(_rng_of(10, torch.uint8), "holds no RNG state of this torch", id="rng too short"),
    pytest.param(_rng_of(5056, torch.float32), "holds no RNG state", id="rng of floats"),
    pytest.param(_optimizer_tensor_longer, "which fits no moment of its parameter of shape", id="optimizer shape"),
])  # fmt: skip
def test_edited_checkpoint_state_is_one_line_before_any_step(tmp_path_factory, tmp_path, capfd, edit, expected):
    """A checkpoint whose state files were edited is refused naming the file, before the first step
    (the schedule's counter, the RNG state and an optimizer moment failed with internal errors)."""
    source = tmp_path_factory.getbasetemp() / "edited-checkpoint-source"
    if not source.is_dir():
        assert main(["train", *QUICK, "--steps", "2", "--save-every", "2", "--output-dir", str(source)]) == 0
        capfd.readouterr()
    out = _edited_checkpoint(source, tmp_path / "out", edit)
    refused(capfd, ["train", *QUICK, "--steps", "4", "--resume", "--output-dir", str(out)], expected,
            str(out / "checkpoint-2"))  # fmt: skip
    assert not (out / "checkpoint-4").exists()


# ---- 6 and 7: model directories ----------------------------------------------------------------------------


@pytest.mark.parametrize("shard", ["../elsewhere/model-00001-of-00001.safetensors", "ABSOLUTE"])
def test_a_shard_index_cannot_point_outside_the_model_directory(tmp_path, capfd, shard):
    source = _model_dir(tmp_path / "model")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = elsewhere / "model-00001-of-00001.safetensors"
    os.replace(source / "model.safetensors", target)
    shard = str(target) if shard == "ABSOLUTE" else shard
    from safetensors import safe_open

    with safe_open(str(target), framework="pt") as handle:
        keys = list(handle.keys())
    (source / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(keys, shard)}))
    expected = ("is not a file name inside", "fix the index's weight_map")
    refused(capfd, ["convert", str(source), str(tmp_path / "dst")], *expected)
    refused(capfd, ["train", *QUICK, "--model", str(source), "--output-dir", str(tmp_path / "out")], *expected)


def without_file_override() -> list[str]:
    """A command prefix under which a chmod 000 file cannot be read: root reads anything, so as root
    the command runs without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: a permission cannot be denied")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"]


def test_unreadable_weights_and_output_directory_say_so(tmp_path):
    source = _model_dir(tmp_path / "model")
    (source / "model.safetensors").chmod(0)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    env = dict(os.environ, PYTHONPATH=str(ROOT), FASTSEQ_BACKEND="reference")
    prefix = without_file_override()
    try:
        runs = {
            "weights": ["convert", str(source), str(tmp_path / "dst")],
            "output": ["train", *QUICK, "--output-dir", str(locked / "run")],
        }
        for what, argv in runs.items():
            proc = subprocess.run([*prefix, sys.executable, "-m", "fastseq.cli", *argv], env=env, capture_output=True,
                                  text=True, timeout=300, check=False)  # fmt: skip
            assert proc.returncode == 2, proc.stderr
            line = proc.stderr.strip().splitlines()[-1]
            assert "Traceback" not in proc.stderr
            if what == "weights":
                assert "exists but cannot be read (Permission denied)" in line and "chmod" in line, line
                assert "corrupted" not in line
            else:
                assert "is not writable (Permission denied)" in line, line
    finally:
        (source / "model.safetensors").chmod(0o644)
        locked.chmod(0o755)


def test_metrics_are_strict_json(tmp_path):
    out = tmp_path / "out"
    assert main(["train", *QUICK, "--output-dir", str(out)]) == 0
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = _strict_json(line)
        assert all(not isinstance(v, float) or math.isfinite(v) for v in record.values())


# ---- model configs, weights and tokenizer files (issue 23): read and checked before any work ---------------


CONFIG_CASES = {
    "relative_attention_num_buckets": (0, "an integer >= 4"),
    "num_layers": (0, "an integer >= 1"),
    "decoder_start_token_id": (-7, "an integer in 0 ... 383"),
    "d_model": ("abc", "an integer >= 1"),
    "relative_attention_max_distance": (0, "an integer >= 17"),
    "num_heads": (0, "an integer >= 1"),
    "layer_norm_epsilon": (-1, "a number in (0.0, inf)"),
    "dropout_rate": (1.5, "a number in [0.0, 1.0)"),
    "tie_word_embeddings": ("yes", "true or false"),
}


@pytest.mark.parametrize("field", list(CONFIG_CASES) + ["d_model 0"])
def test_a_bad_model_config_field_is_one_line_naming_file_field_value_and_range(tmp_path, capfd, field):
    model = _model_dir(tmp_path / "model")
    name, (value, allowed) = (field, CONFIG_CASES[field]) if field in CONFIG_CASES else ("d_model", (0, ">= 1"))
    allowed = "an integer >= 1" if allowed == ">= 1" else allowed
    config = json.loads((model / "config.json").read_text())
    config[name] = value
    (model / "config.json").write_text(json.dumps(config))
    expected = (f"{model / 'config.json'}: {name} is {value!r}; it must be {allowed}",)
    refused(capfd, ["train", *QUICK, "--model", str(model), "--output-dir", str(tmp_path / "out")], *expected)
    if field in ("d_model", "relative_attention_num_buckets"):
        refused(capfd, ["generate", "--model", str(model), "text"], *expected)
        refused(capfd, ["convert", str(model), str(tmp_path / "dst")], *expected)
    assert not (tmp_path / "out").exists() and not (tmp_path / "dst").exists()


def _edit_tensor(model: Path, edit) -> None:
    state = load_file(model / "model.safetensors")
    edit(state)
    save_file(state, model / "model.safetensors", metadata={"format": "pt"})


def test_integer_and_non_finite_weights_are_one_line_naming_the_tensor(tmp_path, capfd):
    model = _model_dir(tmp_path / "model")
    key = "decoder.block.1.layer.2.DenseReluDense.wi_0.weight"
    _edit_tensor(model, lambda s: s.__setitem__(key, s[key].to(torch.int32)))
    out = ["--output-dir", str(tmp_path / "out")]
    refused(capfd, ["train", *QUICK, "--model", str(model), *out], f"weight {key} is stored as int32", "re-save")
    refused(capfd, ["generate", "--model", str(model), "text"], f"weight {key} is stored as int32")
    model = _model_dir(tmp_path / "nan")

    def poison(state):
        state[key][0, 0] = float("nan")

    _edit_tensor(model, poison)
    line = refused(capfd, ["train", *QUICK, "--model", str(model), *out], f"weight {key} holds 1 NaN or infinite",
                    "earlier checkpoint")  # fmt: skip
    assert "--lr" not in line
    assert not (tmp_path / "out" / "metrics.jsonl").exists() and not list((tmp_path / "out").glob("checkpoint-*"))


@pytest.mark.parametrize("damage", ["truncated", "garbage header"])
def test_damaged_safetensors_are_one_line_naming_the_file(tmp_path, capfd, damage):
    """A weights file cut short or with a header that is not JSON: one line naming it, in every command
    that reads weights (the embedding check at train start read it unguarded)."""
    model = _model_dir(tmp_path / "model", d_model=32)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:8] + b"{garbage" + data[16:])
    expected = (f"{weights} is not a readable safetensors file", "re-download or re-save it")
    refused(capfd, ["train", *QUICK, "--model", str(model), "--output-dir", str(tmp_path / "out")], *expected)
    refused(capfd, ["generate", "--model", str(model), "text"], *expected)
    refused(capfd, ["convert", str(model), str(tmp_path / "converted")], *expected)
    assert not (tmp_path / "converted").exists()


def test_an_option_given_twice_in_a_config_is_one_line(tmp_path, capfd):
    """YAML keeps the last of two equal keys without a word: an option given twice in --config, or under
    both spellings, is refused naming both lines (for train and for plan)."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("steps: 1\nlr: 1.0e-3\nsteps: 2\n")
    spellings = tmp_path / "spellings.yaml"
    spellings.write_text("batch_size: 4\nbatch-size: 2\n")
    out = ["--output-dir", str(tmp_path / "out")]
    refused(capfd, ["train", "--config", str(twice), *out],
            f"--config {twice}:3: option steps is given twice (also as steps on line 1); keep one")  # fmt: skip
    refused(capfd, ["train", "--config", str(spellings), *out],
            f"--config {spellings}:2: option batch-size is given twice (also as batch_size on line 1)")  # fmt: skip
    refused(capfd, ["plan", "--gpus", "1", "--config", str(twice)], "option steps is given twice")
    assert not (tmp_path / "out").exists()


def test_configs_nested_beyond_reading_are_one_line(tmp_path, capfd):
    """A DeepSpeed JSON or a YAML --config nested 100,000 deep (RecursionError; the YAML loader took two
    minutes to get there): one line naming the file, at once."""
    deep_json = tmp_path / "deep.json"
    deep_json.write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    deep_yaml = tmp_path / "deep.yaml"
    deep_yaml.write_text("steps: " + "[" * 100_000 + "]" * 100_000 + "\n")
    out = ["--output-dir", str(tmp_path / "out")]
    refused(capfd, ["train", *QUICK, *out, "--deepspeed", str(deep_json)], f"--deepspeed {deep_json}: not valid JSON")
    refused(capfd, ["plan", "--model", "t5-small", "--gpus", "2", "--deepspeed", str(deep_json)],
            f"--deepspeed {deep_json}: not valid JSON")  # fmt: skip
    refused(capfd, ["train", "--config", str(deep_yaml), *out], f"--config {deep_yaml}:1: nested deeper than 32 levels")
    assert not (tmp_path / "out").exists()


def test_ids_past_the_tokenizer_decode_in_generate_and_evaluation(tmp_path, capfd):
    """A model whose vocabulary is padded past its tokenizer's (FLAN-T5: 32,128 ids, 32,100 tokens) and that
    emits only such ids: `generate` prints what transformers decodes (nothing), evaluation scores it."""
    import dataclasses

    from fastseq.models import T5ForConditionalGeneration
    from fastseq.train.engine import default_config

    config = dataclasses.replace(default_config(), d_model=32, d_kv=8, d_ff=32, vocab_size=392, extra={})
    model = T5ForConditionalGeneration(config)
    with torch.no_grad():  # every step's argmax is id 390, past ByT5's 384 ids (never eos), whatever the input:
        model.shared.weight[:, 0] = 100.0  # the residual stream's first coordinate is large and positive,
        model.decoder.final_layer_norm.weight.zero_()
        model.decoder.final_layer_norm.weight[0] = 1.0  # the head sees only that coordinate,
        model.lm_head.weight.zero_()
        model.lm_head.weight[390, 0] = 10.0  # and only id 390's logit grows with it
    path = tmp_path / "padded"
    model.save_pretrained(path)
    ByT5Tokenizer().save_pretrained(path)
    generated = model.generate(torch.tensor([[72, 73, 1]]), max_new_tokens=4)
    assert set(generated[0, 1:].tolist()) == {390}
    assert main(["generate", "--model", str(path), "hi", "--max-new-tokens", "4"]) == 0
    assert capfd.readouterr().out == "\n"
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"source": f"copy {w}", "target": w}) + "\n" for w in "abcdefgh"))
    out = tmp_path / "out"
    argv = ["train", "--model", str(path), "--data", str(data), "--eval-data", str(data), "--eval-every", "1",
            "--steps", "2", "--batch-size", "2", "--quiet", "--optimizer", "adamw", "--lr", "1e-20",
            "--output-dir", str(out)]  # fmt: skip
    assert main(argv) == 0, capfd.readouterr().err
    assert "held-out exact match 0.0%" in capfd.readouterr().out
    assert (out / "checkpoint-2").is_dir()


# ---- issue 23, generate (and the seed and --label-smoothing of train) ------------------------------------


def _generate_cases(tmp: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """argv after `fastseq generate --model DIR` -> what the one error line says."""
    texts = tmp / "in.txt"
    texts.write_text("a\nb\n")
    bad_json = tmp / "bad.jsonl"
    bad_json.write_text('{"source": "a"}\n{"source": "b",\n')
    no_field = tmp / "nofield.jsonl"
    no_field.write_text('{"translation": {"de": "x"}}\n')
    not_text = tmp / "number.jsonl"
    not_text.write_text('{"source": 3}\n')
    latin1 = tmp / "latin1.txt"
    latin1.write_bytes(b"ok\ncaf\xe9\n")
    good = tmp / "good.jsonl"
    good.write_text('{"source": "a", "translation": {"en": "b"}}\n')
    empty = tmp / "empty.txt"
    empty.write_text("")
    return {
        "tpu": (["x", "--device", "tpu"], ("--device 'tpu' is not a device", "use cpu, cuda")),
        "no CUDA": (["x", "--device", "cuda"], ("--device cuda", "no CUDA device", "--device cpu")),
        "a billion new tokens": (["x", "--max-new-tokens", "1e9"],
                                 ("max_new_tokens must be between 1 and 65536", "1000000000")),
        "zero new tokens": (["x", "--max-new-tokens", "0"], ("max_new_tokens must be between 1 and",)),
        "NaN temperature": (["x", "--do-sample", "--temperature", "nan"], ("temperature must be a finite", "nan")),
        "negative top-k": (["x", "--top-k", "-5"], ("top_k must be >= 0", "-5")),
        "zero top-p": (["x", "--top-p", "0"], ("top_p must be in (0, 1]", "got 0.0")),
        "top-p above 1": (["x", "--top-p", "1.5"], ("top_p must be in (0, 1]", "1.5")),
        "zero beams": (["x", "--num-beams", "0"], ("num_beams must be >= 1", "got 0")),
        "zero repetition penalty": (["x", "--repetition-penalty", "0"], ("repetition_penalty must be",)),
        "negative n-gram size": (["x", "--no-repeat-ngram-size", "-1"], ("no_repeat_ngram_size must be >= 0",)),
        "negative min new tokens": (["x", "--min-new-tokens", "-3"], ("min_new_tokens must be >= 0", "-3")),
        "infinite length penalty": (["x", "--num-beams", "2", "--length-penalty", "inf"], ("length_penalty",)),
        "seed of 10^23": (["x", "--seed", str(10**23)], ("--seed must be below 2**64", str(10**23))),
        "negative seed": (["x", "--seed", "-1"], ("--seed must be at least 0",)),
        "zero batch size": (["x", "--batch-size", "0"], ("--batch-size must be at least 1",)),
        "texts and a file": (["x", "--input-file", str(texts)], ("not both",)),
        "missing input file": (["--input-file", str(tmp / "nope.txt")], ("nope.txt does not exist",)),
        "directory as input": (["--input-file", str(tmp)], ("is a directory",)),
        "bad JSON line": (["--input-file", str(bad_json)], ("bad.jsonl:2", "not valid JSON")),
        "missing nested field": (["--input-file", str(no_field), "--input-field", "translation.en"],
                                 ("nofield.jsonl:1", "'translation.en'", "--input-field")),
        "field that is not text": (["--input-file", str(not_text)], ("number.jsonl:1", "is a number, not text")),
        "not UTF-8": (["--input-file", str(latin1)], ("latin1.txt:2", "not UTF-8")),
        "empty input": (["--input-file", str(empty)], ("holds no input",)),
        "output onto the input": (["--input-file", str(texts), "--output-file", str(texts)], ("is --input-file",)),
        "output in a missing directory": (["x", "--output-file", str(tmp / "no" / "out.txt")], ("does not exist",)),
        "output that is a directory": (["x", "--output-file", str(tmp)], ("is a directory",)),
        "output field over the input": (["--input-file", str(good), "--output-field", "source"],
                                        ("--output-field source would replace each record's input (source)",)),
        "output field over a nested input": (["--input-file", str(good), "--input-field", "translation.en",
                                              "--output-field", "translation"], ("(translation.en) with its output",)),
    }  # fmt: skip


GENERATE_CASES = [
    "tpu", "no CUDA", "a billion new tokens", "zero new tokens", "NaN temperature", "negative top-k", "zero top-p",
    "top-p above 1", "zero beams", "zero repetition penalty", "negative n-gram size", "negative min new tokens",
    "infinite length penalty", "seed of 10^23", "negative seed", "zero batch size", "texts and a file",
    "missing input file", "directory as input", "bad JSON line", "missing nested field", "field that is not text",
    "not UTF-8", "empty input", "output onto the input", "output in a missing directory", "output that is a directory",
    "output field over the input", "output field over a nested input",
]  # fmt: skip


@pytest.fixture(scope="module")
def generate_model(tmp_path_factory) -> Path:
    return _model_dir(tmp_path_factory.mktemp("generate") / "model", d_model=32)


def test_the_generate_case_table_is_complete(tmp_path):
    assert sorted(_generate_cases(tmp_path)) == sorted(GENERATE_CASES)


@pytest.mark.parametrize(
    "file,expected",
    [("config.json", "would replace a file of"), ("model.safetensors", "would replace a file of"),
     ("extra.safetensors", "whose loaders would read it as the model's own file")],
)  # fmt: skip
def test_generate_replaces_nothing_the_model_loads(tmp_path, capfd, generate_model, file, expected):
    """--output-file inside --model (or --tokenizer) is refused before anything is read where it would replace
    a file there or add one its loaders read; new predictions beside the model are written."""
    model = tmp_path / "model"
    shutil.copytree(generate_model, model)
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    out = model / file
    refused(capfd, ["generate", "--model", str(model), "x", "--output-file", str(out)],
            f"--output-file {out} {expected} --model {model}" if "replace" in expected else expected,
            "write the outputs to another file")  # fmt: skip
    tokenizer = tmp_path / "tokenizer"
    shutil.copytree(generate_model, tokenizer)
    refused(capfd, ["generate", "--model", str(model), "--tokenizer", str(tokenizer), "x", "--output-file",
                    str(tokenizer / file)], "--tokenizer")  # fmt: skip
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before
    assert main(["generate", "--model", str(model), "x", "--max-new-tokens", "2", "--output-file",
                 str(model / "predictions.txt")]) == 0  # fmt: skip
    assert len((model / "predictions.txt").read_text().splitlines()) == 1


@pytest.mark.parametrize(
    "file,fields,expected",
    [
        ("generation_config.json", {"num_beams": "x"}, "num_beams is 'x'; it must be an integer: fix or remove"),
        ("generation_config.json", {"max_new_tokens": "5"}, "max_new_tokens is '5'; it must be an integer"),
        ("generation_config.json", {"no_repeat_ngram_size": 1.5}, "no_repeat_ngram_size is 1.5; it must be an integer"),
        ("generation_config.json", {"repetition_penalty": "x"}, "repetition_penalty is 'x'; it must be a number"),
        ("generation_config.json", {"min_length": "a"}, "min_length is 'a'; it must be an integer"),
        ("generation_config.json", {"early_stopping": 1}, "early_stopping is 1; it must be true, false or \"never\""),
        ("generation_config.json", {"max_length": -4},
         "max_new_tokens must be between 1 and 65536 (the KV cache is allocated up front); got 0; fix the field, or "
         "pass its flag"),
        ("prediction_config.json", {"source_prefix": 5}, "source_prefix is 5; it must be text: fix or remove"),
        ("prediction_config.json", {"max_source_length": "x"}, "max_source_length is 'x'; it must be an integer >= 1"),
        ("prediction_config.json", {"max_source_length": -3}, "max_source_length is -3; it must be an integer >= 1"),
    ],
)  # fmt: skip
def test_a_model_directorys_bad_generation_settings_name_their_file(tmp_path, capfd, generate_model, file, fields,
                                                                    expected):  # fmt: skip
    """A setting of another type or range in generation_config.json or prediction_config.json is one line
    naming the file and the field (an internal TypeError, or a line that named neither, before)."""
    model = tmp_path / "model"
    shutil.copytree(generate_model, model)
    path = model / file
    settings = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**settings, **fields}))
    refused(capfd, ["generate", "--model", str(model), "x"], f"{path}: {expected}")
    if "max_length" in fields:  # a flag that sets it leaves the file's value unread
        assert main(["generate", "--model", str(model), "x", "--max-new-tokens", "2", "--quiet"]) == 0


def test_a_path_that_is_not_utf8_is_named_not_called_corrupt(tmp_path, capfd, generate_model):
    """safetensors opens only UTF-8 paths: an --output-dir whose name is not UTF-8 is refused before the
    run (its checkpoints could never be resumed), and a model there is an intact file it cannot open, not
    a "truncated or corrupted" one."""
    odd = tmp_path / os.fsdecode(b"bad\xff")
    try:
        odd.mkdir()
        odd.rmdir()
    except OSError:
        pytest.skip("this filesystem takes only UTF-8 names")
    shown = f"{tmp_path}/bad\\xff is not a UTF-8 path, and safetensors opens only UTF-8 paths"
    refused(capfd, ["train", *QUICK, "--output-dir", str(odd)], f"--output-dir: {shown}", "choose a UTF-8 name")
    assert not odd.exists()
    shutil.copytree(generate_model, odd)
    weights = f"{tmp_path}/bad\\xff/model.safetensors is not a UTF-8 path"
    line = refused(capfd, ["generate", "--model", str(odd), "x"], weights, "rename the directory")
    assert "corrupted" not in line


def test_generate_out_of_memory_says_to_cut_the_inputs(tmp_path, capfd, generate_model, monkeypatch):
    """An input too long for memory (a model without prediction_config.json cuts nothing) is one line
    naming its length and --max-source-length, not an internal error (the allocator's failure is made
    here: a real one could bring the machine's out-of-memory killer instead)."""
    from fastseq.models import T5ForConditionalGeneration

    def allocate(self, *args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 123906816016 bytes. Error code 12 (Cannot allocate memory)")  # fmt: skip

    monkeypatch.setattr(T5ForConditionalGeneration, "generate", allocate)
    refused(capfd, ["generate", "--model", str(generate_model), "hello world " * 20],
            "generating for inputs of up to 241 tokens ran out of memory ([enforce fail at alloc_cpu.cpp:117] "
            "DefaultCPUAllocator: can't allocate memory", "pass --max-source-length N to cut the inputs")  # fmt: skip

    def bare(self, *args, **kwargs):  # Python's own, with no message
        raise MemoryError()

    monkeypatch.setattr(T5ForConditionalGeneration, "generate", bare)
    refused(capfd, ["generate", "--model", str(generate_model), "hi"], "ran out of memory (MemoryError)")


def test_generate_refuses_a_tokenizer_past_the_models_vocabulary(tmp_path, capfd, generate_model):
    """A tokenizer with more ids than the model's embedding (here 500 sentinels on ByT5's bytes) is the
    line train gives, not an IndexError from the embedding."""
    tokenizer = tmp_path / "tokenizer"
    ByT5Tokenizer(extra_ids=500).save_pretrained(tokenizer)
    argv = ["generate", "--model", str(generate_model), "--tokenizer", str(tokenizer), "a <extra_id_200> b"]
    refused(capfd, argv, "the tokenizer has 759 ids but the model's vocabulary has 384", "use the tokenizer the model")


@pytest.mark.parametrize("name", GENERATE_CASES)
def test_bad_generate_input_is_one_line(tmp_path, capfd, generate_model, name):
    if name == "no CUDA" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    argv, expected = _generate_cases(tmp_path)[name]
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    refused(capfd, ["generate", "--model", str(generate_model), *argv], *expected)
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # nothing written or lost


def test_generate_with_nothing_on_a_terminal_says_what_to_pass(generate_model, capfd, monkeypatch):
    """No texts, no --input-file and stdin a terminal: an error instead of waiting for typed input."""
    monkeypatch.setattr(sys, "stdin", type("Terminal", (), {"isatty": staticmethod(lambda: True)})())
    refused(capfd, ["generate", "--model", str(generate_model)], "no input", "--input-file", "stdin")


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--seed", str(10**23)], ("--seed must be below 2**64", str(10**23))),
        (["--steps", str(10**30)], ("--steps must be at most 2**40", str(10**30))),
        (["--save-every", str(2**41)], ("--save-every must be at most 2**40", str(2**41))),
        (["--max-source-length", str(10**20)], ("--max-source-length must be at most 2**40", str(10**20))),
        (["--label-smoothing", "1.5"], ("--label-smoothing must be in [0, 1)", "1.5")),
        (["--label-smoothing", "nan"], ("--label-smoothing must be in [0, 1)", "nan")),
        (["--label-smoothing=-0.1"], ("--label-smoothing must be in [0, 1)", "-0.1")),
    ],
)
def test_train_seed_and_label_smoothing_are_checked(tmp_path, capfd, argv, expected):
    refused(capfd, ["train", *argv, "--output-dir", str(tmp_path / "out")], *expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", ["0", "1KB", "9999", "0.000001GB", "5 parsecs"])
def test_a_shard_size_below_the_minimum_is_one_line(tmp_path, capfd, size):
    """--max-shard-size 0 wrote a file per tensor: sizes below 10KB are refused before anything is read."""
    model = _model_dir(tmp_path / "model", d_model=32)
    expected = "is not a size" if "parsecs" in size else "is below the smallest shard size, 10KB"
    refused(capfd, ["convert", str(model), str(tmp_path / "dst"), "--max-shard-size", size],
            f"--max-shard-size {size!r}", expected)  # fmt: skip
    refused(capfd, ["convert", "--from-deepspeed", str(model), "--to", str(tmp_path / "dst"), "--max-shard-size",
                    size], expected)  # fmt: skip
    assert not (tmp_path / "dst").exists()
    assert main(["convert", str(model), str(tmp_path / "ok"), "--max-shard-size", "10KB"]) == 0
    assert len(list((tmp_path / "ok").glob("model-*.safetensors"))) > 1


@pytest.mark.parametrize("argv,expected", [
    (["--max-new-tokens", "100000000"], "evaluation's max_new_tokens must be between 1 and 65536"),
    (["--max-target-length", "100000"], "lower --max-target-length (the default of --max-new-tokens)"),
    (["--num-beams", "2", "--max-new-tokens", str(2**17)], "got 131072: lower --max-new-tokens"),
])  # fmt: skip
def test_evaluation_settings_are_checked_at_start(tmp_path, capfd, argv, expected):
    """--max-new-tokens 100000000 with held-out data trained, checkpointed, then failed at the first
    evaluation: now refused before any work, and without held-out examples it is not used."""
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"source": f"s{i}", "target": f"t{i}"}) + "\n" for i in range(8)))
    out = tmp_path / "out"
    held_out = ["--data", str(data), "--eval-data", str(data), "--eval-every", "1"]
    refused(capfd, ["train", *QUICK, *held_out, *argv, "--output-dir", str(out)], expected)
    assert not out.exists() or not list(out.iterdir())
    assert main(["train", *QUICK, "--steps", "1", "--data", str(data), *argv, "--output-dir", str(out)]) == 0


@pytest.mark.parametrize("field,value", [("num_layers", 10**9), ("vocab_size", 10**12), ("d_model", 10**8)])
def test_a_model_too_large_to_build_is_one_line_with_its_size(tmp_path, capfd, field, value):
    """--random-init of a config with a billion layers (or a trillion-token vocabulary, or d_model 10**8)
    hung, raised an internal error or met the OOM killer: its parameters are counted before anything is
    built, and refused against the machine's memory with the figure."""
    from fastseq.memory import host_memory_gib

    model = _model_dir(tmp_path / "model", d_model=32)
    config = json.loads((model / "config.json").read_text())
    config[field] = value
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    line = refused(capfd, ["train", *QUICK, "--model", str(model), "--random-init", "--device", "cpu", "--output-dir",
                           str(out)], "the model needs", "TiB for its", "parameters (fp32), more than this machine's",
                   f"{host_memory_gib():.1f} GiB", "lower its sizes")  # fmt: skip
    assert "internal error" not in line and not out.exists()
    refused(capfd, ["plan", "--model", str(model), "--gpus", "8", "--cpu-mem", "64"],
            "more than the cluster's GPU and host memory together, 704.0 GiB")  # fmt: skip


def test_a_billion_epochs_build_no_list_per_epoch(tmp_path, capfd):
    """--epochs 1e9 built a list with an entry per epoch (13 GB on a 64-line file): one count serves every
    epoch; with --max-tokens (whose epochs are each counted) and past 2**40 steps it is one line."""
    import tracemalloc

    from fastseq.train.args import TrainArgs
    from fastseq.train.data import build_data

    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"source": f"s{i}", "target": f"t{i}"}) + "\n" for i in range(64)))
    args = TrainArgs(data=str(data), epochs=1e9, batch_size=4, output_dir=str(tmp_path / "out"))
    tracemalloc.start()
    try:
        build_data(args, ByT5Tokenizer(), __import__("fastseq.train.engine").train.engine.default_config())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert args.steps == 16 * 10**9 and peak < 2**26, peak
    out = ["--data", str(data), "--output-dir", str(tmp_path / "out")]
    refused(capfd, ["train", "--epochs", "1e9", "--max-tokens", "64", *out], "at most 10,000 epochs", "--steps")
    refused(capfd, ["train", "--epochs", "1e12", "--batch-size", "4", *out],
            "gives 16,000,000,000,000 steps, more than 2**40")  # fmt: skip
