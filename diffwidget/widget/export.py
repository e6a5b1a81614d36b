"""Standalone HTML export: one file with the widget's code and state, no kernel needed.

The file inlines the bundled ES module (base64, imported from a ``blob:`` URL so that no
``</script>`` in the code can end the tag) and the widget state as JSON with every binary
buffer as ``{"$b64": ...}``. In the JSON every ``<``, ``>`` and ``&`` and the line
separators U+2028/U+2029 are written as ``\\uXXXX`` escapes: the same JSON value, but no
prompt (``<!--<script>``, ``</script>``) can end or re-open the script element. Opened
from ``file://`` it renders the same views on a kernel-less model: the slider, token chips,
the grid and every overlay and faithfulness result computed before export work.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffwidget._markup import escape
from diffwidget.widget import schema
from diffwidget.widget.codecs import to_transport
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


#: Characters written as ``\\uXXXX`` inside the embedded JSON (see the module docstring).
_SCRIPT_UNSAFE = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


def script_safe_json(value: Any) -> str:
    """JSON text of ``value`` that is safe inside ``<script type="application/json">``.

    Examples
    --------
    >>> script_safe_json({"prompt": "</script><!--"})
    '{"prompt":"\\\\u003c/script\\\\u003e\\\\u003c!--"}'
    """
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for char, code in _SCRIPT_UNSAFE.items():
        text = text.replace(char, code)
    return text


def module_base64() -> str:
    """The bundled ES module as base64 text (letters, digits, ``+ / =``: inert in a page)."""
    return base64.b64encode(ESM_PATH.read_bytes()).decode("ascii")


def standalone_state(explorer: Explorer) -> dict[str, Any]:
    """The widget state as exported: no running work, only what has data, fixed filters."""
    widget = explorer.widget
    state = {spec.name: getattr(widget, spec.name) for spec in schema.TRAITS}
    offline = [k for k in state["available"] if k not in schema.HEAVY_OVERLAYS]
    offline += [k for k in schema.HEAVY_OVERLAYS if k in state["overlays"]]
    state.update(available=offline, status="idle", progress=0.0, error="", actions=[])
    if state["overlay"] not in offline:
        state["overlay"] = "none"
    # Filters are applied in the kernel: the file keeps the ones in effect at export.
    options = dict(state["layer_options"])
    options["attention"] = [
        o for o in options.get("attention", []) if o["value"] == state["attention_layer"]
    ]
    options["saliency"] = {
        kind: [o for o in values if o["value"] == state["saliency_layer"]]
        for kind, values in options.get("saliency", {}).items()
    }
    state["layer_options"] = options
    if state["grid"] != "none" and state["grid_data"] is None:
        state["grid"] = "none"
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
    # Every field is made safe where it is filled in (the markup lint checks this).
    page = _TEMPLATE.format(
        title=escape(title or f"diffwidget: {explorer.trace.prompt}"),
        state=script_safe_json(to_transport(standalone_state(explorer), "base64")),
        module=module_base64(),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
