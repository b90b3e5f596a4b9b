"""A run loses nothing (issue 23): an output directory apart from the run's inputs and locked while
a run uses it, a checkpoint of the last completed step when anything fails mid-run, resume checks
(options, engine, ranks, the data's whole-file fingerprint, a damaged trainer state), a full disk,
and signals (SIGHUP, a second Ctrl-C, Ctrl-C during evaluation or start-up). Each through the CLI:
one line, exit status 2 (or 128 + the signal), nothing lost."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fastseq.cli import main
from fastseq.files import LOCK_FILE, DirectoryLock, fingerprint
from fastseq.train import loop
from tests.conftest import refused
from tests.test_bad_inputs import QUICK, ROOT, _model_dir

ADAMW = ["--optimizer", "adamw", "--lr", "1e-3"]


def _snapshot(*dirs: Path) -> dict[str, bytes]:
    """Every file under `dirs`, by path: what must not change."""
    return {str(f): f.read_bytes() for d in dirs for f in sorted(Path(d).rglob("*")) if f.is_file()}


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in _records(out) if "loss" in r]


def _jsonl(path: Path, rows: int, bad_line: int | None = None) -> Path:
    lines = [json.dumps({"source": f"copy {i} {'x' * (i % 5)}", "target": f"{i}"}) for i in range(rows)]
    if bad_line is not None:
        lines[bad_line - 1] = '{"source": "a", "target'
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """The fingerprint cache of these tests is their own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


# ---- the output directory is apart from the inputs ---------------------------------------------------------


@pytest.mark.parametrize(
    "case", ["model is output", "model inside output", "output inside model", "tokenizer is output",
             "resume is output", "data inside output"],
)  # fmt: skip
@pytest.mark.parametrize("overwrite", [True, False])
def test_an_output_directory_overlapping_an_input_is_refused(tmp_path, capfd, case, overwrite):
    model = _model_dir(tmp_path / "model")
    run = tmp_path / "x"
    _model_dir(run / "checkpoint-3")
    (run / "checkpoint-3" / "trainer_state.json").write_text("{}")
    data = _jsonl(run / "train.jsonl", 8)
    argv = {
        "model is output": ["--model", str(model), "--output-dir", str(model)],
        "model inside output": ["--model", str(run / "checkpoint-3"), "--output-dir", str(run)],
        "output inside model": ["--model", str(model), "--output-dir", str(model / "run")],
        "tokenizer is output": ["--tokenizer", str(model), "--output-dir", str(model)],
        "resume is output": ["--resume", str(run / "checkpoint-3"), "--output-dir", str(run / "checkpoint-3")],
        "data inside output": ["--data", str(data), "--output-dir", str(run)],
    }[case]
    before = _snapshot(model, run)
    expected = {"model is output": "is --model", "model inside output": "holds --model",
                "output inside model": "lies inside --model", "tokenizer is output": "is --tokenizer",
                "resume is output": "is --resume",
                "data inside output": "holds --data"}[case]  # fmt: skip
    refused(capfd, ["train", *QUICK, *argv, *(["--overwrite"] if overwrite else [])], expected,
             "choose an --output-dir outside the run's inputs")  # fmt: skip
    assert _snapshot(model, run) == before  # nothing deleted, nothing written
    assert not (model / "run").exists()


def _nan_model(path: Path) -> Path:
    from safetensors.torch import load_file, save_file

    _model_dir(path)
    state = load_file(path / "model.safetensors")
    next(iter(state.values())).view(-1)[0] = float("nan")
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("bad", ["held-out line 1", "data line 1", "NaN weights"])
def test_overwrite_deletes_nothing_until_every_check_has_passed(tmp_path, capfd, bad):
    """--overwrite removed the old run's checkpoints and model, then the run stopped on its bad
    --eval-data, --data or --model: now nothing is removed until all of them have been read."""
    out = tmp_path / "out"
    assert main(["train", *QUICK, "--save-every", "2", "--output-dir", str(out)]) == 0
    before = _snapshot(out)
    assert {"checkpoint-2", "checkpoint-3", "model.safetensors"} <= {p.name for p in out.iterdir()}
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"source": "a", "target\n{"source": "b", "target": "c"}\n')
    argv = {
        "held-out line 1": ["--data", str(_jsonl(tmp_path / "t.jsonl", 8)), "--eval-data", str(broken)],
        "data line 1": ["--data", str(broken)],
        "NaN weights": ["--model", str(_nan_model(tmp_path / "nan"))],
    }[bad]
    expected = "holds 1 NaN" if bad == "NaN weights" else "broken.jsonl:1"
    capfd.readouterr()
    refused(capfd, ["train", *QUICK, *argv, "--overwrite", "--output-dir", str(out)], expected)
    assert _snapshot(out) == before  # the old run's checkpoints, model and log, byte for byte


