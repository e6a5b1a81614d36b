"""The explorer where widgets do not render: a PNG of the current view and a text summary.

nbconvert's HTML, GitHub and nbviewer have no widget manager (or no kernel state); they show
the richest *static* part of an output instead. ``Explorer._repr_mimebundle_`` therefore
carries, beside the widget view, a PNG of what the view shows now (image, overlay, colour
scale) and a plain-text summary. Drawn from the synced state with NumPy and Pillow, no torch.
"""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING, Any

import numpy as np

from diffwidget.widget import schema
from diffwidget.widget.codecs import decode_array

if TYPE_CHECKING:
    from diffwidget.widget.explorer import Explorer

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


def _frame(explorer: Explorer) -> np.ndarray:
    widget = explorer.widget
    payload = widget.noisy_previews if widget.image_mode == "noisy" else widget.previews
    return np.asarray(decode_array(payload)[explorer.step], dtype=np.uint8)


def shown_map(explorer: Explorer) -> tuple[np.ndarray, float, float] | None:
    """The overlay drawn now, in [0, 1], with the low and high values its scale shows."""
    widget = explorer.widget
    kind, step = widget.overlay, explorer.step
    if kind == "attention" and widget.attention is not None:
        maps = decode_array(widget.attention)
        values = np.asarray(maps[step, explorer.token], dtype=np.float32)
        high = float(values.max())
        return (values / high if high > 0 else values), 0.0, high
    overlay = widget.overlays.get(kind) if kind in schema.HEAVY_OVERLAYS else None
    if overlay is None or step not in overlay["steps"]:
        return None
    index = overlay["steps"].index(step)
    values = decode_array(overlay["maps"])[index].astype(np.float32)  # dequantised: 0..1
    low, high = overlay["ranges"][index]
    return values, float(low), float(high)


def _resize(values: np.ndarray, size: int) -> np.ndarray:
    from diffwidget.explain.attention import upsample_maps

    return upsample_maps(values[None].astype(np.float32), (size, size))[0]


def render_view(explorer: Explorer) -> np.ndarray:
    """uint8 ``[H, W, 3]`` picture of the current view: image, overlay, colour scale.

    Examples
    --------
    >>> render_view(explorer).shape  # doctest: +SKIP
    (284, 370, 3)
    """
    from PIL import Image, ImageDraw

    frame = _frame(explorer)
    factor = max(1, VIEW_PX // max(frame.shape[:2]))
    image = np.repeat(np.repeat(frame, factor, axis=0), factor, axis=1).astype(np.float32)
    side = image.shape[0]
    overlay = shown_map(explorer)
    if overlay is not None:
        values = np.clip(_resize(overlay[0], side), 0.0, 1.0)
        colours = colormap_lut()[np.rint(values * 255).astype(int)].astype(np.float32)
        alpha = (explorer.opacity * values)[..., None]
        image = image * (1 - alpha) + colours * alpha
    width = side + 2 * MARGIN_PX + (BAR_PX + LABEL_PX if overlay is not None else 0)
    canvas = Image.new("RGB", (width, side + TITLE_PX + 2 * MARGIN_PX), _BACKGROUND)
    canvas.paste(Image.fromarray(np.rint(image).astype(np.uint8)), (MARGIN_PX, TITLE_PX))
    draw = ImageDraw.Draw(canvas)
    step = explorer.step
    title = f"step {step}/{explorer.trace.n_steps - 1}, t = {int(explorer.trace.timesteps[step])}"
    if explorer.overlay != "none":
        title += f", {schema.OVERLAY_LABELS[explorer.overlay]}"
    if explorer.overlay == "attention":
        title += f" '{explorer.trace.tokens[explorer.token]}'"
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


def png_bytes(explorer: Explorer) -> bytes:
    """The current view as PNG file bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(render_view(explorer)).save(buffer, format="PNG")
    return buffer.getvalue()


def _steps_text(steps: list[int]) -> str:
    if len(steps) > _MAX_LISTED_STEPS:
        return f"{len(steps)} steps"
    return "step" + ("s " if len(steps) > 1 else " ") + ", ".join(str(s) for s in steps)


def summary_line(explorer: Explorer) -> str:
    """One line: prompt, steps, what is shown, what has been computed.

    Examples
    --------
    >>> summary_line(explorer)  # doctest: +SKIP
    "Explorer('a red circle', 20 steps, step 7 (t = 631), overlay DF-RISE, DF-RISE at step 7)"
    """
    trace = explorer.trace
    parts = [
        f"{trace.n_steps} steps",
        f"step {explorer.step} (t = {trace.timesteps[explorer.step]})",
    ]
    parts.append(f"overlay {schema.OVERLAY_LABELS[explorer.overlay]}")
    if explorer.overlay == "attention":
        parts.append(f"token {trace.tokens[explorer.token]!r}")
    for kind in schema.HEAVY_OVERLAYS:
        steps = sorted(explorer.cached(kind))
        if steps:
            parts.append(f"{schema.OVERLAY_LABELS[kind]} at {_steps_text(steps)}")
    return f"Explorer({trace.prompt!r}, {', '.join(parts)})"


def summary_text(explorer: Explorer) -> str:
    """The plain-text output: the summary line and the caption of what is shown."""
    widget = explorer.widget
    lines = [summary_line(explorer), widget.descriptions.get(widget.image_mode, "")]
    if widget.overlay == "attention":
        lines.append(widget.descriptions.get("attention", ""))
    return "\n".join(line for line in lines if line)


def mimebundle(explorer: Explorer, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The widget view (with anywidget's metadata, e.g. Colab's) plus PNG and text fallbacks."""
    bundle = explorer.widget._repr_mimebundle_(**kwargs) or {}
    data, metadata = bundle if isinstance(bundle, tuple) else (bundle, {})
    data = dict(data)
    data["text/plain"] = summary_text(explorer)
    data["image/png"] = base64.b64encode(png_bytes(explorer)).decode("ascii")
    return data, dict(metadata or {})
