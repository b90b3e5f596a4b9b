"""The wheels a lent GPU machine gets with the checkout (`bench/gpu_check.sh`), and the size of what travels.

    python bench/carry.py fetch              # build .whl/ here, where the registries are reachable
    python bench/carry.py size               # the working tree plus .whl/ against the 64 MiB a run carries
    python bench/carry.py select .whl        # the wheels this interpreter needs (what gpu_check.sh installs)
    python bench/carry.py check fastseq deepspeed   # one line: what their requirements miss here

The GPU machine (Python 3.12, torch 2.11, Triton 3.6, transformers 5.17, no DeepSpeed) reaches no
registry. `fastseq.patch` needs transformers >= 5.23, and the ZeRO-3 step needs DeepSpeed and what
DeepSpeed requires that the machine may lack: hjson, pydantic and its own dependencies, psutil,
msgpack, py-cpuinfo, ninja and einops (fastseq's too). A wheel is installed there only where the
package is missing or older (`select`), and `check` then names, in one line, any requirement still
missing. All are small; pydantic-core, psutil, msgpack and ninja are compiled, fetched for CPython
3.12 on x86-64 Linux.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.tags import sys_tags
    from packaging.utils import parse_wheel_filename
    from packaging.version import Version
except ImportError:  # pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.tags import sys_tags
    from pip._vendor.packaging.utils import parse_wheel_filename
    from pip._vendor.packaging.version import Version

# name -> version. transformers: the newest release in fastseq.patch.TRANSFORMERS_TESTED whose own
# requirements the GPU machine meets (a test checks the range): 5.25 asks for huggingface-hub >= 2.4 (the
# machine has 1.33) and the `kernels` package, 5.24 for huggingface-hub >= 1.31. DeepSpeed is published
# as a source archive only, so its wheel is built here.
CARRIED = {
    "transformers": "5.24.0",
    "deepspeed": "0.19.8",
    "hjson": "3.1.0",
    "pydantic": "2.14.4",
    "pydantic-core": "2.50.5",
    "annotated-types": "0.8.0",
    "typing-inspection": "0.4.5",
    "typing-extensions": "4.16.0",  # pydantic 2.14 asks for >= 4.16
    "psutil": "7.2.2",
    "msgpack": "1.2.4",
    "py-cpuinfo": "9.0.0",
    "ninja": "1.13.2",
    "einops": "0.8.2",
}
BUILT_HERE = ("deepspeed",)
# The GPU machine's interpreter, for `pip download` of the compiled wheels (pydantic-core, psutil, msgpack, ninja).
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
          "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]  # fmt: skip
LIMIT_MIB = 64  # the working tree, untracked files that git does not ignore, and the carried paths
ROOT = Path(__file__).resolve().parents[1]


def fetch(dest: Path) -> None:
    """Download (or build) every wheel of `CARRIED` into `dest`, for the GPU machine's interpreter."""
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    downloads = [f"{name}=={version}" for name, version in CARRIED.items() if name not in BUILT_HERE]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", *TARGET, "-d", str(dest),
                    *downloads], check=True)  # fmt: skip
    built = [f"{name}=={CARRIED[name]}" for name in BUILT_HERE]
    # --no-build-isolation: DeepSpeed's setup imports torch, which this environment has; no compiled ops.
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest), *built], check=True)


def travelling_files(root: Path) -> list[Path]:
    """The files a run sends: tracked, and untracked ones that git does not ignore."""
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout  # fmt: skip
    return [root / name for name in listed.decode().split("\0") if name and (root / name).is_file()]


def carried_bytes(root: Path, carried: list[Path]) -> tuple[int, int]:
    """(bytes of the working tree that travels, bytes of the carried paths)."""
    tree = sum(path.stat().st_size for path in travelling_files(root))
    extra = 0
    for path in carried:
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        extra += sum(p.stat().st_size for p in files)
    return tree, extra


def select(wheel_dir: Path) -> Iterator[tuple[Path, str]]:
    """(wheel, why) for each wheel in `wheel_dir` that this interpreter can install and lacks: the
    package is missing or older. A wheel for another interpreter is skipped, so that one such wheel
    cannot stop `pip install` of the others."""
    supported = set(sys_tags())
    for path in sorted(wheel_dir.glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(path.name)
        if not tags & supported:
            print(f"carry: {path.name} is not for this interpreter: skipped", file=sys.stderr)
            continue
        try:
            have = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            yield path, f"{name} {version} (missing here)"
            continue
        if have < version:
            yield path, f"{name} {version} (here {have})"
        else:
            print(f"carry: {name} {have} is here: {path.name} skipped", file=sys.stderr)


def unmet(distributions: list[str]) -> list[str]:
    """What the runtime requirements of `distributions` (their metadata's, without extras) miss in this
    environment: "NAME (missing, for DIST)" or "NAME VERSION (DIST needs SPEC)"; a distribution itself
    missing is "DIST (missing)"."""
    problems = []
    for dist in distributions:
        try:
            requires = importlib.metadata.requires(dist) or []
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{dist} (missing)")
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # an extra's, or another platform's
            try:
                have = importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                problems.append(f"{req.name} (missing, for {dist})")
                continue
            if req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{req.name} {have} ({dist} needs {req.specifier})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, what in (("fetch", "download and build the carried wheels"),
                       ("select", "print the wheels this interpreter needs")):  # fmt: skip
        sub.add_parser(name, help=what).add_argument("dir", nargs="?", default=".whl")
    check = sub.add_parser("check", help="one line: what the distributions' requirements miss here")
    check.add_argument("distributions", nargs="+")
    size = sub.add_parser("size", help="what a run carries against its limit")
    size.add_argument("carried", nargs="*", default=[".whl"], help="the run's carry list (default .whl)")
    size.add_argument("--limit-mib", type=float, default=LIMIT_MIB)
    args = parser.parse_args(argv)
    if args.command == "fetch":
        fetch(Path(args.dir))
        return 0
    if args.command == "select":
        for path, why in select(Path(args.dir)):
            print(f"carry: installing {why}", file=sys.stderr)
            print(path)
        return 0
    if args.command == "check":
        names = ", ".join(args.distributions)
        if problems := unmet(args.distributions):
            print(f"carry: what {names} require is not all here: {', '.join(problems)}; carry wheels (CARRIED)")
            return 1
        print(f"carry: every requirement of {names} is here")
        return 0
    tree, extra = carried_bytes(ROOT, [ROOT / p for p in args.carried])
    total = (tree + extra) / 2**20
    print(f"working tree {tree / 2**20:.1f} MiB + carried {extra / 2**20:.1f} MiB = {total:.1f} MiB "
          f"(limit {args.limit_mib:g} MiB)")  # fmt: skip
    if total > args.limit_mib:
        print(f"carry: {total:.1f} MiB is over the {args.limit_mib:g} MiB a run can carry", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