# ---- the output directory is locked ------------------------------------------------------------------------


def _lock(out: Path, pid: int, host: str | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_FILE).write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid, "start": None}))


def test_a_locked_output_directory_is_refused_and_a_stale_lock_taken_over(tmp_path, capfd, caplog):
    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        _lock(out, sleeper.pid)
        line = refused(capfd, ["train", *QUICK, "--output-dir", str(out)], "is in use by another run",
                        f"PID {sleeper.pid} on {socket.gethostname()}")  # fmt: skip
        assert "remove" in line and LOCK_FILE in line
        _lock(out, 12345, host="elsewhere.example")  # another host's: its PID cannot be checked from here
        refused(capfd, ["train", *QUICK, "--output-dir", str(out)], "PID 12345 on elsewhere.example")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing was written
    finally:
        sleeper.kill()
        sleeper.wait()
    _lock(out, sleeper.pid)  # that process is gone: its lock is stale
    with caplog.at_level("WARNING", logger="fastseq.files"):
        assert main(["train", *QUICK, "--output-dir", str(out)]) == 0
    assert f"took over the lock of PID {sleeper.pid}" in caplog.text
    assert not (out / LOCK_FILE).exists() and (out / "checkpoint-3").is_dir()  # released at the end


@pytest.mark.parametrize("pid", [2**80, -1, 0])
def test_a_lock_that_names_no_process_is_refused_in_one_line(tmp_path, capfd, pid):
    """A lock whose PID is no process ID (2**80 raised OverflowError; 0 and -1 name process groups to
    os.kill): refused as unreadable, the lock left where it is for the user to remove."""
    out = tmp_path / "out"
    _lock(out, pid)
    refused(capfd, ["train", *QUICK, "--output-dir", str(out)], "is locked by", f"remove {out / LOCK_FILE}")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]


