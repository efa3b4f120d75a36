"""No import loops inside a subpackage (``model/``, ``bench/``, ``cache/``, ``engine/``, ``server/``): every
``chunkattn`` import between their modules, at module level or inside a function, points one way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "chunkattn"


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set[str]) -> set[str]:
    """The known modules ``path`` imports at run time (imports under ``if TYPE_CHECKING:`` are for types)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
                   for stmt in block.body for n in ast.walk(stmt)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            names = [node.args[0].value]  # importlib.import_module("chunkattn....")
        out |= {n for n in names if n in known}
    return out


@pytest.mark.parametrize("package", ["model", "bench", "cache", "engine", "server", "cluster", "attention"])
def test_no_import_cycle_within(package):
    files = sorted((SRC / package).rglob("*.py"))
    known = {_module(f) for f in files}
    graph = {_module(f): _imports(f, known) - {_module(f)} for f in files}
    for name in graph:  # a package imports its modules by design (its __init__): not an edge back
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".") and m != f"chunkattn.{package}"}

    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return path + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for c in (cycle_from(n) for n in graph) if c]
    assert not cycles, cycles[0]
