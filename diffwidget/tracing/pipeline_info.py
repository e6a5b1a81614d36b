"""Facts about a pipeline and helpers for a trace's metadata."""

from __future__ import annotations

import importlib.metadata
import json
from typing import Any

SUPPORTED_PIPELINES: tuple[str, ...] = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def pipeline_kind(pipe: Any) -> str:
    """The supported pipeline class ``pipe`` is (or derives from); a clear error otherwise."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in SUPPORTED_PIPELINES:
            return cls.__name__
    raise TypeError(
        f"diffwidget cannot trace a {type(pipe).__name__}; supported pipelines: "
        f"{', '.join(SUPPORTED_PIPELINES)} (and their subclasses). Load your checkpoint with "
        "one of them, e.g. StableDiffusionPipeline.from_pretrained(path)"
    )


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
