"""Issue 23 under the real `deepspeed` launcher (CPU, gloo): a checkpoint without the layouts of its
partitions resumes only on the engine and number of ranks that wrote it (one line naming both),
rank 0 alone locks the output directory, and a data error mid-run leaves a checkpoint of every
rank's state after the last completed step."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from fastseq.files import LOCK_FILE
from tests.conftest import refused
from tests.distributed.launch import deepspeed
from tests.distributed.test_bad_inputs import COMMON, ZERO2, ZERO3, _errors
from tests.test_run_safety import _jsonl


@pytest.mark.slow
def test_a_zero_checkpoint_resumes_only_as_it_was_written(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = tmp_path / "z2"
    deepspeed("--deepspeed", ZERO2, "--steps", "2", *COMMON, "--output-dir", str(run))
    assert (run / "checkpoint-2").is_dir() and not (run / LOCK_FILE).exists()
    state = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())
    assert (state["engine_kind"], state["world_size"]) == ("DeepSpeed ZeRO-2", 2)
    resume = ["--steps", "4", *COMMON, "--resume", "--output-dir", str(run)]
    # A checkpoint written before the layouts of its partitions were (what re-partitioning reads:
    # tests/distributed/test_reshard.py) resumes only on the stage and ranks that wrote it.
    state["engine"] = {}
    (run / "checkpoint-2" / "trainer_state.json").write_text(json.dumps(state))
    proc = deepspeed("--deepspeed", ZERO2, *resume, ranks=1, expect_fail=True)
    _errors(proc, "was written by DeepSpeed ZeRO-2 on 2 ranks, and this run is DeepSpeed ZeRO-2 on 1 rank")
    proc = deepspeed("--deepspeed", ZERO3, *resume, expect_fail=True)
    _errors(proc, "was written by DeepSpeed ZeRO-2 on 2 ranks, and this run is DeepSpeed ZeRO-3 on 2 ranks")
    # Without --deepspeed: how to resume it, not "holds no weights".
    refused(capfd, ["train", *resume], "this run is one process on 1 rank",
             f"resume it under the `deepspeed` launcher (--num_gpus 2) with --deepspeed {ZERO2}")  # fmt: skip
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # nothing lost


@pytest.mark.slow
def test_rank_0_locks_and_a_data_error_checkpoints_every_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    locked = tmp_path / "locked"
    locked.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        (locked / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid, "start": None}))
        proc = deepspeed("--deepspeed", ZERO2, "--steps", "2", *COMMON, "--output-dir", str(locked), expect_fail=True)
    finally:
        sleeper.kill()
        sleeper.wait()
    _errors(proc, f"is in use by another run (PID {sleeper.pid}")
    assert sorted(p.name for p in locked.iterdir()) == [LOCK_FILE]
    # Line 21 is read at step 3: every rank reads the stream's two micro-batches of 4 of each step.
    data = _jsonl(tmp_path / "train.jsonl", 40, bad_line=21)
    out = tmp_path / "out"
    proc = deepspeed("--deepspeed", ZERO2, "--steps", "8", *COMMON, "--buffer-size", "4", "--data", str(data),
                     "--output-dir", str(out), expect_fail=True)  # fmt: skip
    _errors(proc, "train.jsonl:21")
    saved = sorted(p.name for p in out.glob("checkpoint-*"))
    assert len(saved) == 1 and f"is saved in {out / saved[0]}" in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in (out / saved[0]).glob("rng-*")) == ["rng-0.safetensors", "rng-1.safetensors"]
    assert not (out / LOCK_FILE).exists()
