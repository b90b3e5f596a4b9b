"""`bench/gpu_check.sh` run on the CPU (every GPU step fails fast) returns what a lent GPU machine can
give back: at most 8 files, at most 2 folders deep, plain names, 16 MiB each; and a run cut short
still returns every step that finished. Also the wheels it carries (`bench/carry.py`)."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import signal
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "bench"))
import carry  # noqa: E402

STEPS = ["install", "versions", "cuda_kernels", "bucketed_attention", "cuda_models", "train", "local_attention",
         "ffn", "rms_norm", "cross_entropy", "packing", "zero3_t5_base"]  # fmt: skip
BENCH_STEPS = ["bucketed_attention", "local_attention", "ffn", "rms_norm", "cross_entropy", "train", "packing"]
NAME = re.compile(r"^[A-Za-z0-9._-]+$")
MIB = 2**20


def assert_returnable(out: Path) -> None:
    """What the device tool gives back from $OUT: at most 8 files, 16 MiB each and 64 MiB together,
    none more than 2 folders down, every file and folder named in letters, digits, '.', '_', '-'."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8, sorted(p.name for p in files)
    for path in out.rglob("*"):
        rel = path.relative_to(out)
        assert all(NAME.match(part) for part in rel.parts), rel
        assert not path.is_symlink(), rel
        if path.is_file():
            assert len(rel.parts) <= 3, f"{rel} is more than 2 folders down"
            assert path.stat().st_size <= 16 * MIB, rel
    assert sum(p.stat().st_size for p in files) <= 64 * MIB


def step_lines(steps_txt: Path) -> dict[str, int]:
    """step name -> exit status, from the outcome lines of steps.txt (its indented lines are the tails)."""
    outcomes = {}
    for line in steps_txt.read_text().splitlines():
        m = re.match(r"^(\w+): exit (\d+) in ", line)
        if m:
            outcomes[m[1]] = int(m[2])
    return outcomes


def bundle(out: Path) -> dict[str, str]:
    """results.tar.gz: member name under gpu_check/ -> text."""
    with tarfile.open(out / "results.tar.gz") as tar:
        return {Path(m.name).name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}


def make_wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel: one module `name` with VERSION = version."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": f"VERSION = {version!r}\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = io.StringIO()
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.write(f"{path},sha256={digest},{len(text.encode())}\n")
    record.write(f"{dist_info}/RECORD,,\n")
    files[f"{dist_info}/RECORD"] = record.getvalue()
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


