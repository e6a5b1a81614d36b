"""The concept-maps method: its result is the softmax over the words of what the tap
recorded, its aggregations average what they say, its captions name what is shown."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from diffwidget.explain.attention import upsample_maps
from diffwidget.explain.concept_maps import ConceptMaps, ConceptMapsConfig
from diffwidget.explain.concept_results import (
    VALUE_TEXT,
    Aggregation,
    ConceptMapsResult,
    layer_range,
    result_from_scores,
)
from diffwidget.tracing.concepts import ConceptTap
from diffwidget.tracing.generate import trace

WORDS = ("circle", "square", "red")
PROMPT = "a red circle on the left"


@pytest.fixture(scope="module")
def recorded(tiny_sd_pipe: Any) -> tuple[Any, Any, Any]:
    """A trace with the tap's scores recorded during it."""
    tap = ConceptTap(tiny_sd_pipe, list(WORDS))
    run = trace(tiny_sd_pipe, PROMPT, num_inference_steps=4, decode_previews=False, taps=[tap])
    return tiny_sd_pipe, run, tap.result()


def test_maps_are_the_softmax_over_the_words_of_the_recorded_scores(
    recorded: tuple[Any, Any, Any],
) -> None:
    _, run, scores = recorded
    result = result_from_scores(scores, run)
    for layer in scores.layers:
        raw = scores.layer_scores(layer).astype(np.float64)  # (steps, h, w, words)
        weights = np.exp(raw - raw.max(axis=-1, keepdims=True))
        expected = np.moveaxis(weights / weights.sum(axis=-1, keepdims=True), -1, 1)
        np.testing.assert_allclose(result.maps[layer], expected, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(result.maps[layer].sum(axis=1), 1.0, atol=1e-5)
    assert result.timesteps == [int(t) for t in run.timesteps]
    assert result.kind == "cross"


def test_replaying_a_trace_gives_the_maps_recorded_during_it(
    recorded: tuple[Any, Any, Any],
) -> None:
    pipe, run, scores = recorded
    during = result_from_scores(scores, run)
    replayed = ConceptMaps(words=WORDS, steps=(1, 3), progress_bar=False).attribute(pipe, run)
    assert replayed.steps == [1, 3]
    for layer in during.layers:
        np.testing.assert_allclose(replayed.maps[layer], during.maps[layer][[1, 3]], atol=1e-5)


def test_generate_records_the_maps_on_the_way(tiny_sd_pipe: Any) -> None:
    method = ConceptMaps(words=("circle", "dog"), progress_bar=False)
    run, result = method.generate(tiny_sd_pipe, PROMPT, num_inference_steps=3)
    assert result.steps == [0, 1, 2]
    assert run.n_steps == 3
    assert result.heat_map().shape == (2, *run.latent_shape)


def test_aggregations_average_what_they_say(recorded: tuple[Any, Any, Any]) -> None:
    _, run, scores = recorded
    result = result_from_scores(scores, run, aggregation=Aggregation((0.5, 1.0), (0.5, 1.0)))
    size = run.latent_shape
    chosen = result.default_layers()
    assert chosen == layer_range(result.layers, (0.5, 1.0))
    assert chosen == result.layers[len(result.layers) // 2 :]
    by_hand = np.mean([upsample_maps(result.maps[p], size) for p in chosen], axis=0)
    np.testing.assert_allclose(result.per_step(), by_hand, rtol=1e-6)
    assert result.window_steps() == [2, 3]
    np.testing.assert_allclose(result.heat_map(), by_hand[[2, 3]].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(result.mass().sum(axis=1), 1.0, atol=1e-5)
    grid = result.layer_step_grid("square")
    assert grid.shape == (len(result.layers), 4, *size)
    np.testing.assert_allclose(grid[-1], upsample_maps(result.maps[result.layers[-1]][:, 1], size))
    with pytest.raises(KeyError, match="no concept word 'dog'"):
        result.layer_step_grid("dog")


def test_the_caption_and_colour_scale_say_what_is_shown(recorded: tuple[Any, Any, Any]) -> None:
    _, run, scores = recorded
    result = result_from_scores(scores, run)
    assert all(word in result.caption for word in WORDS)
    assert "softmax over the words" in result.caption
    assert "output projection" in result.caption
    assert result.value == VALUE_TEXT


def test_a_result_saves_and_loads(recorded: tuple[Any, Any, Any], tmp_path: Any) -> None:
    _, run, scores = recorded
    result = result_from_scores(scores, run)
    back = ConceptMapsResult.load(result.save(tmp_path / "concepts.npz"))
    assert back.caption == result.caption
    assert back.depth == result.depth
    for layer in result.layers:
        np.testing.assert_array_equal(back.maps[layer], result.maps[layer])


@pytest.mark.parametrize(
    ("settings", "error", "says"),
    [
        ({"words": ("circle", "circle")}, ValueError, "twice"),
        ({"words": ("circle", "")}, ValueError, "empty"),
        ({"layers": "mid_block"}, TypeError, "list of strings"),
        ({"steps": (-1,)}, ValueError, "loop indices"),
        ({"steps": ()}, ValueError, "loop indices"),
        ({"space": "latent"}, ValueError, "unknown space"),
    ],
)
def test_bad_settings_are_refused(
    settings: dict[str, Any], error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=says):
        ConceptMapsConfig(**settings)


def test_no_words_is_refused_with_the_fix(recorded: tuple[Any, Any, Any]) -> None:
    pipe, run, _ = recorded
    with pytest.raises(ValueError, match=r"words=\('circle', 'dog'\)"):
        ConceptMaps(progress_bar=False).attribute(pipe, run)
    with pytest.raises(IndexError, match="outside"):
        ConceptMaps(words=WORDS, steps=(9,), progress_bar=False).attribute(pipe, run)


def test_a_cancelled_replay_returns_the_steps_done(recorded: tuple[Any, Any, Any]) -> None:
    pipe, run, _ = recorded
    method = ConceptMaps(words=WORDS, progress_bar=False)
    result = method.attribute(pipe, run, progress=lambda done, total: done < 2)
    assert result.steps == [0, 1]
