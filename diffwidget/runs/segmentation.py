"""Attention maps as segmentations, scored against the objects of the generated image.

DAAM's protocol (Tang et al., ACL 2023): a word's heat map is upsampled to the image,
min-max normalised and thresholded at τ = 0.4; the binary map is compared with the
object's mask by IoU. Here the masks come from the *generated* image, read back by the
scene reader (:class:`~diffwidget.models.reader.SceneReader`): the caption says what should
be there, the reader finds where the model put it. Each caption object contributes two
pairs, its colour word's map and its shape word's map against its mask.

Scores per pair: IoU over a grid of thresholds (τ = 0.4 is DAAM's), and average precision
of the continuous map (threshold-free). The aggregation that makes the heat map is
pluggable: :class:`~diffwidget.explain.attention.AttentionMaps` (ours) or
:func:`daam_heat_maps` (DAAM's sum over layers, heads and steps) on the same stored maps.
NumPy and Pillow only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffwidget.explain.attention import AttentionMaps, upsample_maps
from diffwidget.explain.results import minmax
from diffwidget.records import Record
from diffwidget.runs.prompts import SceneTruth
from diffwidget.tracing.trace import Trace

#: DAAM's binarisation threshold.
DAAM_TAU = 0.4
#: Thresholds scored for every pair; the best one is chosen over a whole set.
TAU_GRID: np.ndarray = np.round(np.arange(0.0, 1.0 + 1e-9, 0.05), 2)
#: The caption words each object is segmented by.
SEGMENTED_WORDS: tuple[str, ...] = ("colour", "shape")


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision of ``scores`` ranking the positive ``labels`` first.

    ``AP = sum_k (R_k - R_{k-1}) P_k`` over the distinct score thresholds in decreasing
    order (ties share one threshold), the step-wise definition scikit-learn uses.

    Examples
    --------
    >>> average_precision(np.array([0.9, 0.8, 0.1]), np.array([1, 0, 1]))
    0.8333333333333333
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    n_pos = int(labels.sum())
    if n_pos == 0:
        raise ValueError("average precision needs at least one positive pixel (an empty mask)")
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    # The last index of each run of equal scores is where a threshold takes them all.
    last = np.r_[np.flatnonzero(np.diff(scores) != 0), len(scores) - 1]
    true_pos = np.cumsum(labels)[last]
    precision = true_pos / (last + 1)
    recall = true_pos / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def iou_curve(heat: np.ndarray, mask: np.ndarray, taus: np.ndarray = TAU_GRID) -> np.ndarray:
    """IoU of ``heat > τ`` with ``mask`` for every τ in ``taus``.

    ``heat`` is a map normalised to [0, 1] on the mask's grid.

    Examples
    --------
    >>> heat = np.array([[1.0, 0.5], [0.2, 0.0]])
    >>> iou_curve(heat, np.array([[True, True], [False, False]]), np.array([0.4])).tolist()
    [1.0]
    """
    if heat.shape != mask.shape:
        raise ValueError(f"heat map {heat.shape} and mask {mask.shape} must share one grid")
    mask = mask.astype(bool)
    flat = heat.ravel()[None, :] > np.asarray(taus, dtype=np.float64)[:, None]
    m = mask.ravel()[None, :]
    inter = (flat & m).sum(axis=1)
    union = (flat | m).sum(axis=1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0).astype(np.float64)


def to_image_grid(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Heat maps ``(T, h, w)`` upsampled bilinearly to ``size`` and min-max per map."""
    up = upsample_maps(np.asarray(maps, dtype=np.float32), size)
    return np.stack([minmax(m) for m in up])


def ours_heat_maps(
    trace: Trace, size: tuple[int, int], aggregation: AttentionMaps | None = None
) -> np.ndarray:
    """Per-token heat maps on the image grid from :class:`AttentionMaps` (default settings).

    Returns
    -------
    ndarray of float32, shape (n_tokens, size[0], size[1]), each map in [0, 1]
    """
    result = (aggregation or AttentionMaps()).attribute(trace)
    return to_image_grid(result.heat_map(), size)


