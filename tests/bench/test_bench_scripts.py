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
