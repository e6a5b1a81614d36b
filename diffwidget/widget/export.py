"""Standalone HTML export: one file with the widget's code and state, no kernel needed.

The page holds three blocks: the widget state as JSON, in which every binary buffer is a
reference ``{"$buf": [offset, length]}`` into one data block; the data block, gzip-compressed
and base64-encoded (the browser inflates it with ``DecompressionStream``, which works from
``file://``); and the bundled ES module (base64, imported from a ``blob:`` URL so that no
``</script>`` in the code can end the tag). In the JSON every ``<``, ``>`` and ``&`` and the
line separators U+2028/U+2029 are written as ``\\uXXXX`` escapes: the same JSON value, but no
prompt (``<!--<script>``, ``</script>``) can end or re-open the script element.

:func:`export_plan` builds the file in memory and says what it holds, part by part, before
anything is written; it can keep a subset of the steps and of the grid's layers. Opened from
``file://`` the page renders the same views on a kernel-less model: the slider, token chips,
the grid and every overlay and faithfulness result computed before export work.
"""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypedDict

from diffwidget._markup import base64_text, escape
from diffwidget.widget import schema
from diffwidget.widget.codecs import decode_array, encode_array, payload_nbytes
from diffwidget.widget.curves import CurveSet
from diffwidget.widget.grid import block_of
from diffwidget.widget.layers import grid_text
from diffwidget.widget.model import ESM_PATH
from diffwidget.widget.payloads import AttentionSet, GridData
from diffwidget.widget.switch_view import SwitchFilmstrip

