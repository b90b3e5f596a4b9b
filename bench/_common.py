"""Helpers shared by the benchmark scripts: timing, peak memory, CSV rows with their provenance."""

from __future__ import annotations

import argparse
import csv
import datetime
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def time_ms(fn: Callable[[], object], device: str, grad_to_none=None) -> float:
    """Median milliseconds of `fn`: triton.testing.do_bench on a GPU (after warm-up), a few timed
    calls on the CPU (smoke runs only)."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=50, rep=200, grad_to_none=grad_to_none, return_mode="median")
    fn()
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def peak_mib(fn: Callable[[], object], device: str) -> float:
    """Peak CUDA memory of one call of `fn` above what was allocated before it (NaN on the CPU)."""
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def fwd_bwd_full(call: Callable[[], torch.Tensor], leaves: list[torch.Tensor], grad, device: str):
    """Median ms of forward, backward and forward + backward of `call()` (backward with `grad`; None
    for a scalar), and the peak MiB of one forward + backward with the leaves' gradients cleared."""
    out = call()
    out.backward(grad, retain_graph=True)
    fwd = time_ms(call, device)
    bwd = time_ms(lambda: out.backward(grad, retain_graph=True), device, grad_to_none=leaves)
    full = time_ms(lambda: call().backward(grad), device, grad_to_none=leaves)
    out = None  # free the graph before measuring the peak
    for t in leaves:
        t.grad = None
    return fwd, bwd, full, peak_mib(lambda: call().backward(grad), device)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """--dtype, --out and --smoke, which every benchmark takes."""
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", type=Path, default=None, help="CSV file to write")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run through the Triton interpreter")


def provenance(device: str, formula: str) -> dict[str, str]:
    import triton

    return {
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
        "formula": formula,
    }


def write_csv(rows: list[dict], path: Path | None) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {path}")


def smoke_setup(smoke: bool) -> str:
    """The device to run on: CUDA, or the CPU with the Triton interpreter for `--smoke`."""
    import os

    if smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before fastseq.kernels is imported
        import importlib

        os.environ.setdefault("FASTSEQ_BACKEND", "reference")
        for op in ("bucketed_attention", "local_attention", "global_aggregate", "gated_gelu", "rms_norm",
                   "linear_cross_entropy"):  # fmt: skip
            if importlib.import_module(f"fastseq.kernels.{op}").HAS_TRITON_KERNEL:
                os.environ.setdefault(f"FASTSEQ_BACKEND_{op.upper()}", "triton")
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke to check the script on the CPU")
    return "cuda"
