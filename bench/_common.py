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


class Timing(float):
    """A median in milliseconds that also carries the 20th and 80th percentiles of its samples
    (kept through `round`)."""

    def __new__(cls, p50: float, p20: float, p80: float):
        obj = super().__new__(cls, p50)
        obj.p20, obj.p80 = p20, p80
        return obj

    def __round__(self, ndigits=None):
        return Timing(round(float(self), ndigits), round(self.p20, ndigits), round(self.p80, ndigits))

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        ordered = sorted(samples)

        def q(f: float) -> float:
            return ordered[min(len(ordered) - 1, max(0, round(f * (len(ordered) - 1))))]

        return cls(statistics.median(ordered), q(0.2), q(0.8))


def time_ms(fn: Callable[[], object], device: str, grad_to_none=None, reps: int = 3) -> Timing:
    """Milliseconds of `fn` (median, p20, p80): triton.testing.do_bench's samples on a GPU (after
    warm-up, L2 flushed), `reps` timed calls on the CPU (smoke runs only)."""
    if device == "cuda":
        import triton.testing

        samples = triton.testing.do_bench(fn, warmup=50, rep=200, grad_to_none=grad_to_none, return_mode="all")
        return Timing.of(list(samples))
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return Timing.of(samples)


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
    """The columns every row carries: the device, the versions (torch's names its CUDA, as in
    2.11.0+cu130; transformers is the baselines' and the patched models' version) and the date."""
    import importlib.metadata

    import triton

    try:
        transformers = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        transformers = ""
    return {
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers,
        "date": datetime.date.today().isoformat(),
        "formula": formula,
    }


# A wide column a script reports -> (mode, metric, unit). `mode` is the pass a figure measures
# (fwd, bwd, full: forward + backward, step: a training step); a rate X_tflops is derived from the
# time X_ms, so its p20 and p80 come from the time's p80 and p20.
_METRICS = {
    "ms": ("time", "ms"),
    "tflops": ("tflops", "TFLOP/s"),
    "gbps": ("bandwidth", "GB/s"),
    "tokens_per_s": ("tokens_per_s", "tokens/s"),
    "real_tokens_per_s": ("real_tokens_per_s", "real tokens/s"),  # padding not counted
    "mfu_pct": ("mfu", "%"),
    "peak_mib": ("peak_memory", "MiB"),
}
_OTHER = {
    "peak_mem_mib": ("full", "peak_memory", "MiB"),
    "max_rel_diff_vs_eager": ("full", "max_rel_diff", "ratio"),  # the check that a provider computes the same
    "max_rel_diff_vs_hf": ("full", "max_rel_diff", "ratio"),
    "loss": ("step", "loss", "nats"),
    "run_ms": ("run", "time", "ms"),
    "exact_match": ("run", "exact_match", "fraction"),
    "real_fraction": ("step", "real_fraction", "fraction"),  # real tokens / padded tokens
    "host_us": ("full", "host_time", "us"),  # Python, dispatch and launch set-up per call, kernels not run
}
_MODES = ("fwd", "bwd", "full", "step")
PROVENANCE = ("gpu", "torch", "triton", "transformers", "date", "formula")
LONG_FIELDS = ["benchmark", "provider", "mode", "metric", "unit", "x_name", "x_value", "p20", "p50", "p80",
               *PROVENANCE]  # fmt: skip


def _metric(column: str) -> tuple[str, str, str] | None:
    if column in _OTHER:
        return _OTHER[column]
    mode, _, rest = column.partition("_")
    if mode in _MODES and rest in _METRICS:
        return (mode, *_METRICS[rest])
    return None


def long_rows(rows: list[dict], benchmark: str) -> list[dict]:
    """The results schema: one row per (provider, mode, metric, x) with p20/p50/p80 and provenance;
    x is every input column of the script's row (sizes, dtype, model)."""
    out = []
    for row in rows:
        metrics = {k: v for k, v in row.items() if _metric(k) and k not in PROVENANCE and v not in ("", None)}
        xs = {k: v for k, v in row.items() if not _metric(k) and k not in PROVENANCE and k != "provider"}
        base = {"benchmark": benchmark, "provider": row.get("provider", ""),
                "x_name": ",".join(xs), "x_value": ",".join(str(v) for v in xs.values())}  # fmt: skip
        base |= {k: row.get(k, "") for k in PROVENANCE}
        for column, value in metrics.items():
            mode, metric, unit = _metric(column)
            p20 = p80 = value
            if isinstance(value, Timing):
                p20, p80 = value.p20, value.p80
            elif isinstance(row.get(f"{mode}_ms"), Timing) and unit in ("TFLOP/s", "GB/s", "tokens/s", "%"):
                t = row[f"{mode}_ms"]  # a rate, work / time: its p20 comes from the time's p80
                p20 = value * float(t) / t.p80 if t.p80 else value
                p80 = value * float(t) / t.p20 if t.p20 else value
            out.append(base | {"mode": mode, "metric": metric, "unit": unit,
                               "p20": _fmt(p20), "p50": _fmt(value), "p80": _fmt(p80)})  # fmt: skip
    return out


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{float(value):.6g}"
    return str(value)


def write_csv(rows: list[dict], path: Path | None, benchmark: str | None = None) -> None:
    """Write `rows` in the results schema (`LONG_FIELDS`)."""
    if path is None:
        return
    import sys

    benchmark = benchmark or Path(sys.argv[0]).stem.removeprefix("bench_")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LONG_FIELDS)
        writer.writeheader()
        writer.writerows(long_rows(rows, benchmark))
    print(f"wrote {len(rows)} measurements to {path}")


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
