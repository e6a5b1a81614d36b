"""bqplot figures linked to an explorer's step, and linking several explorers.

bqplot has no scalar "current step" trait that ``jslink`` could tie to the widget, so the
cursor is a two-point ``Lines`` mark moved by a Python observer of the explorer's step
(one kernel round trip, ~0.1 s), and clicking a point of a curve sets the step through the
``selected`` trait of a ``Scatter`` mark.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from diffwidget.widget import schema
from diffwidget.widget.curves import CurveSet

if TYPE_CHECKING:
    from diffwidget.widget.explorer import Explorer

#: Colour of the step cursor; the same as the widget's own cursor.
CURSOR_COLOUR = "#1976d2"
#: Opacity of the curves of tokens that are not selected (the selected one is drawn at 1).
DIMMED_OPACITY = 0.35
#: Room right of the last step for the direct labels, as a share of the step range.
LABEL_ROOM = 0.28
#: Smallest vertical gap between two direct labels, as a share of the y range.
LABEL_GAP = 0.07


def _series(explorer: Explorer, group: str) -> tuple[list[str], list[int | None], np.ndarray]:
    curves = CurveSet.from_json(explorer.widget.curves)
    if not curves.curves:
        raise ValueError(
            f"the explorer has no curves; add one with explorer.add_curve(..., group={group!r})"
        )
    kinds = explorer.trace.token_kinds
    names, tokens, rows = [], [], []
    for curve in curves.of_group(group):
        if curve.token is not None and kinds[curve.token] != "word":
            continue  # start/end/pad are hidden here as in the widget
        names.append(curve.name)
        tokens.append(curve.token)
        rows.append(curve.values)
    if not rows:
        raise ValueError(
            f"no {group!r} curves yet; add them with "
            f"explorer.add_curve(name, values, group={group!r})"
        )
    # Repeated words ("a ... a") get their position, so every label names one curve.
    repeated = {n for n in names if names.count(n) > 1}
    names = [
        f"{n} ({t})" if n in repeated and t is not None else n
        for n, t in zip(names, tokens, strict=True)
    ]
    return names, tokens, np.stack(rows)


def label_positions(ends: np.ndarray, low: float, high: float) -> np.ndarray:
    """y positions for direct labels at the curves' ends, pushed apart to stay readable.

    Examples
    --------
    >>> label_positions(np.array([0.5, 0.5, 0.1]), 0.0, 1.0).round(2).tolist()
    [0.5, 0.57, 0.1]
    """
    gap = LABEL_GAP * (high - low or 1.0)
    order = np.argsort(ends, kind="stable")
    placed = np.asarray(ends, dtype=np.float64).copy()
    for k in range(1, len(order)):
        below, here = order[k - 1], order[k]
        placed[here] = max(placed[here], placed[below] + gap)
    overflow = float(placed.max() - high) if len(placed) else 0.0
    if overflow > 0:  # keep the top label inside the plot: shift everything down
        placed -= overflow
    return placed


def explorer_figure(explorer: Explorer, kind: str = "attention_mass") -> Any:
    """A bqplot ``Figure`` of one curve group whose step cursor follows the explorer.

    Each curve is labelled directly at its end (no legend over the data), colours are
    distinct, the selected token's curve is drawn on top and the others dimmed; hovering a
    point shows its step and value.

    Parameters
    ----------
    explorer : Explorer
        The explorer to link to.
    kind : {"attention_mass", "token_relevance", "concept_auc", "faithfulness"}
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
    names, tokens, values = _series(explorer, kind)
    frame = _frame(kind, values)
    x_scale = bqplot.LinearScale(min=0.0, max=frame.last * (1 + LABEL_ROOM))
    y_scale = bqplot.LinearScale(min=frame.low, max=frame.high)
    marks = _marks(explorer, names, values, frame, {"x": x_scale, "y": y_scale})
    figure = bqplot.Figure(
        marks=[marks.lines, marks.points, marks.labels, marks.cursor],
        axes=_axes(kind, frame, x_scale, y_scale),
        title=schema.CURVE_GROUP_TITLES[kind],
        layout={"width": "560px", "height": "300px"},
        fig_margin={"top": 40, "bottom": 45, "left": 60, "right": 10},
    )
    figure.add_class("dw-figure")
    figure.add_class(f"dw-figure-{kind}")
    figure.unlink = _follow_explorer(explorer, marks, tokens, len(frame.steps))
    figure.cursor = marks.cursor
    return figure


