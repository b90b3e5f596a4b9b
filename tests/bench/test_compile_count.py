"""`bench/compile_count.py` counts the builds a command launches as Triton keys them for a GPU: one per
kernel and specialization, however often it is launched, and the tests that skip without CUDA only
with `--gpu-tests`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "bench" / "compile_count.py"
# Each test starts the tool (and torch) in a new process, seconds apiece: the full matrix's.
pytestmark = pytest.mark.slow

CALLS = """
import torch
from fastseq.kernels import rms_norm

def step(n, d):
    x = torch.randn(n, d, requires_grad=True)
    w = torch.ones(d, requires_grad=True)
    rms_norm(x, w, 1e-6).sum().backward()
"""


def _count(tmp_path: Path, *command: str) -> tuple[int, list[str]]:
    """The tool's exit status (the command's) and the lines it printed."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # the GPU-only test skips, as on the CPU
    env.pop("TRITON_INTERPRET", None)  # the tool sets it itself, and FASTSEQ_BACKEND=triton where unset
    env.pop("FASTSEQ_BACKEND", None)
    proc = subprocess.run([sys.executable, str(TOOL), *command], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return proc.returncode, proc.stdout.strip().splitlines()


def test_a_build_is_counted_once_per_specialization(tmp_path):
    # The norm's forward and backward: launched twice at one shape, two builds; a row of 33 (another
    # block width, and a size not divisible by 16) two more.
    (tmp_path / "same.py").write_text(CALLS + "step(4, 32)\nstep(4, 32)\n")
    (tmp_path / "other.py").write_text(CALLS + "step(4, 32)\nstep(4, 32)\nstep(8, 33)\n")
    status, same = _count(tmp_path, "same.py")
    assert status == 0 and same[-2:] == [
        "same.py: 2 builds, 2 new",
        "builds: 2 (_rms_norm_bwd_kernel 1, _rms_norm_fwd_kernel 1)",
    ]
    status, other = _count(tmp_path, "other.py")
    assert status == 0 and other[-1] == "builds: 4 (_rms_norm_bwd_kernel 2, _rms_norm_fwd_kernel 2)"


def test_the_gpu_only_tests_count_with_gpu_tests(tmp_path):
    (tmp_path / "test_gpu_only.py").write_text(
        CALLS
        + """
import pytest

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_only():
    step(4, 32)
    step(8, 33)

def test_anywhere():
    step(4, 32)
"""
    )
    args = ("pytest", "-q", "-p", "no:cacheprovider", "test_gpu_only.py")
    status, lines = _count(tmp_path, *args)
    assert status == 0 and "test_gpu_only.py::test_anywhere: 2 builds, 2 new" in lines
    assert lines[-1].startswith("builds: 2 ") and not any(
        line.startswith("test_gpu_only.py::test_gpu_only") for line in lines
    )
    # With --gpu-tests the skipped test runs too, its launches keyed and not run (garbage outputs: a
    # GPU-only test's checks fail there, after its launches).
    _, lines = _count(tmp_path, "--gpu-tests", *args)
    assert "test_gpu_only.py::test_gpu_only: 4 builds, 4 new" in lines
    assert "test_gpu_only.py::test_anywhere: 2 builds, 0 new" in lines and lines[-1].startswith("builds: 4 ")


def test_a_benchmark_counts_at_its_gpu_sizes(tmp_path):
    """`--gpu-sizes`: a benchmark that stops without CUDA (its `smoke_setup`, in the `_common.py` beside
    it) runs on the CPU at its own sizes, its launches keyed; without the flag it stops, having launched
    nothing, and the tool says so."""
    (tmp_path / "_common.py").write_text("def smoke_setup(smoke):\n    raise SystemExit('no CUDA device')\n")
    script = CALLS + "from _common import smoke_setup\n\nsmoke_setup(False)\nstep(4, 32)\n"
    (tmp_path / "bench_norm.py").write_text(script)
    status, lines = _count(tmp_path, "--gpu-sizes", "bench_norm.py")
    assert status == 0 and lines[-1] == "builds: 2 (_rms_norm_bwd_kernel 1, _rms_norm_fwd_kernel 1)"
    status, lines = _count(tmp_path, "bench_norm.py")
    assert status == 1 and lines[-2:] == [
        "builds: 0 ()",
        "no fastseq kernel was launched: is the command's backend the Triton one (FASTSEQ_BACKEND)?",
    ]
