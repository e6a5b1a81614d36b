"""Concept maps scored on the scene world: which layers and steps ground a word best.

Every scene caption names its objects' colour and shape words; the generated image's object
masks (read back by :class:`~diffwidget.models.reader.SceneReader`) are the exact ground
truth. A concept map of each of those words is scored against its object's mask with the
segmentation metric of :mod:`diffwidget.runs.segmentation` (IoU at DAAM's τ = 0.4, the best
τ, average precision), the same (object, word) pairs as the attention maps of the prompt's
tokens, so the two compare pair for pair. A colour and a shape that the caption does *not*
name join the words as a control: a word for nothing in the image should take little of it.

Candidates are a layer range (single layers included: which block grounds best) and a step
window; the default of an architecture is chosen on a training split and confirmed on a
held-out one (``bench/bench_concepts.py``). NumPy only.

Examples
--------
>>> words = concept_words([SceneTruth("red", "circle", None, "left", {"colour": 1, "shape": 2})])
>>> words.words
['red', 'circle', 'green', 'square']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from diffwidget.explain.attention import upsample_maps
from diffwidget.explain.concept_results import ConceptMapsResult, layer_range
from diffwidget.explain.results import minmax
from diffwidget.runs.prompts import SceneTruth
from diffwidget.runs.segmentation import (
    SegmentationScores,
    daam_heat_maps,
    ours_heat_maps,
    score_item,
    score_pairs,
)
from diffwidget.tracing.trace import Trace

#: The plain attention maps every concept map is compared with, on the same pairs:
#: ``AttentionMaps()``'s default aggregation and DAAM's.
BASELINES: tuple[str, ...] = ("attention", "daam")

#: Step windows tried, as (start, end) fractions of the run.
CONCEPT_WINDOWS: tuple[tuple[float, float], ...] = (
    (0.0, 1.0),
    (0.0, 0.5),
    (0.5, 1.0),
    (0.75, 1.0),
)
#: Layer ranges tried besides every single layer, as (start, end) fractions of the layers.
CONCEPT_DEPTHS: tuple[tuple[float, float], ...] = ((0.0, 1.0), (0.0, 0.5), (0.5, 1.0), (0.25, 0.75))


@dataclass(frozen=True)
class ConceptWords:
    """The words mapped for one scene caption.

    Attributes
    ----------
    present : list of str
        The caption objects' colour and shape words (each once, caption order).
    absent : list of str
        A colour and a shape of the scene world that the caption does not name (controls).
    """

    present: list[str]
    absent: list[str]

    @property
    def words(self) -> list[str]:
        """Present words, then absent ones: the order of the maps."""
        return [*self.present, *self.absent]


def concept_words(objects: Sequence[SceneTruth], controls: Sequence[str] = ()) -> ConceptWords:
    """The colour and shape words of a caption's objects, and the absent-word controls.

    The controls are ``controls`` less the caption's own words when given (a control must
    name nothing in the image), else the first of the scene world's colours and shapes not
    named, so the control is deterministic.

    Examples
    --------
    >>> truth = SceneTruth("red", "circle", None, "left", {"colour": 1, "shape": 2})
    >>> concept_words([truth]).absent
    ['green', 'square']
    >>> concept_words([truth], controls=["sky", "red"]).absent
    ['sky']
    """
    from diffwidget.models.scenes import COLOURS, SHAPES

    if not objects:
        raise ValueError("a scene caption names at least one object; pass its SceneTruth list")
    present: list[str] = []
    for truth in objects:
        for word in (truth.colour, truth.shape):
            if word not in present:
                present.append(word)
    if controls:
        absent = [w for w in dict.fromkeys(controls) if w not in present]
    else:
        absent = [
            next(c for c in COLOURS if c not in present),
            next(s for s in SHAPES if s not in present),
        ]
    return ConceptWords(present, absent)


@dataclass(frozen=True)
class ConceptCandidate:
    """One aggregation of concept maps: a range of layers and a window of steps.

    Examples
    --------
    >>> ConceptCandidate((0.5, 1.0), (0.0, 1.0)).name
    'layers 0.5-1 steps 0-1'
    """

    depth: tuple[float, float]
    window: tuple[float, float]

    @property
    def name(self) -> str:
        """A short unique label."""
        d, w = self.depth, self.window
        return f"layers {d[0]:g}-{d[1]:g} steps {w[0]:g}-{w[1]:g}"


def concept_candidates(
    n_layers: int,
    depths: Sequence[tuple[float, float]] = CONCEPT_DEPTHS,
    windows: Sequence[tuple[float, float]] = CONCEPT_WINDOWS,
) -> list[ConceptCandidate]:
    """Every single layer and every range of ``depths``, each with every window.

    A single layer ``i`` of ``n`` is the depth ``(i / n, (i + 1) / n)``.

    Examples
    --------
    >>> len(concept_candidates(2, depths=[(0.0, 1.0)], windows=[(0.0, 1.0)]))
    3
    """
    if n_layers < 1:
        raise ValueError(f"a model has at least one attention layer, got {n_layers}")
    singles = [(i / n_layers, (i + 1) / n_layers) for i in range(n_layers)]
    return [ConceptCandidate(d, w) for d in [*singles, *depths] for w in windows]


def layers_heat(
    result: ConceptMapsResult, layers: Sequence[str], steps: Sequence[int], size: tuple[int, int]
) -> np.ndarray:
    """Heat maps ``(n_words, *size)`` in [0, 1]: the mean of ``layers``' maps over the loop
    indices ``steps``, each layer upsampled bilinearly to ``size`` (the image), then min-max
    normalised per word, as DAAM's protocol scores a heat map.

    Examples
    --------
    >>> layers_heat(result, result.layers[:1], result.steps, (64, 64)).shape  # doctest: +SKIP
    (6, 64, 64)
    """
    rows = [result.steps.index(s) for s in steps]
    mean = np.mean([upsample_maps(result.maps[p][rows].mean(axis=0), size) for p in layers], axis=0)
    return np.stack([minmax(m) for m in mean]).astype(np.float32)


def concept_heat_maps(
    result: ConceptMapsResult, candidates: Sequence[ConceptCandidate], size: tuple[int, int]
) -> dict[str, np.ndarray]:
    """Each candidate's heat maps ``(n_words, *size)`` in [0, 1] (:func:`layers_heat` of its
    layers and steps).

    Examples
    --------
    >>> heat = concept_heat_maps(result, concept_candidates(8), (64, 64))  # doctest: +SKIP
    >>> heat["layers 0-0.125 steps 0.75-1"].shape  # (n_words, 64, 64)  # doctest: +SKIP
    (6, 64, 64)
    """
    return {
        c.name: layers_heat(
            result, layer_range(result.layers, c.depth), result.window_steps(c.window), size
        )
        for c in candidates
    }


def score_concepts(
    image: np.ndarray,
    objects: Sequence[SceneTruth],
    words: Sequence[str],
    heat_maps: dict[str, np.ndarray],
    reader: object = None,
) -> SegmentationScores:
    """Each found object's colour and shape concept maps scored against its mask.

    Parameters
    ----------
    image : ndarray
        The generated image.
    objects : sequence of SceneTruth
        What the caption names.
    words : sequence of str
        The words of the maps (:attr:`ConceptWords.words`).
    heat_maps : dict of str to ndarray
        Aggregation name -> ``(len(words), H, W)`` maps on the image grid in [0, 1].

    Examples
    --------
    >>> scores = score_concepts(trace.image, item.objects, words.words, heat)  # doctest: +SKIP
    """
    words = list(words)

    def place(truth: SceneTruth, role: str) -> int:
        word = truth.colour if role == "colour" else truth.shape
        if word not in words:
            raise KeyError(f"no concept map of {word!r}; map the caption's words ({words})")
        return words.index(word)

    return score_pairs(image, objects, heat_maps, place, words, reader)


def score_with_baselines(
    trace: Trace,
    objects: Sequence[SceneTruth],
    words: Sequence[str],
    concept_heat: dict[str, np.ndarray],
    reader: object = None,
) -> SegmentationScores:
    """Concept maps and the trace's plain attention maps (:data:`BASELINES`), each found
    object's colour and shape map scored against its mask: the same pairs for every map.

    Parameters
    ----------
    trace : Trace
        The traced generation (its image and attention maps).
    objects : sequence of SceneTruth
        What the caption names.
    words : sequence of str
        The words of the concept maps.
    concept_heat : dict of str to ndarray
        Name -> ``(len(words), H, W)`` concept heat maps on the image grid in [0, 1].

    Examples
    --------
    >>> scores = score_with_baselines(trace, item.objects, words.words, heat)  # doctest: +SKIP
    >>> sorted(scores.pairs)[:2]  # doctest: +SKIP
    ['attention', 'daam']
    """
    if trace.image is None:
        raise ValueError("the trace holds no final image; trace it again (diffwidget.trace)")
    clash = sorted(set(concept_heat) & set(BASELINES))
    if clash:
        raise ValueError(f"concept maps named {clash} would hide the baselines; rename them")
    size = (int(trace.image.shape[0]), int(trace.image.shape[1]))
    concept = score_concepts(trace.image, objects, words, concept_heat, reader)
    plain = {"attention": ours_heat_maps(trace, size), "daam": daam_heat_maps(trace, size)}
    baselines = score_item(trace, objects, plain, reader)
    return SegmentationScores(concept.found, {**concept.pairs, **baselines.pairs})


def word_shares(result: ConceptMapsResult, candidate: ConceptCandidate) -> np.ndarray:
    """Each word's share of the image ``(n_words,)``: the spatial mean of its map on each
    layer's own grid (softmax over the words, so the shares sum to 1), averaged over the
    candidate's layers and steps.

    Examples
    --------
    >>> word_shares(result, ConceptCandidate((0.0, 1.0), (0.0, 1.0))).sum()  # doctest: +SKIP
    1.0
    """
    layers = layer_range(result.layers, candidate.depth)
    rows = [result.steps.index(s) for s in result.window_steps(candidate.window)]
    return np.mean([result.maps[p][rows].mean(axis=(0, 2, 3)) for p in layers], axis=0)


def word_mass(
    result: ConceptMapsResult, words: ConceptWords, candidate: ConceptCandidate
) -> tuple[float, float]:
    """Mean share of the image taken by a present word and by an absent word
    (:func:`word_shares`).

    Returns
    -------
    (present, absent) : tuple of float

    Examples
    --------
    >>> word_mass(result, words, ConceptCandidate((0.0, 1.0), (0.0, 1.0)))  # doctest: +SKIP
    (0.2, 0.2)
    """
    share = word_shares(result, candidate)
    place = {w: i for i, w in enumerate(result.words)}
    present = float(np.mean([share[place[w]] for w in words.present]))
    absent = float(np.mean([share[place[w]] for w in words.absent]))
    return present, absent