@dataclass(frozen=True)
class _Frame:
    """Where a figure's curves lie: the steps on x, the value range on y."""

    steps: np.ndarray
    #: The last step (at least 1, so a one-step trace still has an x range).
    last: float
    low: float
    high: float


@dataclass(frozen=True)
class _Marks:
    """The bqplot marks of one figure, kept together for the observers that move them."""

    lines: Any
    points: Any
    labels: Any
    cursor: Any


def _frame(kind: str, values: np.ndarray) -> _Frame:
    steps = np.arange(values.shape[1])
    finite = values[np.isfinite(values)]
    if kind == "attention_mass" and finite.size:
        # Shares are small and close together: fit them, with a margin.
        margin = 0.05 * float(finite.max() - finite.min()) or 1e-3
        low, high = float(finite.min()) - margin, float(finite.max()) + margin
    else:
        low = float(min(0.0, finite.min())) if finite.size else 0.0
        high = max(float(finite.max()) if finite.size else 1.0, 1.0)
    return _Frame(steps=steps, last=float(max(len(steps) - 1, 1)), low=low, high=high)


def _curve_ends(values: np.ndarray, low: float) -> np.ndarray:
    """Each curve's last finite value (``low`` for a curve with none), where its label goes."""
    ends = []
    for row in values:
        valid = np.flatnonzero(np.isfinite(row))
        ends.append(float(row[valid[-1]]) if valid.size else low)
    return np.asarray(ends)


