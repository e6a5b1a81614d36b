"""bqplot figures linked to an explorer's step, and linking several explorers.

bqplot has no scalar "current step" trait that ``jslink`` could tie to the widget, so the
cursor is a two-point ``Lines`` mark moved by a Python observer of the explorer's step
(one kernel round trip, ~0.1 s), and clicking a point of a curve sets the step through the
``selected`` trait of a ``Scatter`` mark.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from diffwidget.widget import schema
from diffwidget.widget.codecs import decode_array

if TYPE_CHECKING:
    from diffwidget.widget.explorer import Explorer

#: Colour of the step cursor; the same as the widget's own cursor.
CURSOR_COLOUR = "#1976d2"
#: Colour of the selected token's curve; others are drawn in the palette below.
SELECTED_COLOUR = "#d4480f"
PALETTE = ("#4c78a8", "#72b7b2", "#54a24b", "#eeca3b", "#b279a2", "#9d755d", "#bab0ac")
_TITLES = {
    "attention_mass": "Cross-attention mass per token",
    "token_relevance": "Token relevance per step (min–max over words)",
    "concept_auc": "Concept ROC-AUC per step",
    "faithfulness": "Faithfulness (insertion / deletion AUC)",
}


def _series(explorer: Explorer, group: str) -> tuple[list[str], np.ndarray]:
    curves = explorer.widget.curves
    if not curves:
        raise ValueError(
            f"the explorer has no curves; add one with explorer.add_curve(..., group={group!r})"
        )
    values = decode_array(curves["values"])
    kinds = explorer.trace.token_kinds
    names, rows = [], []
    for row, series in enumerate(curves["series"]):
        if series["group"] != group:
            continue
        token = series["token"]
        if token is not None and kinds[token] != "word":
            continue  # start/end/pad are hidden here as in the widget
        names.append(series["name"])
        rows.append(values[row])
    if not rows:
        raise ValueError(
            f"no {group!r} curves yet; add them with "
            f"explorer.add_curve(name, values, group={group!r})"
        )
    return names, np.stack(rows)


def explorer_figure(explorer: Explorer, kind: str = "attention_mass") -> Any:
    """A bqplot ``Figure`` of one curve group whose step cursor follows the explorer.

    Parameters
    ----------
    explorer : Explorer
        The explorer to link to.
    kind : {"attention_mass", "concept_auc", "faithfulness"}
        Curve group to draw.

    Returns
    -------
    bqplot.Figure
        Clicking a curve point sets ``explorer.step``; changing the step (slider, Python,
        a linked explorer) moves the cursor. The figure has ``unlink()`` to stop following.
    """
    import bqplot

    if kind not in schema.CURVE_GROUPS:
        raise ValueError(f"kind must be one of {schema.CURVE_GROUPS}, not {kind!r}")
    names, values = _series(explorer, kind)
    steps = np.arange(values.shape[1])
    finite = values[np.isfinite(values)]
    if kind == "attention_mass" and finite.size:
        # Shares are small and close together: fit them, with a margin.
        margin = 0.05 * float(finite.max() - finite.min()) or 1e-3
        low, high = float(finite.min()) - margin, float(finite.max()) + margin
    else:
        low = float(min(0.0, finite.min())) if finite.size else 0.0
        high = max(float(finite.max()) if finite.size else 1.0, 1.0)
    x_scale = bqplot.LinearScale(min=0.0, max=float(max(len(steps) - 1, 1)))
    y_scale = bqplot.LinearScale(min=low, max=high)
    scales = {"x": x_scale, "y": y_scale}
    colours = [PALETTE[i % len(PALETTE)] for i in range(len(names))]
    lines = bqplot.Lines(
        x=steps, y=values, scales=scales, colors=colours, labels=names, display_legend=True
    )
    points = bqplot.Scatter(
        x=np.tile(steps, len(names)),
        y=values.reshape(-1),
        scales=scales,
        colors=["#666666"],
        default_size=12,
        interactions={"click": "select"},
        selected_style={"opacity": 1.0},
        unselected_style={"opacity": 1.0},
    )
    cursor = bqplot.Lines(
        x=[explorer.step, explorer.step],
        y=[low, high],
        scales=scales,
        colors=[CURSOR_COLOUR],
        stroke_width=2,
    )
    figure = bqplot.Figure(
        marks=[lines, points, cursor],
        axes=[
            bqplot.Axis(scale=x_scale, side="bottom", label="step (loop index)"),
            bqplot.Axis(scale=y_scale, side="left", tick_format=".3~g"),
        ],
        title=_TITLES[kind],
        legend_location="top-right",
        layout={"width": "520px", "height": "300px"},
        fig_margin={"top": 40, "bottom": 40, "left": 50, "right": 10},
    )
    n_steps = len(steps)

    def follow(_change: Any = None) -> None:
        cursor.x = [explorer.step, explorer.step]

    def jump(change: Any) -> None:
        selected = change["new"]
        if selected is None or len(selected) == 0:
            return
        explorer.step = int(selected[-1]) % n_steps
        points.selected = None  # ready for the next click

    explorer.widget.observe(follow, names=["step"])
    points.observe(jump, names=["selected"])

    def unlink() -> None:
        explorer.widget.unobserve(follow, names=["step"])
        points.unobserve(jump, names=["selected"])

    figure.unlink = unlink
    figure.cursor = cursor
    return figure


class ExplorerLink:
    """Keeps several explorers on one step; ``unlink()`` undoes it."""

    def __init__(self, undo: list[Callable[[], None]]) -> None:
        self._undo = undo

    def unlink(self) -> None:
        """Stop linking."""
        for undo in self._undo:
            undo()
        self._undo = []


def link_explorers(*explorers: Explorer) -> ExplorerLink:
    """Link the step of several explorers (compare prompts, seeds, schedules, guidance).

    Explorers with the same number of steps are linked in the browser with
    ``ipywidgets.jslink`` (no kernel round trip, works in exported notebooks); otherwise the
    step is mapped by its fraction of the run through a Python observer.

    Examples
    --------
    >>> link = link_explorers(explorer_a, explorer_b)  # doctest: +SKIP
    >>> explorer_a.step = 5; explorer_b.step  # doctest: +SKIP
    5
    """
    import ipywidgets

    if len(explorers) < 2:
        raise ValueError("link_explorers needs at least two explorers")
    first = explorers[0]
    undo: list[Callable[[], None]] = []
    if len({e.trace.n_steps for e in explorers}) == 1:
        for other in explorers[1:]:
            link = ipywidgets.jslink((first.widget, "step"), (other.widget, "step"))
            undo.append(link.unlink)
        # jslink acts in the browser only; keep kernel-side values in step too.
    busy = False

    def make(source: Explorer) -> Callable[[Any], None]:
        def propagate(_change: Any) -> None:
            nonlocal busy
            if busy:
                return
            busy = True
            try:
                fraction = source.step / max(source.trace.n_steps - 1, 1)
                for target in explorers:
                    if target is not source:
                        n = target.trace.n_steps
                        target.step = round(fraction * (n - 1))
            finally:
                busy = False

        return propagate

    for explorer in explorers:
        handler = make(explorer)
        explorer.widget.observe(handler, names=["step"])
        undo.append(
            lambda e=explorer, h=handler: e.widget.unobserve(h, names=["step"])  # type: ignore[misc]
        )
    return ExplorerLink(undo)
