"""The explorer in a real JupyterLab and Notebook 7, driven by headless chromium."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from bench.browserlib import JupyterServer, run_all_cells, run_code, write_notebook
from diffwidget.testing.synthetic import synthetic_trace
from tests.browser.helpers import wait_for_json

pytestmark = pytest.mark.browser

#: The fake DF-RISE provider's number of progress updates and the seconds each takes.
FAKE_RISE_STEPS = 20
FAKE_RISE_DELAY_S = 0.1
#: Seconds the kernel is kept busy while the view is scrubbed.
BUSY_KERNEL_S = 8

SETUP = textwrap.dedent(
    f"""
    import json, time
    from pathlib import Path
    import numpy as np
    from diffwidget.explain.results import FaithfulnessCurves, FaithfulnessResult, SaliencyMap
    from diffwidget.tracing.trace import Trace
    from diffwidget.widget.explorer import Explorer

    class FakeRise:
        # Stands in for DF-RISE: a blob that moves with the step, with progress calls.
        name, label = "df_rise", "DF-RISE"

        def attribute(self, pipe, trace, step, progress=None):
            for done in range(1, {FAKE_RISE_STEPS} + 1):
                time.sleep({FAKE_RISE_DELAY_S})
                if progress(done, {FAKE_RISE_STEPS}) is False:
                    break
            h, w = trace.latent_shape
            yy, xx = np.mgrid[0:h, 0:w]
            blob = np.exp(-((yy - h / 2) ** 2 + (xx - (step % w)) ** 2) / 8.0).astype(np.float32)
            return SaliencyMap(method="df_rise", step=step, timestep=int(trace.timesteps[step]),
                               map=blob / blob.max(), raw=blob, meta={{"n_masks": 8, "p": 0.5}})

        def describe(self, result):
            return f"DF-RISE saliency (fake) at step {{result.step}} (n_masks 8)"

    class FakeCam:
        # Stands in for DF-CAM: three per-layer blobs at fixed places, no wait.
        name, label = "df_cam", "DF-CAM"

        def attribute(self, pipe, trace, step, progress=None):
            h, w = trace.latent_shape
            yy, xx = np.mgrid[0:h, 0:w]
            layers = {{
                f"up_blocks.{{k}}": np.exp(-((yy - h / 2) ** 2 + (xx - 3 - 4 * k) ** 2) / 6.0)
                .astype(np.float32)
                for k in range(3)
            }}
            raw = sum(layers.values())
            return SaliencyMap(method="df_cam", step=step, timestep=int(trace.timesteps[step]),
                               map=raw / raw.max(), raw=raw, layers=layers,
                               meta={{"layers": list(layers)}})

        def describe(self, result):
            return f"DF-CAM saliency (fake) at step {{result.step}}, 3 layers"

    class FakeEvaluator:
        # Insertion/deletion stand-in: deletion falls faster for a peakier map.
        def evaluate(self, pipe, trace, step, saliency, progress=None):
            frac = np.linspace(0, 1, 9, dtype=np.float32)
            for done in range(1, 5):
                time.sleep(0.05)
                progress(done, 4)
            peak = float(np.max(saliency) / (np.mean(saliency) + 1e-9))
            dele = np.exp(-frac * min(peak, 8)).astype(np.float32)
            ins = (1 - np.exp(-frac * 4)).astype(np.float32)
            curve = lambda d, i: FaithfulnessCurves(frac, d, i, float(np.trapezoid(d, frac)),
                                                    float(np.trapezoid(i, frac)))
            meta = {{"operator": "renoise", "operator_text": "fresh noise at the step's level",
                    "similarity": "ssim", "n_random": 3, "random_deletion_auc_sd": 0.01,
                    "random_insertion_auc_sd": 0.01}}
            baseline = curve(1 - 0.5 * frac, 0.5 + 0.5 * frac)
            return FaithfulnessResult(step, curve(dele, ins), baseline, meta)

    explorer = Explorer(Trace.load("trace.safetensors"),
                        methods={{"df_rise": FakeRise(), "df_cam": FakeCam()}},
                        faithfulness=FakeEvaluator())
    STATE = Path(NAME + ".state.json")
    WATCHED = ["step", "token", "overlay", "status", "error", "attention_layer",
               "saliency_layer", "grid", "faithfulness", "transport"]
    def dump(_=None):
        w = explorer.widget
        STATE.write_text(json.dumps({{"step": explorer.step, "token": explorer.token,
            "overlay": explorer.overlay, "status": explorer.status, "error": explorer.error,
            "attention_layer": w.attention_layer, "saliency_layer": w.saliency_layer,
            "grid": w.grid, "faithfulness": len(w.faithfulness), "transport": w.transport}}))
    explorer.widget.observe(dump, names=WATCHED)
    dump()
    """
)


def open_explorer(
    server: JupyterServer, page: Any, name: str, app: str = "lab", prelude: str = ""
) -> Path:
    """Write a notebook showing an explorer, open it, run it; return the kernel's state file.

    ``prelude`` runs first, in the same cell, before the explorer is created.
    """
    trace_path = server.root / "trace.safetensors"
    if not trace_path.exists():
        synthetic_trace().save(trace_path)
    setup = f"NAME = {name!r}\n" + prelude + "\n" + SETUP
    write_notebook(server.root / f"{name}.ipynb", [setup, "explorer"])
    path = f"lab/tree/{name}.ipynb" if app == "lab" else f"notebooks/{name}.ipynb"
    page.goto(server.page_url(path))
    run_all_cells(page)
    page.wait_for_selector(".dw-canvas[data-draws]")
    return server.root / f"{name}.state.json"


def canvas_pixels(page: Any) -> list[int]:
    """A coarse grey-level fingerprint of the canvas (64 samples)."""
    return page.evaluate(
        """() => {
            const c = document.querySelector('.dw-canvas');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            const out = [];
            for (let y = 0; y < 8; y++) for (let x = 0; x < 8; x++) {
                const i = ((y * 48 + 24) * c.width + (x * 48 + 24)) * 4;
                out.push(d[i] + d[i + 1] + d[i + 2]);
            }
            return out;
        }"""
    )


def test_lab_renders_and_slider_drives_canvas_and_kernel(jupyter_server, page):
    browser_page, console = page
    state = open_explorer(jupyter_server, browser_page, "slider")
    before = canvas_pixels(browser_page)
    assert max(before) > 0, "the canvas is black"
    assert len(set(before)) > 1, "the canvas is uniform"
    browser_page.fill(".dw-range", "15")
    browser_page.wait_for_selector('.dw-canvas[data-step="15"]')
    assert canvas_pixels(browser_page) != before
    wait_for_json(state, lambda s: s["step"] == 15)
    browser_page.focus(".dw-root")
    browser_page.keyboard.press("ArrowLeft")
    wait_for_json(state, lambda s: s["step"] == 14)
    browser_page.click(".dw-play")  # plays to the last step, then stops
    wait_for_json(state, lambda s: s["step"] == 19)
    browser_page.wait_for_function("() => document.querySelector('.dw-play').textContent === '▶'")
    assert console.widget_errors() == []


def test_lab_step_set_in_python_moves_slider(jupyter_server, page):
    browser_page, console = page
    open_explorer(jupyter_server, browser_page, "from_python")
    run_code(browser_page, "explorer.step = 7")
    browser_page.wait_for_function("() => document.querySelector('.dw-range').value === '7'")
    assert browser_page.get_attribute(".dw-canvas", "data-step") == "7"
    assert console.widget_errors() == []


def test_lab_token_click_switches_overlay_and_kernel_token(jupyter_server, page):
    browser_page, console = page
    state = open_explorer(jupyter_server, browser_page, "tokens")
    plain = canvas_pixels(browser_page)
    # Start/end/pad chips are hidden by default.
    assert browser_page.locator(".dw-chip-start").count() == 0
    browser_page.click('.dw-chip[data-token="3"]')
    browser_page.wait_for_selector('.dw-canvas[data-overlay="attention"]')
    wait_for_json(state, lambda s: s["token"] == 3 and s["overlay"] == "attention")
    with_circle = canvas_pixels(browser_page)
    assert with_circle != plain
    browser_page.click('.dw-chip[data-token="4"]')
    wait_for_json(state, lambda s: s["token"] == 4)
    assert canvas_pixels(browser_page) != with_circle
    assert "circle" in browser_page.inner_text(".dw-caption") or "left" in browser_page.inner_text(
        ".dw-caption"
    )
    assert console.widget_errors() == []


def test_lab_scrubbing_needs_no_kernel_round_trip(jupyter_server, page):
    browser_page, console = page
    state = open_explorer(jupyter_server, browser_page, "busy")
    run_code(browser_page, f"time.sleep({BUSY_KERNEL_S})", wait=False)
    browser_page.wait_for_function(
        "() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status"
        " === 'busy'"
    )
    started = time.monotonic()
    browser_page.fill(".dw-range", "13")
    browser_page.click('.dw-chip[data-token="2"]')
    browser_page.wait_for_selector('.dw-canvas[data-step="13"][data-overlay="attention"]')
    redraw_s = time.monotonic() - started
    assert redraw_s < BUSY_KERNEL_S / 2, "the view waited for the busy kernel"
    # The kernel catches up once the cell is done.
    wait_for_json(state, lambda s: s["step"] == 13 and s["token"] == 2, timeout_s=60)
    assert console.widget_errors() == []


def test_lab_df_rise_request_shows_progress_then_overlay(jupyter_server, page):
    browser_page, console = page
    state = open_explorer(jupyter_server, browser_page, "rise")
    browser_page.select_option(".dw-overlay", "df_rise")
    browser_page.wait_for_selector('.dw-status[data-status="running"]')
    browser_page.wait_for_function(
        "() => /computing… [1-9]/.test(document.querySelector('.dw-status-text').textContent)"
    )
    browser_page.wait_for_selector('.dw-canvas[data-overlay="df_rise"]')
    wait_for_json(state, lambda s: s["status"] == "done" and s["overlay"] == "df_rise")
    assert "DF-RISE saliency" in browser_page.inner_text(".dw-caption")
    # Moving to a step without a map requests it; the cancel button stops it.
    browser_page.fill(".dw-range", "6")
    browser_page.wait_for_selector(".dw-cancel:visible")
    browser_page.click(".dw-cancel")
    wait_for_json(state, lambda s: s["status"] == "cancelled")
    browser_page.wait_for_selector('.dw-status[data-status="cancelled"]')
    assert "not computed for step 6" in browser_page.inner_text(".dw-caption")
    assert console.widget_errors() == []


def test_lab_rejected_value_shows_error_and_kernel_keeps_working(jupyter_server, page):
    browser_page, console = page
    state = open_explorer(jupyter_server, browser_page, "invalid")
    run_code(browser_page, "explorer.widget.set_state({'step': 10**9, 'overlay': 'nope'})")
    browser_page.wait_for_function(
        "() => /out of range|unknown overlay/.test(document.querySelector('.dw-error').textContent)"
    )
    browser_page.fill(".dw-range", "3")
    wait_for_json(state, lambda s: s["step"] == 3)
    assert console.widget_errors() == []


def test_notebook7_smoke(notebook_server, page):
    browser_page, console = page
    # Notebook 7.6 itself logs an error from its shortcut-settings plugin when a kernel runs
    # any cell; record what a notebook without the widget logs and allow only that.
    write_notebook(notebook_server.root / "control.ipynb", ["1 + 1"])
    browser_page.goto(notebook_server.page_url("notebooks/control.ipynb"))
    run_all_cells(browser_page)
    browser_page.wait_for_selector(".jp-OutputArea-output")
    baseline = set(console.errors)
    console.errors.clear()
    state = open_explorer(notebook_server, browser_page, "nb7", app="notebook")
    assert len(set(canvas_pixels(browser_page))) > 1
    browser_page.fill(".dw-range", "9")
    wait_for_json(state, lambda s: s["step"] == 9)
    browser_page.click('.dw-chip[data-token="2"]')
    wait_for_json(state, lambda s: s["token"] == 2)
    assert set(console.widget_errors()) <= baseline
