"""Concept maps scored on the scene world: the metric agrees with scikit-learn's on a toy with
known masks, the word of each pair is the object's own, the aggregations average what they say."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, jaccard_score

from diffwidget.explain.concept_results import ConceptMapsResult
from diffwidget.models.reader import ReadObject
from diffwidget.runs.concept_study import (
    ConceptCandidate,
    concept_candidates,
    concept_heat_maps,
    concept_words,
    score_concepts,
    word_mass,
)
from diffwidget.runs.prompts import SceneTruth
from diffwidget.runs.segmentation import DAAM_TAU, TAU_GRID

SIZE = 8
RED_CIRCLE = SceneTruth("red", "circle", None, "left", {"colour": 1, "shape": 2})
BLUE_SQUARE = SceneTruth("blue", "square", None, "right", {"colour": 6, "shape": 7})


def _mask(cols: slice) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), dtype=bool)
    mask[2:6, cols] = True
    return mask


class FakeReader:
    """Finds the two objects at known places, whatever the image."""

    def __init__(self) -> None:
        self.masks = {"red": _mask(slice(0, 3)), "blue": _mask(slice(5, 8))}

    def read(self, image: np.ndarray) -> list[ReadObject]:
        del image
        return [
            ReadObject("red", "circle", "small", "left", self.masks["red"], (0.2, 0.5), 0.2, 1.0),
            ReadObject("blue", "square", "small", "right", self.masks["blue"], (0.8, 0.5), 0.2, 1),
        ]


def test_concept_words_are_the_caption_words_then_an_absent_colour_and_shape() -> None:
    words = concept_words([RED_CIRCLE, BLUE_SQUARE])
    assert words.present == ["red", "circle", "blue", "square"]
    assert words.absent == ["green", "triangle"]
    with pytest.raises(ValueError, match="at least one object"):
        concept_words([])


def test_scores_agree_with_scikit_learn_and_use_each_objects_own_word() -> None:
    words = concept_words([RED_CIRCLE, BLUE_SQUARE]).words
    rng = np.random.default_rng(0)
    maps = rng.random((len(words), SIZE, SIZE)).astype(np.float32)
    reader = FakeReader()
    image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    scores = score_concepts(image, [RED_CIRCLE, BLUE_SQUARE], words, {"toy": maps}, reader)
    assert scores.found == [True, True]
    pairs = scores.pairs["toy"]
    assert [(p.object, p.word) for p in pairs] == [
        (0, "red"),
        (0, "circle"),
        (1, "blue"),
        (1, "square"),
    ]
    at = int(np.argmin(np.abs(TAU_GRID - DAAM_TAU)))
    for pair in pairs:
        mask = reader.masks["red" if pair.object == 0 else "blue"].ravel()
        heat = maps[words.index(pair.word)].ravel()
        assert pair.iou[at] == pytest.approx(jaccard_score(mask, heat > DAAM_TAU))
        assert pair.ap == pytest.approx(average_precision_score(mask, heat))


def test_a_perfect_map_scores_one_and_a_missing_word_is_refused() -> None:
    reader = FakeReader()
    words = ["red", "circle"]
    maps = np.stack([reader.masks["red"], reader.masks["red"]]).astype(np.float32)
    image = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    scores = score_concepts(image, [RED_CIRCLE], words, {"exact": maps}, reader)
    assert all(p.ap == 1.0 and p.iou[8] == 1.0 for p in scores.pairs["exact"])
    with pytest.raises(KeyError, match="no concept map of 'blue'"):
        score_concepts(image, [BLUE_SQUARE], words, {"exact": maps}, reader)


def _result(maps: dict[str, np.ndarray], words: list[str]) -> ConceptMapsResult:
    n_steps = next(iter(maps.values())).shape[0]
    return ConceptMapsResult(
        words=words,
        family="mmdit",
        kind="joint",
        layers=list(maps),
        steps=list(range(n_steps)),
        timesteps=list(range(n_steps)),
        space="output",
        projected=[],
        latent_hw=[SIZE, SIZE],
        maps=maps,
        depth=(0.0, 1.0),
        window=(0.0, 1.0),
        caption="toy",
        value="toy",
    )


def test_heat_maps_and_mass_average_the_candidates_layers_and_steps() -> None:
    rng = np.random.default_rng(1)
    words = ["red", "circle", "green", "square"]
    raw = {f"l{i}": rng.random((4, len(words), SIZE, SIZE)).astype(np.float32) for i in range(4)}
    result = _result(raw, words)
    candidates = concept_candidates(4, depths=[(0.5, 1.0)], windows=[(0.5, 1.0)])
    assert len(candidates) == 5
    single, late = candidates[1], candidates[4]
    heat = concept_heat_maps(result, [single, late], (SIZE, SIZE))
    expected_single = raw["l1"][2:].mean(axis=0)
    expected_late = (raw["l2"][2:] + raw["l3"][2:]).mean(axis=0) / 2
    for name, expected in ((single.name, expected_single), (late.name, expected_late)):
        low = expected.min(axis=(1, 2), keepdims=True)
        high = expected.max(axis=(1, 2), keepdims=True)
        np.testing.assert_allclose(heat[name], (expected - low) / (high - low), atol=1e-5)
    present, absent = word_mass(result, concept_words([RED_CIRCLE]), late)
    share = expected_late.mean(axis=(1, 2))
    assert present == pytest.approx((share[0] + share[1]) / 2, rel=1e-5)
    assert absent == pytest.approx((share[2] + share[3]) / 2, rel=1e-5)
    assert ConceptCandidate((0.0, 1.0), (0.5, 1.0)).name == "layers 0-1 steps 0.5-1"
