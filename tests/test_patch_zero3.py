"""The fused loss of a patched transformers model under DeepSpeed ZeRO-3: two ranks (CPU, gloo) through
the real `deepspeed` launcher, every parameter partitioned (the LM head too)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import batch, hf_model

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, *extra: str) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), FASTSEQ_BACKEND="reference")
    cmd = [
        sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(_free_port()),
        str(ROOT / "tests" / "workers" / "patch_zero3.py"), "--out", str(out), *extra,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_fused_loss_under_zero3_two_ranks(tmp_path):
    patched = launch(tmp_path / "patched.json")
    unpatched = launch(tmp_path / "unpatched.json", "--unpatched")
    assert patched["world"] == 2
    assert patched["head_partitioned"]  # the head's weight is a shard outside its forward...
    assert patched["linear_cross_entropy"] == 3
    assert patched["weight_shape"] == [99, 32]  # ...and whole inside it, where the fused loss runs
    assert unpatched["linear_cross_entropy"] == 0
    for step, (a, b) in enumerate(zip(patched["losses"], unpatched["losses"], strict=True)):
        assert abs(a - b) <= 1e-5 * abs(b), f"step {step}: patched {a} vs unpatched {b} under ZeRO-3"
    # The first loss, before any update, is the one-process loss of the same weights.
    with torch.no_grad():
        expected = hf_model("t5_v11_untied").train()(**batch("t5_v11_untied", seed=100)).loss.item()
    assert abs(patched["losses"][0] - expected) <= 1e-5 * expected
