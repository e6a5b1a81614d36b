"""The ``concepts`` metric of a run: does a word's concept map find the object it names?

Per item (one scene caption, one seed) the caption is traced with a
:class:`~diffwidget.tracing.concepts.ConceptTap` recording the concept maps
(:class:`~diffwidget.explain.concept_maps.ConceptMaps` with the run's ``concept_maps``
config) of the caption objects' colour and shape words and of control words for nothing in
the image (:func:`~diffwidget.runs.concept_study.concept_words`: one absent colour and one
absent shape, or the config's ``words``). On that trace each found object's colour and shape
word is scored against its mask read from the generated image (IoU over τ, AP;
:mod:`diffwidget.runs.segmentation`) for three map kinds on the same pairs: the concept map
over the architecture's default layers and steps, the plain attention map
(``AttentionMaps()``'s default) and DAAM's aggregation; and every layer's concept map alone
over the same steps (which block grounds best). The control is each word's share of the
image: a word for nothing in it should take little.

Across the run the items of one prompt (its seeds) make one unit, as for commitment.
:func:`summarise_concepts` gives, per map kind and per layer, the mIoU at τ 0.4, the best τ
of the mean IoU curve and AP, and the gaps concept − attention and concept − DAAM, with 95 %
percentile-bootstrap intervals over prompts (:func:`~diffwidget.explain.intervals.
bootstrap_curve`: every column is resampled with the same prompts, so the gaps are paired),
and the mean ratio of an absent word's share to a present word's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, TypedDict

import numpy as np

from diffwidget._markup import markdown_text
from diffwidget.explain.intervals import DEFAULT_RESAMPLES, bootstrap_curve
from diffwidget.explain.results import Meta
from diffwidget.records import Array, Record
from diffwidget.runs.concept_study import (
    BASELINES,
    ConceptCandidate,
    ConceptWords,
    concept_words,
    layers_heat,
    score_with_baselines,
    word_shares,
)
from diffwidget.runs.item_records import ConceptEntry
from diffwidget.runs.metric_names import METRIC_METHODS
from diffwidget.runs.prompts import PromptItem
from diffwidget.runs.segmentation import DAAM_TAU, TAU_GRID, PairScore

if TYPE_CHECKING:
    from diffwidget.explain.concept_maps import ConceptMaps
    from diffwidget.runs.settings import RunSettings
    from diffwidget.runs.store import RunItem
    from diffwidget.tracing.concepts import ConceptTap
    from diffwidget.tracing.trace import Trace

#: The method of the ``concepts`` metric (its config sits in the run settings).
CONCEPT_METHOD = METRIC_METHODS["concepts"]
#: Where the summary is written, inside the run's ``summary/``.
SUMMARY_FILE = "concepts.npz"
#: The concept map over the architecture's default layers and steps.
CONCEPT = "concept"
#: Map kinds scored on every pair: the concept map and the plain attention baselines.
MAP_KINDS: tuple[str, ...] = (CONCEPT, *BASELINES)
#: Why an item is not scored.
NOT_SCENE = (
    "not a scene-world caption: the concepts metric scores each object's colour and shape "
    "word against the object read from the image; give scene captions (scene:N, or e.g. "
    "'a red circle on the left')"
)
SCENE_OFF = (
    "scene metrics are off for this model (it does not draw the scene world the reader "
    "reads); run the embedded unet or dit for the concepts metric"
)
#: What the intervals are, stated in every summary.
BAND = "95 % percentile bootstrap over prompts (seeds together; gaps paired)"
_INDEX_TAU = int(np.argmin(np.abs(TAU_GRID - DAAM_TAU)))
Vector = Annotated[np.ndarray, Array(ndim=1, kinds="f")]
_ROW_FIELDS = ("miou_tau", "miou_tau_low", "miou_tau_high", "ap", "ap_low", "ap_high")
_GAP_FIELDS = tuple(f"gap_{name}" for name in _ROW_FIELDS)
Curves = Annotated[np.ndarray, Array(ndim=2, kinds="f")]


class _RowStats(TypedDict):
    """The per-row and per-gap arrays of :class:`ConceptSummary`."""

    taus: np.ndarray
    iou: np.ndarray
    miou_tau: np.ndarray
    miou_tau_low: np.ndarray
    miou_tau_high: np.ndarray
    best_tau: np.ndarray
    miou_best: np.ndarray
    ap: np.ndarray
    ap_low: np.ndarray
    ap_high: np.ndarray
    gap_miou_tau: np.ndarray
    gap_miou_tau_low: np.ndarray
    gap_miou_tau_high: np.ndarray
    gap_ap: np.ndarray
    gap_ap_low: np.ndarray
    gap_ap_high: np.ndarray


class _ShareStats(TypedDict):
    """The absent-word control of :class:`ConceptSummary`."""

    share_present: float | None
    share_absent: float | None
    absent_over_present: float | None
    absent_over_present_low: float | None
    absent_over_present_high: float | None


@dataclass(frozen=True)
class ConceptPlan:
    """The words of one item and the tap recording their maps during its trace."""

    words: ConceptWords
    method: ConceptMaps
    tap: ConceptTap


def plan_concepts(
    pipe: Any, item: PromptItem, settings: RunSettings, scene_metrics: bool
) -> ConceptPlan | str:
    """The concept tap of one item, or why the item is not scored (:data:`NOT_SCENE`).

    Examples
    --------
    >>> plan = plan_concepts(pipe, item, settings, True)  # doctest: +SKIP
    >>> plan.words.words  # doctest: +SKIP
    ['red', 'circle', 'green', 'square']
    """
    from diffwidget.explain.concept_maps import ConceptMaps, ConceptMapsConfig

    if not scene_metrics:
        return SCENE_OFF
    if not item.objects:
        return NOT_SCENE
    config = settings.config(CONCEPT_METHOD)
    if not isinstance(config, ConceptMapsConfig):  # pragma: no cover - registry guard
        raise TypeError(f"{CONCEPT_METHOD} is configured by a {type(config).__name__}")
    words = concept_words(item.objects, config.words)
    method = ConceptMaps(config.replace(words=tuple(words.words)), progress_bar=False)
    return ConceptPlan(words, method, method.tap(pipe))


def item_concepts(
    trace: Trace, item: PromptItem, plan: ConceptPlan, reader: Any = None
) -> tuple[ConceptEntry, dict[str, float], dict[str, np.ndarray]]:
    """Score the maps the plan's tap recorded during ``trace``.

    Returns
    -------
    ConceptEntry, dict of str to float, dict of str to ndarray
        The entry; ``concepts.<kind>.iou@0.4``, ``concepts.<kind>.ap``,
        ``concepts.share_present``, ``concepts.share_absent`` and
        ``concepts.absent_over_present``; and the concept map ``concepts/map``
        ``(n_words, h, w)`` on the latent grid (default layers and steps).

    Examples
    --------
    >>> entry, metrics, arrays = item_concepts(trace, item, plan)  # doctest: +SKIP
    >>> entry.maps["concept"][0].word  # doctest: +SKIP
    'red'
    """
    from diffwidget.explain.concept_results import result_from_scores

    if trace.image is None:
        raise ValueError("the trace holds no final image; trace it again (diffwidget.trace)")
    result = result_from_scores(plan.tap.result(), trace, plan.method.config.space)
    size = (int(trace.image.shape[0]), int(trace.image.shape[1]))
    steps = result.window_steps()
    heat = {CONCEPT: layers_heat(result, result.default_layers(), steps, size)}
    heat.update({layer: layers_heat(result, [layer], steps, size) for layer in result.layers})
    scores = score_with_baselines(trace, item.objects, plan.words.words, heat, reader)
    shares = word_shares(result, ConceptCandidate(result.depth, result.window))
    entry = ConceptEntry(
        present=list(plan.words.present),
        absent=list(plan.words.absent),
        layers=list(result.layers),
        default_layers=result.default_layers(),
        steps=list(steps),
        found=list(scores.found),
        maps={kind: scores.pairs[kind] for kind in MAP_KINDS},
        per_layer={layer: scores.pairs[layer] for layer in result.layers},
        shares=[float(v) for v in shares],
    )
    return entry, entry_metrics(entry), {"concepts/map": result.heat_map().astype(np.float32)}


def entry_metrics(entry: ConceptEntry) -> dict[str, float]:
    """The item's metric columns of one entry (:func:`item_concepts`)."""
    metrics: dict[str, float] = {}
    for kind in MAP_KINDS:
        pairs = entry.maps[kind]
        if pairs:
            metrics[f"concepts.{kind}.iou@{DAAM_TAU}"] = float(
                np.mean([p.iou[_INDEX_TAU] for p in pairs])
            )
            metrics[f"concepts.{kind}.ap"] = float(np.mean([p.ap for p in pairs]))
    present, absent = entry.mass()
    metrics["concepts.share_present"] = present
    if absent is not None:
        metrics["concepts.share_absent"] = absent
        metrics["concepts.absent_over_present"] = absent / present
    return metrics


