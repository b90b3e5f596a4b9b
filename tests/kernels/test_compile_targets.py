"""Compile-only: every Triton kernel configuration builds for sm_80, sm_86 and sm_90 without a GPU
and fits the chip's shared memory. Runs without the interpreter (it replaces the kernels)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest

OPS = ["bucketed_attention", "gated_gelu", "global_aggregate", "linear_cross_entropy", "rms_norm"]


@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_every_config_compiles_within_shared_memory(op):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastseq.kernels._compile", op], capture_output=True, text=True,
                          env=env, timeout=1500)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    specs = importlib.import_module(f"fastseq.kernels.{op}").compile_specs()
    assert sorted(r["name"] for r in results) == sorted(s.name for s in specs)
    assert {r["capability"] for r in results} == {80, 86, 90}
    over = [r for r in results if r["shared"] > r["limit"]]
    assert not over, over


# Ops whose Triton kernels live in another op's module (and are compile-checked there).
KERNELS_OF = {"local_attention": "bucketed_attention"}  # the attention kernels with a key window


def test_every_op_with_a_kernel_is_compile_checked():
    kernels = importlib.import_module("fastseq.kernels")
    with_kernel = {
        KERNELS_OF.get(name, name)
        for name in ("bucketed_attention", "local_attention", "global_aggregate", "gated_gelu", "rms_norm",
                     "linear_cross_entropy")
        if importlib.import_module(f"{kernels.__name__}.{name}").HAS_TRITON_KERNEL
    }  # fmt: skip
    assert with_kernel == set(OPS)
