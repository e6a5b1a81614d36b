"""A prompt switch run from the explorer (in code or by the view's button): in the background,
then on the curves' step axis and in the filmstrip."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from diffwidget.widget import Explorer
from diffwidget.widget.codecs import decode_array
from diffwidget.widget.previews import shrink_images
from diffwidget.widget.switch_view import FILMSTRIP_SIZE, SwitchFilmstrip

CAPTION = "a large red circle on the left"
N_STEPS = 4
SWITCH_STEPS = [0, 2, N_STEPS]
WAIT_S = 300


@pytest.fixture(scope="module")
def demo() -> tuple[Any, Any]:
    import diffwidget

    pipe = diffwidget.load_demo_pipeline("unet")
    trace = diffwidget.trace(
        pipe, CAPTION, seed=0, num_inference_steps=N_STEPS, decode_previews=False
    )
    return pipe, trace


def _settled(explorer: Explorer) -> str:
    """The status once the job's last callback ran (it follows the future's result)."""
    deadline = time.monotonic() + 10
    while explorer.widget.status == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    return str(explorer.widget.status)


def test_switch_from_the_explorer_joins_the_curves(demo: tuple[Any, Any]) -> None:
    from diffwidget.explain.prompt_switch import PromptSwitch

    pipe, trace = demo
    explorer = Explorer(trace, pipe=pipe)
    try:
        seen: list[float] = []
        explorer.widget.observe(lambda change: seen.append(change["new"]), names=["progress"])
        curves = explorer.prompt_switch("red", "blue", switch_steps=SWITCH_STEPS).result(WAIT_S)
        assert _settled(explorer) == "done"
        assert explorer.commitment is curves
        direct = PromptSwitch(switch_steps=SWITCH_STEPS, progress_bar=False).run(
            pipe, trace, word="red", replacement="blue"
        )
        np.testing.assert_array_equal(curves.outcomes, direct.outcomes)
        # Progress moved through the branch steps, not only to the end.
        assert any(0 < p < 1 for p in seen)
        series = explorer.widget.curves["series"]
        values = decode_array(explorer.widget.curves["values"])
        row = next(i for i, s in enumerate(series) if s["name"] == "colour")
        assert series[row]["group"] == "commitment"
        keep, _, _ = direct.keep_a("colour")
        np.testing.assert_allclose(values[row][[0, 2]], keep[:2])
        assert np.isnan(values[row][[1, 3]]).all()  # steps not switched at stay empty
        # The page shows what the code asked for: the picker's values and the filmstrip.
        assert (explorer.widget.switch_word, explorer.widget.switch_replacement) == ("red", "blue")
        film = SwitchFilmstrip.from_json(explorer.widget.switch)
        assert film.steps == SWITCH_STEPS
        np.testing.assert_array_equal(
            film.images, shrink_images(direct.filmstrip(0), FILMSTRIP_SIZE)
        )
        # Switching again (k = n only: no branch step to run) replaces the curve.
        explorer.prompt_switch("red", "blue", switch_steps=[N_STEPS]).result(WAIT_S)
        names = [s["name"] for s in explorer.widget.curves["series"]]
        assert names.count(series[row]["name"]) == 1
    finally:
        explorer.close()


def test_the_switch_button_runs_the_same_switch(demo: tuple[Any, Any]) -> None:
    pipe, trace = demo
    explorer = Explorer(trace, pipe=pipe)
    try:
        assert "prompt_switch" in explorer.widget.actions
        # k = n only: the button's job runs without a branch step to compute.
        explorer.prompt_switch("red", "blue", switch_steps=[N_STEPS]).result(WAIT_S)
        _settled(explorer)
        content = {"kind": "prompt_switch", "word": "circle", "replacement": "square"}
        explorer.widget._dispatch_message(explorer.widget, content, [])
        deadline = time.monotonic() + WAIT_S
        while explorer.widget.switch["word"] != "circle" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _settled(explorer) == "done", explorer.error
        assert explorer.commitment is not None
        assert explorer.commitment.prompt_b == "a large red square on the left"
        assert explorer.commitment.attributes == ["shape"]
        assert (explorer.widget.switch_word, explorer.widget.switch_replacement) == (
            "circle",
            "square",
        )
    finally:
        explorer.close()


def test_a_bad_word_or_no_pipeline_is_refused_before_any_work(demo: tuple[Any, Any]) -> None:
    pipe, trace = demo
    explorer = Explorer(trace, pipe=pipe)
    try:
        with pytest.raises(ValueError, match="has no word 'green'"):
            explorer.prompt_switch("green", "blue")
        assert explorer.widget.status != "running"
    finally:
        explorer.close()
    bare = Explorer(trace)
    try:
        with pytest.raises(RuntimeError, match="needs the pipeline"):
            bare.prompt_switch("red", "blue")
    finally:
        bare.close()
