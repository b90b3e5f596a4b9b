"""Adafactor under ZeRO-1, 2 and 3 through the real `deepspeed` launcher with two ranks (CPU, gloo):
one process's Adafactor (losses and final parameters, relative step and a fixed rate with weight
decay, 20 steps), a resumed run bit for bit the uninterrupted one, and the optimizer state each rank
saves against the plan's figure.

Tolerances: ZeRO-1/2 compute one process's gradients bit for bit and the optimizer sums its
per-matrix statistics in fp64, so the runs agree to the rounding of the logged mean loss (a few
1e-8). ZeRO-3's hooks pass every module's inputs through an identity autograd function, so autograd
sums a gradient inside a module before adding the rest of the model's share, where one process sums
it all in arrival order: one micro-batch's gradients differ in the last bit (up to 7e-7 relative,
46 of the default model's 52 parameters). Its reduce-scatter is exact (two values added, then
halved). So ZeRO-3 is compared with one process whose autograd groups its sums the same way
(`zero3_grouping`): its final parameters are that run's bit for bit, relative step included.

The relative-step runs train as T5 did, with Adafactor's update clipping (RMS 1) and no
gradient-norm clipping: DeepSpeed sums the norm's squares per partition, one process takes the norm
of per-parameter norms, and the relative step on this random model carries that last-bit difference
to 5e-4 of the loss at step 20 under ZeRO-3 (measured with --clip 1). The fixed-rate runs (1e-4) keep
--clip 1, where the same difference stays below 5e-7 for 20 steps."""

from __future__ import annotations

import pytest
import torch

import fastseq
from tests.distributed.launch import ROOT, assert_losses_close, deepspeed, losses, one_process

STEPS = 20
COMMON = ["--data", "synthetic", "--batch-size", "4", "--optimizer", "adafactor", "--quiet", "--eval-examples", "0"]
MODES = {
    "relative step": (["--clip", "0"], dict(lr=None, clip=0.0)),
    "fixed rate": (["--lr", "1e-4", "--weight-decay", "0.01"], dict(lr=1e-4, weight_decay=0.01)),
}


def _config(stage: int | str) -> str:
    """The shipped config of ZeRO stage `stage`, or the one named `stage`."""
    return str(ROOT / f"configs/deepspeed/{stage if isinstance(stage, str) else f'zero{stage}'}.json")


def _assert_same_parameters(got, expected, rel: float = 1e-6) -> float:
    """Every parameter of the model directory `got` within `rel` of `expected`'s (relative to the
    tensor's largest value); returns the largest relative difference."""
    ours, theirs = fastseq.from_pretrained(got).state_dict(), fastseq.from_pretrained(expected).state_dict()
    worst = 0.0
    for name, value in theirs.items():
        difference = (ours[name] - value).abs().max().item() / value.abs().max().item()
        assert difference <= rel, f"{name}: {difference:.2e} from one process"
        worst = max(worst, difference)
    return worst


