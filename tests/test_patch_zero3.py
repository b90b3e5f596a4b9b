"""The fused loss of a patched transformers model under DeepSpeed ZeRO-3: two ranks (CPU, gloo) through
the real `deepspeed` launcher, every parameter partitioned (the LM head too)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import batch, hf_model
from tests.distributed.launch import ROOT, deepspeed

WORKER = ROOT / "tests" / "workers" / "patch_zero3.py"


def launch(out: Path, *extra: str) -> dict:
    deepspeed(str(WORKER), "--out", str(out), *extra, module=None)
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