def _marks(
    explorer: Explorer, names: list[str], values: np.ndarray, frame: _Frame, scales: dict[str, Any]
) -> _Marks:
    import bqplot

    palette = schema.CURVE_PALETTE
    colours = [palette[i % len(palette)] for i in range(len(names))]
    steps, low, high = frame.steps, frame.low, frame.high
    lines = bqplot.Lines(
        x=steps, y=values, scales=scales, colors=colours, labels=names, display_legend=False
    )
    labels = bqplot.Label(
        x=[frame.last + 0.3] * len(names),
        y=label_positions(_curve_ends(values, low), low, high),
        text=names,
        colors=colours,
        scales=scales,
        default_size=12,
        align="start",
    )
    points = bqplot.Scatter(
        x=np.tile(steps, len(names)),
        y=values.reshape(-1),
        scales=scales,
        colors=["#666666"],
        default_size=12,
        interactions={"click": "select", "hover": "tooltip"},
        tooltip=bqplot.Tooltip(fields=["x", "y"], formats=["d", ".3~g"], labels=["step", "value"]),
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
    return _Marks(lines=lines, points=points, labels=labels, cursor=cursor)


def _axes(kind: str, frame: _Frame, x_scale: Any, y_scale: Any) -> list[Any]:
    import bqplot

    n_steps = len(frame.steps)
    return [
        bqplot.Axis(
            scale=x_scale,
            side="bottom",
            label="step (loop index)",
            tick_values=np.unique(np.linspace(0, frame.last, min(n_steps, 6)).round()),
        ),
        bqplot.Axis(
            scale=y_scale,
            side="left",
            tick_format=".3~g",
            label=schema.CURVE_GROUP_UNITS[kind],
        ),
    ]


def _follow_explorer(
    explorer: Explorer, marks: _Marks, tokens: list[int | None], n_steps: int
) -> Callable[[], None]:
    """Tie the marks to the explorer's step and token; returns the function that unties them."""
    lines, points, cursor = marks.lines, marks.points, marks.cursor

    def follow(_change: Any = None) -> None:
        cursor.x = [explorer.step, explorer.step]

    def emphasise(_change: Any = None) -> None:
        token = explorer.token
        chosen = [t == token for t in tokens]
        lines.opacities = [1.0 if c or not any(chosen) else DIMMED_OPACITY for c in chosen]
        lines.stroke_width = 2

    def jump(change: Any) -> None:
        selected = change["new"]
        if selected is None or len(selected) == 0:
            return
        explorer.step = int(selected[-1]) % n_steps
        points.selected = None  # ready for the next click

    emphasise()
    explorer.widget.observe(follow, names=["step"])
    explorer.widget.observe(emphasise, names=["token"])
    points.observe(jump, names=["selected"])

    linked = {"on": True}

    def unlink() -> None:
        if not linked["on"]:
            return
        linked["on"] = False
        explorer.widget.unobserve(follow, names=["step"])
        explorer.widget.unobserve(emphasise, names=["token"])
        points.unobserve(jump, names=["selected"])

    return unlink


class ExplorerLink:
    """Keeps several explorers on one step; ``unlink()`` undoes it.

    Closing an explorer takes it out of every link it is in (the others stay linked), so
    moving a remaining explorer never reaches a closed one.
    """

    def __init__(self, explorers: Sequence[Explorer]) -> None:
        self._members: list[Explorer] = []
        self._handlers: dict[int, Callable[[Any], None]] = {}
        # Browser-side links (same step counts), each with the two explorers it ties.
        self._jslinks: list[tuple[Explorer, Explorer, Any]] = []
        self._busy = False
        for explorer in explorers:
            self._members.append(explorer)
            handler = self._propagator(explorer)
            self._handlers[id(explorer)] = handler
            explorer.widget.observe(handler, names=["step"])
            explorer._links.append(self)

    @property
    def explorers(self) -> list[Explorer]:
        """The explorers still linked."""
        return list(self._members)

    def _propagator(self, source: Explorer) -> Callable[[Any], None]:
        def propagate(_change: Any) -> None:
            if self._busy:
                return
            self._busy = True
            try:
                fraction = source.step / max(source.trace.n_steps - 1, 1)
                for target in list(self._members):
                    if target is not source:
                        target.step = round(fraction * (target.trace.n_steps - 1))
            finally:
                self._busy = False

        return propagate

    def _jslink(self, first: Explorer, other: Explorer) -> None:
        import ipywidgets

        link = ipywidgets.jslink((first.widget, "step"), (other.widget, "step"))
        self._jslinks.append((first, other, link))

    def remove(self, explorer: Explorer) -> None:
        """Take ``explorer`` out of the link (the others stay linked)."""
        if explorer not in self._members:
            return
        self._members.remove(explorer)
        explorer.widget.unobserve(self._handlers.pop(id(explorer)), names=["step"])
        if self in explorer._links:
            explorer._links.remove(self)
        kept = []
        for first, other, link in self._jslinks:
            if explorer in (first, other):
                link.unlink()
            else:
                kept.append((first, other, link))
        self._jslinks = kept
        if len(self._members) == 1:
            self.remove(self._members[0])  # nothing left to link it to

    def unlink(self) -> None:
        """Stop linking."""
        for explorer in list(self._members):
            self.remove(explorer)


def link_explorers(*explorers: Explorer) -> ExplorerLink:
    """Link the step of several explorers (compare prompts, seeds, schedules, guidance).

    Explorers with the same number of steps are linked in the browser with
    ``ipywidgets.jslink`` (no kernel round trip, works in exported notebooks); otherwise the
    step is mapped by its fraction of the run through a Python observer. Closing one of the
    explorers takes it out of the link.

    Examples
    --------
    >>> link = link_explorers(explorer_a, explorer_b)  # doctest: +SKIP
    >>> explorer_a.step = 5; explorer_b.step  # doctest: +SKIP
    5
    """
    if len(explorers) < 2:
        raise ValueError("link_explorers needs at least two explorers")
    closed = [e for e in explorers if e.closed]
    if closed:
        raise ValueError("this explorer was closed; link open explorers only")
    link = ExplorerLink(explorers)
    if len({e.trace.n_steps for e in explorers}) == 1:
        # jslink acts in the browser only; the observers keep kernel-side values in step too.
        for other in explorers[1:]:
            link._jslink(explorers[0], other)
    return link
