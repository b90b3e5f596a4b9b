"""The import graph of `fastseq`: no module imports another that (directly or not) imports it back.
Every import statement counts, those inside functions too: a deferred import hides a cycle at
start-up but still ties the two modules together."""

from __future__ import annotations

import ast
from pathlib import Path

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


def test_every_package_is_listed_for_installation():
    """A subpackage pyproject.toml does not list would be missing from a built wheel."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    packages = {name for name, file in _modules().items() if file.name == "__init__.py"}
    assert packages == listed
