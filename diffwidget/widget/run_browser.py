"""The run browser: a prompt-set run's items, aggregate curves, and the explorer of one item.

``diffwidget.open_run(DIR)`` returns a :class:`RunView`: the run's table and records
(:class:`~diffwidget.runs.open.RunResult`) plus ``explorer(item)`` and ``browser()``.
The browser is built from ipywidgets and bqplot: a list of items sorted by a metric (worst
first by default), a bqplot figure of the aggregate curves with ± sd bands, and below them
the :class:`~diffwidget.widget.explorer.Explorer` of the item clicked. Nothing here imports
torch; a finished run opens anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from diffwidget._markup import safe_html
from diffwidget.runs.aggregation import ITEM_COLUMNS, RANDOM_ORDER, aggregate_curves
from diffwidget.runs.open import RunResult
from diffwidget.runs.report import worst_metric
from diffwidget.runs.store import RunItem
from diffwidget.widget import schema
from diffwidget.widget.explorer import Explorer

#: Items listed at once; the list scrolls.
LIST_ROWS = 12
#: Characters of the prompt shown per row.
PROMPT_WIDTH = 48
_BAND_OPACITY = 0.2
#: How to compute an item again: resuming a run recomputes what is missing or damaged.
_RESUME = "resume the run (the same `diffwidget run` command with the same --out) to compute it"


class RunView(RunResult):
    """A run with explorers per item and the run browser (see :func:`open_run`)."""

    def explorer(self, item: str, seed: int | None = None, pipe: Any = None) -> Explorer:
        """The Explorer of one item, with the run's DF-RISE and DF-CAM maps as overlays.

        Parameters
        ----------
        item : str
            Item id, or its key ``id__seedN``.
        seed : int, optional
            Which seed, when the item ran with several.
        pipe : diffusers pipeline, optional
            Lets the explorer compute further overlays; not needed for the stored ones.

        Examples
        --------
        >>> open_run("my-run").explorer("scene00003")  # doctest: +SKIP
        """
        explorer = Explorer(self.trace(item, seed), pipe=pipe)
        for saliency in self.saliency_maps(item, seed):
            if saliency.method != "attention":
                explorer.add_overlay(saliency.method, saliency.step, saliency)
        return explorer

    def browser(self, **kwargs: Any) -> RunBrowser:
        """The run browser widget (:class:`RunBrowser`)."""
        return RunBrowser(self, **kwargs)


def open_run(path: str | Path) -> RunView:
    """Open a run folder written by ``diffwidget run``: table, explorers, browser.

    Examples
    --------
    >>> import diffwidget
    >>> run = diffwidget.open_run("my-run")  # doctest: +SKIP
    >>> worst = run.table.sort_values("seg.ours.iou@0.4").iloc[0]  # doctest: +SKIP
    >>> run.explorer(worst.key)  # doctest: +SKIP
    >>> run.browser()  # doctest: +SKIP
    """
    return RunView(path)


def item_message(item: RunItem) -> str:
    """Why an item has no explorer, by its status: not computed yet, failed, damaged, made
    by other settings, or no trace kept.

    Examples
    --------
    >>> from diffwidget.runs.manifest import Work
    >>> from diffwidget.runs.prompts import PromptItem
    >>> work = Work(PromptItem("a", "a red circle"), offset=0, seed=1, key="a__seed1")
    >>> item_message(RunItem(work, "missing")).split(":")[0]
    'not computed yet (status missing)'
    """
    status = item.status
    if status == "missing":
        return f"not computed yet (status missing): {_RESUME}"
    if status == "corrupt":
        return f"its result file is damaged or incomplete (status corrupt): {_RESUME} again"
    if status == "stale":
        return (
            "its result was made by other settings or for another prompt (status stale): "
            f"{_RESUME} again"
        )
    if status == "failed":
        error = item.error
        kind = (error.type if error else "") or "error"
        message = (error.message if error else "") or "the run recorded no message"
        return f"failed: {kind}: {message}"
    return (
        f"computed (status {status}), but the run kept no trace of it; rerun it without "
        "--no-traces (save_traces=True) to open its explorer"
    )


def _row_label(row: Any, column: str | None) -> str:
    prompt = str(row["prompt"])
    if len(prompt) > PROMPT_WIDTH:
        prompt = prompt[: PROMPT_WIDTH - 1] + "…"
    value = row[column] if column is not None else None
    shown = "–" if value is None or not np.isfinite(float(value)) else f"{float(value):.3f}"
    status = "" if row["status"] == "ok" else f"  [{row['status']}]"
    return f"{shown:>7}  {prompt:<{PROMPT_WIDTH}}  {row['key']}{status}"


class RunBrowser:
    """Browse a run: items sorted by a metric, aggregate curves, the clicked item's explorer.

    Parameters
    ----------
    run : RunView
        The run (``diffwidget.open_run(DIR)``).
    sort_by : str, optional
        Metric column to sort by; default segmentation IoU of our aggregation, else the
        first map's deletion gain.
    worst_first : bool
        Lowest values first (for both defaults, the worst items).

    Attributes
    ----------
    widget : ipywidgets.VBox
        What is displayed.
    explorer : Explorer or None
        The explorer of the selected item.

    Examples
    --------
    >>> browser = open_run("my-run").browser()  # doctest: +SKIP
    >>> browser.select(browser.keys[0])  # opens the worst item's explorer  # doctest: +SKIP
    """

    def __init__(
        self, run: RunView, *, sort_by: str | None = None, worst_first: bool = True
    ) -> None:
        import ipywidgets as w

        self.run = run
        table = run.table
        self.metrics = [c for c in table.columns if c not in ITEM_COLUMNS]
        if sort_by is not None and sort_by not in self.metrics:
            raise KeyError(f"no metric {sort_by!r} in this run; metrics: {self.metrics}")
        column = sort_by or worst_metric(table)
        self.explorer: Explorer | None = None
        self._sort = w.Dropdown(
            options=self.metrics, value=column, description="sort by", layout={"width": "60%"}
        )
        self._order = w.ToggleButtons(
            options=[("worst first", True), ("best first", False)], value=worst_first
        )
        self._list = w.Select(options=[], rows=LIST_ROWS, layout={"width": "100%"})
        self._list.add_class("diffwidget-run-list")
        self._style = w.HTML(
            "<style>.diffwidget-run-list select{font-family:monospace;font-size:12px}</style>"
        )
        self._curves = aggregate_curves(run.records)
        self._curve_choice = w.Dropdown(
            options=list(self._curves), description="curves", layout={"width": "60%"}
        )
        self.figure = self._make_figure()
        self._below = w.VBox([])
        counts = table["status"].value_counts().to_dict()
        header = w.HTML(
            safe_html(
                "<b>{name}</b>: {count} items ({statuses}). Click an item to open its "
                "explorer below.",
                name=run.path.name,
                count=len(table),
                statuses=", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
            )
        )
        self.widget = w.VBox(
            [
                self._style,
                header,
                w.HBox([self._sort, self._order]),
                self._list,
                self._curve_choice,
                self.figure,
                self._below,
            ]
        )
        self._sort.observe(lambda _c: self._refresh(), names="value")
        self._order.observe(lambda _c: self._refresh(), names="value")
        self._list.observe(self._on_pick, names="value")
        self._curve_choice.observe(lambda _c: self._draw_curves(), names="value")
        self._refresh()
        self._draw_curves()

    # ------------------------------------------------------------------- table
    @property
    def keys(self) -> list[str]:
        """Item keys in the order listed."""
        return [key for _label, key in self._list.options]

    def sort(self, metric: str, *, worst_first: bool = True) -> None:
        """Sort the list by ``metric`` (lowest first when ``worst_first``)."""
        if metric not in self.metrics:
            raise KeyError(f"no metric {metric!r} in this run; metrics: {self.metrics}")
        self._order.value = worst_first
        self._sort.value = metric

    def _refresh(self) -> None:
        column = self._sort.value
        table = self.run.table
        ordered = (
            table.sort_values(column, ascending=bool(self._order.value), na_position="last")
            if column is not None
            else table
        )
        picked = self._list.value
        self._list.options = [
            (_row_label(row, column), row["key"]) for _, row in ordered.iterrows()
        ]
        self._list.value = picked if picked in self.keys else None

    def select(self, key: str) -> Explorer | None:
        """Open the explorer of item ``key`` below the list (``None`` if it has no trace)."""
        if key not in self.keys:
            raise KeyError(f"no item {key!r}; keys look like {self.keys[:1]}")
        self._list.value = key
        return self.explorer

    def _on_pick(self, change: Any) -> None:
        import ipywidgets as w

        key = change["new"]
        if key is None:
            return
        if self.explorer is not None:
            self.explorer.close()
            self.explorer = None
        record = self.run.record(key)
        if record.ok is None or "trace" not in record.ok.files:
            self._below.children = [
                w.HTML(safe_html("<b>{key}</b>: {text}", key=key, text=item_message(record)))
            ]
            return
        self.explorer = self.run.explorer(key)
        caption = w.HTML(safe_html("<b>{key}</b>: {prompt}", key=key, prompt=record.prompt))
        self._below.children = [caption, self.explorer.widget]

    # ------------------------------------------------------------------ curves
    def _make_figure(self) -> Any:
        import bqplot as bq

        self._x = bq.LinearScale()
        self._y = bq.LinearScale()
        self._x_axis = bq.Axis(scale=self._x, label="")
        self._y_axis = bq.Axis(scale=self._y, side="left", label="")
        return bq.Figure(
            marks=[],
            axes=[self._x_axis, self._y_axis],
            layout={"width": "100%", "height": "300px"},
            legend_location="top-right",
            fig_margin={"top": 30, "bottom": 45, "left": 60, "right": 20},
        )

    def _draw_curves(self) -> None:
        import bqplot as bq

        name = self._curve_choice.value
        if name is None:
            self.figure.marks = []
            self.figure.title = "no aggregate curves in this run"
            return
        curve = self._curves[name]
        marks = []
        for k, line in enumerate(curve["lines"]):
            colour = schema.CURVE_PALETTE[k % len(schema.CURVE_PALETTE)]
            mean, sd = line["mean"], line["sd"]
            marks.append(
                bq.Lines(
                    x=curve["x"],
                    y=[mean - sd, mean + sd],
                    fill="between",
                    fill_colors=[colour],
                    fill_opacities=[_BAND_OPACITY],
                    stroke_width=0,
                    colors=[colour],
                    scales={"x": self._x, "y": self._y},
                )
            )
            marks.append(
                bq.Lines(
                    x=curve["x"],
                    y=mean,
                    colors=[colour],
                    labels=[line["label"]],
                    display_legend=True,
                    scales={"x": self._x, "y": self._y},
                    line_style="dashed" if line["label"] == RANDOM_ORDER else "solid",
                )
            )
        self.figure.marks = marks
        self.figure.title = f"{name}: mean ± sd over items"
        self._x_axis.label = curve["xlabel"]
        self._y_axis.label = curve["ylabel"]

    def close(self) -> None:
        """Close the explorer and the widgets."""
        if self.explorer is not None:
            self.explorer.close()
        self.widget.close()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)