#: Key of a buffer stored in the page's data block: ``{"$buf": [offset, length]}``.
BUFFER_KEY = "$buf"
#: Buffers start at multiples of this many bytes, so float32 data is viewed without a copy.
ALIGN = 4
#: gzip level of the data block (6: zlib's default balance of size and time).
GZIP_LEVEL = 6
#: base64 writes every 3 bytes as 4 characters (the last block padded).
BASE64_BYTES_PER_BLOCK, BASE64_CHARS_PER_BLOCK = 3, 4

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
<script type="application/octet-stream" id="diffwidget-data" data-encoding="{encoding}">
{data}</script>
<script type="application/octet-stream" id="diffwidget-module">{module}</script>
<script type="module">
const app = document.getElementById("diffwidget-app");
const text = (id) => document.getElementById(id).textContent.trim();
const bytes = (id) => {{
  const raw = atob(text(id));
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}};
async function data() {{
  const packed = bytes("diffwidget-data");
  if (document.getElementById("diffwidget-data").dataset.encoding !== "gzip") return packed;
  if (typeof DecompressionStream === "undefined") {{
    throw new Error("this browser cannot inflate the file's data (no DecompressionStream); " +
      "open it in a current browser, or export with compress=False");
  }}
  const stream = new Blob([packed]).stream().pipeThrough(new DecompressionStream("gzip"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}}
try {{
  const code = new Blob([bytes("diffwidget-module")], {{ type: "text/javascript" }});
  const url = URL.createObjectURL(code);
  const widget = await import(url);
  URL.revokeObjectURL(url);
  const state = JSON.parse(text("diffwidget-state"));
  window.diffwidgetModel = widget.renderStandalone(state, app, await data());
}} catch (error) {{
  app.textContent = "diffwidget could not open this file: " + error.message;
  throw error;
}}
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


@dataclass(frozen=True)
class ExportSource:
    """What an export reads from an explorer.

    Attributes
    ----------
    state : dict
        Trait name -> value of every synced trait, buffers as bytes, with the parts the live
        view gets on request filled in (the noisy previews) and the attention filters a file
        can switch between (the default and the current one).
    prompt : str
        The traced prompt (the default page title).
    grid : GridData, optional
        The open grid with every token's maps (the live view holds one token's).
    """

    state: dict[str, Any]
    prompt: str
    grid: GridData | None = None


class ExportOptions(TypedDict, total=False):
    """What :func:`export_plan` can be told (every key optional)."""

    steps: Sequence[int] | None
    layers: Sequence[str] | None
    compress: bool
    title: str | None


class Exportable(Protocol):
    """Anything that can be exported (an :class:`~diffwidget.widget.explorer.Explorer`)."""

    def export_source(self) -> ExportSource:
        """The state to export."""
        ...


@dataclass(frozen=True)
class ExportPart:
    """One trait's share of an export: its binary bytes before compression."""

    name: str
    nbytes: int


@dataclass
class ExportPlan:
    """A standalone page built in memory, with what it holds; :meth:`write` saves it.

    Attributes
    ----------
    page : str
        The HTML text.
    parts : list of ExportPart
        Binary bytes per trait (before compression), largest first.
    json_bytes : int
        Bytes of the state's JSON text.
    data_bytes : int
        Bytes of the data block as stored (compressed, base64).
    compress : bool
        Whether the data block is gzip-compressed.
    steps : int
        Steps kept in the file.
    """

    page: str
    parts: list[ExportPart]
    json_bytes: int
    data_bytes: int
    compress: bool
    steps: int
    notes: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Size of the file in bytes."""
        return len(self.page.encode("utf-8"))

    def summary(self) -> str:
        """A table of what the file holds and its size.

        Examples
        --------
        >>> print(explorer.export().summary())  # doctest: +SKIP
        """
        raw = sum(p.nbytes for p in self.parts)
        how = "gzip + base64" if self.compress else "base64"
        lines = [f"standalone HTML, {self.steps} steps: {self.nbytes / 1e6:.2f} MB"]
        lines += [f"  {p.name:<20} {p.nbytes / 1e6:8.2f} MB" for p in self.parts if p.nbytes]
        lines.append(
            f"  {'(binary, raw)':<20} {raw / 1e6:8.2f} MB -> {how} {self.data_bytes / 1e6:.2f} MB"
        )
        lines.append(f"  {'state JSON':<20} {self.json_bytes / 1e6:8.2f} MB")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.summary()

    def write(self, path: str | Path) -> Path:
        """Write the page (``.html`` is appended when missing) and return its path."""
        path = Path(path)
        if path.suffix != ".html":
            path = path.with_suffix(path.suffix + ".html")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.page, encoding="utf-8")
        return path


def standalone_state(state: dict[str, Any]) -> dict[str, Any]:
    """The widget state as exported: no running work, only what has data, fixed filters."""
    state = dict(state)
    offline = [k for k in state["available"] if k not in schema.COMPUTED_OVERLAYS]
    offline += [k for k in schema.COMPUTED_OVERLAYS if k in state["overlays"]]
    state.update(available=offline, status="idle", progress=0.0, error="", actions=[])
    if state["overlay"] not in offline:
        state["overlay"] = "none"
    # Filters are applied in the kernel: the file keeps the ones it holds maps for.
    options = dict(state["layer_options"])
    options["saliency"] = {
        kind: [o for o in values if o["value"] == state["saliency_layer"]]
        for kind, values in options.get("saliency", {}).items()
    }
    state["layer_options"] = options
    if state["grid"] != "none" and state["grid_data"] is None:
        state["grid"] = "none"
    return state


def _matches(name: str, wanted: Sequence[str], grid: tuple[int, int]) -> bool:
    return name in wanted or block_of(name) in wanted or grid_text(grid) in wanted


def _keep_layers(state: dict[str, Any], wanted: Sequence[str]) -> None:
    if state["grid_data"] is None:
        return
    grid = GridData.from_json(state["grid_data"])
    kept = [n for g in grid.groups for n in g.layers if _matches(n, wanted, g.grid)]
    if not kept:
        raise ValueError(
            f"no grid row matches layers={list(wanted)}; give module paths, block prefixes "
            f"such as {sorted({g.name for g in grid.groups})} or grids such as "
            f"{sorted({grid_text(g.grid) for g in grid.groups})}"
        )
    state["grid_data"] = grid.keep(layers=kept).to_json()


def _rows(payload: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    """An ``ArrayPayload`` (and its scale) with only ``rows`` of its first axis."""
    plain = {k: v for k, v in payload.items() if k != "scale"}
    codes = decode_array(plain)[rows]
    scale = decode_array(payload["scale"])[rows] if "scale" in payload else None
    return encode_array(codes, scale=scale)


def _keep_steps(state: dict[str, Any], keep: list[int]) -> None:
    """Keep the loop indices ``keep`` everywhere, renumbered 0, 1, … (the file's steps)."""
    position = {step: i for i, step in enumerate(keep)}
    for name in ("previews", "noisy_previews"):
        if state[name] is not None:
            state[name] = _rows(state[name], keep)
    for name in ("attention", "attention_filtered"):
        if state[name] is not None:
            state[name] = AttentionSet.from_json(state[name]).keep_steps(keep).to_json()
    overlays = {}
    for kind, entry in state["overlays"].items():
        rows = [i for i, s in enumerate(entry["steps"]) if s in position]
        if rows:
            overlays[kind] = {
                **entry,
                "steps": [position[entry["steps"][i]] for i in rows],
                "maps": _rows(entry["maps"], rows),
                "ranges": [entry["ranges"][i] for i in rows],
                "descriptions": [entry["descriptions"][i] for i in rows],
            }
    state["overlays"] = overlays
    state["curves"] = CurveSet.from_json(state["curves"]).keep(keep).to_json()
    state["faithfulness"] = [
        {**e, "step": position[e["step"]]} for e in state["faithfulness"] if e["step"] in position
    ]
    if state["grid_data"] is not None:
        state["grid_data"] = GridData.from_json(state["grid_data"]).keep(steps=keep).to_json()
    if state["switch"] is not None:
        state["switch"] = SwitchFilmstrip.from_json(state["switch"]).keep_steps(keep).to_json()
    state["timesteps"] = [state["timesteps"][s] for s in keep]
    state["exact_steps"] = [position[s] for s in state["exact_steps"] if s in position]
    state["step"] = min(range(len(keep)), key=lambda i: abs(keep[i] - state["step"]))
    note = (
        f"This file keeps {len(keep)} of the run's steps (loop indices "
        f"{', '.join(str(s) for s in keep)}); its slider counts the kept steps."
    )
    state["descriptions"] = {
        k: f"{v}. {note}" if k in ("x0", "noisy") else v for k, v in state["descriptions"].items()
    }


def _checked_steps(steps: Sequence[int], n_steps: int) -> list[int]:
    keep = sorted({int(s) for s in steps})
    if not keep or keep[0] < 0 or keep[-1] >= n_steps:
        raise ValueError(
            f"steps must be loop indices in 0..{n_steps - 1} (at least one), got {list(steps)}"
        )
    return keep


def pack_buffers(value: Any, blob: bytearray) -> Any:
    """``value`` with every bytes buffer moved into ``blob`` and replaced by a reference.

    Examples
    --------
    >>> blob = bytearray()
    >>> pack_buffers({"a": b"xy", "b": [b"z"]}, blob), bytes(blob)
    ({'a': {'$buf': [0, 2]}, 'b': [{'$buf': [4, 1]}]}, b'xy\\x00\\x00z')
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        blob.extend(b"\0" * (-len(blob) % ALIGN))
        offset = len(blob)
        blob.extend(value)
        return {BUFFER_KEY: [offset, len(value)]}
    if isinstance(value, dict):
        return {k: pack_buffers(v, blob) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [pack_buffers(v, blob) for v in value]
    return value


def export_plan(
    explorer: Exportable,
    *,
    steps: Sequence[int] | None = None,
    layers: Sequence[str] | None = None,
    compress: bool = True,
    title: str | None = None,
) -> ExportPlan:
    """Build the standalone page of ``explorer`` in memory and say what it holds.

    Parameters
    ----------
    explorer : Explorer
        The explorer to export; compute heavy overlays and open the grid first to include
        them.
    steps : sequence of int, optional
        Loop indices to keep (default all).
    layers : sequence of str, optional
        Grid rows to keep: module paths, block prefixes or grids such as ``"32x32"``.
    compress : bool
        gzip the data block (inflated by the browser's ``DecompressionStream``).
    title : str, optional
        Page title; default the prompt.

    Returns
    -------
    ExportPlan
        ``plan.summary()`` gives the sizes; ``plan.write(path)`` writes the file.

    Examples
    --------
    >>> plan = export_plan(explorer, steps=range(0, 20, 2))  # doctest: +SKIP
    >>> plan.write("explorer.html")  # doctest: +SKIP
    """
    if not ESM_PATH.exists():
        raise FileNotFoundError(
            f"{ESM_PATH} is missing; build the front end with `npm install && npm run build` "
            "in js/ (or reinstall the package)"
        )
    source = explorer.export_source()
    state = dict(source.state)
    state["grid_data"] = source.grid.to_json() if source.grid is not None else None
    n_steps = len(state["timesteps"])
    notes = []
    if layers is not None:
        _keep_layers(state, list(layers))
    if steps is not None:
        keep = _checked_steps(steps, n_steps)
        if keep != list(range(n_steps)):
            _keep_steps(state, keep)
            notes.append(f"kept loop indices {keep[0]}..{keep[-1]} ({len(keep)} of {n_steps})")
    state = standalone_state(state)
    parts = sorted(
        (ExportPart(name, payload_nbytes(state[name])) for name in schema.PAYLOAD_TRAITS),
        key=lambda p: -p.nbytes,
    )
    blob = bytearray()
    packed = pack_buffers(state, blob)
    data = gzip.compress(bytes(blob), GZIP_LEVEL, mtime=0) if compress else bytes(blob)
    # Every field is made safe where it is filled in (the markup lint checks this).
    page = _TEMPLATE.format(
        title=escape(title or f"diffwidget: {source.prompt}"),
        state=script_safe_json(packed),
        encoding=escape("gzip" if compress else "raw"),
        data=base64_text(data),
        module=module_base64(),
    )
    return ExportPlan(
        page,
        parts,
        len(script_safe_json(packed).encode()),
        BASE64_CHARS_PER_BLOCK * -(-len(data) // BASE64_BYTES_PER_BLOCK),
        compress,
        len(state["timesteps"]),
        notes,
    )


def export_html(
    explorer: Exportable,
    path: str | Path,
    *,
    title: str | None = None,
    steps: Sequence[int] | None = None,
    layers: Sequence[str] | None = None,
    compress: bool = True,
) -> Path:
    """Write ``explorer`` as one self-contained HTML file (see :func:`export_plan`).

    Returns
    -------
    Path
        The file written (``.html`` is appended when missing).

    Examples
    --------
    >>> export_html(explorer, "explorer.html")  # doctest: +SKIP
    """
    plan = export_plan(explorer, steps=steps, layers=layers, compress=compress, title=title)
    return plan.write(path)