def test_a_signal_arriving_as_the_lock_is_taken_leaves_no_lock(tmp_path, monkeypatch):
    """SIGINT sent while the lock file is written waits until the file is complete, then interrupts
    `acquire` before its caller holds the lock: the scope around the run still removes it."""
    out = tmp_path / "out"
    out.mkdir()
    write = os.fdopen

    def fdopen_then_sigint(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # held until the lock is complete
        return write(*args, **kwargs)

    monkeypatch.setattr(os, "fdopen", fdopen_then_sigint)
    # Python's own SIGINT handler, whatever this process inherited (a job that a non-interactive shell
    # starts in the background has SIGINT ignored).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt), DirectoryLock.scope():
            DirectoryLock.acquire(out)
            raise AssertionError("the signal should have interrupted acquire")
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert list(out.iterdir()) == []
    monkeypatch.undo()
    with DirectoryLock.scope():  # a lock released by its holder inside the scope is not touched again
        lock = DirectoryLock.acquire(out)
        lock.release()
        other = DirectoryLock.acquire(out)
        assert (out / LOCK_FILE).exists()
    assert list(out.iterdir()) == [] and other.path == out / LOCK_FILE


def test_a_second_run_is_refused_while_the_first_runs_and_sighup_checkpoints(tmp_path, capfd):
    """SIGHUP (a closed SSH session) ends the run as SIGTERM does: a checkpoint, then exit 128 + 1.
    While it ran, a second run in its directory got one line."""
    from tests.test_cli import wait_for_steps

    out = tmp_path / "out"
    proc = subprocess.Popen([shutil.which("fastseq"), "train", "--steps", "100000", *QUICK[2:], *ADAMW,
                             "--output-dir", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        wait_for_steps(out, 2, proc)
        refused(capfd, ["train", *QUICK, "--resume", "--output-dir", str(out)], "in use by another run",
                 f"PID {proc.pid}")  # fmt: skip
        proc.send_signal(signal.SIGHUP)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGHUP, stderr
    stopped = len(_losses(out))
    assert f"stopped by SIGHUP after step {stopped}; continue with the same command and --resume" in stdout
    assert (out / f"checkpoint-{stopped}" / "trainer_state.json").is_file() and "Traceback" not in stderr
    assert not (out / LOCK_FILE).exists()


# ---- a failure mid-run saves the last completed step -------------------------------------------------------


def test_bad_json_mid_file_saves_the_last_completed_step(tmp_path, capfd):
    """Line 21 is read with the sixth buffer of four examples: steps 1-5 are done, and kept."""
    data = _jsonl(tmp_path / "train.jsonl", 40, bad_line=21)
    out = tmp_path / "out"
    common = [*QUICK[2:], "--buffer-size", "4", *ADAMW, "--eval-examples", "0"]
    line = refused(capfd, ["train", "--steps", "8", *common, "--data", str(data), "--output-dir", str(out)],
                    "train.jsonl:21", f"the run's state after step 5 is saved in {out / 'checkpoint-5'}",
                    "--resume")  # fmt: skip
    assert line.startswith("fastseq train: error:")
    assert json.loads((out / "checkpoint-5" / "trainer_state.json").read_text())["step"] == 5
    assert [r["step"] for r in _records(out)] == [1, 2, 3, 4, 5] and not (out / LOCK_FILE).exists()
    assert f"start a new run from it with --model {out / 'checkpoint-5'}" in line  # fixing the line changes the data
    assert main(["train", "--steps", "2", *common, "--data", str(_jsonl(tmp_path / "good.jsonl", 40)), "--model",
                 str(out / "checkpoint-5"), "--output-dir", str(tmp_path / "again")]) == 0  # fmt: skip


def test_an_error_in_evaluation_keeps_the_evaluated_step(tmp_path, capfd, monkeypatch):
    """Evaluation at step 4 runs after step 4's optimizer step: its failure leaves checkpoint-4, and
    resuming from it gives the losses of a run that never failed."""
    evaluate = loop._Run.evaluate

    def failing(self, step):
        if step == 4:
            raise ValueError("the metric failed on a held-out example")
        return evaluate(self, step)

    common = [*QUICK[2:], *ADAMW, "--eval-every", "2", "--steps", "6"]
    out = tmp_path / "out"
    monkeypatch.setattr(loop._Run, "evaluate", failing)
    refused(capfd, ["train", *common, "--output-dir", str(out)], "the metric failed",
             f"the run's state after step 4 is saved in {out / 'checkpoint-4'}")  # fmt: skip
    monkeypatch.setattr(loop._Run, "evaluate", evaluate)
    assert [r["step"] for r in _records(out) if "loss" in r] == [1, 2, 3, 4]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    assert main(["train", *common, "--resume", "--output-dir", str(out)]) == 0
    straight = tmp_path / "straight"
    assert main(["train", *common, "--output-dir", str(straight)]) == 0
    assert _losses(out) == _losses(straight)  # bit for bit


def test_a_data_file_deleted_before_the_next_epoch(tmp_path, capfd, monkeypatch):
    data = _jsonl(tmp_path / "train.jsonl", 8)  # two steps of 4 per epoch
    step = loop._Run.step

    def deleting(self, done, signals):
        result = step(self, done, signals)
        if done == 2:
            data.unlink()
        return result

    monkeypatch.setattr(loop._Run, "step", deleting)
    out = tmp_path / "out"
    common = [*QUICK[2:], *ADAMW, "--steps", "5", "--eval-examples", "0"]
    refused(capfd, ["train", *common, "--data", str(data), "--output-dir", str(out)],
             "train.jsonl", f"after step 2 is saved in {out / 'checkpoint-2'}")  # fmt: skip
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    # The same file back: the run continues as if it had never failed.
    monkeypatch.setattr(loop._Run, "step", step)
    _jsonl(data, 8)
    assert main(["train", *common, "--data", str(data), "--resume", "--output-dir", str(out)]) == 0
    straight = tmp_path / "straight"
    assert main(["train", *common, "--data", str(data), "--output-dir", str(straight)]) == 0
    assert _losses(out) == _losses(straight)  # bit for bit


# ---- resume ------------------------------------------------------------------------------------------------


def test_resume_applies_a_new_rate_and_refuses_another_optimizer(tmp_path, capfd, caplog):
    out = tmp_path / "out"
    base = ["train", *QUICK, "--eval-examples", "0", "--output-dir", str(out)]
    assert main([*base, *ADAMW]) == 0
    capfd.readouterr()
    refused(capfd, [*base, "--steps", "5", "--resume", "--optimizer", "adafactor"],
             "was trained with --optimizer adamw and this run asks for --optimizer adafactor",
             "resume with --optimizer adamw")  # fmt: skip
    with caplog.at_level("WARNING", logger="fastseq.train"):
        assert main([*base, "--steps", "5", "--resume", "--optimizer", "adamw", "--lr", "5e-4",
                     "--weight-decay", "0.01"]) == 0  # fmt: skip
    assert "--lr 0.0005 replaces the checkpoint's 0.001 from step 4 on" in caplog.text
    assert "--weight-decay 0.01 replaces the checkpoint's 0.0 from step 4 on" in caplog.text
    assert [r["lr"] for r in _records(out) if "loss" in r] == [1e-3] * 3 + [5e-4] * 2
    state = json.loads((out / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["optimizer"] == {"name": "adamw", "lr": 5e-4, "weight_decay": 0.01}
    # Adafactor's relative step size and a fixed rate are different optimizers too.
    relative = tmp_path / "relative"
    assert main(["train", *QUICK, "--eval-examples", "0", "--output-dir", str(relative)]) == 0
    capfd.readouterr()
    refused(capfd, ["train", *QUICK, "--steps", "5", "--lr", "1e-3", "--resume", "--output-dir", str(relative)],
             "Adafactor steps with its relative step size (no --lr)", "resume without --lr")  # fmt: skip


def _tampered(out: Path, checkpoint: int, **fields) -> None:
    file = out / f"checkpoint-{checkpoint}" / "trainer_state.json"
    state = json.loads(file.read_text())
    state.update(fields)
    file.write_text(json.dumps(state))


def test_resume_refuses_another_engine_or_number_of_ranks(tmp_path, capfd):
    out = tmp_path / "out"
    assert main(["train", *QUICK, "--eval-examples", "0", "--output-dir", str(out)]) == 0
    capfd.readouterr()
    argv = ["train", *QUICK, "--steps", "5", "--eval-examples", "0", "--resume", "--output-dir", str(out)]
    _tampered(out, 3, engine_kind="DeepSpeed ZeRO-2", world_size=2, engine={},
              args={"deepspeed": "configs/deepspeed/zero2.json"})  # fmt: skip
    refused(capfd, argv, "written by DeepSpeed ZeRO-2 on 2 ranks, and this run is one process on 1 rank",
             "resume it under the `deepspeed` launcher (--num_gpus 2) with --deepspeed configs/deepspeed/zero2.json",
             )  # fmt: skip
    _tampered(out, 3, engine_kind="one process", world_size=3)
    refused(capfd, argv, "written by one process on 3 ranks, and this run is one process on 1 rank")
    assert [r["step"] for r in _records(out)] == [1, 2, 3]  # nothing lost


@pytest.mark.parametrize(
    "field,value,expected",
    [("step", -5, "step is -5, not a whole number >= 0"), ("step", "3", "step is '3', not a whole number"),
     ("step", 2, "records step 2 in checkpoint-3"), ("world_size", 0, "world_size is 0, not a whole number >= 1"),
     ("data", [], "data is [], not an object"), ("run", None, "run is None, not an object"),
     ("optimizer", {"name": "adamw", "lr": -1, "weight_decay": 0}, "optimizer is"),
     ("data", {"stream": {"rng": "abc"}}, "data holds no data position")],
)  # fmt: skip
def test_a_tampered_trainer_state_is_one_line_naming_the_file(tmp_path, capfd, field, value, expected):
    out = tmp_path / "out"
    assert main(["train", *QUICK, "--eval-examples", "0", "--save-every", "2", "--output-dir", str(out)]) == 0
    capfd.readouterr()
    _tampered(out, 3, **{field: value})
    before = _snapshot(out)
    line = refused(capfd, ["train", *QUICK, "--steps", "5", "--resume", "--output-dir", str(out)], expected)
    assert "trainer_state.json" in line and f"--resume {out / 'checkpoint-2'}" in line
    assert _snapshot(out) == before  # metrics.jsonl and the checkpoints as they were


def test_missing_or_damaged_checkpoint_files_point_to_the_earlier_checkpoint(tmp_path, capfd):
    out = tmp_path / "out"
    assert main(["train", *QUICK, "--eval-examples", "0", "--save-every", "2", "--output-dir", str(out)]) == 0
    capfd.readouterr()
    argv = ["train", *QUICK, "--steps", "5", "--resume", "--output-dir", str(out)]
    state = out / "checkpoint-3" / "trainer_state.safetensors"
    saved = state.read_bytes()
    state.unlink()
    refused(capfd, argv, f"{state} is missing", f"--resume {out / 'checkpoint-2'}")
    state.write_bytes(saved)
    weights = out / "checkpoint-3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    line = refused(capfd, argv, "model.safetensors", f"--resume {out / 'checkpoint-2'}")
    assert "re-download" not in line
    # A newer checkpoint directory without trainer_state.json is said, not skipped.
    (out / "checkpoint-9").mkdir()
    refused(capfd, argv, f"{out / 'checkpoint-9'}, the latest checkpoint", "has no trainer_state.json",
             f"--resume {out / 'checkpoint-3'}")  # fmt: skip
    assert main(["train", *QUICK, "--steps", "5", "--resume", str(out / "checkpoint-2"), "--output-dir",
                 str(out)]) == 0  # fmt: skip


def test_the_fingerprint_is_of_every_byte_and_cached(tmp_path, capfd):
    data = tmp_path / "train.jsonl"
    rows = [{"source": f"copy {i}", "target": str(i), "pad": "x" * 2**20} for i in range(3)]  # 3 MiB
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    argv = ["train", *QUICK, "--batch-size", "2", "--eval-examples", "0", "--data", str(data), "--output-dir", str(out)]
    assert main(argv) == 0
    capfd.readouterr()
    raw = bytearray(data.read_bytes())
    middle = len(raw) // 2  # inside the second row's padding: neither the first nor the last MiB
    raw[middle : middle + 1] = b"y"
    data.write_bytes(bytes(raw))
    refused(capfd, [*argv[:-2], "--steps", "5", "--resume", "--output-dir", str(out)], "belongs to another run",
             "data.train")  # fmt: skip
    # Cached by size, mtime and inode: the same stamp is not read again; a new mtime is.
    first = fingerprint(data)
    stat = data.stat()
    raw[middle : middle + 1] = b"z"
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fingerprint(data) == first
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert fingerprint(data) != first
    # A directory: every file under it, with its name.
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jsonl").write_text("1\n")
    (folder / "sub" / "b.jsonl").write_text("2\n")
    whole = fingerprint(folder)
    (folder / "sub" / "b.jsonl").write_text("3\n")
    assert fingerprint(folder) != whole
    (folder / "sub" / "b.jsonl").write_text("2\n")
    assert fingerprint(folder) == whole
    (folder / "sub" / "b.jsonl").rename(folder / "sub" / "c.jsonl")
    assert fingerprint(folder) != whole


# ---- a full disk -------------------------------------------------------------------------------------------


def test_a_full_disk_is_one_line_and_keeps_the_earlier_checkpoint(tmp_path, capfd, monkeypatch):
    save_rng = loop.save_rng
    calls = []

    def full_disk(directory, rank, states=None):
        calls.append(directory)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory / "rng-0.safetensors"))
        save_rng(directory, rank, states)

    monkeypatch.setattr(loop, "save_rng", full_disk)
    out = tmp_path / "out"
    line = refused(capfd, ["train", *QUICK, "--steps", "6", "--save-every", "2", "--output-dir", str(out)],
                    f"no space left to write {out / 'checkpoint-4'} (No space left on device)",
                    "a checkpoint needs about", f"the last checkpoint, {out / 'checkpoint-2'}, is intact")  # fmt: skip
    assert "internal error" not in line and "saved in" not in line
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "metrics.jsonl"]  # no temporary directory
    monkeypatch.setattr(loop, "save_rng", save_rng)
    assert main(["train", *QUICK, "--steps", "6", "--save-every", "2", "--resume", "--output-dir", str(out)]) == 0


def test_a_file_size_limit_is_one_line(tmp_path):
    """Under `ulimit -f` (1 MiB) the checkpoint's weights (4 MiB) cannot be written: File too large."""

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT), FASTSEQ_BACKEND="reference")
    proc = subprocess.run([sys.executable, "-m", "fastseq.cli", "train", *QUICK, "--output-dir", str(out)], env=env,
                          capture_output=True, text=True, timeout=600, preexec_fn=limited, check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fastseq ")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "File too large" in lines[0] and "file-size limit (ulimit -f)" in lines[0], lines[0]
    assert not [p for p in out.iterdir() if "checkpoint" in p.name]  # nothing half-written
    assert not (out / LOCK_FILE).exists()


def test_a_file_size_limit_at_start_names_the_file(tmp_path):
    """Under `ulimit -f 1` the run fails at start, writing the tokenizer's files that its identity
    fingerprints: the line said only "File too large"; now it names the file and what wrote it."""

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))  # `ulimit -f 1`: one 1024-byte block

    env = dict(os.environ, PYTHONPATH=str(ROOT), FASTSEQ_BACKEND="reference", TMPDIR=str(tmp_path))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fastseq.cli", "train", *QUICK, "--output-dir", str(out)], env=env,
                          capture_output=True, text=True, timeout=600, preexec_fn=limited, check=False)  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fastseq ")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith(f"fastseq train: error: {tmp_path}/tmp"), lines[0]
    assert ".json: File too large; the run's identity fingerprints the tokenizer's files" in lines[0], lines[0]
    assert "ulimit -f" in lines[0] and not (out / LOCK_FILE).exists()


