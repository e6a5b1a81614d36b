"""The explorer where widgets do not render: a PNG of the current view and a text summary.

nbconvert's HTML, GitHub and nbviewer have no widget manager (or no kernel state); they show
the richest *static* part of an output instead. ``Explorer._repr_mimebundle_`` therefore
carries, beside the widget view, a PNG of what the view shows now (image, overlay, colour
scale) and a plain-text summary. Drawn from the widget's synced state alone (no trace, no
kernel objects) with NumPy and Pillow, no torch.
"""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING, Any

import numpy as np

from diffwidget.explain.attention import upsample_maps
from diffwidget.widget import schema
from diffwidget.widget.codecs import decode_array
from diffwidget.widget.payloads import AttentionSet

if TYPE_CHECKING:
    from diffwidget.widget.model import ExplorerWidget

#: Side of the image in the PNG (pixels); previews are scaled up by whole factors.
VIEW_PX = 256
#: Width of the colour bar and of its labels (pixels).
BAR_PX = 14
LABEL_PX = 84
MARGIN_PX = 6
TITLE_PX = 16
_BACKGROUND = (255, 255, 255)
_TEXT = (34, 34, 34)
_MAX_LISTED_STEPS = 8


def colormap_lut() -> np.ndarray:
    """The overlays' colour map as a 256 x 3 uint8 table (same stops as the front end)."""
    stops = np.asarray(schema.COLORMAP_STOPS, dtype=np.float64)
    x = np.linspace(0, len(stops) - 1, 256)
    low = np.minimum(np.floor(x).astype(int), len(stops) - 2)
    frac = (x - low)[:, None]
    return np.round(stops[low] * (1 - frac) + stops[low + 1] * frac).astype(np.uint8)


def _step(widget: ExplorerWidget) -> int:
    return min(max(int(widget.step), 0), max(widget.n_steps - 1, 0))


def _frame(widget: ExplorerWidget) -> np.ndarray:
    payload = widget.noisy_previews if widget.image_mode == "noisy" else None
    payload = payload if payload is not None else widget.previews
    return np.asarray(decode_array(payload)[_step(widget)], dtype=np.uint8)


def shown_attention(widget: ExplorerWidget) -> AttentionSet | None:
    """The attention set of the current filter (layer and head), when the widget holds it."""
    wanted = (str(widget.attention_layer), int(widget.attention_head))
    for value in (widget.attention_filtered, widget.attention):
        if value is not None and (value.get("layer"), value.get("head")) == wanted:
            return AttentionSet.from_json(value)
    return None


def shown_map(widget: ExplorerWidget) -> tuple[np.ndarray, float, float] | None:
    """The overlay drawn now, in [0, 1], with the low and high values its scale shows.

    Attention is on its own grid (the picture upsamples it as the view does).
    """
    kind, step = widget.overlay, _step(widget)
    attention = shown_attention(widget) if kind == "attention" else None
    if attention is not None and step in attention.steps:
        row = attention.steps.index(step)
        values = attention.codes[row, int(widget.token)].astype(np.float32) / 255
        return values, 0.0, float(attention.scale[row, int(widget.token)])
    overlay = widget.overlays.get(kind) if kind in schema.COMPUTED_OVERLAYS else None
    if overlay is None or step not in overlay["steps"]:
        return None
    index = overlay["steps"].index(step)
    values = decode_array(overlay["maps"])[index].astype(np.float32)  # dequantised: 0..1
    low, high = overlay["ranges"][index]
    return values, float(low), float(high)


def _resize(values: np.ndarray, size: int) -> np.ndarray:
    return upsample_maps(values[None].astype(np.float32), (size, size))[0]


