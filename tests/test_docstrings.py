"""Every docstring example in the package runs (those marked ``+SKIP`` need a real pipeline)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import diffwidget

#: Modules whose import needs an optional extra that the test install may lack.
OPTIONAL = ("diffwidget.runs",)


def _modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(diffwidget.__path__, "diffwidget."):
        if info.name.endswith("__main__"):
            continue
        names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name: str) -> None:
    try:
        module = importlib.import_module(name)
    except ImportError as error:
        if name.startswith(OPTIONAL):
            pytest.skip(f"{name} needs an optional extra: {error}")
        raise
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    for test in finder.find(module, name):
        runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, "".join(report)