def daam_heat_maps(trace: Trace, size: tuple[int, int]) -> np.ndarray:
    """DAAM's heat maps: every layer's map, summed over steps, upsampled bicubically to the
    image, clamped at 0, summed over layers, min-max normalised per token.

    Heads were averaged when the trace was recorded; DAAM sums them, which multiplies each
    layer by its head count: the same factor for every layer of the embedded model and of
    Stable Diffusion 1.x, so the normalised maps are the same. DAAM upsamples with torch's
    bicubic (a = -0.75), Pillow's bicubic uses a = -0.5.

    Returns
    -------
    ndarray of float32, shape (n_tokens, size[0], size[1]), each map in [0, 1]
    """
    from PIL import Image

    total = np.zeros((len(trace.tokens), *size), dtype=np.float64)
    for probs in trace.attention.values():
        summed = np.asarray(probs, dtype=np.float32).sum(axis=0)  # steps: [h_l, w_l, T]
        for token in range(summed.shape[-1]):
            image = Image.fromarray(np.ascontiguousarray(summed[..., token]), mode="F")
            up = np.asarray(image.resize((size[1], size[0]), Image.Resampling.BICUBIC))
            total[token] += np.clip(up, 0.0, None)
    return np.stack([minmax(m) for m in total])


def match_objects(objects: Sequence[SceneTruth], found: Sequence[Any]) -> list[Any | None]:
    """For each caption object, the read object of its colour nearest its anchor (or None).

    Scene-world objects of one caption have distinct colours, so the colour identifies the
    object; the anchor breaks ties when the reader finds several blobs of one colour.
    """
    from diffwidget.models.scenes import ANCHORS

    matches: list[Any | None] = []
    for truth in objects:
        ax, ay = ANCHORS[truth.position]
        same = [o for o in found if o.colour == truth.colour]
        matches.append(
            min(same, key=lambda o: (o.centre[0] - ax) ** 2 + (o.centre[1] - ay) ** 2)
            if same
            else None
        )
    return matches


@dataclass(frozen=True)
class PairScore(Record):
    """One word map scored against one object's mask.

    Attributes
    ----------
    object : int
        Index of the caption's object.
    role : str
        Which of its words (``"colour"`` or ``"shape"``).
    word : str
        The word's token.
    iou : list of float
        IoU at every threshold of :data:`TAU_GRID`.
    ap : float
        Average precision of the continuous map.
    """

    object: int
    role: str
    word: str
    iou: list[float]
    ap: float


@dataclass(frozen=True)
class SegmentationScores(Record):
    """The segmentation scores of one item.

    Attributes
    ----------
    found : list of bool
        Per caption object, whether the reader found it in the generated image.
    pairs : dict of str to list of PairScore
        Aggregation name -> its scored (object, word) pairs (none for objects not found).
    """

    found: list[bool]
    pairs: dict[str, list[PairScore]]


def word_token_positions(trace: Trace, n_words: int) -> list[int]:
    """Trace token position of every prompt word (``prompt.split()``).

    A word-level tokenizer gives one token per word; CLIP's BPE marks the last piece of a
    word with ``</w>``, and a word is represented by that last piece.

    Raises
    ------
    ValueError
        When the stored word tokens cannot be aligned with the prompt's words.
    """
    words = trace.word_indices
    if len(words) == n_words:
        return list(words)
    ends = [i for i in words if trace.tokens[i].endswith("</w>")]
    if len(ends) == n_words:
        return ends
    raise ValueError(
        f"the trace stores {len(words)} word tokens for {n_words} prompt words and they do "
        "not align; give roles and objects for prompts whose words are single tokens"
    )


