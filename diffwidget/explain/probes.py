"""Concept probes: when during denoising does a concept become decodable from the UNet?

For every step and every concept, a scikit-learn classifier is cross-validated on pooled
block activations of many prompts (:mod:`diffwidget.tracing.activations`); its held-out
ROC-AUC per step is the *concept-AUC curve*. A curve at 0.5 means the concept cannot be
read from the activations at that step; a curve near 1 means it can.

This is not in Park, Ju & Lee (2024): it is diffwidget's quantitative answer to the paper's
third question ("which visual concept does step t carry?"), which the paper answers only
qualitatively with time-step schedules.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import numpy as np

from diffwidget.records import NON_FINITE, Array, JsonValue, Record, RecordError, parse_json

CurveKind = Literal["probe_auc", "x0_agreement"]
CURVE_KINDS: tuple[str, ...] = get_args(CurveKind)
BandKind = Literal["sd", "minmax"]
BAND_KINDS: tuple[str, ...] = get_args(BandKind)

#: ROC-AUC of a classifier that cannot tell the classes apart.
CHANCE_AUC = 0.5
DEFAULT_CV = 5
DEFAULT_THRESHOLD = 0.9
#: Iteration cap for the default logistic regression; standardised pooled activations
#: converge well within it, and a cap keeps a pathological step from stalling the sweep.
DEFAULT_MAX_ITER = 1000
FORMAT_VERSION = 1
#: BLAS threads while fitting: probes are thousands of small fits, for which thread start-up
#: costs more than it saves (10x slower on a busy 2-core machine with the default).
PROBE_BLAS_THREADS = 1

Labels = Mapping[str, Sequence[Any]]


@dataclass(frozen=True, eq=False)
class ConceptCurves(Record):
    """One curve per concept over denoising steps, with a band: what the widget draws.

    Used for concept-AUC curves (``kind="probe_auc"``, from :class:`ConceptProbe`) and for
    x̂0 attribute agreement curves (``kind="x0_agreement"``, from
    :func:`diffwidget.explain.concepts.x0_attribute_curves`).

    Attributes
    ----------
    kind : {"probe_auc", "x0_agreement"}
        What the curves measure.
    concepts : list of str
        Concept names, one per row.
    timesteps : ndarray of int64, shape (n_steps,)
        Scheduler timestep of each step (``step`` is the column index).
    curves : ndarray of float32, shape (n_concepts, n_steps)
        The curve values (mean held-out ROC-AUC over folds, or agreement rate).
    band_low, band_high : ndarray of float32, shape (n_concepts, n_steps)
        The band drawn around each curve; ``meta["band"]`` says what it is.
    chance : ndarray of float32, shape (n_concepts,)
        The value of each curve when nothing is decodable (0.5 for ROC-AUC).
    classes : dict of str to list of str
        The class labels of each concept.
    n_examples : dict of str to int
        Prompts that carried a label for each concept.
    fold_scores : ndarray of float32, shape (n_concepts, n_steps, n_folds), optional
        Per-fold held-out ROC-AUC (probe curves only).
    meta : dict
        JSON-serialisable settings: classifier, cv, seed, blocks, band description.
    """

    kind: CurveKind
    concepts: list[str]
    timesteps: Annotated[np.ndarray, Array(ndim=1, kinds="iu")]
    curves: Annotated[np.ndarray, Array(ndim=2, kinds="f")]
    band_low: Annotated[np.ndarray, Array(ndim=2, kinds="f")]
    band_high: Annotated[np.ndarray, Array(ndim=2, kinds="f")]
    chance: Annotated[np.ndarray, Array(ndim=1, kinds="f")]
    classes: dict[str, list[str]] = field(default_factory=dict)
    n_examples: dict[str, int] = field(default_factory=dict)
    fold_scores: Annotated[np.ndarray, Array(ndim=3, kinds="f")] | None = None
    meta: dict[str, Annotated[JsonValue, NON_FINITE]] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                "written by a newer diffwidget; upgrade with `pip install -U diffwidget`"
            )
        if self.kind not in CURVE_KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; use one of {CURVE_KINDS}")
        shape = (len(self.concepts), len(self.timesteps))
        for name in ("curves", "band_low", "band_high"):
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, expected {shape}")
        if self.chance.shape != (len(self.concepts),):
            raise ValueError(f"chance must have one value per concept, got {self.chance.shape}")

    @property
    def n_steps(self) -> int:
        """Number of steps (columns)."""
        return len(self.timesteps)

    @property
    def steps(self) -> np.ndarray:
        """Loop indices ``0..n_steps-1`` (the x axis)."""
        return np.arange(self.n_steps)

    def curve(self, concept: str) -> np.ndarray:
        """The curve of one concept, shape (n_steps,)."""
        return self.curves[self._row(concept)]

    def _row(self, concept: str) -> int:
        if concept not in self.concepts:
            raise KeyError(f"no concept {concept!r}; available: {self.concepts}")
        return self.concepts.index(concept)

    def first_step_above(
        self, threshold: float = DEFAULT_THRESHOLD, *, sustained: bool = True
    ) -> dict[str, int | None]:
        """The step at which each concept becomes decodable.

        Parameters
        ----------
        threshold : float
            Curve value that counts as decodable (e.g. ROC-AUC 0.9).
        sustained : bool
            If True (default), the first step from which the curve *stays* at or above
            ``threshold`` until the last step; if False, the first step at which it reaches
            it at all.

        Returns
        -------
        dict of str to int or None
            Concept -> step, or None where the curve never (stably) reaches ``threshold``.
        """
        result: dict[str, int | None] = {}
        for name, curve in zip(self.concepts, self.curves, strict=True):
            above = curve >= threshold
            if sustained:
                below = np.flatnonzero(~above)
                first = 0 if below.size == 0 else int(below[-1]) + 1
                result[name] = first if first < len(curve) else None
            else:
                hits = np.flatnonzero(above)
                result[name] = int(hits[0]) if hits.size else None
        return result

    def order(self, threshold: float = DEFAULT_THRESHOLD, *, sustained: bool = True) -> list[str]:
        """Concepts sorted by the step at which they become decodable (never-decodable last)."""
        first = self.first_step_above(threshold, sustained=sustained)
        never = self.n_steps + 1
        return sorted(
            self.concepts,
            key=lambda c: (first[c] if first[c] is not None else never, self.concepts.index(c)),
        )

    def to_dict(self) -> dict[str, JsonValue]:
        """Plain JSON form (arrays as lists of numbers), e.g. for a widget trait or bqplot."""
        lists = {name: array.tolist() for name, array in self.arrays().items()}
        return {**self.to_json(), "fold_scores": None, **lists}

    @classmethod
    def from_dict(cls, data: Mapping[str, object], where: str | Path = "") -> ConceptCurves:
        """Inverse of :meth:`to_dict`, every field validated.

        Raises
        ------
        RecordError
            Naming the field that is missing or wrong.
        """
        header = {k: v for k, v in data.items() if k not in _ARRAY_DTYPES}
        arrays = {}
        for name, dtype in _ARRAY_DTYPES.items():
            value = data.get(name)
            if value is None:
                continue
            try:
                arrays[name] = np.asarray(value, dtype=dtype)
            except (TypeError, ValueError):
                raise RecordError(
                    where, "should be a (nested) list of numbers", field=name
                ) from None
        return cls.from_json(header, where=where, arrays=arrays)

    def save(self, path: str | Path) -> Path:
        """Write to ``.json`` (human-readable) or ``.npz`` (binary), chosen by the suffix.

        Examples
        --------
        >>> curves.save("concepts.json")  # doctest: +SKIP
        >>> ConceptCurves.load("concepts.json").order()  # doctest: +SKIP
        ['colour', 'size', 'shape', 'position']
        """
        path = Path(path)
        if path.suffix == ".npz":
            return super().save(path)
        if path.suffix != ".json":
            raise ValueError(f"save to a .json or .npz path, not {path.name!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict()))
        return path

    @classmethod
    def load(cls, path: str | Path, *, error: type[RecordError] = RecordError) -> ConceptCurves:
        """Read curves written by :meth:`save` (validated, sizes checked before reading)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no concept curves at {path}; write them with .save(path)")
        if path.suffix == ".json":
            data = parse_json(path.read_bytes(), path, error=error)
            if not isinstance(data, dict):
                raise error(path, "should be a JSON object of concept curves")
            return cls.from_dict(data, where=path)
        return super().load(path, error=error)


