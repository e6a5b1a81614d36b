"""Standalone HTML from file:// with no kernel, and the bqplot cursor following the slider."""

from __future__ import annotations

import numpy as np
import pytest

from diffwidget.explain.results import SaliencyMap
from diffwidget.widget.explorer import Explorer
from tests.browser.helpers import run_all_cells, wait_for_json, write_notebook
from tests.browser.test_browser_explorer import SETUP, canvas_pixels
from tests.widget.synthetic import make_trace

pytestmark = pytest.mark.browser

#: Stroke of the bqplot step cursor (figures.CURSOR_COLOUR) as the browser reports it.
CURSOR_RGB = "rgb(25, 118, 210)"
CURSOR_X = f"""() => {{
    const paths = [...document.querySelectorAll('.bqplot path')];
    const cursor = paths.find((p) => getComputedStyle(p).stroke === '{CURSOR_RGB}');
    return cursor ? cursor.getBoundingClientRect().x : null;
}}"""


def test_exported_html_works_offline_from_file(page, tmp_path):
    browser_page, console = page
    explorer = Explorer(make_trace())
    value = np.zeros((16, 16), dtype=np.float32)
    value[4:12, 2:8] = 1.0
    explorer.add_overlay(
        "df_rise", 4, SaliencyMap("df_rise", 4, 0, value, value, {}, {"n_masks": 8})
    )
    path = explorer.to_html(tmp_path / "explorer.html")
    explorer.close()
    # Block every network request: the file must not need one.
    browser_page.route("http*://**", lambda route: route.abort())
    browser_page.goto(path.as_uri())
    browser_page.wait_for_selector(".dw-canvas[data-draws]")
    first = canvas_pixels(browser_page)
    assert len(set(first)) > 1
    browser_page.fill(".dw-range", "4")
    browser_page.wait_for_selector('.dw-canvas[data-step="4"]')
    assert canvas_pixels(browser_page) != first
    assert browser_page.inner_text(".dw-step-label").startswith("step 4 / 19")
    browser_page.click('.dw-chip[data-token="2"]')
    browser_page.wait_for_selector('.dw-canvas[data-overlay="attention"]')
    browser_page.select_option(".dw-overlay", "df_rise")
    browser_page.wait_for_selector('.dw-canvas[data-overlay="df_rise"]')
    assert "n_masks 8" in browser_page.inner_text(".dw-caption")
    assert console.widget_errors() == []


def test_bqplot_cursor_follows_the_slider(jupyter_server, page):
    browser_page, console = page
    jupyter_server.root.joinpath("trace.safetensors").exists() or make_trace().save(
        jupyter_server.root / "trace.safetensors"
    )
    cells = [
        "NAME = 'bq'\n" + SETUP,
        "explorer",
        "figure = explorer.figure('attention_mass')\nfigure",
    ]
    write_notebook(jupyter_server.root / "bq.ipynb", cells)
    browser_page.goto(jupyter_server.page_url("lab/tree/bq.ipynb"))
    run_all_cells(browser_page)
    browser_page.wait_for_selector(".dw-canvas[data-draws]")
    browser_page.wait_for_function(f"() => ({CURSOR_X})() !== null")
    start = browser_page.evaluate(CURSOR_X)
    browser_page.fill(".dw-range", "19")
    wait_for_json(jupyter_server.root / "bq.state.json", lambda s: s["step"] == 19)
    browser_page.wait_for_function(f"() => ({CURSOR_X})() > {start} + 100")
    browser_page.fill(".dw-range", "0")
    browser_page.wait_for_function(f"() => Math.abs(({CURSOR_X})() - {start}) < 2")
    assert console.widget_errors() == []