# ---------------------------------------------------------------------------- the summary
@dataclass(frozen=True, eq=False)
class ConceptSummary(Record):
    """The ``concepts`` metric over a run.

    Attributes
    ----------
    rows : list of str
        The map kinds (:data:`MAP_KINDS`), then every layer (its concept map alone).
    taus : ndarray, shape (n_taus,)
        The thresholds of the IoU curves.
    iou : ndarray, shape (n_rows, n_taus)
        Mean IoU curve over prompts (each prompt: mean over its pairs).
    miou_tau, miou_tau_low, miou_tau_high : ndarray, shape (n_rows,)
        Mean IoU at τ = :attr:`tau` and its interval.
    best_tau, miou_best : ndarray, shape (n_rows,)
        The τ of the highest mean IoU, and that IoU.
    ap, ap_low, ap_high : ndarray, shape (n_rows,)
        Mean average precision and its interval.
    gaps : list of str
        ``"concept - attention"``, ``"concept - daam"``.
    gap_miou_tau, gap_miou_tau_low, gap_miou_tau_high, gap_ap, gap_ap_low, gap_ap_high
        Paired differences (same prompts resampled for both maps), shape (n_gaps,).
    share_present, share_absent : float, optional
        Mean share of the image of a present and of an absent word.
    absent_over_present, absent_over_present_low, absent_over_present_high : float, optional
        Mean over prompts of their ratio, and its interval (the control: low is good).
    n_prompts, n_items, n_pairs : int
        Prompts and items with scored pairs, and pairs per row.
    skipped : dict of str to int
        Why items were not scored -> how many.
    tau : float
        DAAM's threshold.
    meta : dict
        The band's description and resamples.
    """

    rows: list[str]
    taus: Vector
    iou: Curves
    miou_tau: Vector
    miou_tau_low: Vector
    miou_tau_high: Vector
    best_tau: Vector
    miou_best: Vector
    ap: Vector
    ap_low: Vector
    ap_high: Vector
    gaps: list[str]
    gap_miou_tau: Vector
    gap_miou_tau_low: Vector
    gap_miou_tau_high: Vector
    gap_ap: Vector
    gap_ap_low: Vector
    gap_ap_high: Vector
    share_present: float | None
    share_absent: float | None
    absent_over_present: float | None
    absent_over_present_low: float | None
    absent_over_present_high: float | None
    n_prompts: int
    n_items: int
    n_pairs: int
    skipped: dict[str, int] = field(default_factory=dict)
    tau: float = DAAM_TAU
    meta: Meta = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, g = len(self.rows), len(self.gaps)
        if self.iou.shape != (n, len(self.taus)):
            raise ValueError(f"iou has shape {self.iou.shape}, expected ({n}, {len(self.taus)})")
        for name in (*_ROW_FIELDS, "best_tau", "miou_best"):
            if getattr(self, name).shape != (n,):
                raise ValueError(f"{name} needs one value per row ({n})")
        for name in _GAP_FIELDS:
            if getattr(self, name).shape != (g,):
                raise ValueError(f"{name} needs one value per gap ({g})")

    def row(self, name: str) -> int:
        """The row of a map kind or layer."""
        if name not in self.rows:
            raise KeyError(f"no row {name!r}; summarised: {self.rows}")
        return self.rows.index(name)


