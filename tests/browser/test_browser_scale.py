"""Real model sizes in a real browser: SDXL's 70-layer grid and Flux's 64x64 attention.

Standalone exports of synthetic traces with the stored shapes of SDXL at 1024² (70 attention
layers in five blocks, 32x32 and 64x64 grids) and Flux at 1024² (57 layers on the 64x64 patch
grid of a 128x128 latent), opened from ``file://`` in headless chromium: the compressed data
block is inflated in the page, the grid draws only what is in view, and the overlay is
upsampled in the page from the grid it was recorded on.
"""

from __future__ import annotations

import pytest

from diffwidget.testing.synthetic import shaped_trace
from diffwidget.widget.explorer import Explorer
from tests.browser.helpers import click_grid_cell

pytestmark = pytest.mark.browser

#: Steps of the synthetic traces (the real runs have 50 and 28; layers and sizes are real).
STEPS = 6

GRID = """() => {
    const box = document.querySelector('figure.dw-grid');
    return {...box.dataset, hidden: box.hidden};
}"""

#: Pixels of the image canvas in a 24x24 sample grid (RGBA summed per sample).
PIXELS = """() => {
    const canvas = document.querySelector('.dw-canvas');
    const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
    const out = [];
    for (let y = 8; y < canvas.height; y += 16)
        for (let x = 8; x < canvas.width; x += 16) {
            const i = (y * canvas.width + x) * 4;
            out.push(data[i] + 256 * data[i + 1] + 65536 * data[i + 2]);
        }
    return out;
}"""


def _export(tmp_path, shape, **settings):
    explorer = Explorer(shaped_trace(shape, n_steps=STEPS))
    try:
        for name, value in settings.items():
            setattr(explorer, name, value)
        return explorer.to_html(tmp_path / f"{shape}.html")
    finally:
        explorer.close()


def test_sdxl_grid_and_overlay_render_from_a_compressed_file(page, tmp_path):
    browser_page, console = page
    path = _export(tmp_path, "sdxl", token=3, attention_layer="32x32", grid="attention")
    browser_page.route("http*://**", lambda route: route.abort())
    browser_page.goto(path.as_uri())
    browser_page.wait_for_selector('figure.dw-grid[data-source="attention"]:not([hidden])')
    grid = browser_page.evaluate(GRID)
    assert (grid["rows"], grid["groups"], grid["columns"]) == ("70", "5", str(STEPS))
    # Virtualised: only the cells in view are drawn, not 70 x steps.
    drawn = int(grid["drawnCells"])
    assert 0 < drawn < 70 * STEPS
    # Scrolled to the bottom, the last block's rows are drawn.
    browser_page.evaluate(
        "() => { const s = document.querySelector('.dw-grid-scroll');"
        " s.scrollTop = s.scrollHeight; }"
    )
    browser_page.wait_for_function(
        "() => document.querySelector('.dw-grid-canvas') && "
        "Number(document.querySelector('figure.dw-grid').dataset.drawnCells) > 0"
    )
    # Folding a block keeps its header and hides its rows.
    browser_page.evaluate("() => { document.querySelector('.dw-grid-scroll').scrollTop = 0; }")
    browser_page.wait_for_timeout(100)
    box = browser_page.locator(".dw-grid-scroll").bounding_box()
    browser_page.mouse.click(box["x"] + 40, box["y"] + 18 + 5)  # the first block's header
    tops = browser_page.evaluate(GRID)["rowTops"].split(",")
    assert tops[:4] == ["-1"] * 4  # down_blocks.1's four layers folded
    assert tops[4] != "-1"
    # The overlay: the exported 32x32 filter, drawn over the image and different per token.
    browser_page.select_option(".dw-overlay", "attention")
    browser_page.wait_for_selector('.dw-canvas[data-overlay="attention"]')
    with_overlay = browser_page.evaluate(PIXELS)
    browser_page.click('.dw-chip[data-token="11"]')  # "blue": another object
    browser_page.wait_for_selector('figure.dw-grid[data-token="11"]')
    assert browser_page.evaluate(PIXELS) != with_overlay
    # The file holds two filters (the default and 32x32) and switches between them offline.
    options = browser_page.locator(".dw-layer option").evaluate_all("os => os.map(o => o.value)")
    assert options == ["", "32x32"]
    browser_page.select_option(".dw-layer", "")
    caption = browser_page.inner_text(".dw-caption")
    assert "mean of 70 layers" in caption
    assert "64×64 grid of the finest layer" in caption
    click_grid_cell(browser_page, 30, 2)  # a mid_block row (rows count over folded blocks)
    browser_page.wait_for_function("() => document.querySelector('.dw-range').value === '2'")
    assert console.widget_errors() == []


def test_flux_attention_is_upsampled_in_the_page(page, tmp_path):
    browser_page, console = page
    path = _export(tmp_path, "flux", token=2, overlay="attention")
    browser_page.goto(path.as_uri())
    browser_page.wait_for_selector('.dw-canvas[data-overlay="attention"]')
    # Flux: 64x64 attention on a 128x128 latent; the page holds it at 64x64.
    grid = browser_page.evaluate(
        "() => window.diffwidgetModel.get('attention').maps.shape.slice(2)"
    )
    assert grid == [64, 64]
    pixels = browser_page.evaluate(PIXELS)
    assert len(set(pixels)) > 20  # a smooth map over the image, not one colour
    assert console.widget_errors() == []
