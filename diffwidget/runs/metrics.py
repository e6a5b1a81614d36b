"""What a run computes for one item: the trace, the maps, and the per-item metrics.

For one (prompt, seed): trace the generation; compute the chosen maps (cross-attention,
DF-RISE, DF-CAM) at the chosen steps; score each map's faithfulness with insertion and
deletion curves beside random orders; on scene-world captions segment each object's
colour and shape word by attention and score it against the object read from the generated
image (our aggregation and DAAM's); sum the attention each token role draws per step; and
optionally record pooled UNet activations for the concept probes fitted across the set,
switch each scene caption to its swapped twins at every step (the ``commitment`` metric,
:mod:`diffwidget.runs.commitment`), and map each scene caption's words with concept maps
recorded during the trace (the ``concepts`` metric, :mod:`diffwidget.runs.concept_metric`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from diffwidget.explain.attention import AttentionMaps, AttentionResult
from diffwidget.explain.protocol import SaliencyMethodName
from diffwidget.explain.results import FaithfulnessResult, SaliencyMap, minmax
from diffwidget.runs.item_records import (
    ConceptEntry,
    CurveEntry,
    ItemResult,
    MapEntry,
    SwitchEntry,
    json_safe,
)
from diffwidget.runs.metric_names import Metric
from diffwidget.runs.prompts import PromptItem
from diffwidget.runs.segmentation import (
    DAAM_TAU,
    TAU_GRID,
    SegmentationScores,
    daam_heat_maps,
    ours_heat_maps,
    score_item,
    word_token_positions,
)
from diffwidget.tracing.activation_record import Half
from diffwidget.tracing.trace import Trace

if TYPE_CHECKING:
    from diffwidget.runs.concept_metric import ConceptPlan
    from diffwidget.runs.settings import RunSettings

#: Maps a run can compute: the trace's cross-attention and every registered saliency method.
MapMethod = Literal["attention", SaliencyMethodName]
MAP_METHODS: tuple[str, ...] = get_args(MapMethod)
#: The paper's maps; other registered methods join a run when named.
DEFAULT_METHODS: tuple[MapMethod, ...] = ("attention", "df_rise", "df_cam")
DEFAULT_METRICS: tuple[Metric, ...] = ("faithfulness", "segmentation", "roles")
#: Segmentation aggregations scored on every scene item: ours (AttentionMaps' defaults)
#: and DAAM's baseline on the same stored maps.
SEGMENTATION_AGGREGATIONS: tuple[str, ...] = ("ours", "daam")
#: The explained step when none is chosen: the paper visualises step 15 of 20.
PAPER_STEP_FRACTION = 0.75
#: CFG halves whose pooled activations are kept for the probes; the unconditional half
#: never sees the prompt, so what it carries came through the latent.
PROBE_HALVES: tuple[Half, ...] = ("cond", "uncond")
#: Saliency meta entries that vary between runs of the same work (kept under "timing").
_TIMING_META = ("seconds", "first_batch_seconds", "device")


def default_steps(n_inference_steps: int) -> list[int]:
    """The paper's explained step scaled to the run: step 15 of 20.

    Examples
    --------
    >>> default_steps(20), default_steps(4)
    ([15], [3])
    """
    return [min(n_inference_steps - 1, round(PAPER_STEP_FRACTION * n_inference_steps))]


def attention_saliency(result: AttentionResult, trace: Trace, step: int) -> SaliencyMap:
    """The attention map whose faithfulness is scored: the cross-attention probability that
    all prompt words together receive at each latent cell, at loop index ``step``."""
    row = result.steps.index(step)
    raw = result.maps[row][trace.word_indices].sum(axis=0).astype(np.float32)
    return SaliencyMap(
        method="attention",
        step=step,
        timestep=int(trace.timesteps[step]),
        map=minmax(raw),
        raw=raw,
        meta={"aggregation": result.description, "tokens": "sum over the prompt's words"},
    )


@dataclass
class ItemOutput:
    """What one item produced: its result record, its trace and its arrays."""

    record: ItemResult
    trace: Trace | None
    arrays: dict[str, np.ndarray]


def _faithfulness_entry(result: FaithfulnessResult) -> CurveEntry:
    return CurveEntry(
        step=result.step,
        fractions=result.saliency.fractions.tolist(),
        deletion=result.saliency.deletion.tolist(),
        insertion=result.saliency.insertion.tolist(),
        random_deletion=result.random.deletion.tolist(),
        random_insertion=result.random.insertion.tolist(),
        meta=json_safe(result.meta),
    )


def _faithfulness_metrics(name: str, result: FaithfulnessResult) -> dict[str, float]:
    return {
        f"{name}.deletion_auc": result.saliency.deletion_auc,
        f"{name}.deletion_auc_random": result.random.deletion_auc,
        f"{name}.deletion_gain": result.deletion_gain,
        f"{name}.insertion_auc": result.saliency.insertion_auc,
        f"{name}.insertion_auc_random": result.random.insertion_auc,
        f"{name}.insertion_gain": result.insertion_gain,
    }


def _role_curves(
    result: AttentionResult, trace: Trace, item: PromptItem
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Attention mass each role's tokens draw per step, and its mean share of the words'."""
    positions = word_token_positions(trace, len(item.prompt.split()))
    word_mass = result.mass[:, trace.word_indices].sum(axis=1)
    curves: dict[str, list[float]] = {}
    metrics: dict[str, float] = {}
    for role, words in item.roles.items():
        tokens = [positions[w] for w in words]
        curve = result.mass[:, tokens].sum(axis=1)
        curves[role] = curve.tolist()
        share = np.where(word_mass > 0, curve / np.where(word_mass > 0, word_mass, 1), 0.0)
        metrics[f"roles.{role}.share"] = float(share.mean())
    return curves, metrics


