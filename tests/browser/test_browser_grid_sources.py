"""The concept grid picked in a real JupyterLab: a typed word's map per layer and step."""

from __future__ import annotations

import textwrap

import pytest

from bench.browserlib import run_all_cells, write_notebook
from tests.browser.helpers import wait_for_json

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
            "rows": len(data.layers) if data else 0, "steps": data.steps if data else []}))
    explorer.widget.observe(dump, names=["grid", "concept", "status", "error", "grid_data"])
    dump()
    """
)


def test_lab_concept_grid_of_a_typed_word_is_drawn(jupyter_server, page):
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
    assert console.widget_errors() == []
