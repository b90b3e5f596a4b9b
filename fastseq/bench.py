"""`fastseq bench [NAME ...] [--quick]`: run the benchmark scripts of the repository's `bench/`
directory, then write one plot per benchmark and the results table of `bench/README.md`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

NAMES = ("train", "packing", "bucketed_attention", "local_attention", "rms_norm", "ffn", "cross_entropy")
# name -> its script and arguments, where not bench_NAME.py alone
SCRIPTS = {"packing": ("bench_train.py", ["--packing"])}


def bench_dir() -> Path:
    path = Path(__file__).resolve().parents[1] / "bench"
    if not (path / "bench_train.py").is_file():
        raise FileNotFoundError(
            f"{path} has no benchmark scripts: `fastseq bench` runs the scripts of a fastseq clone "
            "(pip install -e . from the repository)"
        )
    return path


def _device_tag(quick: bool) -> str:
    if quick:
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        raise ValueError("no CUDA device: run `fastseq bench --quick` for the CPU check")
    return torch.cuda.get_device_name().split()[1].lower() if " " in torch.cuda.get_device_name() else "gpu"


def run(names: list[str], *, quick: bool = False, out: str | None = None, readme: str | None = None,
        compile: bool = False) -> None:  # fmt: skip
    """`fastseq bench`: run the scripts, then write the plots and the results table."""
    here = bench_dir()
    names = names or list(NAMES)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise ValueError(f"unknown benchmark {unknown}; choose from {', '.join(NAMES)}")
    # Resolved here: the scripts run inside bench/, so a relative --out is this directory's, not theirs.
    out = Path(out).resolve() if out else here / "results"
    out.mkdir(parents=True, exist_ok=True)
    tag = _device_tag(quick)
    failed = []
    for name in names:
        script, extra = SCRIPTS.get(name, (f"bench_{name}.py", []))
        cmd = [sys.executable, str(here / script), *extra, "--out", str(out / f"{name}_{tag}.csv")]
        if quick:
            cmd.append("--quick" if script == "bench_train.py" else "--smoke")
        if compile and name == "train":
            cmd.append("--compile")
        print(f"fastseq bench: {name}", flush=True)
        if subprocess.run(cmd, cwd=here).returncode != 0:
            failed.append(name)
    sys.path.insert(0, str(here))
    from report import report

    default_readme = here / "README.md" if out.resolve() == (here / "results").resolve() else out / "README.md"
    readme = Path(readme).resolve() if readme else default_readme
    written = report(out, readme)
    print(f"fastseq bench: {len(names) - len(failed)}/{len(names)} benchmarks ran; wrote "
          f"{', '.join(p.name for p in written)} in {out}")  # fmt: skip
    if failed:
        print(f"fastseq bench: failed: {', '.join(failed)} (their output is above)", file=sys.stderr)
        raise SystemExit(1)
