"""What a run computes for one item: the trace, the maps, and the per-item metrics.

For one (prompt, seed): trace the generation; compute the chosen maps (cross-attention,
DF-RISE, DF-CAM) at the chosen steps; score each map's faithfulness with insertion and
deletion curves beside random orders; on scene-world captions segment each object's
colour and shape word by attention and score it against the object read from the generated
image (our aggregation and DAAM's); sum the attention each token role draws per step; and
optionally record pooled UNet activations for the concept probes fitted across the set.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeAlias, get_args

import numpy as np

from diffwidget.explain.attention import AttentionMaps, AttentionResult
from diffwidget.explain.config import MethodConfig
from diffwidget.explain.protocol import SALIENCY_METHOD_NAMES, SaliencyMethodName
from diffwidget.explain.results import FaithfulnessResult, SaliencyMap, minmax
from diffwidget.runs.prompts import PromptItem
from diffwidget.runs.segmentation import (
    DAAM_TAU,
    TAU_GRID,
    daam_heat_maps,
    ours_heat_maps,
    score_item,
    word_token_positions,
)
from diffwidget.tracing.trace import Trace

if TYPE_CHECKING:
    from diffwidget.explain.base import Method
    from diffwidget.explain.faithfulness import InsertionDeletionConfig

#: Maps a run can compute: the trace's cross-attention and every registered saliency method.
MapMethod = Literal["attention", SaliencyMethodName]
MAP_METHODS: tuple[str, ...] = get_args(MapMethod)
#: A map method as a run takes it: a name (default settings), a config, or a method object.
MethodChoice: TypeAlias = "str | MethodConfig | Method[Any]"
Metric = Literal["faithfulness", "segmentation", "roles", "probes"]
METRICS: tuple[str, ...] = get_args(Metric)
#: The paper's maps; other registered methods join a run when named.
DEFAULT_METHODS: tuple[str, ...] = ("attention", "df_rise", "df_cam")
#: The prefix of the insertion/deletion evaluator's settings in a run's settings.
FAITHFULNESS = "faithfulness"
DEFAULT_METRICS: tuple[str, ...] = ("faithfulness", "segmentation", "roles")
#: Segmentation aggregations scored on every scene item: ours (AttentionMaps' defaults)
#: and DAAM's baseline on the same stored maps.
SEGMENTATION_AGGREGATIONS: tuple[str, ...] = ("ours", "daam")
#: The explained step when none is chosen: the paper visualises step 15 of 20.
PAPER_STEP_FRACTION = 0.75
#: CFG halves whose pooled activations are kept for the probes; the unconditional half
#: never sees the prompt, so what it carries came through the latent.
PROBE_HALVES: tuple[str, ...] = ("cond", "uncond")
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
class RunSettings:
    """Everything that decides an item's results (stored in the run manifest).

    Attributes
    ----------
    methods : list of {"attention", "df_rise", "df_cam", ...}
        Maps computed at every explained step: ``"attention"`` and any registered saliency
        method (default :data:`DEFAULT_METHODS`).
    steps : list of int
        Loop indices explained (default :func:`default_steps`).
    seeds : list of int
        Seed offsets; each item runs once per offset (see ``PromptItem.generator_seed``).
    inference_steps : int
        Denoising steps of each generation.
    guidance : float, optional
        CFG scale; default the pipeline's recommended one.
    model : str, optional
        ``"unet"`` or ``"dit"`` (an embedded model) or a local diffusers pipeline folder;
        ``None`` is the embedded UNet.
    configs : dict of str to MethodConfig
        The typed settings of the saliency methods in ``methods``; a method without one
        takes its config's defaults (:meth:`fill_configs` writes them in).
    faithfulness : InsertionDeletionConfig, optional
        Settings of the insertion/deletion evaluator (default: its config's defaults).
    metrics : list of {"faithfulness", "segmentation", "roles", "probes"}
        Metrics computed per item.
    save_traces : bool
        Keep each item's Trace (needed to open its explorer).
    """

    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    steps: list[int] | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    inference_steps: int = 20
    guidance: float | None = None
    model: str | None = None
    configs: dict[str, MethodConfig] = field(default_factory=dict)
    faithfulness: InsertionDeletionConfig | None = None
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))
    save_traces: bool = True

    def __post_init__(self) -> None:
        if self.steps is None:
            self.steps = default_steps(self.inference_steps)

    @property
    def explained_steps(self) -> list[int]:
        """The loop indices explained (``steps`` after defaults)."""
        assert self.steps is not None
        return list(self.steps)

    @property
    def saliency_methods(self) -> list[str]:
        """The registered saliency methods among ``methods``."""
        return [m for m in self.methods if m in SALIENCY_METHOD_NAMES]

    def fill_configs(self) -> None:
        """Write the default config of every saliency method without one, and of the
        evaluator, in; refuse configs of methods the run does not compute."""
        from diffwidget.explain.faithfulness import InsertionDeletionConfig
        from diffwidget.explain.registry import config_class

        extra = sorted(set(self.configs) - set(self.saliency_methods))
        if extra:
            raise ValueError(
                f"settings given for {extra}, which this run does not compute; add them to "
                f"methods ({self.methods})"
            )
        self.configs = {
            name: self.configs.get(name) or config_class(name)() for name in self.saliency_methods
        }
        if self.faithfulness is None:
            self.faithfulness = InsertionDeletionConfig()

    def to_json(self) -> dict[str, Any]:
        """JSON-ready settings for the manifest; each method setting is ``"method.setting"``
        (so a changed setting is named on its own when a run is resumed)."""
        self.fill_configs()
        assert self.faithfulness is not None
        configs = {
            f"{name}.{key}": value
            for name, config in [*self.configs.items(), (FAITHFULNESS, self.faithfulness)]
            for key, value in config.to_json().items()
        }
        return {
            "methods": list(self.methods),
            "steps": self.explained_steps,
            "seeds": list(self.seeds),
            "inference_steps": self.inference_steps,
            "guidance": self.guidance,
            "model": self.model,
            **configs,
            "metrics": list(self.metrics),
            "save_traces": self.save_traces,
            "attention_defaults": _attention_defaults(),
        }


def split_methods(choices: Sequence[MethodChoice]) -> tuple[list[str], dict[str, MethodConfig]]:
    """The names of a run's maps and the configs among them.

    Parameters
    ----------
    choices : sequence of str, MethodConfig or method objects
        ``"attention"``, a registered name (its default settings), a config such as
        ``DFRiseConfig(n_masks=200)``, or a configured method such as ``DFRise(n_masks=200)``.

    Examples
    --------
    >>> split_methods(["attention", "df_cam"])
    (['attention', 'df_cam'], {})
    """
    names: list[str] = []
    configs: dict[str, MethodConfig] = {}
    for choice in choices:
        if isinstance(choice, str):
            names.append(choice)
            continue
        config = getattr(choice, "config", choice)
        if not isinstance(config, MethodConfig):
            raise TypeError(
                f"a run's methods are names, configs or method objects; got "
                f"{type(choice).__name__} (e.g. pass DFRiseConfig(n_masks=200) or 'df_rise')"
            )
        from diffwidget.explain.registry import method_name

        names.append(method_name(config))
        configs[names[-1]] = config
    return names, configs


def _attention_defaults() -> dict[str, Any]:
    """AttentionMaps' defaults: part of the settings, since the segmentation depends on them."""
    maps = AttentionMaps()
    return {
        "layers": maps.layers,
        "resolution": maps.resolution,
        "window": list(maps.window),
        "normalize": maps.normalize,
    }


@dataclass
class ItemOutput:
    """What one item produced: the JSON parts of its result, its trace and its arrays."""

    record: dict[str, Any]
    trace: Trace | None
    arrays: dict[str, np.ndarray]


def _faithfulness_entry(result: FaithfulnessResult) -> dict[str, Any]:
    return {
        "step": result.step,
        "fractions": result.saliency.fractions.tolist(),
        "deletion": result.saliency.deletion.tolist(),
        "insertion": result.saliency.insertion.tolist(),
        "random_deletion": result.random.deletion.tolist(),
        "random_insertion": result.random.insertion.tolist(),
        "meta": result.meta,
    }


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


def _segmentation(trace: Trace, item: PromptItem) -> tuple[dict[str, Any], dict[str, float]]:
    assert trace.image is not None
    size = (int(trace.image.shape[0]), int(trace.image.shape[1]))
    heat = {"ours": ours_heat_maps(trace, size), "daam": daam_heat_maps(trace, size)}
    scores = score_item(trace, item.objects, heat)
    at = int(np.argmin(np.abs(TAU_GRID - DAAM_TAU)))
    metrics: dict[str, float] = {"seg.objects_found": float(np.mean(scores["found"]))}
    for name, pairs in scores["pairs"].items():
        if pairs:
            metrics[f"seg.{name}.iou@{DAAM_TAU}"] = float(np.mean([p["iou"][at] for p in pairs]))
            metrics[f"seg.{name}.ap"] = float(np.mean([p["ap"] for p in pairs]))
    return scores, metrics


def _probe_features(
    pipe: Any, item: PromptItem, seed: int, settings: RunSettings, guidance: float
) -> dict[str, np.ndarray]:
    from diffwidget.tracing.activations import ActivationRecorder

    recorder = ActivationRecorder(halves=list(PROBE_HALVES), progress=False)  # type: ignore[arg-type]
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
        What to compute.
    scene_metrics : bool
        Whether the pipeline draws the scene world (segmentation needs its reader).

    Returns
    -------
    ItemOutput
    """
    from diffwidget.explain.faithfulness import InsertionDeletion
    from diffwidget.explain.registry import saliency_method
    from diffwidget.tracing.generate import trace as trace_run

    settings.fill_configs()
    timing: dict[str, float] = {}
    start = clock()
    # No guidance given: trace() takes the pipeline's recommended scale and records it.
    tr = trace_run(
        pipe,
        item.prompt,
        num_inference_steps=settings.inference_steps,
        guidance_scale=settings.guidance,
        seed=seed,
    )
    timing["trace"] = clock() - start
    metrics: dict[str, float] = {}
    curves: dict[str, Any] = {}
    maps_meta: list[dict[str, Any]] = []
    arrays: dict[str, np.ndarray] = {}
    attention = AttentionMaps(normalize="none").attribute(tr)
    evaluator = InsertionDeletion(settings.faithfulness)
    methods = {
        m: saliency_method(m)(settings.configs[m], progress_bar=False)
        for m in settings.saliency_methods
    }
    for step in settings.explained_steps:
        for method in settings.methods:
            begin = clock()
            if method == "attention":
                saliency = attention_saliency(attention, tr, step)
            else:
                saliency = methods[method].attribute(pipe, tr, step)
            name = f"{method}@{step}"
            timing[name] = clock() - begin
            meta = {k: v for k, v in saliency.meta.items() if k not in _TIMING_META}
            layers = list(saliency.layers)
            maps_meta.append(
                {
                    "method": method,
                    "step": step,
                    "timestep": saliency.timestep,
                    "meta": meta,
                    "layers": layers,
                }
            )
            arrays[f"{name}/map"] = saliency.map
            arrays[f"{name}/raw"] = saliency.raw
            for k, layer in enumerate(layers):
                arrays[f"{name}/layer{k}"] = saliency.layers[layer]
            if "faithfulness" in settings.metrics:
                begin = clock()
                result = evaluator.evaluate(pipe, tr, step, saliency)
                timing[f"{name}.faithfulness"] = clock() - begin
                curves[name] = _faithfulness_entry(result)
                metrics.update(_faithfulness_metrics(name, result))
    segmentation = None
    if "segmentation" in settings.metrics and scene_metrics and item.objects:
        begin = clock()
        segmentation, seg_metrics = _segmentation(tr, item)
        metrics.update(seg_metrics)
        timing["segmentation"] = clock() - begin
    role_curves = None
    if "roles" in settings.metrics and item.roles:
        role_curves, role_metrics = _role_curves(AttentionMaps().attribute(tr), tr, item)
        metrics.update(role_metrics)
    if "probes" in settings.metrics:
        begin = clock()
        arrays.update(_probe_features(pipe, item, seed, settings, tr.guidance_scale))
        timing["probes"] = clock() - begin
    timing["total"] = clock() - start
    record = {
        "metrics": metrics,
        "curves": curves,
        "maps": maps_meta,
        "segmentation": segmentation,
        "roles": role_curves,
        "timesteps": tr.timesteps.tolist(),
        "timing": timing,
    }
    return ItemOutput(record, tr, arrays)
