"""Standalone HTML export: one file with the widget's code and state, no kernel needed.

The file inlines the bundled ES module (base64, imported from a ``blob:`` URL so that no
``</script>`` in the code can end the tag) and the widget state as JSON with every binary
buffer as ``{"$b64": ...}``. Opened from ``file://`` it renders the same views on a
kernel-less model: the slider, token chips and every overlay computed before export work.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffwidget.widget import schema
from diffwidget.widget.model import ESM_PATH

if TYPE_CHECKING:
    from diffwidget.widget.explorer import Explorer

_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="diffwidget">
<title>{title}</title>
<style>body {{ margin: 24px; background: #fff; }}</style>
</head>
<body>
<div id="diffwidget-app"></div>
<script type="application/json" id="diffwidget-state">{state}</script>
<script type="application/octet-stream" id="diffwidget-module">{module}</script>
<script type="module">
const text = (id) => document.getElementById(id).textContent.trim();
const bytes = Uint8Array.from(atob(text("diffwidget-module")), (c) => c.charCodeAt(0));
const url = URL.createObjectURL(new Blob([bytes], {{ type: "text/javascript" }}));
const widget = await import(url);
URL.revokeObjectURL(url);
const state = JSON.parse(text("diffwidget-state"));
window.diffwidgetModel = widget.renderStandalone(state, document.getElementById("diffwidget-app"));
</script>
</body>
</html>
"""


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$b64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def standalone_state(explorer: Explorer) -> dict[str, Any]:
    """The widget state as exported: no running work, only overlays that have data."""
    widget = explorer.widget
    state = {spec.name: getattr(widget, spec.name) for spec in schema.TRAITS}
    offline = [k for k in state["available"] if k not in schema.HEAVY_OVERLAYS]
    offline += [k for k in schema.HEAVY_OVERLAYS if k in state["overlays"]]
    state.update(available=offline, status="idle", progress=0.0, error="")
    if state["overlay"] not in offline:
        state["overlay"] = "none"
    return state


def export_html(explorer: Explorer, path: str | Path, *, title: str | None = None) -> Path:
    """Write ``explorer`` as one self-contained HTML file.

    Parameters
    ----------
    explorer : Explorer
        The explorer to export; compute heavy overlays first to include them.
    path : str or Path
        Target file (``.html`` is appended when missing).
    title : str, optional
        Page title; default the prompt.

    Returns
    -------
    Path
        The file written.

    Examples
    --------
    >>> explorer.to_html("explorer.html")  # doctest: +SKIP
    """
    if not ESM_PATH.exists():
        raise FileNotFoundError(
            f"{ESM_PATH} is missing; build the front end with `npm install && npm run build` "
            "in js/ (or reinstall the package)"
        )
    path = Path(path)
    if path.suffix != ".html":
        path = path.with_suffix(path.suffix + ".html")
    state_json = json.dumps(_jsonable(standalone_state(explorer)), separators=(",", ":"))
    # "<\/" is the same JSON string but cannot close the <script> element.
    state_json = state_json.replace("</", "<\\/")
    module = base64.b64encode(ESM_PATH.read_bytes()).decode("ascii")
    page = _TEMPLATE.format(
        title=html.escape(title or f"diffwidget: {explorer.trace.prompt}"),
        state=state_json,
        module=module,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
