"""A run over two nodes, as SLURM or Kubernetes start one: one `deepspeed --no_ssh --node_rank R`
launcher per node with a hostfile naming both, here both on this machine with one rank each (a
shared output directory). It trains, checkpoints, resumes and evaluates as the single-node run of two
ranks does, and a checkpoint that lacks a rank's files is refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.distributed.launch import ROOT, deepspeed, deepspeed_nodes, losses
from tests.distributed.test_bad_inputs import _errors

ZERO3 = str(ROOT / "configs/deepspeed/zero3.json")
ARGS = ["--deepspeed", ZERO3, "--steps", "4", "--save-every", "2", "--batch-size", "4", "--optimizer", "adafactor",
        "--quiet", "--eval-examples", "16"]  # fmt: skip


def _scores(run) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: line[k] for k in ("step", "eval_loss", "exact_match")} for line in lines if "eval_loss" in line]


@pytest.mark.slow
def test_two_nodes_train_checkpoint_resume_and_evaluate_as_one_node(tmp_path):
    one_node, two_nodes, resumed = tmp_path / "one_node", tmp_path / "two_nodes", tmp_path / "resumed"
    deepspeed(*ARGS, "--output-dir", str(one_node))
    deepspeed_nodes(tmp_path / "hostfile", *ARGS, "--output-dir", str(two_nodes))
    assert losses(two_nodes) == losses(one_node)
    assert _scores(two_nodes) == _scores(one_node) and _scores(two_nodes)[-1]["step"] == 4
    for name in ("rng-0.safetensors", "rng-1.safetensors", "zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        assert (two_nodes / "checkpoint-2" / name).is_file(), name

    deepspeed_nodes(tmp_path / "hostfile", *ARGS, "--resume", str(two_nodes / "checkpoint-2"),
                    "--output-dir", str(resumed))  # fmt: skip
    assert losses(resumed) == losses(two_nodes)[2:]  # bit for bit
    assert _scores(resumed)[-1] == _scores(two_nodes)[-1]

    # Node 1's files left on its own disk: the checkpoint on node 0 lacks them.
    partial = tmp_path / "partial" / "checkpoint-2"
    shutil.copytree(two_nodes / "checkpoint-2", partial)
    for name in ("rng-1.safetensors", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
                 "zero_pp_rank_1_mp_rank_00_model_states.pt"):  # fmt: skip
        (partial / name).unlink()
    procs = deepspeed_nodes(tmp_path / "hostfile", *ARGS, "--resume", str(partial), "--output-dir",
                            str(tmp_path / "refused"), expect_fail=True)  # fmt: skip
    lines = _errors(procs[0], "does not hold the files of rank(s) 1")
    assert all("--output-dir they share" in line for line in lines), lines
