"""The concept and causal grids picked in a real JupyterLab: computed, drawn, explained."""

from __future__ import annotations

import re
import textwrap

import pytest

from bench.browserlib import run_all_cells, write_notebook
from tests.browser.helpers import _GRID_CELL_JS, wait_for_json

pytestmark = pytest.mark.browser

SETUP = textwrap.dedent(
    """
    import json
    from pathlib import Path
    from diffwidget.testing.tiny import tiny_sd_pipeline
    from diffwidget.tracing.generate import trace
    from diffwidget.widget.explorer import Explorer
    from diffwidget.widget.payloads import GridData

    pipe = tiny_sd_pipeline(tokenizer_dir="tokenizer")
    explorer = Explorer(trace(pipe, "a red circle on the left", num_inference_steps=3, seed=0),
                        pipe)
    STATE = Path("grid.state.json")
    def dump(_=None):
        w = explorer.widget
        data = GridData.from_json(w.grid_data) if w.grid_data is not None else None
        STATE.write_text(json.dumps({"grid": w.grid, "concept": w.concept, "status": w.status,
            "error": w.error, "source": data.source if data else None,
            "rows": len(data.layers) if data else 0, "steps": data.steps if data else [],
            "patch": [w.patch_word, w.patch_replacement]}))
    explorer.widget.observe(dump, names=["grid", "concept", "status", "error", "grid_data",
                                         "patch_word", "patch_replacement"])
    dump()
    """
)


def test_lab_concept_and_causal_grids_are_drawn(jupyter_server, page):
    browser_page, console = page
    write_notebook(jupyter_server.root / "grid.ipynb", [SETUP, "explorer"])
    browser_page.goto(jupyter_server.page_url("lab/tree/grid.ipynb"))
    run_all_cells(browser_page)
    browser_page.wait_for_selector(".dw-canvas[data-draws]")
    state = jupyter_server.root / "grid.state.json"
    browser_page.fill(".dw-concept-word", "dog")
    browser_page.click(".dw-concept-map")
    wait_for_json(state, lambda s: s["concept"] == "dog" and s["status"] == "done", 120)
    browser_page.select_option(".dw-grid-source", "concept")
    kernel = wait_for_json(state, lambda s: s["source"] == "concept" and s["rows"] > 0, 120)
    assert kernel["grid"] == "concept"
    assert kernel["steps"] == [0, 1, 2]
    assert kernel["error"] == ""
    grid = browser_page.wait_for_selector('.dw-grid[data-source="concept"]:not([hidden])')
    assert int(grid.get_attribute("data-rows")) == kernel["rows"]
    assert int(grid.get_attribute("data-columns")) == 3
    assert int(grid.get_attribute("data-drawn-cells")) > 0
    assert "Concept map of “dog” per attention layer" in browser_page.inner_text(".dw-grid-caption")
    # The picture: the first cell holds colour-mapped pixels (inferno never draws pure white).
    painted = browser_page.evaluate(
        """() => {
          const box = document.querySelector('.dw-grid');
          const canvas = box.querySelector('.dw-grid-canvas');
          const x = Number(box.dataset.labelPx) + 2;
          const y = Number(box.dataset.headerPx) + Number(box.dataset.rowTops.split(',')[0]) + 2;
          const data = canvas.getContext('2d').getImageData(x, y, 20, 20).data;
          let coloured = 0;
          for (let i = 0; i < data.length; i += 4)
            if (data[i] + data[i + 1] + data[i + 2] < 3 * 250) coloured += 1;
          return coloured;
        }"""
    )
    assert painted == 400
    assert browser_page.inner_text(".dw-grid-concept-note") == "the concept box's word: “dog”"

    # The causal grid: before its two words the page says how to compute it; then one
    # number per cell, each drawn as one colour, its value on hover.
    browser_page.select_option(".dw-grid-source", "patching")
    wait_for_json(state, lambda s: s["error"].startswith("the causal grid is not computed yet"))
    browser_page.wait_for_function(
        "() => document.querySelector('.dw-error').textContent.includes('not computed yet')"
    )
    browser_page.fill(".dw-patch-word", "red")
    browser_page.fill(".dw-patch-replacement", "blue")
    browser_page.click(".dw-patch-go")
    kernel = wait_for_json(state, lambda s: s["source"] == "patching" and s["rows"] > 0, 180)
    assert kernel["steps"] == [0]  # every 4th step of 3
    assert kernel["patch"] == ["red", "blue"]
    grid = browser_page.wait_for_selector('.dw-grid[data-source="patching"]:not([hidden])')
    # Only the cells in view are drawn (the box scrolls): some, at most one per row.
    assert 0 < int(grid.get_attribute("data-drawn-cells")) <= kernel["rows"]
    assert int(grid.get_attribute("data-rows")) == kernel["rows"]
    caption = browser_page.inner_text(".dw-grid-caption")
    assert "Causal grid (activation patching)" in caption
    assert "colour scale inferno, dark 0 to bright 1: share of seeds" in caption
    colours = browser_page.evaluate(
        """() => {
          const box = document.querySelector('.dw-grid');
          const canvas = box.querySelector('.dw-grid-canvas');
          const x = Number(box.dataset.labelPx);
          const y = Number(box.dataset.headerPx) + Number(box.dataset.rowTops.split(',')[0]);
          const cell = Number(box.dataset.pitchPx) - 2;
          const data = canvas.getContext('2d').getImageData(x, y, cell, cell).data;
          return new Set(Array.from({ length: data.length / 4 },
            (_, i) => data.slice(4 * i, 4 * i + 3).join(','))).size;
        }"""
    )
    assert colours == 1  # a single-colour square
    browser_page.locator("figure.dw-grid").scroll_into_view_if_needed()
    point = browser_page.evaluate(_GRID_CELL_JS, [0, 0])
    browser_page.wait_for_timeout(50)  # the scroll redraw runs on the next animation frame
    browser_page.mouse.move(point["x"], point["y"])
    browser_page.wait_for_function("() => document.querySelector('.dw-grid-hover').textContent")
    hover = browser_page.inner_text(".dw-grid-hover")
    assert re.fullmatch(r"layer down_blocks\.0\.resnets\.0 · step 0 · value (0|1)", hover), hover
    assert console.widget_errors() == []