#: The array fields and the dtype each is read as from JSON lists.
_ARRAY_DTYPES = {
    "timesteps": np.int64,
    "curves": np.float32,
    "band_low": np.float32,
    "band_high": np.float32,
    "chance": np.float32,
    "fold_scores": np.float32,
}


def default_classifier(seed: int = 0) -> Any:
    """Standardised features into an L2 logistic regression (multinomial for >2 classes)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(
        StandardScaler(), LogisticRegression(max_iter=DEFAULT_MAX_ITER, random_state=seed)
    )


def _scores(model: Any, x: np.ndarray) -> np.ndarray:
    """Per-class scores of a fitted classifier, shape (n, n_classes) (or (n,) if binary)."""
    if hasattr(model, "predict_proba"):
        proba = model.predict_proba(x)
        return proba[:, 1] if proba.shape[1] == 2 else proba
    if hasattr(model, "decision_function"):
        return model.decision_function(x)
    raise TypeError(
        f"{type(model).__name__} has neither predict_proba nor decision_function; "
        "pass a scikit-learn classifier that scores its classes"
    )


def macro_auc(y: np.ndarray, scores: np.ndarray, n_classes: int) -> float:
    """ROC-AUC: binary, or one-vs-rest macro average over classes present in ``y``.

    Parameters
    ----------
    y : ndarray of int, shape (n,)
        Class indices in ``0..n_classes-1``.
    scores : ndarray, shape (n,) for two classes or (n, n_classes)
        Higher means more likely the (positive / that) class.
    """
    from sklearn.metrics import roc_auc_score

    if n_classes == 2:
        return float(roc_auc_score(y, scores if scores.ndim == 1 else scores[:, 1]))
    per_class = [
        roc_auc_score(y == c, scores[:, c])
        for c in range(n_classes)
        if 0 < int((y == c).sum()) < len(y)
    ]
    return float(np.mean(per_class))


class ConceptProbe:
    """Cross-validated classifiers that decode concepts from activations at each step.

    For every concept and step, the prompts carrying a label are split into ``cv``
    stratified folds (the same folds at every step, so curves are comparable across
    steps); a fresh clone of ``classifier`` is fitted on each training part and scored on
    the held-out part. Binary concepts use ROC-AUC; concepts with more classes use the
    one-vs-rest macro average. The curve is the mean over folds; the band is mean ± sd
    over folds (``band="sd"``) or the fold min/max (``band="minmax"``).

    Parameters
    ----------
    classifier : scikit-learn classifier, optional
        Any estimator with ``fit`` and ``predict_proba`` or ``decision_function``; cloned
        per fit. Default: :func:`default_classifier` (StandardScaler + LogisticRegression).
    cv : int
        Number of stratified folds; every class needs at least ``cv`` examples.
    seed : int
        Seed of the fold shuffling (and of the default classifier).
    band : {"sd", "minmax"}
        Which band around the curve to report.

    Examples
    --------
    On the embedded model (labels from the scene world's ground truth):

    >>> from diffwidget.explain.concepts import ConceptSet
    >>> from diffwidget.tracing.activations import ActivationRecorder
    >>> concepts = ConceptSet.from_scene_world(200)
    >>> record = concepts.record(
    ...     pipe, ActivationRecorder(pooling="grid", halves=["cond", "uncond"])
    ... )  # doctest: +SKIP
    >>> curves = ConceptProbe().fit(record, concepts, half="uncond")  # doctest: +SKIP
    >>> curves.first_step_above(0.9)  # doctest: +SKIP

    On synthetic activations in which a concept appears at step 3:

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> labels = np.arange(100) % 2
    >>> x = rng.normal(size=(100, 6, 8))
    >>> x[:, 3:, 0] += 4 * labels[:, None]
    >>> ConceptProbe(cv=4).fit(x, {"thing": labels}).first_step_above(0.9)
    {'thing': 3}
    """

    def __init__(
        self,
        classifier: Any = None,
        cv: int = DEFAULT_CV,
        seed: int = 0,
        *,
        band: BandKind = "sd",
    ) -> None:
        if cv < 2:
            raise ValueError(f"cv must be at least 2 folds, got {cv}")
        if band not in BAND_KINDS:
            raise ValueError(f"unknown band {band!r}; use one of {BAND_KINDS}")
        self.classifier = classifier
        self.cv = cv
        self.seed = seed
        self.band: BandKind = band

    def fit(
        self,
        activations: Any,
        labels: Labels | Any,
        *,
        timesteps: Sequence[int] | np.ndarray | None = None,
        blocks: Sequence[str] | None = None,
        half: Literal["cond", "uncond"] = "cond",
        progress: bool = False,
    ) -> ConceptCurves:
        """Fit the probes and return the concept-AUC curves.

        Parameters
        ----------
        activations : ActivationRecord, ndarray or dict of ndarray
            An :class:`~diffwidget.tracing.activations.ActivationRecord`, an array of shape
            (n_prompts, n_steps, n_features), or a dict of such arrays (concatenated).
        labels : mapping of str to sequence, or ConceptSet
            Concept name -> one label per prompt (any hashable; ``None`` leaves the prompt
            out for that concept). A :class:`~diffwidget.explain.concepts.ConceptSet`
            contributes its ``labels``.
        timesteps : sequence of int, optional
            Scheduler timesteps of the steps; taken from an ``ActivationRecord`` if omitted,
            else -1 (unknown).
        blocks : sequence of str, optional
            Which recorded blocks to use (all by default).
        half : {"cond", "uncond"}
            Which CFG half of an ``ActivationRecord`` to probe. The conditional half sees
            the prompt at every step, so a concept named in the prompt can be decodable
            from it even before the image shows it; the unconditional half only carries
            what has reached the latent.
        progress : bool
            Show a ``tqdm`` bar over concepts x steps.

        Returns
        -------
        ConceptCurves
            ``kind="probe_auc"``.

        Raises
        ------
        ValueError
            If a concept has fewer than two classes, or a class has fewer than ``cv``
            examples.
        """
        x, timesteps, source = _features(activations, timesteps, blocks, half)
        labels = getattr(labels, "labels", labels)
        if not isinstance(labels, Mapping) or not labels:
            raise TypeError("labels must map concept names to one label per prompt")
        n_prompts = x.shape[0]
        prepared = {name: self._encode(name, values, n_prompts) for name, values in labels.items()}
        classifier = (
            self.classifier if self.classifier is not None else default_classifier(self.seed)
        )
        concepts = list(prepared)
        scores = self._fold_scores(x, [prepared[name] for name in concepts], classifier, progress)
        mean = scores.mean(axis=-1)
        low, high, band_text = self._band(scores)
        return ConceptCurves(
            kind="probe_auc",
            concepts=concepts,
            timesteps=np.asarray(timesteps, dtype=np.int64),
            curves=mean.astype(np.float32),
            band_low=low.astype(np.float32),
            band_high=high.astype(np.float32),
            chance=np.full(len(concepts), CHANCE_AUC, dtype=np.float32),
            classes={name: prepared[name][2] for name in concepts},
            n_examples={name: int(prepared[name][0].sum()) for name in concepts},
            fold_scores=scores,
            meta={
                "classifier": repr(classifier),
                "cv": self.cv,
                "seed": self.seed,
                "band": band_text,
                "metric": "ROC-AUC (one-vs-rest macro for more than two classes)",
                "n_features": int(x.shape[-1]),
                **source,
            },
        )

    def _fold_scores(
        self,
        x: np.ndarray,
        encoded: Sequence[tuple[np.ndarray, np.ndarray, list[str]]],
        classifier: Any,
        progress: bool,
    ) -> np.ndarray:
        """Held-out ROC-AUC per concept, step and fold, shape (n_concepts, n_steps, cv).

        ``encoded`` holds :meth:`_encode`'s (mask, class indices, class names) per concept.
        """
        from sklearn.base import clone
        from sklearn.model_selection import StratifiedKFold
        from threadpoolctl import threadpool_limits
        from tqdm.auto import tqdm

        n_steps = x.shape[1]
        folds = StratifiedKFold(n_splits=self.cv, shuffle=True, random_state=self.seed)
        scores = np.zeros((len(encoded), n_steps, self.cv), dtype=np.float32)
        bar = tqdm(total=len(encoded) * n_steps, disable=not progress, desc="concept probes")
        with bar, threadpool_limits(limits=PROBE_BLAS_THREADS):
            for row, (keep, y, classes) in enumerate(encoded):
                # The same folds at every step, so that steps are compared on equal terms.
                splits = list(folds.split(np.zeros(len(y)), y))
                for step in range(n_steps):
                    xs = x[keep, step]
                    for k, (train, test) in enumerate(splits):
                        model = clone(classifier).fit(xs[train], y[train])
                        scores[row, step, k] = macro_auc(
                            y[test], _scores(model, xs[test]), len(classes)
                        )
                    bar.update()
        return scores

    def _band(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
        """Low and high edges of the band over folds, and what the band is (for ``meta``)."""
        if self.band == "sd":
            mean, sd = scores.mean(axis=-1), scores.std(axis=-1)
            band_text = f"mean ± sd of held-out ROC-AUC over {self.cv} folds"
            return np.clip(mean - sd, 0, 1), np.clip(mean + sd, 0, 1), band_text
        band_text = f"min-max of held-out ROC-AUC over {self.cv} folds"
        return scores.min(axis=-1), scores.max(axis=-1), band_text

    def check(self, labels: Labels | Any) -> None:
        """Raise the error :meth:`fit` would raise for these labels, before any generation.

        Examples
        --------
        >>> from diffwidget.explain.concepts import ConceptSet
        >>> ConceptProbe(cv=5).check(ConceptSet.from_scene_world(200))
        """
        labels = getattr(labels, "labels", labels)
        for name, values in labels.items():
            values = list(values)
            self._encode(name, values, len(values))

    def _encode(
        self, name: str, values: Sequence[Any], n_prompts: int
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Mask of labelled prompts, class indices, class names; checks the class counts."""
        values = list(values)
        if len(values) != n_prompts:
            raise ValueError(
                f"concept {name!r} has {len(values)} labels for {n_prompts} prompts; "
                "give one label per prompt (None to leave a prompt out)"
            )
        keep = np.array([v is not None for v in values])
        kept = [str(v) for v in values if v is not None]
        classes = sorted(set(kept))
        if len(classes) < 2:
            raise ValueError(
                f"concept {name!r} has {len(classes)} class(es) {classes}; a probe needs at "
                "least two (e.g. prompts with and without the concept)"
            )
        counts = {c: kept.count(c) for c in classes}
        small = {c: k for c, k in counts.items() if k < self.cv}
        if small:
            raise ValueError(
                f"concept {name!r}: classes {small} have fewer than cv={self.cv} examples; "
                f"add prompts for them, drop those classes (label None), or lower cv"
            )
        index = {c: i for i, c in enumerate(classes)}
        return keep, np.array([index[c] for c in kept]), classes


def _features(
    activations: Any,
    timesteps: Sequence[int] | np.ndarray | None,
    blocks: Sequence[str] | None,
    half: str,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(features [n_prompts, n_steps, F] float32, timesteps, provenance for meta)."""
    source: dict[str, Any] = {}
    if hasattr(activations, "features") and hasattr(activations, "timesteps"):
        x = activations.features(blocks, half=half)
        source = {
            "blocks": list(blocks) if blocks is not None else activations.blocks,
            "half": half,
            "pooling": activations.pooling,
            "grid_size": activations.grid_size,
        }
        if timesteps is None:
            timesteps = activations.timesteps
    elif isinstance(activations, Mapping):
        chosen = list(blocks) if blocks is not None else list(activations)
        x = np.concatenate([np.asarray(activations[b], dtype=np.float32) for b in chosen], axis=-1)
        source = {"blocks": chosen}
    else:
        x = np.asarray(activations, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(
            f"activations must have shape (n_prompts, n_steps, n_features), got {x.shape}"
        )
    if timesteps is None:
        # Unknown scheduler timesteps are marked -1 rather than guessed.
        timesteps = np.full(x.shape[1], -1)
    timesteps = np.asarray(timesteps, dtype=np.int64)
    if len(timesteps) != x.shape[1]:
        raise ValueError(f"{len(timesteps)} timesteps for {x.shape[1]} steps of activations")
    return x, timesteps, source
