"""No import circles inside ``diffwidget.tracing``, counting every import.

Every import counts: at module level, inside functions and under ``TYPE_CHECKING``; and
importing ``a.b.c`` also runs the packages ``a.b`` and ``a`` (their ``__init__``), so it
depends on them too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYER = "diffwidget.tracing"


def _name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path = ROOT, prefix: str = LAYER) -> dict[str, set[str]]:
    """Module -> the modules and packages (under ``prefix``) it makes Python run."""
    files = {_name(p, root): p for p in (root / Path(*prefix.split("."))).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                # The module itself and every package above it run on import.
                while target.startswith(prefix):
                    if target != name and not name.startswith(target + "."):
                        graph[name].add(target)
                    target = target.rpartition(".")[0]
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_check_finds_a_circle(tmp_path: Path) -> None:
    package = tmp_path / "diffwidget" / "tracing"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from diffwidget.tracing.b import x\n")
    (package / "b.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from diffwidget.tracing import a\n"
    )
    assert circles(import_graph(tmp_path)) == [["diffwidget.tracing.a", "diffwidget.tracing.b"]]


def test_tracing_has_no_import_circles() -> None:
    graph = import_graph()
    assert "diffwidget.tracing.taps" in graph
    assert circles(graph) == []
