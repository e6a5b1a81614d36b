"""The causal (activation patching) and concept layer × step grids, computed on request."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from diffwidget.widget.explorer import Explorer
from diffwidget.widget.payloads import CellScale, GridData, GridGroup
from tests.conftest import TINY_PROMPT, TINY_STEPS
from tests.widget.test_widget_explorer import WAIT_S, wait_until

#: One uint8 step of the sent maps.
CODE_STEP = 1 / 255
#: Two blocks whose output is one tensor, patched at two steps (4 sites, each checked by hand).
LAYERS = ["down_blocks.1.resnets.0", "mid_block.resnets.0"]
STEPS = [0, 2]
#: Image change of the batched branch run against one run of the pipeline with a hook: four
#: uint8 levels summed over the 32×32×3 image (the two agree exactly on this machine).
CHANGE_ATOL = 4 / (255 * 32 * 32 * 3)


def _grid(explorer: Explorer) -> GridData | None:
    value = explorer.widget.grid_data
    return GridData.from_json(value) if value is not None else None


def _traced(pipe: Any, prompt: str, hooks: dict[str, Any]) -> Any:
    """A trace of ``prompt`` (the tiny trace's settings) with forward hooks, always removed."""
    from diffwidget.tracing.generate import trace

    handles = [pipe.unet.get_submodule(name).register_forward_hook(h) for name, h in hooks.items()]
    try:
        return trace(pipe, prompt, num_inference_steps=TINY_STEPS, seed=0)
    finally:
        for handle in handles:
            handle.remove()


def _patched_by_hand(pipe: Any, prompt_b: str, layer: str, step: int) -> np.ndarray:
    """Prompt A's final image with ``layer``'s output at ``step`` taken from prompt B's run.

    Independent of the method: B's output is read from a whole run of B (one denoiser call
    per step, both CFG halves), then written into a whole run of A by a forward hook.
    """
    calls = {"b": 0, "a": 0}
    stored: list[Any] = []

    def read(_module: Any, _inputs: Any, output: Any) -> None:
        if calls["b"] == step:
            stored.append(output.detach().clone())
        calls["b"] += 1

    def write(_module: Any, _inputs: Any, output: Any) -> Any:
        calls["a"] += 1
        return stored[0] if calls["a"] - 1 == step else output

    _traced(pipe, prompt_b, {layer: read})
    assert len(stored) == 1
    return _traced(pipe, TINY_PROMPT, {layer: write}).image


@pytest.mark.slow
@pytest.mark.parametrize(
    ("word", "replacement", "measure"),
    [("circle", "dog", "image_change"), ("red", "blue", "attribute")],
)
def test_causal_grid_cells_match_patching_by_hand(
    tiny_sd_pipe, tiny_trace, word, replacement, measure
):
    from diffwidget.explain.intervention_results import image_change
    from diffwidget.explain.judges import replace_word, scene_judges

    explorer = Explorer(tiny_trace, pipe=tiny_sd_pipe)
    try:
        future = explorer.patching_grid(word, replacement, layers=LAYERS, steps=STEPS)
        result = future.result(WAIT_S * 10)
        assert result is not None
        # The call filled the view's boxes; opening the grid shows it without a new run.
        assert (explorer.widget.patch_word, explorer.widget.patch_replacement) == (
            word,
            replacement,
        )
        explorer.grid = "patching"
        data = _grid(explorer)
        assert data is not None
        assert data.cells is not None
        assert data.steps == STEPS
        assert data.layers == LAYERS
        prompt_b = replace_word(TINY_PROMPT, word, replacement)
        for row, layer in enumerate(LAYERS):
            group = next(g for g in data.groups if layer in g.layers)
            assert group.values is not None
            for column, step in enumerate(STEPS):
                image = _patched_by_hand(tiny_sd_pipe, prompt_b, layer, step)
                change = float(image_change(image[None], tiny_trace.image[None])[0])
                shown = float(group.values[group.layers.index(layer), column])
                if measure == "image_change":
                    assert shown == pytest.approx(change, abs=CHANGE_ATOL), (layer, step)
                else:
                    judge = scene_judges(TINY_PROMPT, prompt_b)[0]
                    assert shown == float(judge.outcome(image) == "b"), (layer, step)
                    # The image change the method keeps agrees with the hand-made image too.
                    kept = result.change_grid()[row, column]
                    assert kept == pytest.approx(change, abs=CHANGE_ATOL), (layer, step)
        if measure == "image_change":
            assert "no scene-world judge applies" in data.description
            assert data.cells.high == pytest.approx(float(np.max(result.change_grid())))
        else:
            assert "takes B's colour (blue) instead of A's (red)" in data.description
            assert (data.cells.low, data.cells.high) == (0.0, 1.0)
        assert f"“{prompt_b}”" in data.description
        # Asked again in code: the cached result at once, no new run.
        again = explorer.patching_grid(word, replacement, layers=LAYERS, steps=STEPS)
        assert again.done()
        assert again.result() is result
        # A standalone file keeps the numbers (for its own steps and rows).
        exported = explorer.export_source().grid
        assert exported is not None
        assert exported.cells == data.cells
        assert explorer.export(steps=[2], layers=["mid_block"]).nbytes > 0
    finally:
        explorer.close()


@pytest.mark.slow
def test_concept_grid_is_the_methods_layer_step_grid(tiny_sd_pipe, tiny_trace):
    from diffwidget.explain.concept_maps import ConceptMaps
    from diffwidget.widget.concept_overlay import competing_words

    explorer = Explorer(tiny_trace, pipe=tiny_sd_pipe)
    try:
        widget = explorer.widget
        # What the view sends: a typed word, then the grid source.
        widget.set_state({"concept": "dog", "grid": "concept"})
        wait_until(lambda: _grid(explorer) is not None, WAIT_S * 3)
        data = _grid(explorer)
        assert data is not None
        assert data.source == "concept"
        assert data.cells is None
        words = tuple(competing_words(TINY_PROMPT, "dog"))
        method = ConceptMaps(words=words, progress_bar=False)
        expected = method.attribute(tiny_sd_pipe, tiny_trace).layer_step_grid("dog")
        assert data.steps == list(range(TINY_STEPS))
        shown = np.concatenate([g.codes[:, :, 0] for g in data.groups]) * CODE_STEP
        assert shown.shape == expected.shape  # 16×16 latent: cells at full size
        np.testing.assert_allclose(shown, expected, atol=CODE_STEP / 2 + 1e-6)
        assert all(np.all(g.scale == 1.0) for g in data.groups)  # fixed 0–1 scale
        assert "“dog”" in data.description
        assert "fixed 0–1 scale" in data.description
        # Cached per word: asking again in code runs nothing.
        assert explorer.concept_grid("dog").done()
        # Another word without a grid yet is computed when typed.
        widget.set_state({"concept": "red"})
        wait_until(lambda: (_grid(explorer) or data).description != data.description, WAIT_S * 3)
        assert "“red”" in _grid(explorer).description
    finally:
        explorer.close()


@pytest.mark.slow
def test_hostile_words_are_refused_or_text(tiny_sd_pipe, tiny_trace):
    explorer = Explorer(tiny_trace, pipe=tiny_sd_pipe)
    hostile = "<img src=x onerror=alert(1)>"
    try:
        widget = explorer.widget
        widget.set_state({"patch_word": "x" * 101})
        assert "at most 100 characters" in explorer.error
        assert widget.patch_word == ""
        widget.set_state({"patch_replacement": "blue\x00"})
        assert "control characters" in explorer.error
        assert widget.patch_replacement == ""
        widget.set_state({"grid": "patching", "patch_word": hostile, "patch_replacement": "blue"})
        assert widget.patch_word == hostile  # kept as text; the kernel refuses to run it
        assert f"word must be one word, got {hostile!r}" in explorer.error
        assert widget.grid_data is None
        assert widget.status == "idle"
        with pytest.raises(ValueError, match="has no word 'green'"):
            explorer.patching_grid("green", "blue")
        with pytest.raises(ValueError, match="control characters"):
            explorer.patching_grid("red", "bl\x1bue")
        # A hostile concept word gets its grid, the word verbatim in the caption's text.
        widget.set_state({"concept": hostile, "grid": "concept"})
        wait_until(lambda: _grid(explorer) is not None, WAIT_S * 3)
        assert f"“{hostile}”" in _grid(explorer).description
    finally:
        explorer.close()


@pytest.mark.slow
def test_cancel_leaves_no_grid(tiny_sd_pipe, tiny_trace, monkeypatch):
    from diffwidget.explain.activation_patching import ActivationPatching
    from diffwidget.explain.concept_maps import ConceptMaps

    started, release = threading.Event(), threading.Event()

    def held(original):
        def run(self, *args, progress=None, **kwargs):
            def paused(done, total):
                started.set()  # running: the cancel arrives between two progress calls
                release.wait(WAIT_S)
                return progress(done, total)

            return original(self, *args, progress=paused, **kwargs)

        return run

    monkeypatch.setattr(ActivationPatching, "run", held(ActivationPatching.run))
    monkeypatch.setattr(ConceptMaps, "attribute", held(ConceptMaps.attribute))
    explorer = Explorer(tiny_trace, pipe=tiny_sd_pipe)
    try:
        for start in (
            lambda: explorer.patching_grid("red", "blue", layers=LAYERS[:1], steps=[0]),
            lambda: explorer.concept_grid("dog"),
        ):
            started.clear()
            release.clear()
            future = start()
            assert started.wait(WAIT_S)
            explorer.cancel()
            release.set()
            assert future.result(WAIT_S) is None
            wait_until(lambda: explorer.status == "cancelled")
        assert explorer._grids.results == {}
        explorer.concept = "dog"
        monkeypatch.setattr(type(explorer._jobs), "submit", _refuse)
        # Opening either grid now finds nothing cached (and would compute it afresh).
        for source in ("patching", "concept"):
            with pytest.raises(AssertionError, match="a new run"):
                explorer.grid = source
            assert explorer.widget.grid_data is None
    finally:
        release.set()
        explorer.close()


def _refuse(*_args: Any, **_kwargs: Any) -> Any:
    raise AssertionError("a new run")


def test_grids_not_computed_say_how(make_explorer):
    explorer = make_explorer()  # no pipeline: nothing can be computed
    explorer.grid = "concept"
    assert explorer.error.startswith("the concept grid is not computed yet: compute it for a word")
    assert "explorer.concept_grid('dog')" in explorer.error
    explorer.grid = "patching"
    assert explorer.error.startswith("the causal grid is not computed yet: compute it for a word")
    assert explorer.widget.grid_data is None
    with pytest.raises(RuntimeError, match=r"Explorer\(trace, pipe=pipe\)"):
        explorer.patching_grid("red", "blue")
    # DF-CAM says it the same way.
    explorer.grid = "df_cam"
    assert explorer.error.startswith("DF-CAM is not computed yet: compute it at the steps")


def test_scalar_cells_round_trip_and_keep():
    values = np.array([[0.0, 0.5, np.nan], [1.0, 0.25, 0.75]], np.float32)
    scale = CellScale(0.0, 1.0, "share of seeds")
    codes = scale.position(values)[:, :, None, None, None]
    group = GridGroup(
        "mid_block",
        ["mid_block.a", "mid_block.b"],
        ["a", "b"],
        (1, 1),
        codes,
        np.ones((2, 3, 1), np.float32),
        values,
    )
    data = GridData("patching", [group], [0, 4, 8], [], "causal", scale)
    back = GridData.from_json(data.to_json())
    np.testing.assert_array_equal(back.groups[0].values, values)
    assert back.cells == scale
    assert back.groups[0].codes[:, :, 0, 0, 0].tolist() == [[0, 128, 0], [255, 64, 191]]
    kept = back.keep(steps=[8, 0], layers=["mid_block.b"])
    assert kept.groups[0].values.tolist() == [[0.75, 1.0]]
    assert kept.groups[0].codes.shape == (1, 2, 1, 1, 1)
    broken = data.to_json()
    broken["cells"] = None
    with pytest.raises(ValueError, match="scalar cells needs `cells`"):
        GridData.from_json(broken)
    with pytest.raises(ValueError, match="finite low < high"):
        CellScale(1.0, 1.0, "")
