"""`launch_kernel`: a kernel launched again through its compiled kernel's C launcher gets the compiled
kernel and the arguments that Triton's own launch (`JITFunction.run`) gives it, whatever the batch.

Without a GPU nothing launches: the launches of real calls are recorded under the interpreter, then
replayed, for sm_90, through Triton's launch and through `launch_kernel` on a stand-in driver, with a
compiled kernel per specialization (Triton compiles on each miss of its own cache) whose C launcher
records what it receives."""

from __future__ import annotations

import importlib

import pytest

from fastseq.kernels import _compile, _launch
from tests.kernels.test_compile_targets import CALLS


class _Compiled:
    """A compiled kernel whose C launcher records (itself, its arguments) into `sink[0]`."""

    def __init__(self, sink: list):
        self.sink = sink
        self.function, self.packed_metadata = object(), object()

    def launch_metadata(self, grid, stream, *args):
        return None

    @property
    def run(self):
        return lambda *args: self.sink[0].append((self, args))


class _Driver:
    """The GPU driver as a launch asks it: device 0, stream 7, sm_90."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 7

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


def _record(monkeypatch, module, calls) -> list:
    """(kernel, grid, args, meta) of every launch `calls` make of `module`'s kernels, not run."""
    import torch

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors reach the launchers
    launches = []

    class Recorded:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **meta: launches.append((self.kernel, grid, args, meta))

    for name in [n for n in vars(module) if n.startswith("_") and n.endswith("_kernel")]:
        monkeypatch.setattr(module, name, Recorded(getattr(module, name)))
    with torch.no_grad():
        calls()
    return launches


def _attention_layout_calls():
    """The attention's forward and backward, causal or not, on q, k and v laid out as a model's
    projections lay them out, contiguous, with rows of D + 1 (strides no multiple of 16), 4 bytes past a
    16-byte boundary, and in fp16 (one plan each dtype), with a seed past 32 bits: what changes a
    launch's specialization between calls of one plan."""
    import torch

    from fastseq.kernels.bucketed_attention import launch

    B, H, L, D = 2, 2, 24, 16
    table = torch.randn(H, 9)
    n = B * H * L * D

    def layouts(dtype):
        yield [torch.randn(B, L, H, D, dtype=dtype).transpose(1, 2) for _ in range(3)]
        yield [torch.randn(B, H, L, D, dtype=dtype) for _ in range(3)]
        yield [torch.randn(B, H, L, D + 1, dtype=dtype)[..., :D] for _ in range(3)]
        yield [torch.randn(n + 2, dtype=dtype)[2:].view(B, H, L, D) for _ in range(3)]  # 4 or 8 bytes off

    for dtype in (torch.float32, torch.float16, torch.float32):
        for seed, causal in ((5, True), (5, False), (2**31 + 5, True)):
            for q, k, v in layouts(dtype):
                mask = torch.ones(B, L, dtype=torch.bool)
                out, lse = launch.attention_forward(q, k, v, table, mask, seed, causal, 0, 1.0, 0.1)
                launch.attention_backward(torch.randn_like(out), q, k, v, out, lse, table, mask, seed, causal, 0,
                                          1.0, 0.1)  # fmt: skip


def _rms_norm_epsilon_calls():
    """The norm's forward with epsilon 1.0 and 1 (a config's JSON can give either): equal values that
    Triton types apart (fp32 and the constant 1)."""
    import torch

    rms_norm = importlib.import_module("fastseq.kernels.rms_norm")
    x, weight = torch.randn(4, 32), torch.randn(32)
    for eps in (1.0, 1, 1.0, 1):
        rms_norm._forward(x, weight, eps)


REPLAYS = {name: (name, calls) for name, (calls, _) in CALLS.items()} | {
    "attention layouts": ("fastseq.kernels.bucketed_attention.launch", _attention_layout_calls),
    "norm epsilon": ("fastseq.kernels.rms_norm", _rms_norm_epsilon_calls),
}


@pytest.mark.parametrize("case", list(REPLAYS))
def test_launch_kernel_launches_what_triton_launches(monkeypatch, case):
    """Each recorded launch through `JITFunction.run`, then through `launch_kernel`: the same compiled
    kernel gets the same arguments. The launches are replayed twice, and the second time every launch
    whose integers fit in 32 bits goes straight to its compiled kernel's launcher."""
    import torch
    from triton.runtime import driver

    module, calls = REPLAYS[case]
    launches = _record(monkeypatch, importlib.import_module(module), calls)
    monkeypatch.setattr(driver, "_active", _Driver())
    monkeypatch.setattr(_launch, "_SITES", {})
    sink: list = [None]
    jits: dict = {}
    for kernel, *_ in launches:
        if kernel.fn not in jits:
            jit = jits[kernel.fn] = _compile.jit_function(kernel)
            jit.device_caches[0]  # sets `jit.compile`, which the stand-in replaces
            jit.compile = lambda *args, **kwargs: _Compiled(sink)
    triton_runs = []
    jit_run = {fn: jit.run for fn, jit in jits.items()}
    for jit in jits.values():
        jit.run = lambda *args, _run=jit.run, **kwargs: triton_runs.append(1) or _run(*args, **kwargs)
    direct = []
    for replay in range(2):
        for kernel, grid, args, meta in launches:
            jit = jits[kernel.fn]
            theirs, ours = [], []
            sink[0] = theirs
            jit_run[kernel.fn](*args, grid=grid, warmup=False, **meta)
            sink[0] = ours
            before = len(triton_runs)
            _launch.launch_kernel(jit, grid, args, meta)
            assert len(theirs) == len(ours) == 1
            (compiled, got), (expected_compiled, expected) = ours[0], theirs[0]
            assert compiled is expected_compiled, (kernel.fn.__name__, replay)
            fast = len(triton_runs) == before
            # Triton passes the launch hooks, chains that call nothing here; the direct launch passes None.
            assert not any(hook.calls for hook in expected[7:9])
            assert got[6:9] == ((None, None, None) if fast else expected[6:9])
            got, expected = got[:6] + got[9:], expected[:6] + expected[9:]
            for a, b in zip(got, expected, strict=True):
                assert a is b if isinstance(b, torch.Tensor) else (type(a), a) == (type(b), b)
            if replay:
                fits = all(-(2**31) <= a < 2**31 for a in args if type(a) is int)
                direct.append((fast, fits))
    assert direct and all(fast == fits for fast, fits in direct), direct


def test_launch_hooks_get_tritons_launch(monkeypatch):
    """With a launch hook set (a profiler's), a launch goes through `JITFunction.run`, which calls it."""
    from triton import knobs
    from triton.runtime import driver

    calls = CALLS["fastseq.kernels.rms_norm"][0]
    kernel, grid, args, meta = _record(monkeypatch, importlib.import_module("fastseq.kernels.rms_norm"), calls)[0]
    monkeypatch.setattr(driver, "_active", _Driver())
    monkeypatch.setattr(_launch, "_SITES", {})
    sink: list = [[]]
    jit = _compile.jit_function(kernel)
    jit.device_caches[0]
    jit.compile = lambda *args, **kwargs: _Compiled(sink)
    runs = []
    jit.run = lambda *args, _run=jit.run, **kwargs: runs.append(1) or _run(*args, **kwargs)
    for hooks in ([], [], [lambda metadata: None]):
        monkeypatch.setattr(knobs.runtime.launch_enter_hook, "calls", hooks)
        _launch.launch_kernel(jit, grid, args, meta)
    assert len(sink[0]) == 3 and len(runs) == 2  # the first launch and the hooked one
