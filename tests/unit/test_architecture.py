"""The package's import structure: the import-linter contracts hold, and no module takes part in an
import cycle (imports inside functions included). Both checks are shown to fail on a copy of the
package with one import added against the layers."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"


def import_graph(src: Path) -> dict[str, set[str]]:
    """Module -> the distillery modules it imports, read from the AST (module- and function-level)."""
    root = src / "distillery"
    modules = {}
    for f in root.rglob("*.py"):
        parts = list(f.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = f

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, f in modules.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            for target in targets:
                if target.startswith("distillery") and (found := resolve(target)) and found != name:
                    graph[name].add(found)
    # The top-level package re-exports the public API from everything below it: not a cycle with them.
    # (Every other package's __init__ keeps its edges: a child importing its own package's __init__,
    # which imports the child, is a cycle.)
    graph["distillery"] = set()
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _copy_with_import(tmp_path: Path, module: str, line: str) -> Path:
    """A copy of the package in which ``module`` (a path under src/distillery) gains ``line``."""
    src = tmp_path / "src"
    shutil.copytree(SRC / "distillery", src / "distillery", ignore=shutil.ignore_patterns("__pycache__"))
    target = src / "distillery" / module
    target.write_text(target.read_text() + f"\n\ndef _added():\n    {line}\n")
    return src


def _lint_imports(src: Path, cwd: Path) -> subprocess.CompletedProcess:
    shutil.copy(ROOT / "pyproject.toml", cwd / "pyproject.toml")
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run(
        [str(exe), "--no-cache", "--no-logo"],
        cwd=cwd,
        env={"PYTHONPATH": str(src), "PATH": str(exe.parent)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_no_module_takes_part_in_an_import_cycle():
    assert cycles(import_graph(SRC)) == []


def test_a_new_cycle_is_found(tmp_path):
    # the classification task importing the experiment runner, which imports the tasks
    src = _copy_with_import(
        tmp_path, "tasks/classification/__init__.py", "from distillery.experiment import run"
    )
    found = cycles(import_graph(src))
    assert found and any("distillery.experiment.runner" in c for c in found)


@pytest.fixture(scope="module")
def lint_available():
    # a dev dependency that `make test` always installs: its absence is a broken set-up, not a reason to skip
    if not Path(sys.executable).with_name("lint-imports").exists():
        pytest.fail(
            "import-linter is not installed beside this Python: pip install -e '.[dev]' (make test does)"
        )


def test_the_import_contracts_hold(tmp_path, lint_available):
    proc = _lint_imports(SRC, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 kept, 0 broken" in proc.stdout


def test_an_upward_import_breaks_the_layers_contract(tmp_path, lint_available):
    # the loss terms (a building block) importing the experiment runner (above them)
    src = _copy_with_import(tmp_path, "losses/objective.py", "import distillery.experiment.runner")
    work = tmp_path / "work"
    work.mkdir()
    proc = _lint_imports(src, work)
    assert proc.returncode != 0
    assert (
        "BROKEN" in proc.stdout
        and "distillery.losses.objective -> distillery.experiment.runner" in proc.stdout
    )
