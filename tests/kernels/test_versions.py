"""The Triton and torch ranges of the kernels: declared once, the same in pyproject, checked at a kernel's use."""

from __future__ import annotations

import re
import types
import warnings
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from fastseq.kernels import _backend, _versions, rms_norm
from fastseq.kernels.rms_norm import rms_norm_reference
from tests.conftest import DEVICE, assert_close

ROOT = Path(__file__).resolve().parents[2]
RANGES = r"triton 3\.6 to 3\.9 and torch 2\.11 to 2\.14"
# What `use_triton` reads of an input on an sm_90 GPU (`cuda_device`, then the device's capability).
ON_CUDA = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))


@pytest.fixture(autouse=True)
def _an_sm90_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))


@pytest.fixture
def installed(monkeypatch):
    """Pretend these Triton and torch releases are installed, with nothing warned about before."""
    monkeypatch.setattr(_versions, "_WARNED", set())
    _versions._verdict.cache_clear()

    def install(triton_version: str, torch_version: str) -> None:
        monkeypatch.setattr(_versions, "installed_triton", lambda: triton_version)
        monkeypatch.setattr(_versions, "installed_torch", lambda: torch_version)

    yield install
    _versions._verdict.cache_clear()


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 40, generator=g).to(DEVICE), (torch.rand(40, generator=g) + 0.5).to(DEVICE)


def test_pyproject_asks_for_the_oldest_tested_releases():
    text = (ROOT / "pyproject.toml").read_text()
    for name, ((major, minor), _) in (("torch", _versions.TORCH_TESTED), ("triton", _versions.TRITON_TESTED)):
        assert re.findall(rf'"{name}>=([0-9.]+)[";]', text) == [f"{major}.{minor}"], name


def test_release():
    assert _versions.release("3.6.0") == (3, 6)
    assert _versions.release("2.13.0+cpu") == (2, 13)
    assert _versions.release("2.15.0.dev20260101+cu130") == (2, 15)
    assert _versions.release("3.10") == (3, 10)


def test_the_tested_range_runs_without_a_warning(installed, triton_backend):
    x, w = _inputs()
    for versions in (("3.6.0", "2.11.0"), ("3.9.0", "2.14.1+cu130"), ("3.7.1", "2.13.0+cpu")):
        installed(*versions)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert_close(rms_norm(x, w), rms_norm_reference(x, w, 1e-6), rel=1e-6, what=str(versions))
            assert _backend.use_triton("rms_norm", True, ON_CUDA)


@pytest.mark.parametrize(
    "versions,found,install",
    [
        (("3.5.1", "2.13.0"), r"triton 3\.5\.1", r"'triton>=3\.6,<3\.10'"),
        (("3.9.0", "2.10.2+cu128"), r"torch 2\.10\.2\+cu128", r"'torch>=2\.11,<2\.15'"),
        (("3.4.0", "2.8.0"), r"triton 3\.4\.0, torch 2\.8\.0", r"'triton>=3\.6,<3\.10' 'torch>=2\.11,<2\.15'"),
    ],
)
def test_an_older_release_is_refused_when_triton_is_asked_for(installed, triton_backend, versions, found, install):
    installed(*versions)
    message = rf"^fastseq's Triton kernels need {RANGES}; found {found}\. Install with: pip install {install}"
    with pytest.raises(RuntimeError, match=message) as e:
        rms_norm(*_inputs())
    assert "\n" not in str(e.value)


def test_an_older_release_runs_the_reference_under_auto_with_one_warning(installed, monkeypatch):
    monkeypatch.setenv("FASTSEQ_BACKEND", "auto")
    installed("3.9.0", "2.14.0")
    assert _backend.use_triton("rms_norm", True, ON_CUDA)  # in range: the kernel, on a GPU
    installed("3.5.0", "2.14.0")
    message = rf"need {RANGES}; found triton 3\.5\.0\. .*every op runs its PyTorch reference"
    with pytest.warns(UserWarning, match=message):
        assert not _backend.use_triton("rms_norm", True, ON_CUDA)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        assert not _backend.use_triton("bucketed_attention", True, ON_CUDA)


def test_a_newer_release_runs_with_one_warning_naming_the_tested_range(installed, triton_backend):
    x, w = _inputs()
    installed("3.10.0", "2.15.0.dev20260101")
    with pytest.warns(UserWarning, match=rf"tested with {RANGES}; found triton 3\.10\.0, torch 2\.15\.0\.dev20260101"):
        out = rms_norm(x, w)
    assert_close(out, rms_norm_reference(x, w, 1e-6), rel=1e-6, what="out")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        rms_norm(x, w)
        assert _backend.use_triton("rms_norm", True, ON_CUDA)


def test_the_check_keeps_a_torch_compile_graph_whole(installed, triton_backend):
    """Under torch.compile the check runs once as plain Python: its warning breaks no graph."""
    x, w = _inputs()
    installed("3.10.0", "2.13.0")
    compiled = torch.compile(lambda a, b: rms_norm(a, b, 1e-6), backend="aot_eager", fullgraph=True)
    with pytest.warns(UserWarning, match=rf"tested with {RANGES}; found triton 3\.10\.0\."):
        out = compiled(x, w)
    assert torch.equal(out, rms_norm(x, w, 1e-6))


@triton.jit
def _count_kernel(OUT, N, n):
    for i in range(0, n):  # a bound passed as an argument
        tl.store(OUT + i, i + 1)
    for i in range(n, tl.load(N)):  # a bound loaded from memory
        tl.store(OUT + i, -i)


def test_a_loop_over_a_runtime_bound_runs():
    """Triton 3.6's interpreter failed on both loops under NumPy 2.4 (`_versions.fix_interpreter`)."""
    out = torch.zeros(7, dtype=torch.int32, device=DEVICE)
    _count_kernel[(1,)](out, torch.tensor([6], dtype=torch.int32, device=DEVICE), 4)
    assert out.tolist() == [1, 2, 3, 4, -4, -5, 0]
