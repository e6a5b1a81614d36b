"""Aggregate a run: one table row per item, statistics per metric, plots and summary.md.

* every numeric metric: mean ± sd over items and a percentile bootstrap interval of the mean
  (items resampled with replacement, seeded);
* faithfulness: :func:`diffwidget.explain.faithfulness.summarize` per map (per-prompt
  mean ± sd, share of prompts beating random, and the paper's mean-curve aggregation),
  always with the random-order baseline beside the map's AUC;
* segmentation: mIoU at DAAM's τ = 0.4, the best τ of the grid and its mIoU, mean average
  precision, over all (object, word) pairs of the set, with item-level bootstrap intervals;
* token roles: mean attention mass per role and step with a ± sd band;
* concept probes (when recorded): :class:`~diffwidget.explain.probes.ConceptProbe` curves
  fitted across the set's items;
* commitment (when computed): per attribute, the mean prompt-switch curve over prompts with
  bootstrap bands and the step it crosses 0.9 (:mod:`diffwidget.runs.commitment`);
* concepts (when computed): per map kind and layer, mIoU at τ 0.4, best τ and AP of the
  caption words' concept maps beside the attention maps, paired intervals over prompts, and
  the absent-word control (:mod:`diffwidget.runs.concept_metric`).

Writes ``summary/``: ``items.csv`` / ``items.parquet``, ``metrics.csv`` / ``.parquet``,
``faithfulness.csv``, ``segmentation.csv``, ``commitment.npz``, ``concepts.npz``, PNG plots
and ``summary.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from diffwidget.records import check_npz
from diffwidget.runs.item_records import CurveEntry
from diffwidget.runs.manifest import RunManifest
from diffwidget.runs.segmentation import (
    DAAM_TAU,
    TAU_GRID,
    PairScore,
    SegmentationScores,
    summarize_pairs,
)
from diffwidget.runs.store import RunItem, RunStore

if TYPE_CHECKING:
    import pandas as pd

#: Label of the random-order baseline's curves.
RANDOM_ORDER = "random order"
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
#: Columns of the item table before the metric columns.
ITEM_COLUMNS = ("key", "id", "seed", "offset", "prompt", "status", "error")
#: Minimum examples per class for a concept probe (its cross-validation folds).
PROBE_CV = 5


def load_records(store: RunStore) -> tuple[RunManifest, list[RunItem]]:
    """The manifest and every unit of work with its record (missing and corrupt included).

    Raises
    ------
    FileNotFoundError
        When the folder holds no run.
    ManifestError
        When ``run.json`` does not read as a manifest (the message names the field).
    """
    manifest = store.read_manifest()
    if manifest is None:
        raise FileNotFoundError(
            f"{store.root} holds no run (no run.json); start one with `diffwidget run`"
        )
    return manifest, store.items(manifest)


def item_table(records: Sequence[RunItem]) -> pd.DataFrame:
    """One row per item: ids, status, error message and every metric as a column."""
    import pandas as pd

    rows = []
    for item in records:
        error = item.error
        row: dict[str, object] = {
            "key": item.key,
            "id": item.id,
            "seed": item.seed,
            "offset": item.offset,
            "prompt": item.prompt,
            "status": item.status,
            "error": str(error) if error is not None else None,
        }
        row.update(item.record.metrics if item.record is not None else {})
        rows.append(row)
    table = pd.DataFrame(rows, columns=list(ITEM_COLUMNS)) if not rows else pd.DataFrame(rows)
    metric_cols = sorted(c for c in table.columns if c not in ITEM_COLUMNS)
    return table[[*ITEM_COLUMNS, *metric_cols]]


def bootstrap_ci(
    values: np.ndarray,
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over the rows of ``values``.

    Examples
    --------
    >>> low, high = bootstrap_ci(np.arange(100.0))
    >>> bool(low < 49.5 < high)
    True
    """
    values = np.asarray(values)
    if len(values) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(values), size=(samples, len(values)))
    stats = np.array([statistic(values[p]) for p in picks])
    tail = (1 - confidence) / 2
    return float(np.quantile(stats, tail)), float(np.quantile(stats, 1 - tail))