# ---- signals -----------------------------------------------------------------------------------------------


def test_a_second_ctrl_c_exits_at_once_and_keeps_the_last_checkpoint(tmp_path, capfd, monkeypatch):
    """The first SIGINT asks for a checkpoint after step 2; a second one while it is written ends
    the run at once: exit 130, one line, checkpoint-1 as it was, nothing half-written."""
    step, save_rng = loop._Run.step, loop.save_rng

    def interrupted_step(self, done, signals):
        if done == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, done, signals)

    def interrupted_save(directory, rank, states=None):
        if directory.name.startswith(".checkpoint-2"):
            os.kill(os.getpid(), signal.SIGINT)
        save_rng(directory, rank, states)

    monkeypatch.setattr(loop._Run, "step", interrupted_step)
    monkeypatch.setattr(loop, "save_rng", interrupted_save)
    out = tmp_path / "out"
    code = main(["train", *QUICK, "--steps", "5", "--save-every", "1", "--output-dir", str(out)])
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fastseq ")]
    assert code == 130 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("fastseq train: interrupted; stopped at once, without a checkpoint")
    assert f"the last checkpoint, {out / 'checkpoint-1'}, is intact" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "metrics.jsonl"]


def test_ctrl_c_during_evaluation_stops_it_at_the_next_batch(tmp_path, capfd, monkeypatch):
    evaluate, batches = loop._Run.evaluate, []

    def interrupted(self, step):
        inner = self.data.eval_collator.collator
        self.data.eval_collator.collator = lambda examples: batches.append(len(examples)) or inner(examples)
        os.kill(os.getpid(), signal.SIGINT)
        return evaluate(self, step)

    monkeypatch.setattr(loop._Run, "evaluate", interrupted)
    out = tmp_path / "out"
    code = main(["train", *QUICK, "--steps", "5", "--eval-every", "2", "--eval-examples", "200", "--output-dir",
                 str(out)])  # fmt: skip
    assert code == 130
    assert batches == []  # not one held-out batch after the signal
    assert "stopped by SIGINT after step 2" in capfd.readouterr().out
    assert [r["step"] for r in _records(out)] == [1, 2] and "eval_loss" not in _records(out)[1]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_sigterm_during_the_final_evaluation_then_resume_finishes_the_run(tmp_path, capfd, monkeypatch):
    """SIGTERM during the final evaluation said "continue with the same command and --resume", which was
    then refused ("already past --steps"), and the model, final evaluation, predictions and plot were never
    written. Now that command writes them."""
    evaluate = loop._Run.evaluate

    def interrupted(self, step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return evaluate(self, step)

    monkeypatch.setattr(loop._Run, "evaluate", interrupted)
    out = tmp_path / "out"
    argv = ["train", *QUICK, "--eval-every", "2", "--output-dir", str(out)]
    assert main(argv) == 128 + signal.SIGTERM
    said = capfd.readouterr().out
    assert "stopped by SIGTERM after step 3; continue with the same command and --resume" in said
    final = ["model.safetensors", "config.json", "loss.png", "generated_predictions.txt", "eval_predictions-3.jsonl"]
    assert not [name for name in final if (out / name).exists()]
    monkeypatch.setattr(loop._Run, "evaluate", evaluate)
    assert main([*argv, "--resume"]) == 0, capfd.readouterr().err
    summary = capfd.readouterr().out
    assert "steps 3-3" in summary and "held-out exact match" in summary and "(checkpoint-3)" in summary, summary
    assert [name for name in final if (out / name).exists()] == final
    records = _records(out)
    assert [r["step"] for r in records] == [1, 2, 3, 3] and "eval_loss" in records[-1] and "eval_loss" in records[1]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]


