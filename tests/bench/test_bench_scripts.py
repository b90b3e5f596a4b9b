"""The benchmark scripts run end to end (tiny CPU sizes; their numbers are not checked)."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_bucketed_attention_smoke(tmp_path):
    out = tmp_path / "attention.csv"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_bucketed_attention.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert {r["provider"] for r in rows} == {"fastseq", "hf_eager", "hf_sdpa"}
    assert {int(r["L"]) for r in rows} == {16, 32}
    for row in rows:
        assert float(row["full_ms"]) > 0 and row["gpu"] == "cpu"
        # Every provider computed the same attention and gradients as transformers' eager one.
        assert float(row["max_rel_diff_vs_eager"]) < 1e-4


def _smoke(script: str, tmp_path) -> list[dict]:
    out = tmp_path / f"{script}.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{script}.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return list(csv.DictReader(out.open()))


def test_bench_rms_norm_smoke(tmp_path):
    rows = _smoke("bench_rms_norm", tmp_path)
    assert {r["provider"] for r in rows} == {"fastseq", "hf_eager", "torch_compile"}
    assert all(float(r["full_ms"]) > 0 for r in rows)


def test_bench_ffn_smoke(tmp_path):
    rows = _smoke("bench_ffn", tmp_path)
    assert {(r["op"], r["provider"]) for r in rows} == {
        (op, p) for op in ("ffn", "gated_gelu") for p in ("fastseq", "hf_eager", "torch_compile")
    }
    assert all(float(r["full_ms"]) > 0 for r in rows)


def test_bench_cross_entropy_smoke(tmp_path):
    rows = _smoke("bench_cross_entropy", tmp_path)
    assert {r["provider"] for r in rows} == {"fastseq", "hf_eager", "torch_compile"}
    assert {int(r["vocab"]) for r in rows} == {53, 300}
    assert all(float(r["full_ms"]) > 0 for r in rows)


def test_bench_local_attention_smoke(tmp_path):
    rows = _smoke("bench_local_attention", tmp_path)
    assert {(r["provider"], r["kind"]) for r in rows} == {
        (p, k) for p in ("fastseq", "hf_eager", "fastseq_op") for k in ("local", "transient-global")
    }
    for row in rows:
        assert float(row["full_ms"]) > 0
        if row["provider"] != "fastseq_op":  # the same layer as transformers', weights and all
            assert float(row["max_rel_diff_vs_hf"]) < 1e-4