def metric_table(table: pd.DataFrame) -> pd.DataFrame:
    """Per metric: items with a value, mean, sd and the bootstrap interval of the mean."""
    import pandas as pd

    rows = []
    for name in table.columns:
        if name in ITEM_COLUMNS:
            continue
        values = pd.to_numeric(table[name], errors="coerce").dropna().to_numpy(np.float64)
        low, high = bootstrap_ci(values)
        rows.append(
            {
                "metric": name,
                "n": len(values),
                "mean": float(values.mean()) if len(values) else float("nan"),
                "sd": float(values.std(ddof=1)) if len(values) > 1 else float("nan"),
                "ci_low": low,
                "ci_high": high,
            }
        )
    return pd.DataFrame(rows, columns=["metric", "n", "mean", "sd", "ci_low", "ci_high"])


def _faithfulness_result(entry: CurveEntry, trapezoid: Callable[..., float]) -> Any:
    from diffwidget.explain.results import FaithfulnessCurves, FaithfulnessResult

    frac = np.asarray(entry.fractions, dtype=np.float32)

    def curves(deletion: list[float], insertion: list[float]) -> FaithfulnessCurves:
        d, i = np.asarray(deletion, np.float32), np.asarray(insertion, np.float32)
        return FaithfulnessCurves(frac, d, i, trapezoid(frac, d), trapezoid(frac, i))

    return FaithfulnessResult(
        step=entry.step,
        saliency=curves(entry.deletion, entry.insertion),
        random=curves(entry.random_deletion, entry.random_insertion),
        meta=dict(entry.meta),
    )


def faithfulness_table(records: Sequence[RunItem]) -> pd.DataFrame:
    """Per map (``method@step``): :func:`~diffwidget.explain.faithfulness.summarize` of the
    items, the map's AUC beside the random baseline's, per-prompt and paper-style."""
    import pandas as pd

    from diffwidget.explain.faithfulness import summarize, trapezoid_auc

    by_map: dict[str, list[Any]] = {}
    for item in records:
        if item.ok is not None:
            for name, entry in item.ok.curves.items():
                by_map.setdefault(name, []).append(_faithfulness_result(entry, trapezoid_auc))
    rows = []
    for name, results in by_map.items():
        summary = summarize(results)
        per, paper = summary["per_prompt"], summary["paper"]
        gains = np.array([r.deletion_gain for r in results])
        low, high = bootstrap_ci(gains)
        rows.append(
            {
                "map": name,
                "n": len(results),
                **{f"{k}": v for k, v in per.items() if k != "n_prompts"},
                **{f"paper_{k}": v for k, v in paper.items()},
                "deletion_gain_ci_low": low,
                "deletion_gain_ci_high": high,
            }
        )
    return pd.DataFrame(rows)


def _segmentations(records: Sequence[RunItem]) -> list[SegmentationScores]:
    return [r.ok.segmentation for r in records if r.ok is not None and r.ok.segmentation]


#: Pooled segmentation scores given a bootstrap interval, in the columns of the item sums.
_SEGMENTATION_INTERVALS = ("miou_tau", "map")


def segmentation_summary(per_item: Sequence[Sequence[PairScore]]) -> dict[str, float]:
    """:func:`summarize_pairs` over all pairs, with item-level bootstrap intervals.

    The keys are the same whatever the items hold (intervals NaN without pairs), so a
    run whose every object went unfound still makes a table with every column.

    Examples
    --------
    >>> sorted(segmentation_summary([[]]))[:3]
    ['best_tau', 'map', 'map_ci_high']
    """
    flat = [p for pairs in per_item for p in pairs]
    summary = summarize_pairs(flat)
    for label in _SEGMENTATION_INTERVALS:
        summary[f"{label}_ci_low"] = summary[f"{label}_ci_high"] = float("nan")
    summary["n_items"] = float(len(per_item))
    if not flat:
        return summary
    at = int(np.argmin(np.abs(TAU_GRID - DAAM_TAU)))
    # Each row: per-item sums of IoU at tau, of AP, and the pair count.
    sums = np.array(
        [
            [sum(p.iou[at] for p in pairs), sum(p.ap for p in pairs), len(pairs)]
            for pairs in per_item
        ],
        dtype=np.float64,
    )
    for column, label in enumerate(_SEGMENTATION_INTERVALS):

        def pooled(rows: np.ndarray, c: int = column) -> float:
            return float(rows[:, c].sum() / max(rows[:, 2].sum(), 1))

        low, high = bootstrap_ci(sums, pooled)
        summary[f"{label}_ci_low"], summary[f"{label}_ci_high"] = low, high
    return summary