def _optimizer_state_bytes(checkpoint) -> list[int]:
    """The bytes of the state tensors each rank's wrapped optimizer saved in `checkpoint`."""
    from fastseq.distributed.convert import safe_torch_load

    sizes = []
    for rank in range(2):
        with safe_torch_load():
            saved = torch.load(checkpoint / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")["optimizer_state_dict"]
        inner = saved.get("base_optimizer_state") or saved["optimizer_state_dict"]  # ZeRO-1/2, ZeRO-3
        sizes.append(sum(v.numel() * v.element_size() for state in inner["state"].values() for v in state.values()
                         if torch.is_tensor(v)))  # fmt: skip
    return sizes


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_adafactor_under_zero_1_2_3_is_one_process_adafactor(tmp_path, mode):
    flags, options = MODES[mode]
    one, grouped = tmp_path / "one", tmp_path / "one_zero3"
    expected = one_process(one, STEPS, optimizer="adafactor", **options)
    expected_zero3 = one_process(grouped, STEPS, optimizer="adafactor", zero3=True, **options)
    for stage in (1, 2, 3):
        run = tmp_path / f"zero{stage}"
        deepspeed("--deepspeed", _config(stage), "--steps", str(STEPS), "--output-dir", str(run), *COMMON, *flags)
        reference, reference_losses = (grouped, expected_zero3) if stage == 3 else (one, expected)
        worst = assert_losses_close(losses(run), reference_losses, rel=1e-6)
        exact = stage == 3 and mode == "relative step"  # no clipping: ZeRO-3's grouped sums are the only difference
        worst = max(worst, _assert_same_parameters(run, reference, rel=0.0 if exact else 1e-6))
        print(f"{mode}, ZeRO-{stage}: {STEPS} steps, largest relative difference {worst:.1e}")


@pytest.mark.slow
def test_zero3_adafactor_resumes_bit_for_bit_and_saves_the_planned_state(tmp_path):
    """A ZeRO-3 run resumed from its step-10 checkpoint repeats the uninterrupted run's losses and
    final parameters bit for bit. Each rank's saved Adafactor state (the factored moments, whole on
    both ranks, and half of the vectors') is the plan's figure for ZeRO-3; under ZeRO-2 each rank's
    is the plan's figure for that rank (the matrices its partition reaches, its elements of the
    vectors), and the plan's per-GPU figure is the larger."""
    from fastseq.distributed.plan import Setup, end_to_end_state, model_sizes, optimizer_bytes
    from fastseq.train.engine import default_config

    flags, _ = MODES["fixed rate"]
    straight, resumed = tmp_path / "z3", tmp_path / "z3_resumed"
    deepspeed("--deepspeed", _config(3), "--steps", str(STEPS), "--save-every", "10", "--output-dir", str(straight),
              *COMMON, *flags)  # fmt: skip
    deepspeed("--deepspeed", _config(3), "--steps", str(STEPS), "--resume", str(straight / "checkpoint-10"),
              "--output-dir", str(resumed), *COMMON, *flags)  # fmt: skip
    assert losses(resumed) == losses(straight)[10:]
    assert _assert_same_parameters(resumed, straight, rel=0.0) == 0.0

    sizes, setup = model_sizes(default_config()), Setup(optimizer="adafactor", precision="fp32")
    planned = optimizer_bytes(setup, sizes, 2, every_matrix=True)
    assert _optimizer_state_bytes(straight / f"checkpoint-{STEPS}") == [planned, planned]

    zero2 = tmp_path / "z2"
    deepspeed("--deepspeed", _config(2), "--steps", "1", "--output-dir", str(zero2), *COMMON, *flags)
    saved = _optimizer_state_bytes(zero2 / "checkpoint-1")
    assert saved == end_to_end_state(sizes.shapes, 2) and optimizer_bytes(setup, sizes, 2) == max(saved)
    print(f"optimizer state per rank: ZeRO-3 {planned:.0f} B (planned {planned:.0f}), ZeRO-2 {saved} B "
          f"(planned {end_to_end_state(sizes.shapes, 2)})")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_two_pipeline_stages_with_adafactor_are_one_process_adafactor(tmp_path, mode):
    """Pipeline stages under ZeRO-1 hand Adafactor each stage's flat partition: it steps the stage's
    matrices as one process does, with the relative step (no gradient-norm clipping, as above) and
    with a fixed rate (--clip 1)."""
    from tests.distributed.test_pipeline import _directory

    source = _directory(tmp_path / "model", "t5_tied")
    flags, options = MODES[mode]
    one = tmp_path / "one"
    expected = one_process(one, STEPS, model=source, optimizer="adafactor", **options)
    run = tmp_path / "pipeline"
    deepspeed("--deepspeed", _config("pipeline"), "--model", str(source),
              "--steps", str(STEPS), "--grad-accum", "2", "--output-dir", str(run), *COMMON, *flags)  # fmt: skip
    worst = max(assert_losses_close(losses(run), expected, rel=1e-6), _assert_same_parameters(run, one))
    print(f"{mode}, two pipeline stages: {STEPS} steps, largest relative difference {worst:.1e}")
