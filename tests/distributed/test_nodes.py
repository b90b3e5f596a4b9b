"""A run over two nodes, as SLURM or Kubernetes start one: one `deepspeed --no_ssh --node_rank R`
launcher per node with a hostfile naming both, here both on this machine with one rank each. With an
output directory the nodes share, and with each node's own disk at the same path (a mount namespace
per node: `own_disks_prefix`), it trains, checkpoints, resumes and evaluates as the single-node run
of two ranks does; a resume from a checkpoint that lacks some rank's files is refused in one line."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.distributed.launch import ROOT, deepspeed, deepspeed_nodes, losses, own_disks_available
from tests.distributed.test_bad_inputs import _errors

ZERO3 = str(ROOT / "configs/deepspeed/zero3.json")
ARGS = ["--deepspeed", ZERO3, "--steps", "4", "--save-every", "2", "--batch-size", "4", "--optimizer", "adafactor",
        "--quiet", "--eval-examples", "16"]  # fmt: skip
RANK1 = {"rng-1.safetensors", "layout-1.json", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
         "zero_pp_rank_1_mp_rank_00_model_states.pt"}  # fmt: skip


def _scores(run) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: line[k] for k in ("step", "eval_loss", "exact_match")} for line in lines if "eval_loss" in line]


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    """The single-node run of two ranks the two-node runs must repeat."""
    run = tmp_path_factory.mktemp("nodes") / "one_node"
    deepspeed(*ARGS, "--output-dir", str(run))
    return run


@pytest.mark.slow
def test_two_nodes_sharing_the_output_directory_train_as_one_node(tmp_path, one_node):
    two_nodes = tmp_path / "two_nodes"
    deepspeed_nodes(tmp_path / "hostfile", *ARGS, "--output-dir", str(two_nodes))
    assert losses(two_nodes) == losses(one_node)
    assert _scores(two_nodes) == _scores(one_node) and _scores(two_nodes)[-1]["step"] == 4
    written = {p.name for p in (two_nodes / "checkpoint-2").iterdir()}
    assert RANK1 | {"rng-0.safetensors", "trainer_state.json"} <= written

    # A copy of the checkpoint without rank 1's files (node 1's part left behind): refused in one line.
    partial = tmp_path / "partial" / "checkpoint-2"
    shutil.copytree(two_nodes / "checkpoint-2", partial)
    for name in RANK1:
        (partial / name).unlink()
    procs = deepspeed_nodes(tmp_path / "hostfile", *ARGS, "--resume", str(partial), "--output-dir",
                            str(tmp_path / "refused"), expect_fail=True)  # fmt: skip
    lines = _errors(procs[0], "does not hold the files of rank(s) 1")
    assert all("--output-dir they share" in line for line in lines), lines


@pytest.mark.slow
def test_two_nodes_on_their_own_disks_train_and_resume_from_them(tmp_path, one_node):
    """Each node's disk at the same path: node 0 holds the run and the checkpoints without rank 1's
    parts, node 1 only rank 1's parts. Under ZeRO-3 each rank reads only its own files, so the nodes
    resume from their own disks bit for bit."""
    reason = own_disks_available()
    if reason:
        pytest.skip(reason)
    disk, nodes = tmp_path / "disk", (tmp_path / "node0", tmp_path / "node1")
    for path in (disk, *nodes):
        path.mkdir()
    run, resumed = disk / "run", disk / "resumed"
    deepspeed_nodes(tmp_path / "hostfile", *ARGS, "--output-dir", str(run), disks=(disk, nodes))
    assert losses(nodes[0] / "run") == losses(one_node)
    assert _scores(nodes[0] / "run") == _scores(one_node)
    for step in (2, 4):
        on_node0 = {p.name for p in (nodes[0] / "run" / f"checkpoint-{step}").iterdir()}
        assert {"trainer_state.json", "config.json", "rng-0.safetensors"} <= on_node0 and not on_node0 & RANK1
        assert {p.name for p in (nodes[1] / "run" / f"checkpoint-{step}").iterdir()} == RANK1
    assert sorted(p.name for p in (nodes[1] / "run").iterdir()) == ["checkpoint-2", "checkpoint-4"]

    deepspeed_nodes(tmp_path / "hostfile", *ARGS, "--resume", str(run / "checkpoint-2"), "--output-dir",
                    str(resumed), disks=(disk, nodes))  # fmt: skip
    assert losses(nodes[0] / "resumed") == losses(one_node)[2:]  # bit for bit
    assert _scores(nodes[0] / "resumed")[-1] == _scores(one_node)[-1]

    # A node whose disk lacks the checkpoint (a replaced node): both ranks refuse it in one line, none waits.
    shutil.rmtree(nodes[1] / "run")
    procs = deepspeed_nodes(tmp_path / "hostfile", *ARGS, "--resume", str(run / "checkpoint-2"), "--output-dir",
                            str(disk / "refused"), disks=(disk, nodes), expect_fail=True, timeout=300)  # fmt: skip
    lines = _errors(procs[0], "does not hold the files of rank(s) 1")
    assert all("--output-dir they share" in line for line in lines), lines