def segmentation_table(records: Sequence[RunItem]) -> pd.DataFrame:
    """One row per aggregation (ours, DAAM's): mIoU at τ 0.4, best τ, mAP, intervals."""
    import pandas as pd

    scores = _segmentations(records)
    names = sorted({n for s in scores for n in s.pairs})
    found = [f for s in scores for f in s.found]
    rows = []
    for name in names:
        per_item = [s.pairs.get(name, []) for s in scores]
        row = {"aggregation": name, **segmentation_summary(per_item)}
        row["objects_found"] = float(np.mean(found)) if found else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def mean_sd(rows: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample standard deviation over rows (sd 0 for a single row)."""
    values = np.asarray(rows, dtype=np.float64)
    sd = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1:])
    return values.mean(axis=0), sd


#: Name of the token-role curves and of the segmentation curve in :func:`aggregate_curves`.
ROLES_CURVE = "token roles"
SEGMENTATION_CURVE = "segmentation mIoU by threshold"


def aggregate_curves(records: Sequence[RunItem]) -> dict[str, dict[str, Any]]:
    """The set's mean curves with ± sd bands, for the plots, summary.md and the browser.

    Returns
    -------
    dict
        Name -> ``{"x", "xlabel", "ylabel", "lines"}``, each line ``{"label", "mean", "sd",
        "n"}`` over the finished items: ``"<map> deletion"`` / ``"<map> insertion"`` with
        the random order's curve beside the map's, ``"segmentation mIoU by threshold"``
        (one line per aggregation, over (object, word) pairs) and ``"token roles"``
        (attention mass per role and step).
    """
    ok = [r.ok for r in records if r.ok is not None]
    curves: dict[str, dict[str, Any]] = {}

    def line(label: str, rows: list[Any]) -> dict[str, Any]:
        mean, sd = mean_sd(rows)
        return {"label": label, "mean": mean, "sd": sd, "n": len(rows)}

    for name in sorted({n for r in ok for n in r.curves}):
        entries = [r.curves[name] for r in ok if name in r.curves]
        for kind in ("deletion", "insertion"):
            curves[f"{name} {kind}"] = {
                "x": np.asarray(entries[0].fractions),
                "xlabel": "fraction of latent cells",
                "ylabel": "similarity to unmodified",
                "lines": [
                    line(name, [getattr(e, kind) for e in entries]),
                    line(RANDOM_ORDER, [getattr(e, f"random_{kind}") for e in entries]),
                ],
            }
    seg = _segmentations(records)
    names = sorted({n for s in seg for n in s.pairs})
    pairs = {n: [p.iou for s in seg for p in s.pairs.get(n, [])] for n in names}
    if any(pairs.values()):
        curves[SEGMENTATION_CURVE] = {
            "x": TAU_GRID,
            "xlabel": f"threshold τ (DAAM: {DAAM_TAU})",
            "ylabel": "IoU of (object, word) pairs",
            "lines": [line(n, rows) for n, rows in pairs.items() if rows],
        }
    roles: dict[str, list[list[float]]] = {}
    for record in ok:
        for role, curve in (record.roles or {}).items():
            roles.setdefault(role, []).append(curve)
    if roles:
        role_lines = [line(role, rows) for role, rows in roles.items()]
        curves[ROLES_CURVE] = {
            "x": np.arange(len(role_lines[0]["mean"])),
            "xlabel": "step",
            "ylabel": "attention mass of the role's tokens",
            "lines": role_lines,
        }
    return curves


def concept_curves(store: RunStore, records: Sequence[RunItem]) -> Any:
    """Concept-probe curves fitted across the items that recorded probe features.

    Returns ``None`` when no item recorded features or no concept has two classes with
    enough examples (at least ``PROBE_CV`` each).
    """
    from diffwidget.explain.probes import ConceptProbe

    features: list[np.ndarray] = []
    labels: list[dict[str, str]] = []
    for item in records:
        if item.ok is None:
            continue
        path = store.arrays_path(item.key)
        check_npz(path)
        with np.load(path, allow_pickle=False) as data:
            keys = sorted(k for k in data.files if k.startswith("probe/uncond/"))
            if not keys:
                continue
            features.append(np.concatenate([data[k] for k in keys], axis=-1))
        labels.append(item.work.item.labels)
    if not features:
        return None
    concepts = sorted({c for lab in labels for c in lab})
    usable: dict[str, list[str | None]] = {}
    for concept in concepts:
        values = [lab.get(concept) for lab in labels]
        counts = {v: values.count(v) for v in set(values) if v is not None}
        kept = [v if v is not None and counts[v] >= PROBE_CV else None for v in values]
        if len({v for v in kept if v is not None}) >= 2:
            usable[concept] = kept
    if not usable:
        return None
    return ConceptProbe(cv=PROBE_CV).fit(np.stack(features), usable, half="uncond")
