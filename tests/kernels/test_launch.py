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
from tests.kernels.test_compile_targets import CALLS, record_launches


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
    """The GPU driver as a launch asks it: the current device and stream are the test's to change; sm_90."""

    device, stream = 0, 7

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device):
        return self.stream

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)


class _Replay:
    """Launches through Triton's `JITFunction.run` and through `launch_kernel`, each into a stand-in
    compiled kernel per specialization (Triton compiles on every miss of its own cache), compared."""

    def __init__(self, monkeypatch, compiled=None):
        from triton.runtime import driver

        self.compiled = compiled or _Compiled

        self.driver = _Driver()
        monkeypatch.setattr(driver, "_active", self.driver)
        monkeypatch.setattr(_launch, "_SITES", {})
        self.sink: list = [None]
        self.jits: dict = {}
        self.runs: dict = {}  # each kernel's JITFunction.run
        self.triton_runs = 0  # the launches `launch_kernel` left to Triton's

    def jit(self, kernel):
        """The JITFunction of an interpreted kernel, with the stand-in compiler on the current device."""
        jit = self.jits.get(kernel.fn)
        if jit is None:
            jit = self.jits[kernel.fn] = _compile.jit_function(kernel)
            self.runs[kernel.fn] = run = jit.run

            def counted(*args, **kwargs):
                self.triton_runs += 1
                return run(*args, **kwargs)

            jit.run = counted
        if self.driver.device not in jit.device_caches:
            jit.device_caches[self.driver.device]  # sets `jit.compile`, which the stand-in replaces
        jit.compile = lambda *args, **kwargs: self.compiled(self.sink)
        return jit

    def launch(self, kernel, grid, args, meta) -> bool:
        """Both launches of one call, held equal; whether `launch_kernel`'s went straight to the launcher."""
        import torch

        jit = self.jit(kernel)
        theirs, ours = [], []
        self.sink[0] = theirs
        self.runs[kernel.fn](*args, grid=grid, warmup=False, **meta)
        self.sink[0] = ours
        before = self.triton_runs
        _launch.launch_kernel(jit, grid, args, meta)
        fast = self.triton_runs == before
        assert len(theirs) == len(ours) == 1
        (compiled, got), (expected_compiled, expected) = ours[0], theirs[0]
        assert compiled is expected_compiled, (kernel.fn.__name__, fast)
        # Triton passes the launch hooks; the direct launch passes None, where the chains call nothing.
        assert got[6:9] == expected[6:9] or (fast and got[6:9] == (None,) * 3)
        assert not fast or not any(hook.calls for hook in expected[7:9])
        got, expected = got[:6] + got[9:], expected[:6] + expected[9:]
        for a, b in zip(got, expected, strict=True):
            assert a is b if isinstance(b, torch.Tensor) else (type(a), a) == (type(b), b)
        return fast


def _attention_layout_calls():
    """The attention's forward and backward, causal or not, on q, k and v laid out as a model's
    projections lay them out, contiguous, with rows of D + 1 (strides no multiple of 16), 4 or 8 bytes
    past a 16-byte boundary, and in fp16 (one plan each dtype), with seeds in tensors:
    what changes a launch's specialization between calls of one plan."""
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
        for seed, causal in ((5, True), (5, False), (2**31 - 2, True)):
            seed = torch.tensor([seed], dtype=torch.int32)
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
    kernel gets the same arguments, on the stream of the moment. The launches are replayed on device 0,
    again (where every launch whose integers fit in 32 bits goes straight to its compiled kernel's
    launcher), on device 1 and another stream, on device 0 again (straight again), with Triton's debug
    knob, and after Triton's caches are cleared (to compile again)."""
    from triton import knobs

    module, calls = REPLAYS[case]
    launches = record_launches(monkeypatch, importlib.import_module(module), calls)
    replay = _Replay(monkeypatch)
    fast_again = []  # each launch of the second and the fourth pass: (straight to the launcher, fits 32 bits)
    passes = ((0, 7, False, False), (0, 7, False, False), (1, 9, False, False), (0, 7, False, False),
              (1, 9, True, False), (1, 11, False, True))  # fmt: skip
    for i, (device, stream, debug, clear) in enumerate(passes):
        replay.driver.device, replay.driver.stream = device, stream
        monkeypatch.setattr(knobs.runtime, "debug", debug)
        if clear:
            for jit in replay.jits.values():
                jit.device_caches.clear()
        for kernel, grid, args, meta in launches:
            fast = replay.launch(kernel, grid, args, meta)
            if i in (1, 3):
                fast_again.append((fast, all(-(2**31) <= a < 2**31 for a in args if type(a) is int)))
    assert all(fast == fits for fast, fits in fast_again), fast_again