def _segmentation(trace: Trace, item: PromptItem) -> tuple[SegmentationScores, dict[str, float]]:
    assert trace.image is not None
    size = (int(trace.image.shape[0]), int(trace.image.shape[1]))
    heat = {"ours": ours_heat_maps(trace, size), "daam": daam_heat_maps(trace, size)}
    scores = score_item(trace, item.objects, heat)
    at = int(np.argmin(np.abs(TAU_GRID - DAAM_TAU)))
    metrics: dict[str, float] = {"seg.objects_found": float(np.mean(scores.found))}
    for name, pairs in scores.pairs.items():
        if pairs:
            metrics[f"seg.{name}.iou@{DAAM_TAU}"] = float(np.mean([p.iou[at] for p in pairs]))
            metrics[f"seg.{name}.ap"] = float(np.mean([p.ap for p in pairs]))
    return scores, metrics


def _probe_features(
    pipe: Any, item: PromptItem, seed: int, settings: RunSettings, guidance: float
) -> dict[str, np.ndarray]:
    from diffwidget.tracing.activations import ActivationRecorder

    recorder = ActivationRecorder(halves=PROBE_HALVES, progress=False)
    record = recorder.record(
        pipe,
        [item.prompt],
        seeds=[seed],
        num_inference_steps=settings.inference_steps,
        guidance_scale=guidance,
    )
    arrays = {}
    for half in PROBE_HALVES:
        source = record.activations if half == "cond" else record.uncond_activations
        for block, values in source.items():
            arrays[f"probe/{half}/{block}"] = np.asarray(values[0], dtype=np.float32)
    return arrays


def compute_item(
    pipe: Any,
    item: PromptItem,
    seed: int,
    settings: RunSettings,
    *,
    scene_metrics: bool = True,
    clock: Callable[[], float] = time.perf_counter,
) -> ItemOutput:
    """Trace one item and compute its maps and metrics.

    Parameters
    ----------
    pipe : diffusers pipeline
        The pipeline of the run.
    item : PromptItem
        The prompt and its ground truth.
    seed : int
        The generator seed (``item.generator_seed(offset)``).
    settings : RunSettings
        What to compute (:class:`~diffwidget.runs.settings.RunSettings`).
    scene_metrics : bool
        Whether the pipeline draws the scene world (segmentation needs its reader).

    Returns
    -------
    ItemOutput
    """
    from diffwidget.tracing.generate import trace as trace_run

    parts = _ItemParts()
    start = clock()
    concepts = _concept_plan(pipe, item, settings, scene_metrics, parts.skipped)
    # No guidance given: trace() takes the pipeline's recommended scale and records it.
    tr = trace_run(
        pipe,
        item.prompt,
        num_inference_steps=settings.inference_steps,
        guidance_scale=settings.guidance,
        seed=seed,
        taps=[concepts.tap] if concepts is not None else [],
    )
    parts.timing["trace"] = clock() - start
    _add_maps(parts, pipe, tr, settings, clock)
    _add_item_metrics(parts, pipe, tr, item, settings, scene_metrics, clock)
    if concepts is not None:
        from diffwidget.runs.concept_metric import item_concepts

        with _timed(parts.timing, "concepts", clock):
            parts.concepts, concept_metrics, concept_arrays = item_concepts(tr, item, concepts)
            parts.metrics.update(concept_metrics)
            parts.arrays.update(concept_arrays)
    if "probes" in settings.metrics:
        with _timed(parts.timing, "probes", clock):
            parts.arrays.update(_probe_features(pipe, item, seed, settings, tr.guidance_scale))
    parts.timing["total"] = clock() - start
    return ItemOutput(parts.record(tr), tr, parts.arrays)


