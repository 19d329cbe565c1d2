"""The layout shows the flow: module imports point one way (hooks -> collection -> kernels ->
readback -> records -> statistics -> export), checked on the source, not by convention.

Function-level imports are left out: they are the deliberate lazy edges (no-code mode builds
the session at the first step; ``import gradwatch`` stays light)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "gradwatch"

# module -> what it must never import at module level (the flow's later stages)
DOWNSTREAM_ONLY = {
    "gradwatch.kernels": {"gradwatch.records", "gradwatch.catalog", "gradwatch.collector"},
    "gradwatch.records": {"gradwatch.catalog", "gradwatch.collector", "gradwatch.export"},
    "gradwatch.readback": {"gradwatch.catalog", "gradwatch.collector", "gradwatch.export"},
    "gradwatch.catalog": {"gradwatch.collector", "gradwatch.export", "gradwatch.session"},
    "gradwatch.collector": {"gradwatch.export", "gradwatch.session", "gradwatch.values"},
    "gradwatch.export": {"gradwatch.collector", "gradwatch.session"},
}


def _module_imports() -> dict[str, set[str]]:
    mods: dict[str, Path] = {}
    for p in SRC.rglob("*.py"):
        name = ".".join(p.relative_to(SRC.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = p

    def statements(body):
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                continue
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
                continue
            yield node
            for attr in ("body", "orelse", "finalbody", "handlers"):
                sub = getattr(node, attr, None)
                if isinstance(sub, list):
                    yield from statements(sub)

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        package = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in statements(ast.parse(p.read_text(encoding="utf-8")).body):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    graph[m].add(full if full in mods else target)
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names)
        graph[m] = {t for t in graph[m] if t in mods and t != m}
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_module_level_imports_have_no_cycle():
    graph = _module_imports()
    assert "gradwatch.collector" in graph and "gradwatch.catalog" in graph  # the walk works
    for m in graph:
        assert m not in _reachable(graph, m), f"{m} imports itself through a cycle"


def test_imports_point_down_the_flow():
    graph = _module_imports()
    for m, forbidden in DOWNSTREAM_ONLY.items():
        inside = [x for x in graph if x == m or x.startswith(m + ".")]  # a package's modules
        below = set().union(*(_reachable(graph, x) for x in inside))
        assert not below & forbidden, f"{m} reaches {sorted(below & forbidden)}"