def script_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The dry run's environment: this interpreter, no CUDA, no install into it, temporaries and a Triton
    cache (a name with a space) in tmp_path."""
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_INSTALL="0", CUDA_VISIBLE_DEVICES="",
               OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path), WHEELS=str(tmp_path / "wheels"),
               TRITON_CACHE_DIR=str(tmp_path / "triton cache"))  # fmt: skip
    env.pop("PYTHONPATH", None)
    return env | extra


@pytest.mark.slow
def test_dry_run_returns_every_step_within_the_limits(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "gpu_check_probe", "1.0")
    # A wheel for another interpreter (pydantic-core for CPython 3.12 on this machine's 3.11, say) is
    # skipped, and does not stop the install of the others.
    (wheels / "gpu_check_other-1.0-cp27-cp27mu-manylinux1_x86_64.whl").write_bytes(b"not for this interpreter")
    site_packages = Path(sysconfig.get_paths()["purelib"])
    before = {p.name: p.stat().st_mtime_ns for p in site_packages.iterdir()}
    proc = subprocess.run(["bash", str(SCRIPT)], env=script_env(tmp_path), capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    out = tmp_path / "out"
    # Nothing was installed into this environment (GPU_CHECK_INSTALL=0 and the carried wheels' own folder).
    assert {p.name: p.stat().st_mtime_ns for p in site_packages.iterdir()} == before
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_returnable(out)
    # A run that ended leaves no partial file: the three files and nothing else.
    assert sorted(p.name for p in out.iterdir()) == ["results.tar.gz", "steps.txt", "versions.txt"]
    outcomes = step_lines(out / "steps.txt")
    assert list(outcomes) == STEPS
    assert (out / "steps.txt").read_text().splitlines()[-1].startswith("gpu_check: done in ")
    logs = bundle(out)
    assert {f"{s}.log" for s in STEPS} <= set(logs)
    assert logs["steps.txt"] == (out / "steps.txt").read_text()
    assert logs["versions.log"] == (out / "versions.txt").read_text()
    # The carried wheel went into the run's own folder, first on the path of the later steps.
    assert "installing gpu-check-probe 1.0 (missing here)" in logs["install.log"]
    assert "gpu_check_other-1.0-cp27-cp27mu-manylinux1_x86_64.whl is not for this interpreter" in logs["install.log"]
    assert "carried: gpu_check_probe 1.0\n" in logs["versions.log"]
    # What fastseq, DeepSpeed and transformers require is all here (on the GPU machine the line names what
    # is not).
    assert "carry: every requirement of fastseq, deepspeed, transformers is here" in logs["install.log"]
    assert "device: no CUDA device" in logs["versions.log"]
    with pytest.raises(ImportError):
        __import__("gpu_check_probe")
    # Every GPU step failed fast for the want of CUDA, not for a wrong argument or a missing module.
    assert outcomes["versions"] == 0
    for name in ("cuda_kernels", "cuda_models"):
        assert outcomes[name] == 0, logs[f"{name}.log"]
        summary = logs[f"{name}.log"].strip().splitlines()[-1]  # "22/328 tests collected (306 deselected) in 5.1s"
        assert "tests collected" in summary and "error" not in summary, summary
    # The CUDA tests split between the two steps: every one collected once.
    kernels, models = ({line for line in logs[f"{name}.log"].splitlines() if "::" in line}
                       for name in ("cuda_kernels", "cuda_models"))  # fmt: skip
    collect = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"]
    every = subprocess.run(collect, cwd=ROOT, capture_output=True, text=True, timeout=300).stdout
    assert kernels and models and not kernels & models
    assert kernels | models == {line for line in every.splitlines() if "::" in line}
    # Each step's line says what it compiled (nothing here: no step launched a kernel).
    lines = [line for line in (out / "steps.txt").read_text().splitlines() if re.match(r"^\w+: exit ", line)]
    assert all(re.search(r"; compiled 0 kernels, 0 launchers$", line) for line in lines), lines
    for name in BENCH_STEPS:
        assert outcomes[name] == 1 and "no CUDA device" in logs[f"{name}.log"], logs[f"{name}.log"]
    assert outcomes["zero3_t5_base"] == 2 and "no CUDA device: not run" in logs["zero3_t5_base.log"]


@pytest.mark.slow
def test_a_run_cut_short_returns_what_finished(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=script_env(tmp_path), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        finished: list[str] = []
        while "bucketed_attention" not in finished:  # a step past the install and the versions
            assert proc.poll() is None, "the script ended before it was cut short"
            time.sleep(0.1)
            finished = list(step_lines(out / "steps.txt")) if (out / "steps.txt").is_file() else []
        # Written as it goes: every step that steps.txt lists is already in the archive, so even a
        # kill that leaves no time to clean up returns it.
        assert {f"{s}.log" for s in finished} <= set(bundle(out))
        os.killpg(proc.pid, signal.SIGTERM)  # what a time limit sends to the command
        assert proc.wait(timeout=60) == 143
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert_returnable(out)
    text = (out / "steps.txt").read_text()
    assert text.splitlines()[-1].startswith("gpu_check: cut short by a signal after ")
    finished = list(step_lines(out / "steps.txt"))
    assert finished[:4] == STEPS[:4] and "zero3_t5_base" not in finished
    logs = bundle(out)
    assert {f"{s}.log" for s in finished} <= set(logs)
    assert logs["steps.txt"] == text
    assert not (out / "current.log").exists()  # the step that was running is filed, its log so far kept


def test_no_time_left_runs_no_step_and_still_returns_the_bundle(tmp_path):
    """GPU_CHECK_BUDGET caps every step at what is left of it: with none left, each step is noted as
    not run, and the files come back all the same."""
    proc = subprocess.run(["bash", str(SCRIPT)], env=script_env(tmp_path, GPU_CHECK_BUDGET="0"),
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    out = tmp_path / "out"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_returnable(out)
    outcomes = step_lines(out / "steps.txt")
    assert list(outcomes) == STEPS and set(outcomes.values()) == {124}
    logs = bundle(out)
    assert all("s are spent: not run" in logs[f"{s}.log"] for s in STEPS)


def test_each_step_says_what_it_compiled(tmp_path):
    """A step's line in steps.txt counts the kernels (cubins) and C launchers that appeared in the Triton
    cache while it ran: here an interpreter that, for the FFN's benchmark, writes two kernels and a
    launcher into the cache as Triton's compile would (one folder a build), and runs the rest."""
    python = tmp_path / "python"
    python.write_text(f"""#!/usr/bin/env bash
for a in "$@"; do
    if [[ $a == *bench_ffn.py ]]; then
        mkdir -p "$TRITON_CACHE_DIR/a" "$TRITON_CACHE_DIR/b c"
        touch "$TRITON_CACHE_DIR/a/k.cubin" "$TRITON_CACHE_DIR/b c/k.cubin" "$TRITON_CACHE_DIR/a/__triton_launcher.so"
        exit 0
    fi
done
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    env = script_env(tmp_path, PYTHON=str(python), GPU_CHECK_ONLY="ffn rms_norm")
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (tmp_path / "out" / "steps.txt").read_text()
    lines = {m[1]: m[2] for m in re.finditer(r"^(\w+): exit \d+ in .*; (compiled .*)$", text, re.M)}
    none = "compiled 0 kernels, 0 launchers"
    assert lines == {"install": none, "versions": none, "ffn": "compiled 2 kernels, 1 launchers", "rms_norm": none}


@pytest.mark.slow
def test_the_device_is_asked_again_and_a_cut_zero3_run_keeps_its_metrics(tmp_path):
    """An interpreter that stands in for a GPU machine's: the versions step dies before it says which
    device there is (a cold start past its limit, say), so the device's lines are asked for on their own
    and the run goes on as a CUDA run (named after the GPU); its ZeRO-3 launch writes a line of metrics
    and is then cut (TERM, what the step's time limit sends), and that line comes back."""
    python = tmp_path / "python"
    python.write_text(f"""#!/usr/bin/env bash
if [ "$1" = - ]; then cat > /dev/null; echo "the versions died"; exit 1; fi
if [ "$1" = -c ] && [[ $2 == *get_device_properties* ]]; then
    echo "device: NVIDIA H100 80GB HBM3, sm_90, 132 SMs, 79.1 GiB"; echo "tag: h100"; exit 0
fi
if [ "$1" = -m ] && [ "$2" = deepspeed.launcher.runner ]; then
    while [ $# -gt 0 ] && [ "$1" != --output-dir ]; do shift; done
    mkdir -p "$2" && echo '{{"step": 1, "loss": 9.5}}' > "$2/metrics.jsonl"
    kill -TERM $PPID
    exit 0
fi
exec {sys.executable} "$@"
""")
    python.chmod(0o755)
    env = script_env(tmp_path, PYTHON=str(python), GPU_CHECK_ONLY="zero3_t5_base")
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    assert_returnable(out)
    outcomes = step_lines(out / "steps.txt")
    assert outcomes == {"install": 0, "versions": 1, "device_probe": 0, "zero3_t5_base": 143}, outcomes
    assert "tag: h100" in (out / "versions.txt").read_text()
    logs = bundle(out)
    assert logs["zero3_t5_base_h100.jsonl"] == '{"step": 1, "loss": 9.5}\n'


def test_a_rerun_of_some_steps_runs_those_alone(tmp_path):
    env = script_env(tmp_path, GPU_CHECK_BUDGET="0", GPU_CHECK_ONLY="ffn zero3_t5_base")
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(step_lines(tmp_path / "out" / "steps.txt")) == ["install", "versions", "ffn", "zero3_t5_base"]


def test_select_takes_the_wheels_this_interpreter_lacks(tmp_path):
    import packaging

    for name in ("packaging-0.1-py3-none-any.whl", "packaging-999.0-py3-none-any.whl",
                 "gpu_check_missing-1.0-py3-none-any.whl", "gpu_check_other-1.0-cp27-cp27mu-manylinux1_x86_64.whl",
                 f"packaging-{packaging.__version__}-py3-none-any.whl"):  # fmt: skip
        (tmp_path / name).write_bytes(b"")
    chosen = {path.name: why for path, why in carry.select(tmp_path)}
    assert chosen == {
        "packaging-999.0-py3-none-any.whl": f"packaging 999.0 (here {packaging.__version__})",
        "gpu_check_missing-1.0-py3-none-any.whl": "gpu-check-missing 1.0 (missing here)",
    }


def test_size_counts_the_tree_and_the_carried_paths(tmp_path, capsys):
    (tmp_path / "a.whl").write_bytes(b"x" * 3 * MIB)
    tree, extra = carry.carried_bytes(ROOT, [tmp_path])
    assert extra == 3 * MIB
    assert tree == sum(p.stat().st_size for p in carry.travelling_files(ROOT))
    assert (ROOT / "bench" / "gpu_check.sh") in carry.travelling_files(ROOT)
    assert carry.main(["size", str(tmp_path)]) == 0
    assert carry.main(["size", str(tmp_path), "--limit-mib", "3"]) == 1  # the tree is more than nothing
    assert "over the 3 MiB" in capsys.readouterr().err


@pytest.mark.skipif(not (ROOT / ".whl").is_dir(), reason="no .whl folder: `python bench/carry.py fetch` makes one")
def test_the_carried_wheels_fit(capsys):
    """The wheels built by `carry.py fetch` and the checkout stay within the 64 MiB a run carries, and
    hold one version of each carried package."""
    assert carry.main(["size", ".whl"]) == 0, capsys.readouterr()
    names = [p.name.split("-")[0].replace("_", "-").lower() for p in (ROOT / ".whl").glob("*.whl")]
    assert sorted(names) == sorted(carry.CARRIED)


def test_check_names_every_requirement_missing_here(tmp_path, monkeypatch, capsys):
    """`carry.py check` reads a distribution's runtime requirements (not its extras' nor another
    platform's) and names, in one line, each one missing or too old here."""
    import packaging

    info = tmp_path / "gpu_check_needy-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: gpu-check-needy\nVersion: 1.0\n"
        "Requires-Dist: gpu-check-absent>=1\nRequires-Dist: packaging>=999\nRequires-Dist: pytest\n"
        "Requires-Dist: gpu-check-extra; extra == 'docs'\nRequires-Dist: gpu-check-win; sys_platform == 'win32'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert carry.unmet(["gpu-check-needy", "gpu-check-nowhere"]) == [
        "gpu-check-absent (missing, for gpu-check-needy)",
        f"packaging {packaging.__version__} (gpu-check-needy needs >=999)",
        "gpu-check-nowhere (missing)",
    ]
    assert carry.main(["check", "gpu-check-needy"]) == 1
    line = capsys.readouterr().out.strip()
    assert line.startswith("carry: what gpu-check-needy require is not all here: gpu-check-absent (missing, for ")
    assert carry.main(["check", "pytest"]) == 0
    assert capsys.readouterr().out.strip() == "carry: every requirement of pytest is here"


def test_the_carried_transformers_is_in_the_tested_range():
    """The GPU machine gets a transformers that fastseq.patch is tested with (one whose requirements
    that machine meets: `carry.CARRIED`'s comment)."""
    from fastseq.patch import TRANSFORMERS_TESTED

    major, minor, _ = (int(part) for part in carry.CARRIED["transformers"].split("."))
    assert TRANSFORMERS_TESTED[0] <= (major, minor) <= TRANSFORMERS_TESTED[1]