@dataclass
class _ItemParts:
    """What the pieces of :func:`compute_item` add up to, in the order they add it (the
    order of the record's dicts on disk)."""

    timing: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, CurveEntry] = field(default_factory=dict)
    maps: list[MapEntry] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    segmentation: SegmentationScores | None = None
    roles: dict[str, list[float]] | None = None
    commitment: tuple[SwitchEntry, ...] | None = None
    concepts: ConceptEntry | None = None

    def add_map(self, method: str, step: int, saliency: SaliencyMap) -> None:
        """Keep a map's arrays, and its settings without the entries that vary between runs."""
        name = f"{method}@{step}"
        meta = {k: v for k, v in saliency.meta.items() if k not in _TIMING_META}
        layers = list(saliency.layers)
        self.maps.append(MapEntry(method, step, saliency.timestep, json_safe(meta), layers))
        self.arrays[f"{name}/map"] = saliency.map
        self.arrays[f"{name}/raw"] = saliency.raw
        for k, layer in enumerate(layers):
            self.arrays[f"{name}/layer{k}"] = saliency.layers[layer]

    def record(self, tr: Trace) -> ItemResult:
        """The item's result record; a non-finite metric is stored as None (JSON has no NaN)."""
        return ItemResult(
            metrics={k: v if math.isfinite(v) else None for k, v in self.metrics.items()},
            curves=self.curves,
            maps=tuple(self.maps),
            segmentation=self.segmentation,
            roles=self.roles,
            timesteps=[int(t) for t in tr.timesteps.tolist()],
            timing=self.timing,
            commitment=self.commitment,
            concepts=self.concepts,
            skipped=self.skipped,
        )


@contextmanager
def _timed(timing: dict[str, float], name: str, clock: Callable[[], float]) -> Iterator[None]:
    """Store the seconds the block took as ``timing[name]``; nothing when it raises."""
    begin = clock()
    yield
    timing[name] = clock() - begin


def _add_maps(
    parts: _ItemParts, pipe: Any, tr: Trace, settings: RunSettings, clock: Callable[[], float]
) -> None:
    """Every chosen map at every explained step, each scored for faithfulness when asked."""
    from diffwidget.explain.faithfulness import InsertionDeletion
    from diffwidget.explain.registry import saliency_method

    attention = AttentionMaps(normalize="none").attribute(tr)
    evaluator = InsertionDeletion(settings.faithfulness_config())
    methods = {
        m: saliency_method(m)(settings.config(m), progress_bar=False)
        for m in settings.saliency_methods
    }
    for step in settings.explained_steps:
        for method in settings.methods:
            name = f"{method}@{step}"
            with _timed(parts.timing, name, clock):
                if method == "attention":
                    saliency = attention_saliency(attention, tr, step)
                else:
                    saliency = methods[method].attribute(pipe, tr, step)
            parts.add_map(method, step, saliency)
            if "faithfulness" in settings.metrics:
                with _timed(parts.timing, f"{name}.faithfulness", clock):
                    result = evaluator.evaluate(pipe, tr, step, saliency)
                parts.curves[name] = _faithfulness_entry(result)
                parts.metrics.update(_faithfulness_metrics(name, result))


def _add_item_metrics(
    parts: _ItemParts,
    pipe: Any,
    tr: Trace,
    item: PromptItem,
    settings: RunSettings,
    scene_metrics: bool,
    clock: Callable[[], float],
) -> None:
    """Segmentation, token roles and commitment, each where the settings and item allow."""
    scene = scene_metrics and bool(item.objects)
    if "segmentation" in settings.metrics and scene:
        with _timed(parts.timing, "segmentation", clock):
            parts.segmentation, seg_metrics = _segmentation(tr, item)
            parts.metrics.update(seg_metrics)
    if "roles" in settings.metrics and item.roles:
        parts.roles, role_metrics = _role_curves(AttentionMaps().attribute(tr), tr, item)
        parts.metrics.update(role_metrics)
    if "commitment" in settings.metrics and scene:
        from diffwidget.runs.commitment import item_commitment

        with _timed(parts.timing, "commitment", clock):
            parts.commitment, commit_metrics = item_commitment(pipe, tr, item, settings)
            parts.metrics.update(commit_metrics)


def _concept_plan(
    pipe: Any, item: PromptItem, settings: RunSettings, scene_metrics: bool, skipped: dict[str, str]
) -> ConceptPlan | None:
    """The concept tap of the item's trace (``concepts`` metric), or its skip reason noted."""
    if "concepts" not in settings.metrics:
        return None
    from diffwidget.runs.concept_metric import plan_concepts

    plan = plan_concepts(pipe, item, settings, scene_metrics)
    if isinstance(plan, str):
        skipped["concepts"] = plan
        return None
    return plan
