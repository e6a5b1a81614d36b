"""Prompt-set runs: sharding over processes, one result file per item, aggregation.

``run`` computes maps and metrics for every prompt of a set (``diffwidget run`` on the
command line); ``aggregate`` writes tables, plots and ``summary.md``; ``load_run`` reads a
run folder without torch (``diffwidget.open_run`` adds explorers and the run browser).

Examples
--------
>>> from diffwidget.runs import run, load_run  # doctest: +SKIP
>>> run("scene:50", "scene-run")  # doctest: +SKIP
>>> load_run("scene-run").table.head()  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "run": "diffwidget.runs.runner",
    "RunReport": "diffwidget.runs.runner",
    "aggregate": "diffwidget.runs.report",
    "load_run": "diffwidget.runs.open",
    "RunResult": "diffwidget.runs.open",
    "load_prompts": "diffwidget.runs.prompts",
    "PromptItem": "diffwidget.runs.prompts",
    "Shard": "diffwidget.runs.sharding",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffwidget.runs' has no attribute {name!r}")
