"""A concept word typed in the explorer in a real JupyterLab: its map is drawn, as text."""

from __future__ import annotations

import textwrap

import pytest

from bench.browserlib import run_all_cells, write_notebook
from tests.browser.helpers import wait_for_json

pytestmark = pytest.mark.browser

#: A word that is also markup: it must reach the page only as text.
HOSTILE = "<b id=injected>dog</b>"

SETUP = textwrap.dedent(
    """
    import json
    from pathlib import Path
    from diffwidget.testing.tiny import tiny_sd_pipeline
    from diffwidget.tracing.generate import trace
    from diffwidget.widget.explorer import Explorer

    pipe = tiny_sd_pipeline(tokenizer_dir="tokenizer")
    explorer = Explorer(trace(pipe, "a red circle on the left", num_inference_steps=3, seed=0),
                        pipe)
    STATE = Path("concept.state.json")
    def dump(_=None):
        w = explorer.widget
        STATE.write_text(json.dumps({"concept": w.concept, "status": w.status,
            "error": w.error, "overlay": w.overlay,
            "steps": (w.overlays.get("concept") or {}).get("steps", [])}))
    explorer.widget.observe(dump, names=["concept", "status", "error", "overlay", "overlays"])
    dump()
    """
)


def test_lab_typed_concept_word_is_mapped_and_shown_as_text(jupyter_server, page):
    browser_page, console = page
    write_notebook(jupyter_server.root / "concept.ipynb", [SETUP, "explorer"])
    browser_page.goto(jupyter_server.page_url("lab/tree/concept.ipynb"))
    run_all_cells(browser_page)
    browser_page.wait_for_selector(".dw-canvas[data-draws]")
    state = jupyter_server.root / "concept.state.json"
    browser_page.fill(".dw-concept-word", "dog")
    browser_page.click(".dw-concept-map")
    browser_page.wait_for_selector('.dw-canvas[data-overlay="concept"]')
    wait_for_json(state, lambda s: s["concept"] == "dog" and s["status"] == "done")
    caption = browser_page.inner_text(".dw-caption")
    assert "concept map of “dog”" in caption
    assert "ConceptAttention output-space scores" in caption
    # A word that is markup is mapped too, and shown only as text. Typed key by key: the
    # space goes into the box (not to the slider's play key) and Enter submits it.
    browser_page.fill(".dw-concept-word", "")
    browser_page.locator(".dw-concept-word").press_sequentially(HOSTILE)
    browser_page.press(".dw-concept-word", "Enter")
    wait_for_json(state, lambda s: s["concept"] == HOSTILE and s["status"] == "done", 120)
    browser_page.wait_for_function(
        "(word) => document.querySelector('.dw-caption').textContent.includes(word)", arg=HOSTILE
    )
    assert browser_page.query_selector("#injected") is None
    assert console.widget_errors() == []
