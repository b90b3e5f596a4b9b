"""The benchmark scripts run end to end (tiny CPU sizes; their numbers are not checked) and write
the results schema."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
from _common import LONG_FIELDS  # noqa: E402

# One `fastseq bench --quick` runs every script (minutes on two cores): the full matrix's.
pytestmark = pytest.mark.slow


def _committed_results() -> list[tuple[str, int]]:
    return sorted((p.name, p.stat().st_mtime_ns) for p in (ROOT / "bench" / "results").iterdir())


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> Path:
    """`fastseq bench --quick --out bench` once, run in a temporary directory: every script at tiny
    CPU sizes, then the plots and the table. The relative --out is that directory's (the scripts
    run inside the repository's bench/, which must stay as committed)."""
    out = tmp_path_factory.mktemp("bench")
    committed = _committed_results()
    exe = shutil.which("fastseq")
    assert exe, "the fastseq console script is not installed (pip install -e .)"
    proc = subprocess.run([exe, "bench", "--quick", "--out", out.name], capture_output=True, text=True, timeout=1200,
                          cwd=out.parent)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _committed_results() == committed and not (ROOT / "bench" / out.name).exists()
    assert f"in {out}" in proc.stdout.splitlines()[-1]
    return out


def _smoke(script: str, out: Path) -> list[dict]:
    rows = list(csv.DictReader((out / f"{script.removeprefix('bench_')}_cpu.csv").open()))
    assert rows and list(rows[0]) == LONG_FIELDS
    for row in rows:
        assert float(row["p20"]) <= float(row["p50"]) <= float(row["p80"]) or row["p50"] == "nan", row
        assert row["gpu"] == "cpu" and row["torch"] and row["transformers"] and row["date"] and row["formula"]
    return rows


def _values(rows, mode: str, metric: str) -> dict[tuple[str, str], float]:
    return {(r["provider"], r["x_value"]): float(r["p50"]) for r in rows if r["mode"] == mode and r["metric"] == metric}


@pytest.mark.slow
def test_bench_bucketed_attention_smoke(quick):
    rows = _smoke("bench_bucketed_attention", quick)
    assert {r["provider"] for r in rows} == {"fastseq", "hf_eager", "hf_sdpa"}
    assert all(v > 0 for v in _values(rows, "full", "time").values())
    # Every provider computed the same attention and gradients as transformers' eager one.
    assert all(v < 1e-4 for v in _values(rows, "full", "max_rel_diff").values())
    assert {r["unit"] for r in rows if r["metric"] == "tflops"} == {"TFLOP/s"}


def test_bench_rms_norm_smoke(quick):
    rows = _smoke("bench_rms_norm", quick)
    assert {r["provider"] for r in rows} == {"fastseq", "hf_eager", "torch_compile"}
    assert all(v > 0 for v in _values(rows, "full", "time").values())


def test_bench_ffn_smoke(quick):
    rows = _smoke("bench_ffn", quick)
    assert {r["provider"] for r in rows} == {"fastseq", "hf_eager", "torch_compile"}
    assert {r["x_value"].split(",")[0] for r in rows} == {"ffn", "gated_gelu"}
    assert all(v > 0 for v in _values(rows, "full", "time").values())


def test_bench_cross_entropy_smoke(quick):
    rows = _smoke("bench_cross_entropy", quick)
    assert {r["provider"] for r in rows} == {"fastseq", "hf_eager", "torch_compile"}
    assert all(v > 0 for v in _values(rows, "full", "time").values())


def test_bench_local_attention_smoke(quick):
    rows = _smoke("bench_local_attention", quick)
    assert {r["provider"] for r in rows} == {"fastseq", "hf_eager", "fastseq_op"}
    assert all(v > 0 for v in _values(rows, "full", "time").values())
    # The same layer as transformers', weights and all.
    assert all(v < 1e-4 for (p, _), v in _values(rows, "full", "max_rel_diff").items() if p != "fastseq_op")


def test_bench_train_quick(quick):
    rows = _smoke("bench_train", quick)
    models = {r["x_value"].split(",")[0] for r in rows}
    assert models == {"t5-small", "google/t5-v1_1-small", "google/long-t5-tglobal-base@4k",
                      "facebook/blenderbot_small-90M"}  # fmt: skip
    for model in models:
        mine = [r for r in rows if r["x_value"].startswith(model + ",")]
        providers = {r["provider"] for r in mine}
        assert {"fastseq", "hf_eager", "hf_patched"} <= providers
        # Every provider trains the same weights on the same batch: the same loss before the timed steps.
        first = {r["provider"]: float(r["p50"]) for r in mine if r["metric"] == "loss"}
        assert max(first.values()) - min(first.values()) <= 1e-4 * max(first.values())
        assert all(float(r["p50"]) > 0 for r in mine if r["metric"] in ("time", "tokens_per_s"))


def test_bench_packing_quick(quick):
    """The three batchings of one FLAN-like mixture on one budget: the packed rows' real-token fraction
    is what packing the mixture gives, the padded batches' what random batches of it give."""
    rows = _smoke("bench_packing", quick)
    assert {r["provider"] for r in rows} == {"fastseq_padded", "fastseq_bucketed", "fastseq_packed", "hf_sdpa_padded"}
    fraction = {r["provider"]: float(r["p50"]) for r in rows if r["metric"] == "real_fraction"}
    assert fraction["fastseq_packed"] >= 0.97 and fraction["fastseq_padded"] < 0.5
    assert fraction["fastseq_padded"] < fraction["fastseq_bucketed"] < fraction["fastseq_packed"]
    assert fraction["hf_sdpa_padded"] == fraction["fastseq_padded"]  # the same batches
    assert all(float(r["p50"]) > 0 for r in rows if r["metric"] == "real_tokens_per_s")


def test_plots_and_the_results_table(quick):
    for name in ("train", "packing", "bucketed_attention", "local_attention", "rms_norm", "ffn", "cross_entropy"):
        png = quick / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = (quick / "README.md").read_text()
    assert "### train" in readme and "fastseq vs hf_eager" in readme and "hf_patched vs hf_sdpa" in readme
    assert "![train](train.png)" in readme  # the plots beside the README, where the links point
    assert "fastseq_packed vs fastseq_padded" in readme and "fastseq_packed vs fastseq_bucketed" in readme


def test_bench_bucketed_attention_host(tmp_path):
    """`--host` times every case, the launchers' launch and Triton's `JITFunction.run` up to the C
    launcher included."""
    out = tmp_path / "host.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_bucketed_attention.py"), "--host", "--label",
                           "test", "--out", str(out)], capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert {r["provider"] for r in rows} == {"fastseq_train", "fastseq_eval", "fastseq_train_layer",
                                             "noop_function_layer", "torch_mul", "torch_mul_layer", "bias_grad_sum",
                                             "triton_launch_layer", "triton_run_layer"}  # fmt: skip
    assert all(float(r["p50"]) > 0 and r["metric"] == "host_time" and r["formula"].endswith("; test") for r in rows)
