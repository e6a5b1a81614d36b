"""The explorer as an instrument, in a real browser: colour scale, axes, grid, faithfulness,
the base64 fallback, malformed steps and hostile prompts in the export."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from bench.browserlib import run_code
from diffwidget.explain.results import SaliencyMap
from diffwidget.testing.synthetic import synthetic_trace
from diffwidget.widget.explorer import Explorer
from tests.browser.helpers import click_grid_cell
from tests.browser.helpers import wait_for_json as _wait_for_json
from tests.browser.test_browser_explorer import canvas_pixels, open_explorer

pytestmark = pytest.mark.browser

#: Seconds to wait for the kernel's state file: a loaded 2-core machine can be slow.
KERNEL_WAIT_S = 90


def wait_for_json(path, predicate):
    return _wait_for_json(path, predicate, timeout_s=KERNEL_WAIT_S)


#: Simulates a widget manager that loses binary buffers (colab-cdn-widget-manager#33): the
#: kernel sends every state without its buffers until the view asks for base64.
DROP_BUFFERS = textwrap.dedent(
    """
    import ipywidgets.widgets.widget as _ipw
    _keep = _ipw._remove_buffers
    def _drop_buffers(state):
        stripped, _paths, _buffers = _keep(state)
        return stripped, [], []
    _ipw._remove_buffers = _drop_buffers
    """
)

SCALE = """() => {
    const box = document.querySelector('.dw-scale');
    return box && !box.hidden ? {
        overlay: box.dataset.overlay, low: Number(box.dataset.low), high: Number(box.dataset.high),
        labels: [box.querySelector('.dw-scale-high').textContent,
                 box.querySelector('.dw-scale-low').textContent],
        label: box.getAttribute('aria-label'),
        meaning: document.querySelector('.dw-scale-meaning').textContent,
    } : null;
}"""


def svg_texts(page, selector):
    """Text of SVG elements (they have no innerText)."""
    return page.locator(selector).evaluate_all("ns => ns.map((n) => n.textContent)")


def test_lab_colour_scale_axes_and_labels_for_each_overlay(jupyter_server, page):
    browser_page, console = page
    state = open_explorer(jupyter_server, browser_page, "scale")
    assert browser_page.evaluate(SCALE) is None  # no overlay, no scale
    browser_page.fill(".dw-range", "12")
    browser_page.click('.dw-chip[data-token="2"]')
    browser_page.wait_for_selector('.dw-canvas[data-overlay="attention"]')
    wait_for_json(state, lambda s: s["step"] == 12 and s["overlay"] == "attention")
    scale = browser_page.evaluate(SCALE)
    assert scale["label"] == "colour scale"
    assert scale["overlay"] == "attention"
    assert scale["low"] == 0
    assert 0 < scale["high"] <= 1  # a probability: the map's own maximum
    assert "cross-attention probability" in scale["meaning"]
    assert "inferno" in scale["meaning"]
    # The top of the scale is the shown map's maximum, as the kernel computed it.
    run_code(
        browser_page,
        "Path(NAME + '.max.json').write_text(json.dumps(float("
        "explorer.attention_result.maps[12, 2].max())))",
    )
    expected = float((jupyter_server.root / "scale.max.json").read_text())
    assert scale["high"] == pytest.approx(expected, rel=0.01)
    # Curves: axes with ticks and a unit, one direct label per visible word, no legend box.
    mass = '.dw-plot[data-group="attention_mass"]'
    ticks = svg_texts(browser_page, f"{mass} .dw-xtick")
    assert ticks[0] == "0"
    assert ticks[-1] == "19"
    assert browser_page.locator(f"{mass} .dw-ytick").count() == 3
    assert svg_texts(browser_page, f"{mass} .dw-label") == ["a", "red", "circle", "left"]
    assert svg_texts(browser_page, f"{mass} .dw-label-selected") == ["red"]
    assert "(share of attention)" in browser_page.inner_text(".dw-panel-title")
    # Hover values: moving over a curve panel shows the step and every series' value.
    plot = browser_page.locator(mass)
    box = plot.bounding_box()
    browser_page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5)
    browser_page.wait_for_function(
        "() => /^step \\d+: a /.test(document.querySelector('.dw-hover').textContent)"
    )
    # DF-RISE: the scale shows the raw range; chips are dimmed (the map ignores the token).
    browser_page.select_option(".dw-overlay", "df_rise")
    browser_page.wait_for_selector('.dw-canvas[data-overlay="df_rise"]')
    scale = browser_page.evaluate(SCALE)
    assert scale["overlay"] == "df_rise"
    assert scale["low"] < scale["high"]
    assert "min–max normalised per step" in scale["meaning"]
    assert browser_page.locator(".dw-tokens.dw-tokens-dimmed").count() == 1
    # Every control and figure is named for screen readers.
    for name in ("overlay", "image", "overlay opacity", "denoising step", "colour scale",
                 "faithfulness", "prompt tokens", "status"):  # fmt: skip
        assert browser_page.locator(f'[aria-label="{name}"]').count() >= 1, name
    assert console.widget_errors() == []


def test_lab_grid_cell_click_moves_the_view_and_the_kernel(jupyter_server, page):
    browser_page, console = page
    state = open_explorer(jupyter_server, browser_page, "grid")
    browser_page.click(".dw-grid-toggle")
    wait_for_json(state, lambda s: s["grid"] == "attention")
    browser_page.wait_for_selector('figure.dw-grid[data-source="attention"]:not([hidden])')
    grid = browser_page.locator('[aria-label="layer × step grid"]')
    assert grid.get_attribute("data-rows") == "3"
    assert grid.get_attribute("data-groups") == "3"  # down_blocks.0, mid_block, up_blocks.1
    assert grid.get_attribute("data-columns") == "20"
    # Row 1 (mid_block), column 14.
    click_grid_cell(browser_page, 1, 14)
    wait_for_json(
        state,
        lambda s: (
            s["step"] == 14
            and s["overlay"] == "attention"
            and s["attention_layer"].startswith("mid_block")
        ),
    )
    browser_page.wait_for_function("() => document.querySelector('.dw-range').value === '14'")
    caption = "document.querySelector('.dw-caption').textContent"
    browser_page.wait_for_function(
        f"() => /mean of 1 (attn2 )?layer \\(grids 8×8\\)/.test({caption})"
    )
    assert browser_page.get_attribute("figure.dw-grid", "data-step") == "14"
    assert browser_page.locator(".dw-grid-row:not([hidden])").count() == 1
    # A token click redraws the grid with that token's cells, sent by the kernel.
    browser_page.click('.dw-chip[data-token="3"]')
    browser_page.wait_for_selector('figure.dw-grid[data-token="3"]')
    # DF-CAM's grid fills as maps are computed.
    run_code(browser_page, "for s in (3, 9): explorer.compute('df_cam', s).result(30)")
    browser_page.select_option(".dw-overlay", "df_cam")
    wait_for_json(state, lambda s: s["grid"] == "df_cam")
    # Selecting DF-CAM at step 14 computes it there too: columns are steps 3, 9 and 14.
    browser_page.wait_for_selector('figure.dw-grid[data-source="df_cam"][data-columns="3"]')
    click_grid_cell(browser_page, 2, 1)
    wait_for_json(state, lambda s: s["step"] == 9 and s["saliency_layer"] == "up_blocks.2")
    browser_page.wait_for_function(f"() => /showing layer up_blocks.2 only/.test({caption})")
    assert console.widget_errors() == []


def test_lab_faithfulness_from_the_view_shows_curves_and_auc(jupyter_server, page):
    browser_page, console = page
    state = open_explorer(jupyter_server, browser_page, "faith")
    browser_page.click('.dw-chip[data-token="3"]')
    browser_page.wait_for_selector('.dw-canvas[data-overlay="attention"]')
    panel = browser_page.locator('[aria-label="faithfulness"]')
    assert panel.get_attribute("data-computed") == "false"
    browser_page.click(".dw-faith-compute")
    wait_for_json(state, lambda s: s["faithfulness"] == 1 and s["status"] == "done")
    browser_page.wait_for_selector('figure.dw-faith[data-computed="true"]')
    names = browser_page.locator(".dw-faith-line").evaluate_all("ls => ls.map(l => l.dataset.name)")
    assert names == ["deletion", "insertion", "random deletion", "random insertion"]
    text = browser_page.inner_text(".dw-faith-auc")
    assert "deletion AUC" in text
    assert "vs random 0.75 ± 0.01 (lower is better)" in text
    assert "Operator “renoise”" in browser_page.inner_text(".dw-faith-operator")
    # Another step has no result yet; coming back shows it again.
    browser_page.fill(".dw-range", "5")
    browser_page.wait_for_selector('figure.dw-faith[data-computed="false"]')
    browser_page.fill(".dw-range", "0")
    browser_page.wait_for_selector('figure.dw-faith[data-computed="true"]')
    assert console.widget_errors() == []


def test_lab_base64_fallback_when_buffers_do_not_arrive(jupyter_server, page):
    browser_page, console = page
    state = open_explorer(jupyter_server, browser_page, "nobuffers", prelude=DROP_BUFFERS)
    wait_for_json(state, lambda s: s["transport"] == "base64")
    browser_page.wait_for_function(
        "() => Number(document.querySelector('.dw-canvas').dataset.draws) > 1"
    )
    pixels = canvas_pixels(browser_page)
    assert len(set(pixels)) > 1, "nothing was drawn from the base64 payloads"
    browser_page.click('.dw-chip[data-token="3"]')
    browser_page.wait_for_selector('.dw-canvas[data-overlay="attention"]')
    assert canvas_pixels(browser_page) != pixels
    # Payloads sent later (a computed overlay) arrive as base64 too.
    browser_page.select_option(".dw-overlay", "df_rise")
    browser_page.wait_for_selector('.dw-canvas[data-overlay="df_rise"]')
    errors = [e for e in console.widget_errors() if "did not arrive" not in e]
    assert errors == []


def test_lab_malformed_step_from_the_browser_is_drawn_at_a_valid_step(jupyter_server, page):
    browser_page, console = page
    state = open_explorer(jupyter_server, browser_page, "badstep")
    # A text box linked in the browser writes whatever is typed into the explorer's step.
    run_code(
        browser_page,
        "import ipywidgets\nbox = ipywidgets.Text()\n"
        "link = ipywidgets.jslink((box, 'value'), (explorer.widget, 'step'))\nbox",
    )
    browser_page.fill(".dw-range", "6")
    wait_for_json(state, lambda s: s["step"] == 6)
    browser_page.locator(".widget-text input").fill("abc")
    browser_page.locator(".widget-text input").press("Enter")
    wait_for_json(state, lambda s: "step must be an integer" in s["error"])
    cursor_x = browser_page.evaluate(
        "() => [...document.querySelectorAll('.dw-cursor')].map((c) => c.getAttribute('x1'))"
    )
    assert cursor_x
    assert all(x is not None and x != "NaN" and np.isfinite(float(x)) for x in cursor_x)
    assert "NaN" not in browser_page.inner_text(".dw-step-label")
    assert console.widget_errors() == []


HOSTILE = "a red circle <!--<script> </script><script>window.pwned = 1</script> & \u2028 >"


def test_export_with_a_hostile_prompt_renders_it_as_text(page, tmp_path):
    browser_page, console = page
    explorer = Explorer(synthetic_trace(prompt=HOSTILE))
    value = np.eye(16, dtype=np.float32)
    explorer.add_overlay("df_rise", 0, SaliencyMap("df_rise", 0, 999, value, value))
    path = explorer.to_html(tmp_path / "hostile.html")
    explorer.close()
    browser_page.route("http*://**", lambda route: route.abort())
    browser_page.goto(path.as_uri())
    browser_page.wait_for_selector(".dw-canvas[data-draws]")
    assert (
        browser_page.evaluate("() => document.querySelector('.dw-prompt').textContent") == HOSTILE
    )
    assert browser_page.evaluate("() => window.pwned") is None
    assert browser_page.title() == f"diffwidget: {HOSTILE}"
    browser_page.select_option(".dw-overlay", "df_rise")
    browser_page.wait_for_selector('.dw-canvas[data-overlay="df_rise"]')
    assert browser_page.evaluate(SCALE)["overlay"] == "df_rise"
    assert console.widget_errors() == []