def render_view(widget: ExplorerWidget) -> np.ndarray:
    """uint8 ``[H, W, 3]`` picture of the current view: image, overlay, colour scale.

    Examples
    --------
    >>> render_view(explorer.widget).shape  # doctest: +SKIP
    (284, 370, 3)
    """
    from PIL import Image, ImageDraw

    frame = _frame(widget)
    factor = max(1, VIEW_PX // max(frame.shape[:2]))
    image = np.repeat(np.repeat(frame, factor, axis=0), factor, axis=1).astype(np.float32)
    side = image.shape[0]
    overlay = shown_map(widget)
    if overlay is not None:
        values = np.clip(_resize(overlay[0], side), 0.0, 1.0)
        colours = colormap_lut()[np.rint(values * 255).astype(int)].astype(np.float32)
        alpha = (float(widget.opacity) * values)[..., None]
        image = image * (1 - alpha) + colours * alpha
    width = side + 2 * MARGIN_PX + (BAR_PX + LABEL_PX if overlay is not None else 0)
    canvas = Image.new("RGB", (width, side + TITLE_PX + 2 * MARGIN_PX), _BACKGROUND)
    canvas.paste(Image.fromarray(np.rint(image).astype(np.uint8)), (MARGIN_PX, TITLE_PX))
    draw = ImageDraw.Draw(canvas)
    step = _step(widget)
    title = f"step {step}/{widget.n_steps - 1}, t = {int(widget.timesteps[step])}"
    if widget.overlay != "none":
        title += f", {schema.OVERLAY_LABELS[widget.overlay]}"
    if widget.overlay == "attention":
        title += f" '{widget.tokens[int(widget.token)]}'"
    draw.text((MARGIN_PX, 2), title, fill=_TEXT)
    if overlay is not None:
        left = side + 2 * MARGIN_PX
        ramp = colormap_lut()[np.linspace(255, 0, side).astype(int)]
        bar = np.repeat(ramp[:, None, :], BAR_PX, axis=1)
        canvas.paste(Image.fromarray(bar), (left, TITLE_PX))
        _, low, high = overlay
        draw.text((left + BAR_PX + 3, TITLE_PX), f"{high:.3g}", fill=_TEXT)
        draw.text((left + BAR_PX + 3, TITLE_PX + side - 12), f"{low:.3g}", fill=_TEXT)
    return np.asarray(canvas)


def png_bytes(widget: ExplorerWidget) -> bytes:
    """The current view as PNG file bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(render_view(widget)).save(buffer, format="PNG")
    return buffer.getvalue()


def _steps_text(steps: list[int]) -> str:
    if len(steps) > _MAX_LISTED_STEPS:
        return f"{len(steps)} steps"
    return "step" + ("s " if len(steps) > 1 else " ") + ", ".join(str(s) for s in steps)


def summary_line(widget: ExplorerWidget) -> str:
    """One line: prompt, steps, what is shown, what has been computed.

    Examples
    --------
    >>> summary_line(explorer.widget)  # doctest: +SKIP
    "Explorer('a red circle', 20 steps, step 7 (t = 631), overlay DF-RISE, DF-RISE at step 7)"
    """
    step = _step(widget)
    parts = [f"{widget.n_steps} steps", f"step {step} (t = {widget.timesteps[step]})"]
    parts.append(f"overlay {schema.OVERLAY_LABELS[widget.overlay]}")
    if widget.overlay == "attention":
        parts.append(f"token {widget.tokens[int(widget.token)]!r}")
    for kind in schema.COMPUTED_OVERLAYS:
        steps = sorted(widget.overlays.get(kind, {}).get("steps", []))
        if steps:
            parts.append(f"{schema.OVERLAY_LABELS[kind]} at {_steps_text(steps)}")
    return f"Explorer({widget.prompt!r}, {', '.join(parts)})"


def summary_text(widget: ExplorerWidget) -> str:
    """The plain-text output: the summary line and the caption of what is shown."""
    lines = [summary_line(widget), widget.descriptions.get(widget.image_mode, "")]
    attention = shown_attention(widget) if widget.overlay == "attention" else None
    if attention is not None:
        lines.append(attention.description)
    return "\n".join(line for line in lines if line)


def mimebundle(widget: ExplorerWidget, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The widget view (with anywidget's metadata, e.g. Colab's) plus PNG and text fallbacks."""
    bundle = widget._repr_mimebundle_(**kwargs) or {}
    data, metadata = bundle if isinstance(bundle, tuple) else (bundle, {})
    data = dict(data)
    data["text/plain"] = summary_text(widget)
    data["image/png"] = base64.b64encode(png_bytes(widget)).decode("ascii")
    return data, dict(metadata or {})
