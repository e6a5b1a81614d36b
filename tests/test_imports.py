"""The package's layering rule: tracing -> explain -> widget, and the widget runs without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffwidget"

#: Sub-packages each layer must not import at module level.
FORBIDDEN = {
    "tracing": ("diffwidget.explain", "diffwidget.widget"),
    "explain": ("diffwidget.widget",),
}

#: Modules that must import on a machine without torch.
TORCH_FREE = (
    "diffwidget",
    "diffwidget.tracing.trace",
    "diffwidget.explain.attention",
    "diffwidget.widget.explorer",
    "diffwidget.widget.export",
)


def _module_level_imports(path: Path) -> list[str]:
    """Names imported at module level (not inside functions), type-checking blocks excluded."""
    tree = ast.parse(path.read_text())
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                break
            if isinstance(sub, ast.Import):
                names += [alias.name for alias in sub.names]
            elif isinstance(sub, ast.ImportFrom) and sub.module:
                names.append(sub.module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_one_way(layer: str) -> None:
    offenders = []
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for name in _module_level_imports(path):
            if name.startswith(FORBIDDEN[layer]):
                offenders.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert not offenders, "imports must go tracing -> explain -> widget:\n" + "\n".join(offenders)


def test_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from diffwidget.widget import explorer\n")
    assert "diffwidget.widget" in _module_level_imports(bad)


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_imports_without_torch(module: str) -> None:
    if (
        not (PACKAGE.parent / (module.replace(".", "/") + ".py")).exists()
        and module != "diffwidget"
    ):
        pytest.fail(f"{module} is part of the torch-free surface but does not exist")
    # A None entry in sys.modules makes `import torch` raise ImportError, as on a machine
    # without torch.
    code = (
        "import sys\n"
        "for name in ('torch', 'diffusers', 'transformers'): sys.modules[name] = None\n"
        f"import {module}\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=PACKAGE.parent,
        check=False,
    )
    assert result.returncode == 0, result.stderr