def score_item(
    trace: Trace,
    objects: Sequence[SceneTruth],
    heat_maps: dict[str, np.ndarray],
    reader: Any = None,
) -> SegmentationScores:
    """Segmentation scores of one generated image for each heat-map aggregation.

    Parameters
    ----------
    trace : Trace
        The traced generation (its final ``image`` is read).
    objects : sequence of SceneTruth
        What the caption names.
    heat_maps : dict of str to ndarray
        Aggregation name -> ``(n_tokens, H, W)`` heat maps on the image grid in [0, 1].
    reader : SceneReader, optional
        Default :class:`~diffwidget.models.reader.SceneReader`.

    Returns
    -------
    SegmentationScores
        Objects the reader did not find have no pairs.
    """
    if trace.image is None:
        raise ValueError("the trace holds no final image; trace it again (diffwidget.trace)")
    positions = word_token_positions(trace, len(trace.prompt.split()))

    def token(truth: SceneTruth, role: str) -> int:
        return positions[truth.words[role]]

    return score_pairs(trace.image, objects, heat_maps, token, trace.tokens, reader)


def score_pairs(
    image: np.ndarray,
    objects: Sequence[SceneTruth],
    heat_maps: dict[str, np.ndarray],
    index: Callable[[SceneTruth, str], int],
    labels: Sequence[str],
    reader: Any = None,
) -> SegmentationScores:
    """Score each found object's colour and shape maps against its mask in ``image``.

    Parameters
    ----------
    image : ndarray
        The generated image ``(H, W, 3)`` the reader finds the objects in.
    objects : sequence of SceneTruth
        What the caption names.
    heat_maps : dict of str to ndarray
        Aggregation name -> ``(n_maps, H, W)`` heat maps on the image grid in [0, 1].
    index : callable
        ``index(truth, role)``: which of the ``n_maps`` maps segments that word of that
        object (a token position for attention maps, a word's place for concept maps).
    labels : sequence of str
        The text of each of the ``n_maps`` maps (stored with the scores).
    reader : SceneReader, optional
        Default :class:`~diffwidget.models.reader.SceneReader`.

    Returns
    -------
    SegmentationScores
        Objects the reader did not find have no pairs.

    Examples
    --------
    >>> scores = score_pairs(image, objects, {"ours": maps}, index, words)  # doctest: +SKIP
    """
    if reader is None:
        from diffwidget.models.reader import SceneReader

        reader = SceneReader()
    found = match_objects(objects, reader.read(image))
    pairs: dict[str, list[PairScore]] = {}
    for name, maps in heat_maps.items():
        scores = []
        for number, (truth, read) in enumerate(zip(objects, found, strict=True)):
            if read is None:
                continue
            for role in SEGMENTED_WORDS:
                at = index(truth, role)
                heat = maps[at]
                scores.append(
                    PairScore(
                        number,
                        role,
                        labels[at],
                        [float(v) for v in iou_curve(heat, read.mask)],
                        average_precision(heat, read.mask),
                    )
                )
        pairs[name] = scores
    return SegmentationScores([read is not None for read in found], pairs)


def summarize_pairs(pairs: Sequence[PairScore], tau: float = DAAM_TAU) -> dict[str, float]:
    """mIoU at ``tau``, the best τ of the grid with its mIoU, and mean AP over pairs.

    Examples
    --------
    >>> pair = PairScore(0, "colour", "red", [0.0] * 8 + [0.5] + [0.0] * 12, 0.7)
    >>> summarize_pairs([pair])["miou_tau"]
    0.5
    """
    if not pairs:
        nan = float("nan")
        return {"miou_tau": nan, "best_tau": nan, "miou_best": nan, "map": nan, "n_pairs": 0.0}
    ious = np.array([p.iou for p in pairs], dtype=np.float64)
    curve = ious.mean(axis=0)
    best = int(np.argmax(curve))
    at = int(np.argmin(np.abs(TAU_GRID - tau)))
    return {
        "miou_tau": float(curve[at]),
        "best_tau": float(TAU_GRID[best]),
        "miou_best": float(curve[best]),
        "map": float(np.mean([p.ap for p in pairs])),
        "n_pairs": float(len(pairs)),
    }
