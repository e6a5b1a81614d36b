"""Standalone HTML from file:// with no kernel, and the bqplot cursor following the slider."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.browserlib import run_all_cells, write_notebook
from diffwidget.explain.results import SaliencyMap
from diffwidget.testing.synthetic import synthetic_trace
from diffwidget.widget.explorer import Explorer
from tests.browser.helpers import wait_for_json
from tests.browser.test_browser_explorer import SETUP, canvas_pixels

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
    explorer = Explorer(synthetic_trace())
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
    # The slider marks the steps that have a precomputed map.
    assert browser_page.locator(".dw-mark").count() == 1
    assert browser_page.get_attribute(".dw-mark", "data-step") == "4"
    with browser_page.expect_download() as download:
        browser_page.click(".dw-png")
    png = Path(download.value.path()).read_bytes()
    assert png.startswith(b"\x89PNG")
    assert download.value.suggested_filename == "diffwidget-step-4.png"
    assert console.widget_errors() == []


def test_bqplot_cursor_follows_the_slider(jupyter_server, page):
    browser_page, console = page
    jupyter_server.root.joinpath("trace.safetensors").exists() or synthetic_trace().save(
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


def test_linked_explorers_move_together_in_the_browser(jupyter_server, page):
    browser_page, console = page
    if not (jupyter_server.root / "trace.safetensors").exists():
        synthetic_trace().save(jupyter_server.root / "trace.safetensors")
    cells = [
        "from diffwidget.tracing.trace import Trace\n"
        "from diffwidget.widget import Explorer, link_explorers\n"
        "trace = Trace.load('trace.safetensors')\n"
        "a, b = Explorer(trace), Explorer(trace)\n"
        "link = link_explorers(a, b)",
        "a",
        "b",
    ]
    write_notebook(jupyter_server.root / "linked.ipynb", cells)
    browser_page.goto(jupyter_server.page_url("lab/tree/linked.ipynb"))
    run_all_cells(browser_page)
    browser_page.wait_for_function("() => document.querySelectorAll('.dw-canvas').length === 2")
    browser_page.locator(".dw-range").first.fill("11")
    browser_page.wait_for_function(
        "() => [...document.querySelectorAll('.dw-canvas')].every((c) => c.dataset.step === '11')"
    )
    assert console.widget_errors() == []
