"""Showing a trace: state schema, codecs, the anywidget model and the Explorer façade.

Nothing here imports torch; heavy overlays load their methods lazily on request.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "Explorer": "diffwidget.widget.explorer",
    "ExplorerWidget": "diffwidget.widget.model",
    "link_explorers": "diffwidget.widget.figures",
    "export_html": "diffwidget.widget.export",
}

if TYPE_CHECKING:
    from diffwidget.widget.explorer import Explorer
    from diffwidget.widget.export import export_html
    from diffwidget.widget.figures import link_explorers
    from diffwidget.widget.model import ExplorerWidget

__all__ = ["Explorer", "ExplorerWidget", "export_html", "link_explorers"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffwidget.widget' has no attribute {name!r}")
