"""The embedded DiT's explorer in a real browser: JupyterLab with a live kernel, and the export.

The other browser tests drive a synthetic trace; these trace the shipped
``load_demo_pipeline("dit")`` (SD3 layout, joint attention on an 8×8 patch grid) and check
that the canvas shows exactly the trace's x̂0 previews, that the slider and a token chip move
the picture and the kernel's traits, and that DF-RISE runs on the DiT from the view.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from bench.browserlib import run_all_cells, write_notebook
from tests.browser.helpers import wait_for_json
from tests.browser.test_browser_explorer import canvas_pixels

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CAPTION = "a red circle on the left"
#: Fewer steps than the usual 20 keep the kernel's trace quick; the slider has this many.
STEPS = 10
#: DF-RISE masks: enough to produce a map, few enough for a 2-core CPU.
N_MASKS = 8
#: Token chip of "circle" (0 is the start token).
CIRCLE = 3
#: Seconds to wait for the kernel: loading the DiT, tracing and DF-RISE on a loaded CPU.
KERNEL_WAIT_S = 120

#: The view's pixels at the centre of each preview pixel (the base image is drawn without
#: smoothing, so with no overlay they are the preview's own values), as (rows, cols, 3).
CANVAS_RGB = """([rows, cols]) => {
    const c = document.querySelector('.dw-canvas');
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    const out = [];
    for (let y = 0; y < rows; y++) for (let x = 0; x < cols; x++) {
        const py = Math.floor((y + 0.5) * c.height / rows);
        const px = Math.floor((x + 0.5) * c.width / cols);
        const i = (py * c.width + px) * 4;
        out.push(d[i], d[i + 1], d[i + 2]);
    }
    return out;
}"""

KERNEL = textwrap.dedent(
    f"""
    import json
    from pathlib import Path

    import numpy as np

    import diffwidget
    from diffwidget.explain import DFRise

    pipe = diffwidget.load_demo_pipeline("dit")
    trace = diffwidget.trace(pipe, {CAPTION!r}, seed=0, num_inference_steps={STEPS})
    rise = DFRise(n_masks={N_MASKS}, progress_bar=False)
    explorer = diffwidget.Explorer(trace, pipe, methods={{"df_rise": rise}})
    np.save(NAME + ".previews.npy", trace.previews)
    STATE = Path(NAME + ".state.json")

    def dump(_=None):
        STATE.write_text(json.dumps({{
            "step": explorer.step, "token": explorer.token, "overlay": explorer.overlay,
            "status": explorer.status, "error": explorer.error,
            "rise_steps": sorted(explorer.cached("df_rise")),
        }}))

    explorer.widget.observe(dump, names=["step", "token", "overlay", "status", "error",
                                         "overlays"])
    dump()
    """
)


def canvas_rgb(page: Any, shape: tuple[int, ...]) -> np.ndarray:
    """The canvas sampled at the centres of an image of ``shape`` (rows, cols, 3)."""
    rows, cols = shape[:2]
    return np.asarray(page.evaluate(CANVAS_RGB, [rows, cols]), dtype=np.int16).reshape(
        rows, cols, 3
    )


def assert_red_circle_on_the_left(image: np.ndarray) -> None:
    """The final image of the caption: a red object in the left third, none on the right."""
    rgb = image.astype(np.int16)
    red = (rgb[..., 0] > 150) & (rgb[..., 0] - rgb[..., 1] > 80) & (rgb[..., 0] - rgb[..., 2] > 80)
    third = image.shape[1] // 3
    assert red[:, :third].sum() > 30, "no red object on the left"
    assert red[:, 2 * third :].sum() == 0, "red pixels on the right"


@pytest.fixture(scope="module")
def dit_explorer() -> Iterator[Any]:
    """The DiT traced in this process, with DF-RISE computed at one step."""
    import diffwidget
    from diffwidget.explain import DFRise

    pipe = diffwidget.load_demo_pipeline("dit")
    trace = diffwidget.trace(pipe, CAPTION, seed=0, num_inference_steps=STEPS)
    explorer = diffwidget.Explorer(
        trace, pipe, methods={"df_rise": DFRise(n_masks=N_MASKS, progress_bar=False)}
    )
    yield explorer
    explorer.close()


def test_lab_dit_slider_token_and_df_rise_drive_canvas_and_kernel(jupyter_server, page):
    browser_page, console = page
    name = "dit"
    write_notebook(
        jupyter_server.root / f"{name}.ipynb", [f"NAME = {name!r}\n" + KERNEL, "explorer"]
    )
    browser_page.goto(jupyter_server.page_url(f"lab/tree/{name}.ipynb"))
    run_all_cells(browser_page)
    browser_page.wait_for_selector(".dw-canvas[data-draws]")
    state_file = jupyter_server.root / f"{name}.state.json"
    state = wait_for_json(state_file, lambda s: s["overlay"] == "none", timeout_s=KERNEL_WAIT_S)
    previews = np.load(jupyter_server.root / f"{name}.previews.npy")
    assert previews.shape[0] == STEPS

    # The picture is the trace's x̂0 preview of the shown step, pixel for pixel.
    first = int(browser_page.get_attribute(".dw-canvas", "data-step"))
    assert first == state["step"]
    np.testing.assert_array_equal(canvas_rgb(browser_page, previews.shape[1:]), previews[first])
    assert_red_circle_on_the_left(previews[-1])

    # The slider: the canvas shows the new step's preview and the kernel's step follows.
    target = 3 if first != 3 else 6
    before = canvas_pixels(browser_page)
    browser_page.fill(".dw-range", str(target))
    browser_page.wait_for_selector(f'.dw-canvas[data-step="{target}"]')
    assert canvas_pixels(browser_page) != before
    np.testing.assert_array_equal(canvas_rgb(browser_page, previews.shape[1:]), previews[target])
    wait_for_json(state_file, lambda s: s["step"] == target, timeout_s=KERNEL_WAIT_S)

    # A token chip: the joint-attention map of "circle" on the 8×8 patch grid.
    plain = canvas_pixels(browser_page)
    browser_page.click(f'.dw-chip[data-token="{CIRCLE}"]')
    browser_page.wait_for_selector('.dw-canvas[data-overlay="attention"]')
    wait_for_json(
        state_file,
        lambda s: s["token"] == CIRCLE and s["overlay"] == "attention",
        timeout_s=KERNEL_WAIT_S,
    )
    with_attention = canvas_pixels(browser_page)
    assert with_attention != plain
    caption = browser_page.inner_text(".dw-caption")
    assert "Joint-attention" in caption
    assert "8×8" in caption

    # DF-RISE on the DiT, computed by the kernel on request from the view.
    browser_page.select_option(".dw-overlay", "df_rise")
    browser_page.wait_for_selector(
        '.dw-canvas[data-overlay="df_rise"]', timeout=KERNEL_WAIT_S * 1000
    )
    wait_for_json(
        state_file,
        lambda s: s["status"] == "done" and target in s["rise_steps"],
        timeout_s=KERNEL_WAIT_S,
    )
    assert f"n_masks {N_MASKS}" in browser_page.inner_text(".dw-caption")
    assert canvas_pixels(browser_page) not in (plain, with_attention)
    assert console.widget_errors() == []


def test_exported_dit_explorer_works_offline(dit_explorer, page, tmp_path):
    browser_page, console = page
    explorer = dit_explorer
    rise_step = 5
    result = explorer.compute("df_rise", rise_step).result()
    assert result.map.shape == explorer.trace.latent_shape
    path = explorer.to_html(tmp_path / "dit.html")
    browser_page.route("http*://**", lambda route: route.abort())
    browser_page.goto(path.as_uri())
    browser_page.wait_for_selector(".dw-canvas[data-draws]")
    previews = explorer.trace.previews
    shown = int(browser_page.get_attribute(".dw-canvas", "data-step"))
    np.testing.assert_array_equal(canvas_rgb(browser_page, previews.shape[1:]), previews[shown])

    browser_page.fill(".dw-range", str(rise_step))
    browser_page.wait_for_selector(f'.dw-canvas[data-step="{rise_step}"]')
    np.testing.assert_array_equal(canvas_rgb(browser_page, previews.shape[1:]), previews[rise_step])
    assert browser_page.inner_text(".dw-step-label").startswith(f"step {rise_step} / {STEPS - 1}")
    plain = canvas_pixels(browser_page)
    browser_page.click(f'.dw-chip[data-token="{CIRCLE}"]')
    browser_page.wait_for_selector('.dw-canvas[data-overlay="attention"]')
    assert canvas_pixels(browser_page) != plain
    assert "Joint-attention" in browser_page.inner_text(".dw-caption")
    browser_page.select_option(".dw-overlay", "df_rise")
    browser_page.wait_for_selector('.dw-canvas[data-overlay="df_rise"]')
    assert f"n_masks {N_MASKS}" in browser_page.inner_text(".dw-caption")
    assert browser_page.get_attribute(".dw-mark", "data-step") == str(rise_step)
    assert console.widget_errors() == []