def _units(
    records: Sequence[RunItem],
) -> tuple[dict[str, list[ConceptEntry]], dict[str, int]]:
    """Entries by prompt id (in run order), and skip reasons with their counts."""
    units: dict[str, list[ConceptEntry]] = {}
    skipped: dict[str, int] = {}
    for item in records:
        record = item.ok
        if record is None:
            continue
        if record.concepts is not None:
            units.setdefault(record.id, []).append(record.concepts)
        elif "concepts" in record.skipped:
            reason = record.skipped["concepts"]
            skipped[reason] = skipped.get(reason, 0) + 1
    return units, skipped


def _pairs(entry: ConceptEntry, row: str) -> list[PairScore]:
    return entry.maps[row] if row in entry.maps else entry.per_layer[row]


def _unit_scores(entries: list[ConceptEntry], rows: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """One prompt's mean IoU curve ``(n_rows, n_taus)`` and mean AP ``(n_rows,)``."""
    curves = [[p.iou for e in entries for p in _pairs(e, row)] for row in rows]
    aps = [[p.ap for e in entries for p in _pairs(e, row)] for row in rows]
    return np.array([np.mean(c, axis=0) for c in curves]), np.array([np.mean(a) for a in aps])


def summarise_concepts(
    records: Sequence[RunItem], *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> ConceptSummary | None:
    """The run's concept scores per map kind and layer, with intervals over prompts.

    ``None`` when no item computed or skipped the metric. Items whose objects were all
    unfound have no pairs and are left out of the scores (not of the shares); without any
    pair the summary has no rows.

    Raises
    ------
    ValueError
        When the items hold concept maps of different layers (different models).

    Examples
    --------
    >>> summary = summarise_concepts(store.items(manifest))  # doctest: +SKIP
    >>> summary.miou_tau[summary.row("concept")]  # doctest: +SKIP
    0.14
    """
    units, skipped = _units(records)
    if not units and not skipped:
        return None
    entries = [e for unit in units.values() for e in unit]
    if any(e.layers != entries[0].layers for e in entries):
        raise ValueError("the items hold concept maps of different layers; one run, one model")
    scored = [[e for e in unit if e.maps[CONCEPT]] for unit in units.values()]
    scored = [unit for unit in scored if unit]
    rows = [*MAP_KINDS, *entries[0].layers] if scored else []
    gaps = [f"{CONCEPT} - {base}" for base in BASELINES] if scored else []
    stats = _scores(scored, rows, resamples, seed)
    return ConceptSummary(
        rows=rows,
        gaps=gaps,
        **stats,
        **_shares(list(units.values()), resamples, seed),
        n_prompts=len(scored),
        n_items=sum(len(unit) for unit in scored),
        n_pairs=sum(len(e.maps[CONCEPT]) for unit in scored for e in unit),
        skipped=skipped,
        meta={"band": BAND, "resamples": resamples},
    )


def _scores(
    units: list[list[ConceptEntry]], rows: list[str], resamples: int, seed: int
) -> _RowStats:
    """The row and gap arrays of :class:`ConceptSummary` (empty without units)."""
    n_rows = len(rows)
    if not units:
        return _empty_rows()
    per_unit = [_unit_scores(unit, rows) for unit in units]
    curves = np.stack([c for c, _ in per_unit])  # (units, rows, taus)
    aps = np.stack([a for _, a in per_unit])  # (units, rows)
    at = curves[:, :, _INDEX_TAU]
    concept = [rows.index(CONCEPT)] * len(BASELINES)
    base = [rows.index(b) for b in BASELINES]
    # One resampling of prompts for every column: the gaps' intervals are paired.
    columns = np.concatenate(
        [at, aps, at[:, concept] - at[:, base], aps[:, concept] - aps[:, base]], axis=1
    )
    band = bootstrap_curve(columns, resamples=resamples, seed=seed)
    cuts = np.cumsum([n_rows, n_rows, len(BASELINES)])
    # Each of mean, low and high splits into: mIoU per row, AP per row, mIoU gaps, AP gaps.
    mean, low, high = (np.split(v, cuts) for v in (band.mean, band.low, band.high))
    iou = curves.mean(axis=0)
    best = iou.argmax(axis=1)
    return _RowStats(
        taus=TAU_GRID.copy(),
        iou=iou,
        miou_tau=mean[0],
        miou_tau_low=low[0],
        miou_tau_high=high[0],
        best_tau=TAU_GRID[best].astype(np.float64),
        miou_best=iou[np.arange(n_rows), best],
        ap=mean[1],
        ap_low=low[1],
        ap_high=high[1],
        gap_miou_tau=mean[2],
        gap_miou_tau_low=low[2],
        gap_miou_tau_high=high[2],
        gap_ap=mean[3],
        gap_ap_low=low[3],
        gap_ap_high=high[3],
    )


def _empty_rows() -> _RowStats:
    """The arrays of a summary without rows (no pair scored)."""
    e = np.zeros(0)
    return _RowStats(
        taus=TAU_GRID.copy(),
        iou=np.zeros((0, len(TAU_GRID))),
        miou_tau=e,
        miou_tau_low=e,
        miou_tau_high=e,
        best_tau=e,
        miou_best=e,
        ap=e,
        ap_low=e,
        ap_high=e,
        gap_miou_tau=e,
        gap_miou_tau_low=e,
        gap_miou_tau_high=e,
        gap_ap=e,
        gap_ap_low=e,
        gap_ap_high=e,
    )


def _shares(units: list[list[ConceptEntry]], resamples: int, seed: int) -> _ShareStats:
    """Mean shares of present and absent words, and the absent/present ratio's interval."""
    present, absent = [], []
    for entries in units:
        masses = [e.mass() for e in entries if e.absent]
        if masses:
            present.append(np.mean([p for p, _ in masses]))
            absent.append(np.mean([a for _, a in masses if a is not None]))
    if not present:
        return _ShareStats(
            share_present=None,
            share_absent=None,
            absent_over_present=None,
            absent_over_present_low=None,
            absent_over_present_high=None,
        )
    ratio = np.array(absent) / np.array(present)
    band = bootstrap_curve(ratio[:, None], resamples=resamples, seed=seed)
    return _ShareStats(
        share_present=float(np.mean(present)),
        share_absent=float(np.mean(absent)),
        absent_over_present=float(band.mean[0]),
        absent_over_present_low=float(band.low[0]),
        absent_over_present_high=float(band.high[0]),
    )


def summary_lines(summary: ConceptSummary) -> list[str]:
    """The ``summary.md`` section of the concepts metric."""

    def number(value: float | None) -> str:
        return "–" if value is None or not np.isfinite(value) else f"{value:.3f}"

    def interval(values: np.ndarray, low: np.ndarray, high: np.ndarray, k: int) -> str:
        return f"{number(values[k])} [{number(low[k])}, {number(high[k])}]"

    lines = [f"## Concept maps of the caption's words (τ = {summary.tau})", ""]
    if summary.rows:
        lines += [
            f"{summary.n_pairs} (object, word) pairs of {summary.n_items} items, "
            f"{summary.n_prompts} prompts; intervals: {markdown_text(summary.meta.get('band'))}.",
            "",
            "| map | mIoU τ 0.4 [95 % CI] | best τ (mIoU) | AP [95 % CI] |",
            "|---|---|---|---|",
        ]
        for k, row in enumerate(summary.rows):
            name = row if row in MAP_KINDS else f"layer {row}"
            lines.append(
                f"| {markdown_text(name)} "
                f"| {interval(summary.miou_tau, summary.miou_tau_low, summary.miou_tau_high, k)} "
                f"| {summary.best_tau[k]:.2f} ({number(summary.miou_best[k])}) "
                f"| {interval(summary.ap, summary.ap_low, summary.ap_high, k)} |"
            )
        lines += ["", "Paired gaps (same prompts resampled for both maps):", ""]
        for k, gap in enumerate(summary.gaps):
            miou = interval(
                summary.gap_miou_tau, summary.gap_miou_tau_low, summary.gap_miou_tau_high, k
            )
            ap = interval(summary.gap_ap, summary.gap_ap_low, summary.gap_ap_high, k)
            lines.append(f"- {markdown_text(gap)}: mIoU τ 0.4 {miou}, AP {ap}")
        lines += [
            "",
            "`concept` is the concept map over the architecture's default layers and steps, "
            "`attention` `AttentionMaps()`'s default, `daam` DAAM's aggregation; a layer row "
            "is that layer's concept map alone over the same steps.",
            "",
        ]
    else:
        lines += ["No object was found in any scored image: no pairs to score.", ""]
    if summary.absent_over_present is not None:
        lines += [
            f"Absent-word control: a present word takes {number(summary.share_present)} of the "
            f"image, an absent one {number(summary.share_absent)}; absent / present "
            f"{number(summary.absent_over_present)} [{number(summary.absent_over_present_low)}, "
            f"{number(summary.absent_over_present_high)}] (mean over prompts; low is good).",
            "",
        ]
    for reason, count in sorted(summary.skipped.items()):
        lines += [f"Skipped {count} item{'s' if count != 1 else ''}: {markdown_text(reason)}", ""]
    return lines
