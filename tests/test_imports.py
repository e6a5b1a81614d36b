"""The package's layering rule, checked on every import, and the widget running without torch.

Layers, left to right: models -> tracing -> explain -> runs -> widget -> testing. A module
may import from its own layer and from layers to its left, never to its right. Every import
counts: module level, inside functions, under ``TYPE_CHECKING``, relative ones,
``importlib`` calls with a literal module name and the module paths of lazy-import tables.
Benchmarks and docs never import the test suite.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "diffwidget"
#: ``testing`` (test pipelines, synthetic traces) may use everything and nothing uses it.
LAYERS = ("models", "tracing", "explain", "runs", "widget", "testing")
#: Folders whose code must not depend on the test suite.
NOT_TESTS = ("bench", "docs")

#: Modules that must import on a machine without torch (every widget module is added).
TORCH_FREE = (
    "diffwidget",
    "diffwidget.records",
    "diffwidget.tracing.trace",
    "diffwidget.testing.synthetic",
    "diffwidget.explain",
    "diffwidget.explain.attention",
    "diffwidget.explain.concept_results",
)


def module_name(path: Path, root: Path = ROOT) -> str:
    """Dotted name of a file under ``root``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` reads from (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    base = current.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _top_level_lazy() -> dict[str, str]:
    """``diffwidget``'s lazy names (``from diffwidget import Explorer``) and their modules."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets)
            and isinstance(node.value, ast.Dict)
        ):
            return {
                k.value: v.value
                for k, v in zip(node.value.keys, node.value.values, strict=True)
                if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)
            }
    return {}


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """``(line, module)`` for every import in ``path`` (a file under ``root``), wherever it stands.

    ``from X import Y`` yields ``X.Y``, so that importing a submodule or a lazily exported
    name is attributed to where it lives.
    """
    tree = ast.parse(path.read_text())
    current = module_name(path, root)
    is_package = path.name == "__init__.py"
    lazy = _top_level_lazy()
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(node, current, is_package)
            for alias in node.names:
                if source == "diffwidget" and alias.name in lazy:
                    found.append((node.lineno, lazy[alias.name]))
                else:
                    found.append((node.lineno, f"{source}.{alias.name}"))
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and _is_module_path(node.value)
        ):
            # importlib.import_module("diffwidget.x"), __import__, lazy-import tables.
            found.append((node.lineno, node.value))
    return found


def _is_module_path(text: str) -> bool:
    if not text.startswith("diffwidget.") or " " in text:
        return False
    relative = Path(*text.split("."))
    return (ROOT / relative).with_suffix(".py").is_file() or (ROOT / relative).is_dir()


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) > 1 and parts[0] == "diffwidget" and parts[1] in LAYERS:
        return parts[1]
    return None


#: Build-time commands of the models layer (``python -m ...``) that make their data with the
#: tracing layer: the preview decoder learns from traced x̂0. Nothing imports them. Never grow it.
RECIPES: dict[str, str] = {"diffwidget/models/train_preview_decoder.py": "tracing"}


def layer_violations(root: Path = PACKAGE) -> list[str]:
    """Every import that goes right in LAYERS, as ``file:line imports module``."""
    offenders = []
    for layer in LAYERS:
        for path in sorted((root / layer).rglob("*.py")):
            allowed = RECIPES.get(str(path.relative_to(root.parent)), layer)
            for line, module in imported_modules(path):
                target = layer_of(module)
                rightwards = target is not None and LAYERS.index(target) > LAYERS.index(allowed)
                if rightwards or module.split(".")[:2] == ["diffwidget", "cli"]:
                    offenders.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return offenders


def test_layers_import_one_way() -> None:
    offenders = layer_violations()
    assert not offenders, f"imports must go {' -> '.join(LAYERS)}:\n" + "\n".join(offenders)


def test_nothing_imports_a_recipe() -> None:
    recipes = {module_name(ROOT / path) for path in RECIPES}
    offenders = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, module in imported_modules(path)
        if any(module == r or module.startswith(r + ".") for r in recipes)
        and module_name(path) not in recipes
    ]
    assert not offenders, "recipes are commands, not libraries:\n" + "\n".join(offenders)


#: Files allowed to import the test suite: none (what bench and docs share with the tests
#: lives in bench/browserlib.py and diffwidget.testing.synthetic). Never grow it.
KNOWN_TEST_IMPORTS: tuple[str, ...] = ()


def imports_of_tests(folder: str) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in sorted((ROOT / folder).rglob("*.py"))
        for line, module in imported_modules(path)
        if module == "tests" or module.startswith("tests.")
    ]


@pytest.mark.parametrize("folder", NOT_TESTS)
def test_bench_and_docs_do_not_import_the_tests(folder: str) -> None:
    offenders = [o for o in imports_of_tests(folder) if not o.startswith(KNOWN_TEST_IMPORTS)]
    assert not offenders, (
        "move what they share into the package or bench/browserlib.py:\n" + "\n".join(offenders)
    )


def test_known_test_imports_are_gone() -> None:
    known = [o for folder in NOT_TESTS for o in imports_of_tests(folder)]
    assert not known, "\n".join(known)


# ---------------------------------------------------------------- the checker finds them all
CHECKER_CASES = {
    "module level": "from diffwidget.widget import explorer\n",
    "inside a function": "def f():\n    import diffwidget.widget.explorer\n",
    "nested in a class method": (
        "class A:\n    def f(self):\n        if True:\n"
        "            from diffwidget.widget.explorer import Explorer\n"
    ),
    "under TYPE_CHECKING": (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from diffwidget.widget.explorer import Explorer\n"
    ),
    "relative": "from ..widget import explorer\n",
    "importlib call": "import importlib\nimportlib.import_module('diffwidget.widget.explorer')\n",
    "lazy table": "_LAZY = {'Explorer': 'diffwidget.widget.explorer'}\n",
    "top-level lazy name": "from diffwidget import Explorer\n",
}


@pytest.mark.parametrize("case", sorted(CHECKER_CASES))
def test_checker_sees_a_forbidden_import(case: str, tmp_path: Path) -> None:
    package = tmp_path / "diffwidget"
    for layer in LAYERS:
        (package / layer).mkdir(parents=True)
        (package / layer / "__init__.py").write_text("")
    (package / "explain" / "bad.py").write_text(CHECKER_CASES[case])
    found = [
        module
        for _, module in imported_modules(package / "explain" / "bad.py", root=tmp_path)
        if layer_of(module) == "widget"
    ]
    assert found, case


def test_checker_allows_imports_to_the_left_and_ignores_docstrings(tmp_path: Path) -> None:
    good = tmp_path / "good.py"
    good.write_text(
        '"""Uses diffwidget.widget.explorer in prose only."""\n'
        "from diffwidget.tracing.trace import Trace\nimport diffwidget.models.scenes\n"
    )
    layers = {layer_of(module) for _, module in imported_modules(good, root=tmp_path)}
    assert layers == {"tracing", "models"}


def test_the_rule_covers_every_layer_that_exists() -> None:
    present = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    # The command line sits on top of every layer; no layer imports it (layer_violations).
    present.discard("cli")
    assert present <= set(LAYERS), f"add {sorted(present - set(LAYERS))} to LAYERS"


# ---------------------------------------------------------------- the widget without torch
def torch_free_modules() -> list[str]:
    widget = [module_name(p) for p in sorted((PACKAGE / "widget").glob("*.py"))]
    return [*TORCH_FREE, *widget]


@pytest.mark.parametrize("module", torch_free_modules())
def test_module_imports_without_torch(module: str) -> None:
    if importlib.util.find_spec(module) is None:
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
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- what tab completion offers
@pytest.mark.parametrize("module", ["diffwidget", "diffwidget.explain"])
def test_dir_offers_the_public_names_only(module: str) -> None:
    package = importlib.import_module(module)
    names = dir(package)
    assert set(package.__all__) <= set(names)
    for junk in ("Any", "TYPE_CHECKING", "annotations", "importlib"):
        assert junk not in names
    for name in names:
        assert getattr(package, name) is not None, name  # each one resolves


def test_every_subpackage_is_offered() -> None:
    import diffwidget

    present = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    present.remove("cli")  # a command, not a library
    assert sorted(set(dir(diffwidget)) - set(diffwidget.__all__)) == present
