"""Choose the attention aggregation on evidence: candidates scored on a run's stored traces.

The defaults of :class:`~diffwidget.explain.attention.AttentionMaps` (layers by resolution,
step window, normalisation) are chosen by segmentation quality on a *training* split of
scene-world prompts and confirmed on a separate held-out split, with DAAM's aggregation
(sum over layers, heads and steps) scored on the same maps as the baseline. Both splits are
ordinary runs (``diffwidget run scene-train:N`` and ``diffwidget run scene:N``); this module
only reads their traces, so it needs no torch.

Examples
--------
>>> study = compare_aggregations("train-run", candidate_grid())  # doctest: +SKIP
>>> study.sort_values("miou_tau", ascending=False).head()  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from diffwidget.explain.attention import NORMALIZATIONS, AttentionMaps
from diffwidget.runs.aggregation import bootstrap_ci, load_records, segmentation_summary
from diffwidget.runs.prompts import PromptItem
from diffwidget.runs.segmentation import (
    PairScore,
    daam_heat_maps,
    ours_heat_maps,
    score_item,
    summarize_pairs,
)
from diffwidget.runs.store import RunStore

if TYPE_CHECKING:
    import pandas as pd

    from diffwidget.tracing.trace import Trace

#: Step windows tried, as (start, end) fractions of the run.
WINDOWS: tuple[tuple[float, float], ...] = (
    (0.0, 1.0),
    (0.0, 0.25),
    (0.0, 0.5),
    (0.25, 0.75),
    (0.5, 1.0),
    (0.75, 1.0),
    (0.9, 1.0),
    (0.95, 1.0),
)
#: Layer sets tried, by the height of the layers' own grid (``None``: every layer).
RESOLUTIONS: tuple[int | None, ...] = (None, 16, 8, 4)
DAAM = "daam"
#: Resamples of the paired bootstrap (each recomputes two pooled scores).
PAIRED_BOOTSTRAP_SAMPLES = 1000


@dataclass(frozen=True)
class Candidate:
    """One aggregation: AttentionMaps settings.

    Examples
    --------
    >>> Candidate(16, (0.5, 1.0), "none").name
    'res16 steps0.5-1 none'
    """

    resolution: int | None
    window: tuple[float, float]
    normalize: str

    @property
    def name(self) -> str:
        """Short label used in tables."""
        res = "all" if self.resolution is None else f"res{self.resolution}"
        return f"{res} steps{self.window[0]:g}-{self.window[1]:g} {self.normalize}"

    def maps(self) -> AttentionMaps:
        """The AttentionMaps object with these settings."""
        return AttentionMaps(
            resolution=self.resolution,
            window=self.window,
            normalize=self.normalize,  # type: ignore[arg-type]
        )


def candidate_grid(
    resolutions: Sequence[int | None] = RESOLUTIONS,
    windows: Sequence[tuple[float, float]] = WINDOWS,
    normalizations: Sequence[str] = NORMALIZATIONS,
) -> list[Candidate]:
    """Every combination of layer set, step window and normalisation."""
    return [Candidate(r, w, n) for r in resolutions for w in windows for n in normalizations]


def _item_traces(run_dir: str | Path) -> list[tuple[PromptItem, Trace]]:
    from diffwidget.tracing.trace import Trace

    store = RunStore(run_dir)
    _manifest, records = load_records(store)
    loaded = []
    for record in records:
        if record.ok is not None and "trace" in record.ok.files:
            item = record.work.item
            if item.objects:
                loaded.append((item, Trace.load(store.trace_path(record.key))))
    if not loaded:
        raise ValueError(
            f"{run_dir} holds no finished scene-world items with traces; run scene prompts "
            "with traces kept (diffwidget run scene-train:N --out DIR)"
        )
    return loaded


def score_candidates(
    run_dir: str | Path, candidates: Sequence[Candidate], *, include_daam: bool = True
) -> dict[str, list[list[PairScore]]]:
    """Per aggregation, the scored (object, word) pairs of every scene item of a run.

    Returns
    -------
    dict
        Aggregation name (:attr:`Candidate.name` or ``"daam"``) -> one list of pair records
        (:class:`~diffwidget.runs.segmentation.PairScore`) per item, items in run order.
    """
    from diffwidget.models.reader import SceneReader

    reader = SceneReader()
    per_item: dict[str, list[list[PairScore]]] = {}
    for item, trace in _item_traces(run_dir):
        assert trace.image is not None
        size = (int(trace.image.shape[0]), int(trace.image.shape[1]))
        heat = {c.name: ours_heat_maps(trace, size, c.maps()) for c in candidates}
        if include_daam:
            heat[DAAM] = daam_heat_maps(trace, size)
        scores = score_item(trace, item.objects, heat, reader)
        for name, pairs in scores.pairs.items():
            per_item.setdefault(name, []).append(pairs)
    return per_item


def summary_table(
    per_item: dict[str, list[list[PairScore]]], candidates: Sequence[Candidate]
) -> pd.DataFrame:
    """One row per aggregation: settings, mIoU at τ = 0.4, best τ, mAP and intervals."""
    import pandas as pd

    settings = {c.name: c for c in candidates}
    rows = []
    for name, pairs in per_item.items():
        candidate = settings.get(name)
        rows.append(
            {
                "name": name,
                "resolution": None if candidate is None else candidate.resolution,
                "window": None if candidate is None else f"{candidate.window}",
                "normalize": None if candidate is None else candidate.normalize,
                **segmentation_summary(pairs),
            }
        )
    return pd.DataFrame(rows)


def compare_aggregations(
    run_dir: str | Path, candidates: Sequence[Candidate], *, include_daam: bool = True
) -> pd.DataFrame:
    """Segmentation scores of every candidate (and DAAM's) on one run's traces.

    Returns
    -------
    DataFrame
        One row per aggregation: ``name``, settings, ``miou_tau`` (τ = 0.4), ``best_tau``,
        ``miou_best``, ``map``, intervals and counts.
    """
    per_item = score_candidates(run_dir, candidates, include_daam=include_daam)
    return summary_table(per_item, candidates)


def paired_gap(
    ours: Sequence[Sequence[PairScore]],
    baseline: Sequence[Sequence[PairScore]],
    key: str = "miou_tau",
) -> dict[str, float]:
    """Difference ``ours - baseline`` of a pooled segmentation score on the same items,
    with a bootstrap interval that resamples items (both aggregations together).

    Examples
    --------
    >>> pair = PairScore(0, "colour", "red", [0.5] * 21, 0.5)
    >>> paired_gap([[pair]], [[PairScore(0, "colour", "red", [0.2] * 21, 0.5)]])["gap"]
    0.3
    """
    if len(ours) != len(baseline):
        raise ValueError("compare the two aggregations on the same items")
    index = np.arange(len(ours))

    # The point values only (no nested intervals): each resample pools the pairs once.
    def gap(rows: np.ndarray) -> float:
        a = summarize_pairs([p for i in rows for p in ours[i]])[key]
        b = summarize_pairs([p for i in rows for p in baseline[i]])[key]
        return float(a - b)

    low, high = bootstrap_ci(index, gap, samples=PAIRED_BOOTSTRAP_SAMPLES)
    return {"gap": round(gap(index), 12), "ci_low": low, "ci_high": high}


def choose(train: pd.DataFrame, metric: str = "miou_tau") -> str:
    """Name of the best non-DAAM candidate on the training split by ``metric``."""
    ours = train[train["name"] != DAAM]
    return str(ours.sort_values([metric, "map"], ascending=False).iloc[0]["name"])