def test_ctrl_c_during_start_up_is_one_line(tmp_path, capfd, monkeypatch):
    build_data = loop.build_data

    def interrupted(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return build_data(*args)

    monkeypatch.setattr(loop, "build_data", interrupted)
    out = tmp_path / "out"
    code = main(["train", *QUICK, "--output-dir", str(out)])
    captured = capfd.readouterr()
    assert code == 130 and "Traceback" not in captured.err
    assert [line for line in captured.err.splitlines() if line.startswith("fastseq")] == ["fastseq train: interrupted"]
    assert list(out.iterdir()) == []  # the lock released, nothing written


def test_ctrl_c_soon_after_the_start_exits_with_a_line(tmp_path):
    """Sent as soon as the run has locked its directory, wherever the run then is."""
    out = tmp_path / "out"
    proc = subprocess.Popen([shutil.which("fastseq"), "train", "--steps", "100000", *QUICK[2:], "--output-dir",
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not (out / LOCK_FILE).exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    said = [line for line in (stdout + stderr).splitlines() if line.startswith("fastseq train")]
    assert said and ("interrupted" in said[-1] or "stopped by SIGINT" in said[-1]), stdout + stderr
    assert not (out / LOCK_FILE).exists()


_HOLD_TORCH = """
import os, pathlib, sys, time


class HoldTorch:
    \"\"\"Marks the moment torch is first imported, then waits there for a signal.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            pathlib.Path(os.environ["HOLD_TORCH_MARK"]).write_text("importing torch")
            while True:
                time.sleep(0.01)
        return None


sys.meta_path.insert(0, HoldTorch())
"""


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_torch_imports_is_the_interrupted_line(tmp_path, number):
    """SIGINT in the first seconds, while torch imports, printed a KeyboardInterrupt traceback, and SIGTERM
    killed the process by signal 15: the command's handlers now come before torch. The signal is sent
    while the import of torch is held (a sitecustomize hook), so the test does not race the start."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_HOLD_TORCH)
    mark = tmp_path / "importing-torch"
    env = dict(os.environ, PYTHONPATH=f"{hook}:{ROOT}", HOLD_TORCH_MARK=str(mark))
    out = tmp_path / "out"
    proc = subprocess.Popen([shutil.which("fastseq"), "train", *QUICK, "--output-dir", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not mark.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(number)
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
    said = "" if number == signal.SIGINT else " by SIGTERM"
    assert proc.returncode == 128 + number, stderr[-3000:]
    assert "Traceback" not in stderr and stderr.strip().splitlines() == [f"fastseq train: interrupted{said}"], stderr
    assert not out.exists()


# ---- the YAML config ---------------------------------------------------------------------------------------


def test_yaml_aliases_are_refused(tmp_path, capfd):
    laughs = tmp_path / "laughs.yaml"
    rows = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    rows += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]" for i in range(8)]
    laughs.write_text("\n".join(rows) + "\nsteps: 3\n")
    refused(capfd, ["train", "--config", str(laughs), "--output-dir", str(tmp_path / "out")],
             f"--config {laughs}:1: YAML anchor &a is not accepted", "write each option out")  # fmt: skip
    alias = tmp_path / "alias.yaml"
    alias.write_text("steps: 3\nlog-every: *x\n")
    refused(capfd, ["train", "--config", str(alias), "--output-dir", str(tmp_path / "out")],
             f"--config {alias}:2: YAML alias *x is not accepted")  # fmt: skip


@pytest.mark.parametrize("edit,expected", [
    ({"index": 10**9}, "stream.index is 1000000000, past the"),
    ({"index": 1e9}, "stream.index is 1000000000.0, not a whole number >= 0"),
    ({"buffer": -5}, "stream.buffer is -5, not a whole number >= 0"),
    ({"buffer": 7}, "stream.buffer is 7, past the end of --data"),
    ({"epoch": 10**9}, "stream.epoch is 1000000000, more epochs than the 3 batches read before it"),
    ({"epoch": "1"}, "stream.epoch is '1', not a whole number"),
    ({"index": True}, "stream.index is True, not a whole number"),
    ({"examples": "many"}, "stream.examples is 'many', not a whole number > 0"),
])  # fmt: skip
def test_an_edited_data_position_is_one_line_naming_the_file(tmp_path, capfd, edit, expected):
    """`data.stream` of trainer_state.json edited (index 1e9, buffer -5, a word): resumed silently on other
    batches before; now one line naming the file, nothing lost."""
    out = tmp_path / "out"
    data = _jsonl(tmp_path / "t.jsonl", 16)
    argv = ["train", *QUICK, "--data", str(data), "--buffer-size", "8", "--output-dir", str(out)]
    assert main(argv) == 0
    capfd.readouterr()
    file = out / "checkpoint-3" / "trainer_state.json"
    state = json.loads(file.read_text())
    state["data"]["stream"].update(edit)
    _tampered(out, 3, data=state["data"])
    before = _snapshot(out)
    line = refused(capfd, [*argv, "--steps", "5", "--resume"], expected)
    assert f"{file}: data holds no data position this run can restore" in line, line
    assert _snapshot(out) == before


def test_a_full_disk_in_convert_is_trains_line(tmp_path, capfd, monkeypatch):
    """convert gave "internal error: SafetensorError ... No space left on device": now the line train gives
    (fastseq.files.disk_full), with what the converted weights need; under `ulimit -f` too."""
    from safetensors import SafetensorError

    from fastseq import files

    source = _model_dir(tmp_path / "model")
    save_file = files.save_file

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(files, "save_file", full)
    dst = tmp_path / "dst"
    for argv in (["convert", str(source), str(dst)], ["convert", str(source), str(dst), "--dtype", "bfloat16"]):
        expected = ("No space left on device", "the converted model needs about", "MiB is free there",
                    "convert to another destination")  # fmt: skip
        line = refused(capfd, argv, f"no space left to write {dst} (Error while serializing", *expected)
        assert "internal error" not in line
    monkeypatch.setattr(files, "save_file", save_file)

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    env = dict(os.environ, PYTHONPATH=str(ROOT), FASTSEQ_BACKEND="reference")
    proc = subprocess.run([sys.executable, "-m", "fastseq.cli", "convert", str(source), str(tmp_path / "big")],
                          env=env, capture_output=True, text=True, timeout=600, preexec_fn=limited,
                          check=False)  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fastseq ")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith(f"fastseq convert: error: no space left to write {tmp_path / 'big'} (")
    assert "larger than the file-size limit (ulimit -f)" in lines[0], lines[0]
