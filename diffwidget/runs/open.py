"""A run folder opened for analysis: the item table, each item's trace and stored maps.

Works without torch: the table comes from the result files, an item's trace and saliency
maps from the files stored beside them. The widget layer adds explorers and the run browser
(``diffwidget.open_run``).
"""

from __future__ import annotations

from collections import Counter
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from diffwidget.records import RecordError, check_npz
from diffwidget.runs.aggregation import item_table, load_records
from diffwidget.runs.store import RunItem, RunStore

if TYPE_CHECKING:
    import pandas as pd

    from diffwidget.explain.results import SaliencyMap
    from diffwidget.tracing.trace import Trace


class RunResult:
    """A run folder opened for analysis.

    Every file is read through its schema: a ``run.json`` of the wrong shape is an error
    naming the file and the field; an item record of the wrong shape, or naming a companion
    file outside its place in the run folder, is listed as ``"corrupt"``.

    Attributes
    ----------
    path : Path
        The run folder.
    manifest : RunManifest
        Settings and items of the run.
    records : list of RunItem
        One per (prompt id, seed), with ``status`` ``"ok"``, ``"failed"``, ``"missing"``,
        ``"corrupt"`` or ``"stale"`` (made by other settings) and the record when it reads.

    Examples
    --------
    >>> run = load_run("my-run")  # doctest: +SKIP
    >>> run.table.sort_values("seg.ours.iou@0.4").head()  # doctest: +SKIP
    >>> run.trace("scene00003").prompt  # doctest: +SKIP
    """

    def __init__(self, path: str | Path) -> None:
        self.store = RunStore(path)
        self.path = self.store.root
        self.manifest, self.records = load_records(self.store)

    def __repr__(self) -> str:
        counts = Counter(record.status for record in self.records)
        text = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        return f"{type(self).__name__}({str(self.path)!r}: {len(self.records)} items, {text})"

    @cached_property
    def table(self) -> pd.DataFrame:
        """One row per item, one column per metric (plus key, id, seed, prompt, status)."""
        return item_table(self.records)

    @property
    def summary_path(self) -> Path:
        """``summary/summary.md`` (written when the run was aggregated)."""
        return self.store.summary_dir / "summary.md"

    def record(self, item: str, seed: int | None = None) -> RunItem:
        """An item, by key, or by id (and seed when it has several).

        Raises
        ------
        KeyError
            For an unknown item, or an id with several seeds and no seed given.
        """
        matches = [r for r in self.records if r.key == item]
        if not matches:
            matches = [r for r in self.records if r.id == item and (seed is None or r.seed == seed)]
        if not matches:
            example = f"; ids look like {self.records[0].id!r}" if self.records else ""
            raise KeyError(f"no item {item!r} in {self.path}{example}")
        if len(matches) > 1:
            seeds = [r.seed for r in matches]
            raise KeyError(f"item {item!r} ran with seeds {seeds}; pass seed= or the item key")
        return matches[0]

    def trace(self, item: str, seed: int | None = None) -> Trace:
        """The saved Trace of an item."""
        from diffwidget.tracing.trace import Trace

        found = self.record(item, seed)
        if found.ok is None:
            raise ValueError(f"item {found.key} is {found.status}; it has no trace")
        if "trace" not in found.ok.files:
            raise FileNotFoundError(
                f"the run kept no traces (save_traces=False); rerun item {found.key} with "
                "traces to open its explorer"
            )
        return Trace.load(self.store.trace_path(found.key))

    def saliency_maps(self, item: str, seed: int | None = None) -> list[SaliencyMap]:
        """The DF-RISE / DF-CAM / attention maps the run stored for an item.

        Raises
        ------
        RecordError
            When the item's arrays file lacks a map its record names.
        """
        from diffwidget.explain.results import SaliencyMap

        found = self.record(item, seed)
        if found.ok is None:
            return []
        path = self.store.arrays_path(found.key)
        check_npz(path)
        maps = []
        with np.load(path, allow_pickle=False) as arrays:

            def array(name: str) -> np.ndarray:
                if name not in arrays.files:
                    raise RecordError(path, f"lacks the array {name!r} its record names")
                return np.asarray(arrays[name])

            for entry in found.ok.maps:
                name = f"{entry.method}@{entry.step}"
                maps.append(
                    SaliencyMap(
                        method=entry.method,
                        step=entry.step,
                        timestep=entry.timestep,
                        map=array(f"{name}/map"),
                        raw=array(f"{name}/raw"),
                        layers={
                            layer: array(f"{name}/layer{k}") for k, layer in enumerate(entry.layers)
                        },
                        meta=dict(entry.meta),
                    )
                )
        return maps


def load_run(path: str | Path) -> RunResult:
    """Read a run folder written by ``diffwidget run`` (no torch, no widgets).

    ``diffwidget.open_run`` gives the same object with explorers and the run browser.

    Examples
    --------
    >>> run = load_run("my-run")  # doctest: +SKIP
    >>> run.table.sort_values("seg.ours.iou@0.4").head()  # doctest: +SKIP
    """
    return RunResult(path)
