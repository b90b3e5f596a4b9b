"""Count the Triton builds a command compiles on a cold cache, on the CPU.

What a harvest step's time limit is sized from (`bench/gpu_check.sh`):

    python bench/compile_count.py pytest -m cuda tests/kernels               # a step's tests
    python bench/compile_count.py --gpu-tests pytest -m cuda tests/kernels   # with the GPU-only ones
    python bench/compile_count.py --gpu-sizes bench/bench_rms_norm.py --tokens 64   # a benchmark

The command runs in this process, its kernels through the Triton interpreter (`TRITON_INTERPRET=1`, and
`FASTSEQ_BACKEND=triton` unless set: what `auto` picks for CUDA tensors), and every launch of a fastseq
kernel (`launch_kernel`) is keyed as Triton's own launch keys it before it compiles, for the GPU of
`--arch`: the kernel's binder on a stand-in driver of that target gives the specialization (each
argument's type, a pointer's 16-byte alignment, an integer equal to 1 or divisible by 16, the
constexprs) and the options. A new key is a build a cold cache compiles. The interpreter's tiles stand
in for the GPU's, one tile per call either way; where the GPU picks a tile by length (a forward with
fewer queries than its tile takes a cut one, `tiles._fwd_config`), calls that share a key here can be
two builds there.

`--gpu-tests` keys the launches without running them (`--record-only`) and also runs the tests that skip
without CUDA: their outputs are then garbage and their checks fail, after the launches that are counted.
(Keyed without running, the models' CUDA tests give the count they give when the interpreter runs them.)
A test that a GPU sends elsewhere (fp32 attention runs PyTorch's on a GPU) is counted here all the same:
read the per-test lines.

`--gpu-sizes` runs a benchmark script at the sizes it runs on a GPU (its `--smoke` shrinks them), on the
CPU, its kernels keyed and not run; the PyTorch baselines it times do run, so give a smaller `--tokens`
where the script takes one, a multiple of 16 as the GPU's (the count depends on divisibility, not size).
"""

from __future__ import annotations

import argparse
import collections
import os
import runpy
import sys
from pathlib import Path

_UNSKIP_REASON = "CUDA"  # the tests' `skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")`


class Counter:
    """The builds launched so far: key -> the first launcher of it (a test or the script), and each
    launcher's keys."""

    def __init__(self, arch: int, record_only: bool):
        from fastseq.kernels._compile import StandInDriver

        self.driver = StandInDriver(arch)
        self.record_only = record_only
        self.first: dict[tuple, str] = {}
        self.by_caller: dict[str, set] = collections.defaultdict(set)
        self.caller = "(command)"
        self._jits: dict = {}

    def key(self, kernel, args: tuple, meta: dict) -> tuple:
        """(kernel name, specialization, options) as Triton's launch of `kernel` computes them for the
        stand-in driver's target."""
        from triton.runtime import driver

        from fastseq.kernels._compile import jit_function

        saved = driver._active
        driver._active = self.driver
        try:
            jit = self._jits.get(kernel.fn)
            if jit is None:
                jit = self._jits[kernel.fn] = jit_function(kernel)
            binder = jit.device_caches[0][-1]
            _, specialization, options = binder(*args, **meta)
        finally:
            driver._active = saved
        return kernel.fn.__name__, str(specialization), str(options)

    def install(self) -> None:
        """Every fastseq module's `launch_kernel` keys its launch first (and, with `record_only`, only
        keys it)."""
        from fastseq.kernels import _launch

        original = _launch.launch_kernel

        def launch_kernel(kernel, grid, args, meta):
            key = self.key(kernel, args, meta)
            self.first.setdefault(key, self.caller)
            self.by_caller[self.caller].add(key)
            if not self.record_only:
                original(kernel, grid, args, meta)

        for name, module in list(sys.modules.items()):
            if name.startswith("fastseq.kernels") and getattr(module, "launch_kernel", None) is original:
                module.launch_kernel = launch_kernel

    def report(self) -> str:
        new = collections.Counter(self.first.values())
        lines = [f"{caller}: {len(keys)} builds, {new[caller]} new" for caller, keys in self.by_caller.items()]
        kernels = collections.Counter(key[0] for key in self.first)
        lines.append(f"builds: {len(self.first)} ({', '.join(f'{k} {n}' for k, n in sorted(kernels.items()))})")
        return "\n".join(lines)


def _skips_without_cuda(mark) -> bool:
    return mark.name == "skipif" and _UNSKIP_REASON in str(mark.kwargs.get("reason", ""))


class _Plugin:
    """pytest's side: whose launches these are, and (with `--gpu-tests`) the GPU-only tests unskipped."""

    def __init__(self, counter: Counter, gpu_tests: bool):
        self.counter, self.gpu_tests = counter, gpu_tests

    def pytest_collection_modifyitems(self, config, items):
        if not self.gpu_tests:
            return
        for item in items:
            item.own_markers = [m for m in item.own_markers if not _skips_without_cuda(m)]

    def pytest_runtest_setup(self, item):
        self.counter.caller = item.nodeid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=(80, 86, 90), help="the GPU's sm_XX (default 90)")
    parser.add_argument("--record-only", action="store_true", help="key the launches without running the kernels")
    parser.add_argument("--gpu-tests", action="store_true", help="also the tests that skip without CUDA (record only)")
    parser.add_argument("--gpu-sizes", action="store_true", help="a benchmark script at its GPU sizes (record only)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="pytest ARGS..., or a script and its arguments")
    args = parser.parse_args(argv)
    if not args.command:
        parser.error("give a command: pytest ARGS..., or a Python script and its arguments")
    os.environ["TRITON_INTERPRET"] = "1"  # before fastseq.kernels is imported: CPU tensors reach the launchers
    os.environ.setdefault("FASTSEQ_BACKEND", "triton")
    import fastseq.kernels  # noqa: F401  (every op module, so that `install` finds their launch_kernel)

    counter = Counter(args.arch, args.record_only or args.gpu_tests or args.gpu_sizes)
    counter.install()
    if args.command[0] == "pytest":
        import pytest

        status = pytest.main(args.command[1:], plugins=[_Plugin(counter, args.gpu_tests)])
    else:
        script = Path(args.command[0])
        counter.caller = script.name
        sys.argv = [str(script), *args.command[1:]]
        sys.path.insert(0, str(script.resolve().parent))
        if args.gpu_sizes:
            import _common  # the benchmarks' helpers, beside the script

            _common.smoke_setup = lambda smoke: "cpu"  # the CPU, at the sizes the script runs on a GPU
        try:
            runpy.run_path(str(script), run_name="__main__")
            status = 0
        except SystemExit as stop:
            status = 0 if stop.code is None else stop.code if isinstance(stop.code, int) else 1
    print(counter.report())
    if not counter.first:
        print("no fastseq kernel was launched: is the command's backend the Triton one (FASTSEQ_BACKEND)?")
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
