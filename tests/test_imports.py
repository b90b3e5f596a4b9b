"""The import graph of `fastseq`: no module imports another that (directly or not) imports it back.
Every import statement counts, those inside functions too: a deferred import hides a cycle at
start-up but still ties the two modules together."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    """Module name -> file, for every module under fastseq/ (the kernels included: fastseq/kernels/)."""
    modules = {}
    for file in (ROOT / "fastseq").rglob("*.py"):
        parts = file.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = file
    return modules


def _imports(name: str, file: Path, modules: dict[str, Path]) -> set[str]:
    """The fastseq modules `name` imports: `from a import b` is `a.b` where that is a module, else `a`."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_finder_sees_a_cycle_and_its_absence():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_resolves_relative_and_deferred_imports():
    modules = _modules()
    assert "fastseq.kernels.bucketed_attention" in modules and "fastseq.train.loop" in modules
    assert "fastseq.distributed" in _imports("fastseq.train.loop", modules["fastseq.train.loop"], modules)
    assert "fastseq.train.args" in _imports("fastseq.train.loop", modules["fastseq.train.loop"], modules)


def test_no_import_cycle_in_fastseq():
    modules = _modules()
    graph = {name: _imports(name, file, modules) for name, file in modules.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_kernels_import_nothing_else_of_fastseq():
    """fastseq.kernels is its own layer: torch and triton only, never the models or the library."""
    modules = _modules()
    kernels = {name: file for name, file in modules.items() if name.startswith("fastseq.kernels")}
    assert "fastseq.kernels.bucketed_attention.kernels" in kernels
    outside = {name: sorted(t for t in _imports(name, file, modules) if not t.startswith("fastseq.kernels"))
               for name, file in kernels.items()}  # fmt: skip
    assert not {name: found for name, found in outside.items() if found}


def test_every_package_is_listed_for_installation():
    """A subpackage pyproject.toml does not list would be missing from a built wheel."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    packages = {name for name, file in _modules().items() if file.name == "__init__.py"}
    assert packages == listed


# Run in a fresh interpreter: imports `first` then `second` ("transformers" reaches the T5 classes,
# which import Hugging Face's `kernels`), counting every torch.library custom op registered on the way.
_IMPORT_BOTH = """
import collections, json, sys
import torch.library

counts = collections.Counter()
real = torch.library.custom_op
def counting(name, *args, **kwargs):
    counts[name] += 1
    return real(name, *args, **kwargs)
torch.library.custom_op = counting

for name in sys.argv[1:]:
    if name == "transformers":
        from transformers import T5ForConditionalGeneration  # noqa: F401
    else:
        import fastseq, fastseq.kernels  # noqa: F401, E401
import kernels
print(json.dumps({"ops": counts, "kernels": kernels.__file__,
                  "modules": {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())}}))
"""


def _registered_ops() -> set[str]:
    """The custom ops the kernel sources declare."""
    found = set()
    for file in (ROOT / "fastseq" / "kernels").rglob("*.py"):
        found |= set(re.findall(r'custom_op\(\s*"(fastseq::\w+)"', file.read_text()))
    return found


def test_the_repository_root_holds_no_importable_name_but_fastseq_and_the_tests():
    """A top-level package of the checkout is importable from its root, where the tests run: one named
    like a dependency's module shadows it (transformers >= 5.25 imports Hugging Face's `kernels`)."""
    names = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() or p.suffix == ".py"}
    assert names == {"fastseq", "tests"}


@pytest.mark.parametrize("where", ["root", "elsewhere"])
@pytest.mark.parametrize("order", [("transformers", "fastseq"), ("fastseq", "transformers")], ids="-then-".join)
def test_transformers_and_fastseq_import_in_either_order(where, order, tmp_path):
    cwd = ROOT if where == "root" else tmp_path
    proc = subprocess.run([sys.executable, "-c", _IMPORT_BOTH, *order], cwd=cwd, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.splitlines()[-1])
    # Hugging Face's `kernels` package, not a folder of the checkout.
    assert not Path(found["kernels"]).resolve().is_relative_to(ROOT), found["kernels"]
    ops = _registered_ops()
    registered = {name: n for name, n in found["ops"].items() if name.startswith("fastseq::")}
    assert len(ops) >= 11 and registered == {name: 1 for name in ops}
    # Every module of the checkout is imported under its one name, fastseq.*.
    ours = sorted(name for name, file in found["modules"].items()
                  if file and Path(file).is_absolute() and Path(file).resolve().is_relative_to(ROOT))  # fmt: skip
    assert ours and all(name == "fastseq" or name.startswith("fastseq.") for name in ours), ours