def _probe_kernel():
    """A kernel with a pointer, an integer it does not specialize on, a number passed by keyword, a
    constexpr, and a constexpr left to its default."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["n"])
    def _probe_kernel(x_ptr, n, s, BLOCK: tl.constexpr, SCALE: tl.constexpr = 2):
        offsets = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offsets, mask=offsets < n)
        tl.store(x_ptr + offsets, x * s * SCALE, mask=offsets < n)

    return _probe_kernel


def test_launch_kernel_leaves_to_triton_what_its_key_cannot_tell(monkeypatch):
    """None where a tensor or a number was, a tensor where a number was, a number Triton specializes
    passed by keyword (16, then 16.0 and True), a callable grid and a kernel made with `debug`: the
    launches still get what Triton's give them, the constexpr left to its default included."""
    import torch

    kernel = _probe_kernel()
    replay = _Replay(monkeypatch)
    x = torch.randn(16)
    launches = [
        ((1,), (x, 16, 2.0), {"BLOCK": 16}),
        ((1,), (x, 16, 2.0), {"BLOCK": 16}),
        ((1,), (None, 16, 2.0), {"BLOCK": 16}),
        ((1,), (x, None, 2.0), {"BLOCK": 16}),
        ((1,), (x, None, None), {"BLOCK": 16}),
        ((1,), (x, torch.ones(2), 2.0), {"BLOCK": 16}),
        ((1,), (x, 16), {"s": 16, "BLOCK": 16}),
        ((1,), (x, 16), {"s": 16.0, "BLOCK": 16}),
        ((1,), (x, 16), {"s": True, "BLOCK": 16}),
        (lambda meta: (1,), (x, 16, 2.0), {"BLOCK": 16}),
    ]
    fast = [replay.launch(kernel, grid, args, meta) for grid, args, meta in launches]
    assert fast == [False, True] + [False] * 8
    monkeypatch.setattr(replay.jit(kernel), "debug", True)
    assert not replay.launch(kernel, (1,), (x, 16, 2.0), {"BLOCK": 16})


def test_a_tensor_where_a_number_was_is_never_kept(monkeypatch):
    """A tensor (or a tuple of them) where the site's first launch had a number is keyed by the object,
    whose storage can change under it (`set_`): such a launch always goes through Triton's, which reads
    its address again."""
    import torch

    kernel = _probe_kernel()
    replay = _Replay(monkeypatch)
    x, storage = torch.randn(16), torch.zeros(8)
    assert replay.launch(kernel, (1,), (x, 16, 2.0), {"BLOCK": 16}) is False
    for wrap in (lambda t: t, lambda t: (t,)):
        y = torch.zeros(1)
        for offset in (0, 0, 1):  # 16-byte aligned twice, then 4 bytes off
            y.set_(storage.untyped_storage(), offset, (1,))
            assert replay.launch(kernel, (1,), (x, 16, wrap(y)), {"BLOCK": 16}) is False


def test_kernels_kept_per_site_are_bounded(monkeypatch):
    """Past `_PER_SITE` compiled kernels a site starts over: the first configuration goes through
    Triton's launch again, the latest straight to its launcher."""
    import torch

    monkeypatch.setattr(_launch, "_PER_SITE", 2)
    kernel = _probe_kernel()
    replay = _Replay(monkeypatch)
    x = torch.randn(16)
    fast = [replay.launch(kernel, (1,), (x, 16, 2.0), {"BLOCK": block}) for block in (16, 32, 64, 16, 64)]
    assert fast == [False, False, False, False, True]


class _Compiling(_Compiled):
    """A compile still under way (Triton 3.9's asynchronous mode returns its future)."""

    def result(self):
        return self


def test_a_compile_under_way_is_not_kept(monkeypatch):
    import torch

    replay = _Replay(monkeypatch, compiled=_Compiling)
    kernel, x = _probe_kernel(), torch.randn(16)
    assert [replay.launch(kernel, (1,), (x, 16, 2.0), {"BLOCK": 16}) for _ in range(3)] == [False] * 3


HOOKS = ["launch enter", "launch exit", "pre-run", "compiler stages"]


@pytest.mark.parametrize("hook", HOOKS)
def test_hooks_get_tritons_launch(monkeypatch, hook):
    """With a hook set (a profiler's launch hooks, a kernel's pre-run hook, the compiler-stage hook, whose
    hash Triton 3.9 adds to the compiled kernel's key), a launch goes through `JITFunction.run`."""
    from triton import knobs

    norm = importlib.import_module("fastseq.kernels.rms_norm")
    kernel, grid, args, meta = record_launches(monkeypatch, norm, CALLS["fastseq.kernels.rms_norm"][0])[0]
    replay = _Replay(monkeypatch)
    fast = [replay.launch(kernel, grid, args, meta) for _ in range(2)]
    called = []
    if hook == "launch enter":
        monkeypatch.setattr(knobs.runtime.launch_enter_hook, "calls", [called.append])
    elif hook == "launch exit":
        monkeypatch.setattr(knobs.runtime.launch_exit_hook, "calls", [called.append])
    elif hook == "pre-run":
        monkeypatch.setattr(replay.jit(kernel), "pre_run_hooks", [lambda *args, **kwargs: called.append(1)])
    else:
        monkeypatch.setattr(knobs.runtime, "add_stages_inspection_hook", lambda: called.append(1) or ("stages", 1))
    fast.append(replay.launch(kernel, grid, args, meta))
    assert fast == [False, True, False]
    if hook == "pre-run":  # (the stand-in launcher calls no launch hook; Triton 3.6 reads the stage hook
        assert called  # only when it compiles)
