"""Bad input and interruptions under the real `deepspeed` launcher (two ranks, CPU, gloo): the run
is refused in one line (the ranks agree on the error; the launcher stops the others as soon as one
exits, so the second rank's line may not get printed), a signal ends the run with a checkpoint of
every rank that resumes exactly, and a diverging run stops before saving."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.launch import (
    ROOT,
    assert_losses_close,
    deepspeed,
    free_port,
    losses,
    one_process,
    shared_memory_left,
)
from tests.test_bad_inputs import without_file_override

ZERO2 = str(ROOT / "configs/deepspeed/zero2.json")
ZERO3 = str(ROOT / "configs/deepspeed/zero3.json")
PIPELINE = str(ROOT / "configs/deepspeed/pipeline.json")
COMMON = ["--data", "synthetic", "--batch-size", "4", "--optimizer", "adamw", "--lr", "1e-3", "--quiet",
          "--eval-examples", "0"]  # fmt: skip


def _errors(proc, expected: str) -> list[str]:
    """The error lines the ranks printed: at least one, each holding `expected`, and no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fastseq train: error:")]
    assert lines and all(expected in line for line in lines), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines


@pytest.mark.slow
def test_bad_input_through_the_launcher_is_one_line(tmp_path):
    # 1: a count that hung before any work
    proc = deepspeed("--deepspeed", ZERO2, "--batch-size", "-3", "--output-dir", str(tmp_path / "a"), expect_fail=True)
    _errors(proc, "error: --batch-size must be at least 1; got -3")
    # 2: a used output directory (checked by rank 0, refused by both)
    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    proc = deepspeed("--deepspeed", ZERO2, "--steps", "2", *COMMON, "--output-dir", str(used), expect_fail=True)
    _errors(proc, "already holds files")
    assert (used / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


@pytest.mark.slow
def test_zero_resume_refuses_another_runs_checkpoint_and_a_diverging_run_stops(tmp_path):
    run = tmp_path / "z2"
    deepspeed("--deepspeed", ZERO2, "--steps", "2", *COMMON, "--output-dir", str(run))
    proc = deepspeed("--deepspeed", ZERO2, "--steps", "4", *COMMON, "--seed", "1", "--resume", "--output-dir",
                     str(run), expect_fail=True)  # fmt: skip
    _errors(proc, "belongs to another run (data.seed 0 there, 1 here")
    diverging = tmp_path / "nan"
    argv = ["--deepspeed", ZERO2, "--steps", "6", "--batch-size", "4", "--optimizer", "adamw", "--lr", "1e30",
            "--save-every", "1", "--quiet", "--eval-examples", "0", "--output-dir", str(diverging)]  # fmt: skip
    proc = deepspeed(*argv, expect_fail=True)
    lines = _errors(proc, "is nan, so the run stopped before saving anything of it")
    step = int(lines[0].split("step ")[1].split(":")[0])
    assert sorted(p.name for p in diverging.glob("checkpoint-*")) == [f"checkpoint-{s}" for s in range(1, step)]
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(c)) for line in
               (diverging / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert [r["step"] for r in records] == list(range(1, step))


@pytest.mark.slow
def test_zero3_refuses_a_shard_outside_the_directory_and_an_unreadable_one(tmp_path):
    from fastseq.models import T5ForConditionalGeneration
    from fastseq.tokenizers import ByT5Tokenizer
    from fastseq.train.engine import default_config

    model = tmp_path / "model"
    T5ForConditionalGeneration(default_config()).save_pretrained(model, max_shard_size="300KB")
    ByT5Tokenizer().save_pretrained(model)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "elsewhere").mkdir()
    os.replace(model / first, tmp_path / "elsewhere" / first)
    index["weight_map"] = {k: f"../elsewhere/{v}" if v == first else v for k, v in index["weight_map"].items()}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    proc = deepspeed("--deepspeed", ZERO3, "--model", str(model), "--steps", "2", *COMMON, "--output-dir",
                     str(tmp_path / "run"), expect_fail=True)  # fmt: skip
    _errors(proc, "is not a file name inside")

    # Back in place but unreadable: said so by every rank (not "corrupted").
    os.replace(tmp_path / "elsewhere" / first, model / first)
    index["weight_map"] = {k: v.removeprefix("../elsewhere/") for k, v in index["weight_map"].items()}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    (model / first).chmod(0)
    try:
        proc = deepspeed("--deepspeed", ZERO3, "--model", str(model), "--steps", "2", *COMMON, "--output-dir",
                         str(tmp_path / "run2"), expect_fail=True, prefix=tuple(without_file_override()))  # fmt: skip
    finally:
        (model / first).chmod(0o644)
    _errors(proc, f"{first} exists but cannot be read (Permission denied)")


def _interrupted(tmp_path: Path, name: str, config: str, extra: list[str]) -> tuple[Path, int]:
    """A launcher run stopped by SIGTERM to its process group (what a scheduler sends) after 3 steps."""
    from tests.test_cli import wait_for_steps

    out = tmp_path / name
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), FASTSEQ_BACKEND="reference",
               OMP_NUM_THREADS="1")  # fmt: skip
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(port),
           "--module", "fastseq.train", "--deepspeed", config, "--steps", "100000", *COMMON, *extra,
           "--output-dir", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    wait_for_steps(out, 3, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode != 0
    assert "Traceback" not in stderr, stderr[-3000:]
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) == 1, stdout[-2000:] + stderr[-2000:]
    stopped = int(checkpoints[0].name.split("-")[1])
    assert f"stopped by SIGTERM after step {stopped}" in stdout
    assert not shared_memory_left(port)  # released even though the launcher ended the ranks
    assert sorted(p.name for p in checkpoints[0].glob("rng-*")) == ["rng-0.safetensors", "rng-1.safetensors"]
    return out, stopped


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2", "pipeline"])
def test_sigterm_checkpoints_every_rank_and_resumes_exactly(tmp_path, engine):
    config, extra = (ZERO2, []) if engine == "zero2" else (PIPELINE, ["--grad-accum", "2"])
    out, stopped = _interrupted(tmp_path, engine, config, extra)
    deepspeed("--deepspeed", config, "--steps", str(stopped + 2), *COMMON, *extra, "--resume", "--output-dir", str(out))
    straight = tmp_path / "straight"
    deepspeed("--deepspeed", config, "--steps", str(stopped + 2), *COMMON, *extra, "--output-dir", str(straight))
    assert losses(out) == losses(straight)  # bit for bit
    if engine == "zero2":
        expected = one_process(tmp_path / "one", stopped + 2)
        assert_losses_close(losses(out), expected)
