"""Helpers for a trace's metadata: JSON-safe values and the versions of the libraries."""

from __future__ import annotations

import importlib.metadata
import json
from typing import Any


def json_safe(value: Any) -> Any:
    """``value`` as it will read back from JSON (tuples become lists, numbers plain)."""
    return json.loads(
        json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o))
    )


def versions() -> dict[str, str]:
    """Versions of the libraries a trace depends on, for its metadata.

    Read from the installed distributions' metadata, so that this layer never imports the
    package root; ``"unknown"`` for a copy run from a folder that was never installed.
    """
    found = {}
    for name in ("diffusers", "torch", "diffwidget"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "unknown"
    return found
