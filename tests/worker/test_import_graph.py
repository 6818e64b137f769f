"""The worker package's modules import each other one way only: no module reaches back to
one that imports it, not even through an import placed inside a function (that only hides a
circle until someone moves the import up)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "worker"


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "worker":
                found.update(f"worker.{a.name}" for a in node.names)
            elif node.module.startswith("worker."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("worker."))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {f"worker.{p.stem}": p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_graph_sees_lazy_imports_too():
    graph = _graph()
    assert "worker.stuck" in graph["worker.metrics"]  # imported inside queue_snapshot()
    assert {"worker.cli_format", "worker.cli_render"} <= graph["worker.cli_jobs"]


def test_no_import_circles_in_the_worker_package():
    assert _cycles(_graph()) == []
