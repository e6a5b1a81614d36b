"""The concept-map overlay: a word typed in the view gets its map at the step shown."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest

from diffwidget.widget.concept_overlay import competing_words, prompt_words
from diffwidget.widget.explorer import Explorer
from diffwidget.widget.payloads import OverlaySet
from tests.widget.test_widget_explorer import WAIT_S, wait_until

pytestmark = pytest.mark.slow
#: One uint8 step of the sent maps.
CODE_STEP = 1 / 255


def _shown(explorer: Explorer) -> OverlaySet | None:
    value = explorer.widget.overlays.get("concept")
    return OverlaySet.from_json(value) if value is not None else None


def test_a_typed_word_gets_its_map_and_caption(tiny_sd_pipe, tiny_trace):
    from diffwidget.explain.concept_maps import ConceptMaps

    explorer = Explorer(tiny_trace, pipe=tiny_sd_pipe)
    try:
        widget = explorer.widget
        assert "concept" in widget.available
        widget.set_state({"step": 3})
        # What the view sends when a word is typed: the word, then the overlay.
        widget.set_state({"concept": "  dog ", "overlay": "concept"})
        assert explorer.concept == "dog"
        wait_until(lambda: _shown(explorer) is not None and widget.status == "done")
        shown = _shown(explorer)
        assert shown is not None
        assert shown.steps == [3]
        assert shown.maps.shape == (1, *tiny_trace.latent_shape)
        assert shown.ranges == [(0.0, 1.0)]
        caption = shown.descriptions[0]
        for part in ("“dog”", "step 3", "ConceptAttention output-space", "softmax over"):
            assert part in caption
        assert "(red, circle, left)" in caption
        assert "layers" in caption
        # The map is the method's own for that word and step, not stretched.
        words = ("red", "circle", "left", "dog")
        expected = ConceptMaps(words=words, steps=(3,), progress_bar=False).attribute(
            tiny_sd_pipe, tiny_trace
        )
        np.testing.assert_allclose(
            shown.maps[0], expected.per_step()[0, 3], atol=CODE_STEP / 2 + 1e-6
        )
        # Cached per word: asking again runs nothing.
        assert explorer.compute_concept("dog", 3).result(WAIT_S).step == 3
        # A prompt word's run is the prompt words' softmax: their maps share every cell.
        red = explorer.compute_concept("red", 3).result(WAIT_S)
        maps = [explorer.compute_concept(w, 3).result(0).map for w in ("red", "circle", "left")]
        np.testing.assert_allclose(np.sum(maps, axis=0), 1.0, atol=1e-5)
        assert red.map.shape == tiny_trace.latent_shape
        # Another word shows its own maps; coming back shows the cached ones.
        explorer.concept = "red"
        assert _shown(explorer).descriptions[0].startswith("concept map of “red”")
        explorer.concept = "dog"
        assert _shown(explorer).steps == [3]
    finally:
        explorer.close()


def test_a_hostile_word_is_text_and_bad_words_are_refused(tiny_sd_pipe, tiny_trace, monkeypatch):
    from diffwidget.explain.concept_maps import ConceptMaps
    from diffwidget.tracing.concept_words import UnknownConceptWarning

    original = ConceptMaps.attribute

    def unreadable(self, pipe, trace, progress=None):
        # The tiny CLIP tokenizer reads every word; a real one warns like this.
        if "zebra" in self.config.words:
            warnings.warn(
                "the tokenizer has no token for 'zebra'", UnknownConceptWarning, stacklevel=2
            )
        return original(self, pipe, trace, progress)

    monkeypatch.setattr(ConceptMaps, "attribute", unreadable)
    explorer = Explorer(tiny_trace, pipe=tiny_sd_pipe)
    hostile = "<img src=x onerror=alert(1)>"
    try:
        widget = explorer.widget
        widget.set_state({"concept": "x" * 101})
        assert "at most 100 characters" in explorer.error
        assert explorer.concept == ""
        widget.set_state({"concept": "dog\x00"})
        assert "control characters" in explorer.error
        with pytest.raises(ValueError, match="type a concept word"):
            explorer.compute_concept("   ")
        widget.set_state({"concept": hostile, "overlay": "concept"})
        wait_until(lambda: _shown(explorer) is not None)
        caption = _shown(explorer).descriptions[0]
        assert f"“{hostile}”" in caption  # verbatim, as text
        # A word the tokenizer cannot read is mapped, and the caption says so.
        unknown = explorer.compute_concept("zebra", 0).result(WAIT_S)
        assert "(note: the tokenizer has no token for 'zebra')" in unknown.caption
    finally:
        explorer.close()


def test_cancel_drops_the_concept_map(tiny_sd_pipe, tiny_trace, monkeypatch):
    from diffwidget.explain.concept_maps import ConceptMaps

    original = ConceptMaps.attribute
    started, release = threading.Event(), threading.Event()

    def held(self, pipe, trace, progress=None):
        started.set()  # running: cancel arrives while the step is computed
        release.wait(WAIT_S)
        return original(self, pipe, trace, progress)

    monkeypatch.setattr(ConceptMaps, "attribute", held)
    explorer = Explorer(tiny_trace, pipe=tiny_sd_pipe)
    try:
        future = explorer.compute_concept("cat", 1)
        queued = explorer.compute_concept("cat", 2)
        assert started.wait(WAIT_S)
        explorer.cancel()
        release.set()
        assert future.result(WAIT_S) is None  # stopped, nothing stored
        assert queued.cancelled()
        wait_until(lambda: explorer.status == "cancelled")
        assert _shown(explorer) is None
        assert explorer._concepts.get("cat", 1) is None
        explorer.overlay = "concept"
        with pytest.raises(ValueError, match="a concept map is of a word"):
            explorer.faithfulness()
    finally:
        release.set()
        explorer.close()


def test_concept_words_compete_with_the_prompt_words():
    assert prompt_words("A red circle, on the left.") == ["red", "circle", "left"]
    assert competing_words("a red circle", "red") == ["red", "circle"]
    assert competing_words("a red circle", "dog") == ["red", "circle", "dog"]
    with pytest.raises(ValueError, match="no content word"):
        competing_words("a the", "dog")


def test_the_view_cannot_compute_without_a_pipeline(make_explorer):
    explorer = make_explorer()
    assert "concept" not in explorer.widget.available
    explorer.widget.set_state({"concept": "dog", "overlay": "concept"})
    assert "Explorer(trace, pipe=pipe)" in explorer.error
    with pytest.raises(RuntimeError, match="Explorer\\(trace, pipe=pipe\\)"):
        explorer.compute_concept("dog")
