"""diffwidget: see how a text-to-image diffusion model denoises, step by step.

Importing the package is cheap and never imports torch: the heavy parts load on first use,
so a saved trace can be opened in the widget on a machine without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "Trace": "diffwidget.tracing.trace",
    "TraceContext": "diffwidget.tracing.context",
    "trace": "diffwidget.tracing.generate",
    "load_demo_pipeline": "diffwidget.models.loader",
    "Explorer": "diffwidget.widget.explorer",
    "open_run": "diffwidget.widget.run_browser",
    "LiveExplorer": "diffwidget.widget.live_widget",
}

if TYPE_CHECKING:
    from diffwidget.models.loader import load_demo_pipeline
    from diffwidget.tracing.context import TraceContext
    from diffwidget.tracing.generate import trace
    from diffwidget.tracing.trace import Trace
    from diffwidget.widget.explorer import Explorer
    from diffwidget.widget.live_widget import LiveExplorer
    from diffwidget.widget.run_browser import open_run

#: Sub-packages reachable as attributes (``diffwidget.explain.DFRise``), imported on first use.
_SUBPACKAGES = ("explain", "models", "runs", "testing", "tracing", "widget")

__all__ = [
    "Explorer",
    "LiveExplorer",
    "Trace",
    "TraceContext",
    "__version__",
    "load_demo_pipeline",
    "open_run",
    "trace",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'diffwidget' has no attribute {name!r}")


def __dir__() -> list[str]:
    # Tab completion offers the public names, not this module's own imports.
    return sorted([*__all__, *_SUBPACKAGES])
