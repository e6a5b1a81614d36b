"""runs sits between explain and widget: it never imports the widget, and nothing below it
imports runs (module level or inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "diffwidget"


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("runs", "diffwidget.widget"),
        ("explain", "diffwidget.runs"),
        ("tracing", "diffwidget.runs"),
        ("models", "diffwidget.runs"),
    ],
)
def test_runs_layer_imports_one_way(layer: str, forbidden: str):
    offenders = [
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in sorted((PACKAGE / layer).rglob("*.py"))
        for name in _imports(path)
        if name.startswith(forbidden)
    ]
    assert not offenders, "\n".join(offenders)
