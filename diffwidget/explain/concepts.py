"""Where concept labels come from, and x̂0 attribute curves for the embedded model.

Two sources of labelled prompts feed :class:`~diffwidget.explain.probes.ConceptProbe`:

- the embedded model's scene world, whose captions come with exact ground truth
  (colour, shape, size and position of every object): :meth:`ConceptSet.from_scene_world`;
- prompt sets written by the user for any pipeline, e.g. prompts with and without a dog:
  :meth:`ConceptSet.from_prompts`.

For the embedded model there is a second, independent answer to "when is each attribute
decided?": decode the predicted clean image x̂0 at every step, read its attributes with
:class:`~diffwidget.models.reader.SceneReader`, and measure how often they already agree
with the final image (:func:`x0_attribute_curves`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

import numpy as np

from diffwidget.explain.intervals import wilson_interval
from diffwidget.explain.probes import ConceptCurves
from diffwidget.tracing.activations import ActivationRecord, ActivationRecorder

if TYPE_CHECKING:
    from diffwidget.models.scenes import Scene

Attribute = Literal["colour", "shape", "size", "position"]
ATTRIBUTES: tuple[str, ...] = get_args(Attribute)
#: z-value of the two-sided 95 % Wilson interval drawn around agreement curves.
WILSON_Z = 1.96
DEFAULT_CONCEPT = "concept"


class _Reader(Protocol):
    def read(self, image: np.ndarray) -> Sequence[Any]: ...


@dataclass
class ConceptSet:
    """Prompts with one label per prompt for each concept.

    Attributes
    ----------
    prompts : list of str
        The prompts, one generated image each.
    labels : dict of str to list
        Concept name -> one label per prompt; ``None`` leaves a prompt out of that concept.
    seeds : list of int, optional
        Generator seed per prompt (default when recording: ``seed + index``).
    meta : dict
        Where the labels come from.
    """

    prompts: list[str]
    labels: dict[str, list[str | None]]
    seeds: list[int] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, values in self.labels.items():
            if len(values) != len(self.prompts):
                raise ValueError(
                    f"concept {name!r} has {len(values)} labels for {len(self.prompts)} "
                    "prompts; give one label per prompt (None to leave one out)"
                )
        if self.seeds is not None and len(self.seeds) != len(self.prompts):
            raise ValueError(f"{len(self.seeds)} seeds for {len(self.prompts)} prompts")

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def concepts(self) -> list[str]:
        """Concept names."""
        return list(self.labels)

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Concept -> class label -> number of prompts carrying it."""
        counts: dict[str, dict[str, int]] = {}
        for name, values in self.labels.items():
            kept = [v for v in values if v is not None]
            counts[name] = {c: kept.count(c) for c in sorted(set(kept))}
        return counts

    @classmethod
    def from_prompts(
        cls,
        groups: Mapping[str, Sequence[str]],
        *,
        concept: str = DEFAULT_CONCEPT,
        seed: int = 0,
    ) -> ConceptSet:
        """One concept whose classes are the groups of prompts.

        Parameters
        ----------
        groups : mapping of str to sequence of str
            Class label -> prompts, e.g. ``{"dog": [...], "no dog": [...]}``.
        concept : str
            Name of the concept.
        seed : int
            Seeds are ``seed + index`` over the concatenated prompts.

        Examples
        --------
        >>> concepts = ConceptSet.from_prompts(
        ...     {"dog": ["a dog on grass", "a dog in snow"], "no dog": ["grass", "snow"]},
        ...     concept="dog",
        ... )
        >>> concepts.labels["dog"]
        ['dog', 'dog', 'no dog', 'no dog']
        """
        if len(groups) < 2:
            raise ValueError(
                "give at least two groups of prompts, e.g. {'dog': [...], 'no dog': [...]}"
            )
        prompts: list[str] = []
        labels: list[str | None] = []
        for label, members in groups.items():
            if isinstance(members, str):
                raise TypeError(f"group {label!r} must be a list of prompts, not one string")
            prompts += list(members)
            labels += [str(label)] * len(members)
        seeds = [seed + i for i in range(len(prompts))]
        return cls(prompts, {concept: labels}, seeds, {"source": "prompt groups"})

    @classmethod
    def from_scenes(
        cls, scenes: Sequence[Scene], attributes: Sequence[str] = ATTRIBUTES, *, seed: int = 0
    ) -> ConceptSet:
        """Captions of scene-world scenes labelled with their objects' ground truth.

        Only one-object scenes give clean labels; prompts of scenes with more objects get
        ``None`` (left out) for every attribute.
        """
        bad = [a for a in attributes if a not in ATTRIBUTES]
        if bad:
            raise ValueError(f"unknown attributes {bad}; choose from {ATTRIBUTES}")
        labels: dict[str, list[str | None]] = {a: [] for a in attributes}
        for scene in scenes:
            single = scene.objects[0] if len(scene.objects) == 1 else None
            for a in attributes:
                labels[a].append(None if single is None else str(getattr(single, a)))
        prompts = [scene.caption for scene in scenes]
        seeds = [seed + i for i in range(len(prompts))]
        return cls(prompts, labels, seeds, {"source": "scene world ground truth"})

    @classmethod
    def from_scene_world(
        cls,
        n: int,
        *,
        seed: int = 0,
        attributes: Sequence[str] = ATTRIBUTES,
        include_held_out: bool = False,
    ) -> ConceptSet:
        """``n`` one-object captions from the embedded model's scene world, with ground truth.

        Examples
        --------
        >>> concepts = ConceptSet.from_scene_world(50, seed=0)
        >>> concepts.concepts
        ['colour', 'shape', 'size', 'position']
        """
        from diffwidget.models.scenes import SceneWorld

        scenes = SceneWorld(seed=seed).sample(n, n_objects=(1,), include_held_out=include_held_out)
        result = cls.from_scenes(scenes, attributes, seed=seed)
        result.meta.update({"world_seed": seed, "include_held_out": include_held_out})
        return result

    @classmethod
    def from_images(
        cls,
        record: ActivationRecord,
        reader: _Reader | None = None,
        attributes: Sequence[str] = ATTRIBUTES,
    ) -> ConceptSet:
        """Labels read from the generated images of a record: what the model actually drew.

        Caption labels ask "when is the prompt's attribute decodable?"; these ask "when is
        the attribute the image will end up with decodable?", the question x̂0 attribute
        curves answer, and the fair comparison where the model does not always follow the
        prompt. Images with no readable object get ``None`` for every attribute.

        Parameters
        ----------
        record : ActivationRecord
            A record with final ``images``.
        reader : object with ``read(image)``, optional
            Default :class:`diffwidget.models.reader.SceneReader`.
        attributes : sequence of str
            Attributes to read.
        """
        if record.images is None:
            raise ValueError("the record holds no images; record them with ActivationRecorder")
        reads = read_attributes(record.images, reader, attributes)
        labels: dict[str, list[str | None]] = {
            a: [None if r is None else r[a] for r in reads] for a in attributes
        }
        meta = {"source": "attributes read from the generated images"}
        return cls(list(record.prompts), labels, list(record.seeds), meta)

    def drop_rare(self, min_count: int) -> ConceptSet:
        """A copy in which classes with fewer than ``min_count`` prompts are left out (None).

        Use it before :meth:`ConceptProbe.fit` with ``min_count=cv`` when labels come from
        images, whose class counts are not under the caller's control.
        """
        labels: dict[str, list[str | None]] = {}
        for name, values in self.labels.items():
            counts = self.class_counts()[name]
            labels[name] = [v if v is not None and counts[v] >= min_count else None for v in values]
        dropped = {
            name: sorted(c for c, k in self.class_counts()[name].items() if k < min_count)
            for name in self.labels
        }
        meta = {**self.meta, "dropped_classes": dropped}
        return ConceptSet(list(self.prompts), labels, self.seeds, meta)

    def record(
        self, pipe: Any, recorder: ActivationRecorder | None = None, **record_kwargs: Any
    ) -> ActivationRecord:
        """Record activations for these prompts (with their seeds).

        Parameters
        ----------
        pipe : diffusers pipeline
        recorder : ActivationRecorder, optional
            How to record (blocks, pooling, x̂0); default settings otherwise.
        **record_kwargs
            Passed to :meth:`ActivationRecorder.record` (``num_inference_steps``, ...).
        """
        recorder = recorder if recorder is not None else ActivationRecorder()
        if self.seeds is not None:
            record_kwargs.setdefault("seeds", self.seeds)
        return recorder.record(pipe, self.prompts, **record_kwargs)


