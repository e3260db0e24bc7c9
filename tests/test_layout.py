"""The package layout is the architecture: imports run one way, between packages and between modules."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Each package may import only those of a lower rank; leaf modules (rank 0) may import each other (the loop
# test keeps that one way).
RANK = {
    "errors": 0,
    "units": 0,
    "point": 0,
    "hub": 0,
    "known_configs": 0,
    "records": 1,
    "runtime": 1,
    "profiler": 2,
    "train": 3,
    "estimate": 4,
    "report": 5,
    "sweep": 6,
    "cli": 7,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every ftprof module ``path`` imports, at module level or inside functions (TYPE_CHECKING included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ftprof")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ftprof"):
            for a in node.names:  # ``from ftprof.sweep import measure`` imports a module
                sub = f"{node.module}.{a.name}"
                is_module = (SRC / (sub.replace(".", "/") + ".py")).exists()
                is_module |= (SRC / sub.replace(".", "/") / "__init__.py").exists()
                found.add(sub if is_module else node.module)
    return found


@functools.cache
def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in (SRC / "ftprof").rglob("*.py")}


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


@pytest.mark.parametrize("module", sorted(_graph()))
def test_imports_run_down_the_layers(module: str) -> None:
    if module == "ftprof":
        return
    mine = RANK[_part(module)]
    for target in _graph()[module]:
        if target == "ftprof" or _part(target) == _part(module):
            continue
        theirs = RANK[_part(target)]
        assert theirs < mine or mine == theirs == 0, f"{module} (layer {mine}) imports {target} (layer {theirs})"


def test_no_import_loop_between_modules() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                raise AssertionError("import loop: " + " -> ".join([*trail[trail.index(t) :], t]))
            if t in graph and state.get(t) is None:
                visit(t, [*trail, t])
        state[m] = 2

    for m in sorted(graph):
        if state.get(m) is None:
            visit(m, [m])


def test_every_package_says_what_it_owns() -> None:
    for init in (SRC / "ftprof").rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init.relative_to(SRC)} has no docstring saying what it owns"
        assert len(doc) > 60, f"{init.relative_to(SRC)} has no docstring saying what it owns"


def test_the_layers_name_every_package() -> None:
    tops = {p.stem if p.is_file() else p.name for p in (SRC / "ftprof").iterdir() if p.name != "__pycache__"}
    tops -= {"__init__", "py"}
    assert tops == set(RANK), (
        f"packages without a layer: {tops - set(RANK)}; layers without a package: {set(RANK) - tops}"
    )


MAX_FUNCTION_LINES = 60  # the body, docstring excluded (STYLE.md: functions under ~60 lines)


def _long_functions() -> list[str]:
    found = []
    for path in sorted((SRC / "ftprof").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body
            if len(body) > 1 and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]  # the docstring
            length = (node.end_lineno or node.lineno) - body[0].lineno + 1
            if length > MAX_FUNCTION_LINES:
                found.append(f"{_module_name(path)}.{node.name}: {length} lines")
    return found


def test_functions_are_short() -> None:
    assert _long_functions() == []
