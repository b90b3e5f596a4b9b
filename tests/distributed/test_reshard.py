"""Resuming a ZeRO checkpoint on another number of ranks or another ZeRO stage, through the real
`deepspeed` launcher (CPU, gloo): ZeRO-2 on 2 ranks resumed on 1 rank and under ZeRO-3 on 2 ranks
(AdamW), and 1 rank resumed on 2 (Adafactor, fixed rate, its factored state carried). --grad-accum
is set to keep the checkpoint's global batch, and the data continues from the same global example,
so each continues the uninterrupted run's losses. Tolerance 1e-6 relative: the same examples and
state, summed in another order over ranks and micro-batches (fp32 rounding; measured below 1e-7
over these steps). A pipeline checkpoint on another stage count is refused in one line."""

from __future__ import annotations

import pytest

from tests.distributed.launch import ROOT, assert_losses_close, deepspeed, losses
from tests.distributed.test_bad_inputs import _errors

COMMON = ["--data", "synthetic", "--batch-size", "4", "--quiet", "--eval-examples", "0", "--steps", "6"]
ADAMW = ["--optimizer", "adamw", "--lr", "1e-3"]
ADAFACTOR = ["--optimizer", "adafactor", "--lr", "1e-4", "--weight-decay", "0.01"]


def _config(name: str) -> str:
    return str(ROOT / f"configs/deepspeed/{name}.json")


@pytest.mark.slow
def test_zero2_on_2_ranks_resumes_on_1_rank_and_under_zero3(tmp_path):
    straight = tmp_path / "z2"
    deepspeed("--deepspeed", _config("zero2"), "--save-every", "3", "--output-dir", str(straight), *COMMON, *ADAMW)
    expected = losses(straight)[3:]
    one_rank = tmp_path / "one_rank"
    proc = deepspeed("--deepspeed", _config("zero2"), "--resume", str(straight / "checkpoint-3"), "--output-dir",
                     str(one_rank), *COMMON, *ADAMW, ranks=1)  # fmt: skip
    line = "ran 2 ranks x --grad-accum 1; on 1 rank --grad-accum 2 keeps its 2 micro-batches a step"
    assert sum(line in text for text in proc.stderr.splitlines()) == 1, proc.stderr[-3000:]
    worst = assert_losses_close(losses(one_rank), expected, rel=1e-6)
    zero3 = tmp_path / "z3"
    deepspeed("--deepspeed", _config("zero3"), "--resume", str(straight / "checkpoint-3"), "--output-dir", str(zero3),
              *COMMON, *ADAMW)  # fmt: skip
    worst = max(worst, assert_losses_close(losses(zero3), expected, rel=1e-6))
    print(f"ZeRO-2 x 2 resumed on 1 rank and on ZeRO-3 x 2: largest relative difference {worst:.1e}")


@pytest.mark.slow
def test_1_rank_resumes_on_2_with_adafactor_and_a_pipeline_on_another_stage_count_is_refused(tmp_path):
    straight = tmp_path / "one_rank"
    deepspeed("--deepspeed", _config("zero2"), "--grad-accum", "2", "--save-every", "3", "--output-dir",
              str(straight), *COMMON, *ADAFACTOR, ranks=1)  # fmt: skip
    two_ranks = tmp_path / "two_ranks"
    deepspeed("--deepspeed", _config("zero3"), "--resume", str(straight / "checkpoint-3"), "--output-dir",
              str(two_ranks), *COMMON, *ADAFACTOR)  # fmt: skip
    worst = assert_losses_close(losses(two_ranks), losses(straight)[3:], rel=1e-6)
    print(f"1 rank resumed on 2 (Adafactor): largest relative difference {worst:.1e}")

    pipeline = tmp_path / "pipeline"
    deepspeed("--deepspeed", _config("pipeline"), "--steps", "1", "--grad-accum", "2", "--output-dir", str(pipeline),
              "--batch-size", "4", "--quiet", "--eval-examples", "0", *ADAMW)  # fmt: skip
    proc = deepspeed("--deepspeed", _config("zero2"), "--steps", "2", "--resume", str(pipeline / "checkpoint-1"),
                     "--output-dir", str(pipeline), "--batch-size", "4", "--quiet", "--eval-examples", "0", *ADAMW,
                     expect_fail=True)  # fmt: skip
    _errors(proc, "was written by DeepSpeed pipeline of 2 stages on 2 ranks")


def test_the_global_batch_is_kept_by_the_accumulation_or_refused(tmp_path):
    """A checkpoint of 2 ranks x --grad-accum 3: 3 ranks take 2 micro-batches each (one line says so),
    2 ranks keep it, and 4 ranks cannot take 6 micro-batches a step: one line saying which can."""
    from fastseq.train import TrainArgs
    from fastseq.train.state import ResumeError, keep_global_batch, write_state

    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    write_state(checkpoint, {"step": 3, "run": {}, "data": {}, "engine": {}, "world_size": 2,
                             "args": {"grad_accum": 3}})  # fmt: skip
    args = TrainArgs(resume=str(checkpoint), output_dir=str(tmp_path))
    assert keep_global_batch(args, 2) is None and args.grad_accum == 1  # the same ranks: nothing changes
    line = keep_global_batch(args, 3)
    assert args.grad_accum == 2 and line.endswith("ran 2 ranks x --grad-accum 3; on 3 ranks --grad-accum 2 keeps "
                                                   "its 6 micro-batches a step")  # fmt: skip
    with pytest.raises(ResumeError, match="which 4 ranks cannot divide; resume on a number of ranks dividing 6"):
        keep_global_batch(args, 4)