def read_attributes(
    images: np.ndarray, reader: _Reader | None = None, attributes: Sequence[str] = ATTRIBUTES
) -> list[dict[str, str] | None]:
    """Attributes of the main (largest) object read from each image, or None if none is read.

    Parameters
    ----------
    images : ndarray of uint8, shape (n, H, W, 3)
    reader : object with ``read(image) -> list of objects``, optional
        Default :class:`diffwidget.models.reader.SceneReader`.
    attributes : sequence of str
        Attribute names to take from the read objects.
    """
    if reader is None:
        from diffwidget.models.reader import SceneReader

        reader = SceneReader()
    result: list[dict[str, str] | None] = []
    for image in images:
        objects = list(reader.read(image))
        if not objects:
            result.append(None)
            continue
        # Scenes in probe sets hold one object; keep the biggest blob so that stray
        # specks read from a noisy x̂0 do not count as the object.
        main = max(objects, key=lambda o: int(np.asarray(o.mask).sum()))
        result.append({a: str(getattr(main, a)) for a in attributes})
    return result


def _wilson(hits: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided 95 % Wilson score interval of a binomial proportion."""
    return wilson_interval(hits, np.maximum(n, 1), WILSON_Z)


def x0_attribute_curves(
    x0_images: np.ndarray | ActivationRecord,
    final_images: np.ndarray | None = None,
    *,
    reader: _Reader | None = None,
    attributes: Sequence[str] = ATTRIBUTES,
    timesteps: Sequence[int] | np.ndarray | None = None,
    truth: ConceptSet | None = None,
    progress: bool = False,
) -> ConceptCurves:
    """Per step, how often the attributes read from x̂0 already match the final image.

    Parameters
    ----------
    x0_images : ndarray of uint8, shape (n_prompts, n_steps, H, W, 3), or ActivationRecord
        Decoded predicted clean images per step; an ``ActivationRecord`` recorded with
        ``decode_x0=True`` supplies these, the final images and the timesteps.
    final_images : ndarray of uint8, shape (n_prompts, H, W, 3), optional
        The generated images (required unless a record is given).
    reader : object with ``read(image)``, optional
        Attribute reader; default :class:`diffwidget.models.reader.SceneReader`.
    attributes : sequence of str
        Attributes to follow.
    timesteps : sequence of int, optional
        Scheduler timesteps of the steps.
    truth : ConceptSet, optional
        Caption ground truth; adds how often the final image matches the caption to
        ``meta["final_matches_caption"]`` (an unreadable final image counts as a miss).
    progress : bool
        Show a ``tqdm`` bar over steps.

    Returns
    -------
    ConceptCurves
        ``kind="x0_agreement"``: agreement rate per attribute and step among prompts whose
        final image has a readable object (an x̂0 with no readable object disagrees), a 95 %
        Wilson band, and as ``chance`` the agreement of a guess drawn from the final
        images' attribute frequencies.
    """
    frames = _x0_frames(x0_images, final_images, timesteps)
    n_prompts = frames.x0.shape[0]
    if reader is None:
        from diffwidget.models.reader import SceneReader

        reader = SceneReader()
    final = read_attributes(frames.final, reader, attributes)
    valid = np.array([f is not None for f in final])
    if not valid.any():
        raise ValueError(
            "no object could be read from any final image; x̂0 curves need a model that "
            "draws scene-world objects (the embedded model with trained weights)"
        )
    attrs = list(attributes)
    hits = _agreement_hits(frames.x0, valid, final, reader, attrs, progress)
    n_valid = int(valid.sum())
    curves = hits / n_valid
    low, high = _wilson(hits, np.full_like(hits, n_valid))
    chance, classes = _chance_agreement(final, attrs)
    meta: dict[str, Any] = {
        "metric": "share of prompts whose x̂0 attribute equals the final image's",
        "band": "95 % Wilson interval over prompts",
        "n_prompts": n_prompts,
        "n_unreadable_final": int(n_prompts - n_valid),
        "reader": type(reader).__name__,
    }
    if truth is not None:
        meta["final_matches_caption"] = _caption_matches(final, truth, attrs)
    return ConceptCurves(
        kind="x0_agreement",
        concepts=attrs,
        timesteps=np.asarray(frames.timesteps, dtype=np.int64),
        curves=curves.astype(np.float32),
        band_low=low.astype(np.float32),
        band_high=high.astype(np.float32),
        chance=np.asarray(chance, dtype=np.float32),
        classes=classes,
        n_examples=dict.fromkeys(attrs, n_valid),
        meta=meta,
    )


@dataclass(frozen=True)
class _X0Frames:
    """The checked inputs of :func:`x0_attribute_curves`.

    Attributes
    ----------
    x0 : ndarray, shape (n_prompts, n_steps, H, W, 3)
        Predicted clean images per step.
    final : ndarray, shape (n_prompts, H, W, 3)
        The generated images.
    timesteps : sequence of int
        Scheduler timestep of each step, -1 where unknown.
    """

    x0: np.ndarray
    final: np.ndarray
    timesteps: Sequence[int] | np.ndarray


def _x0_frames(
    x0_images: np.ndarray | ActivationRecord,
    final_images: np.ndarray | None,
    timesteps: Sequence[int] | np.ndarray | None,
) -> _X0Frames:
    """Unpack a record (its timesteps unless given) and check that the shapes agree."""
    if isinstance(x0_images, ActivationRecord):
        record = x0_images
        if record.x0_images is None:
            raise ValueError("the record has no x̂0 images; record with decode_x0=True")
        x0_images, final_images = record.x0_images, record.images
        timesteps = record.timesteps if timesteps is None else timesteps
    x0 = np.asarray(x0_images)
    if final_images is None:
        raise ValueError("pass final_images (or an ActivationRecord with images)")
    if x0.ndim != 5 or x0.shape[0] != len(final_images):
        raise ValueError(
            f"x0_images must have shape (n_prompts, n_steps, H, W, 3) matching "
            f"{len(final_images)} final images, got {x0.shape}"
        )
    if timesteps is None:
        timesteps = np.full(x0.shape[1], -1)
    return _X0Frames(x0, np.asarray(final_images), timesteps)


def _agreement_hits(
    x0: np.ndarray,
    valid: np.ndarray,
    final: Sequence[dict[str, str] | None],
    reader: _Reader,
    attrs: list[str],
    progress: bool,
) -> np.ndarray:
    """Per attribute and step, how many x̂0 (of prompts with a readable final image) read as
    the final image does; shape (n_attributes, n_steps)."""
    from tqdm.auto import tqdm

    hits = np.zeros((len(attrs), x0.shape[1]))
    ref = [f for f in final if f is not None]
    for step in tqdm(range(x0.shape[1]), disable=not progress, desc="reading x̂0"):
        read = read_attributes(x0[valid, step], reader, attrs)
        for row, a in enumerate(attrs):
            hits[row, step] = sum(
                r is not None and r[a] == f[a] for r, f in zip(read, ref, strict=True)
            )
    return hits


def _chance_agreement(
    final: Sequence[dict[str, str] | None], attrs: list[str]
) -> tuple[list[float], dict[str, list[str]]]:
    """Agreement of a guess drawn from the final images' class frequencies, and the classes."""
    chance = []
    classes: dict[str, list[str]] = {}
    for a in attrs:
        values = [f[a] for f in final if f is not None]
        classes[a] = sorted(set(values))
        freqs = np.array([values.count(c) for c in classes[a]]) / len(values)
        chance.append(float((freqs**2).sum()))
    return chance, classes


def _caption_matches(
    final: Sequence[dict[str, str] | None], truth: ConceptSet, attrs: list[str]
) -> dict[str, float | None]:
    """Per attribute the caption gives, the share of final images that match it."""
    matches: dict[str, float | None] = {}
    for a in attrs:
        if a not in truth.labels:
            continue
        # An unreadable final image counts as not matching its caption.
        agree = [
            f is not None and f[a] == t
            for f, t in zip(final, truth.labels[a], strict=True)
            if t is not None
        ]
        matches[a] = float(np.mean(agree)) if agree else None
    return matches
