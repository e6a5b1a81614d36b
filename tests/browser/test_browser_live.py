"""The live page in headless chromium: generated in the browser, equal to the kernel's trace.

Every page here runs with the network blocked (requests to anything but the page's own file
or its own 127.0.0.1 folder are aborted and recorded): the page must need none.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import diffwidget
from diffwidget.cli.static_site import make_server
from diffwidget.widget import live
from diffwidget.widget.codecs import decode_array
from diffwidget.widget.explorer import Explorer
from diffwidget.widget.export import standalone_state
from diffwidget.widget.grid import attention_grid

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not live.LIVE_JS.is_file(), reason="needs npm run build in js/"),
]
#: First image after load on this 2-core CI box (the goal on a quiet machine is 3 s).
LOAD_TIMEOUT_MS = 180_000
CAPTION = "a small blue square above a yellow triangle"
SEED = 7
IMAGE_TOLERANCE = 1
ATTENTION_TOLERANCE = 1e-3
#: The noisy previews come from a least-squares fit (SVD in NumPy, normal equations here).
NOISY_TOLERANCE = 3
READY = """() => window.diffwidgetLive
  && (window.diffwidgetLive.error || !isNaN(window.diffwidgetLive.firstImageMs))"""
#: A page's state as plain JSON: payload buffers as number arrays.
STATE = """([index, grid]) => {
  const model = window.diffwidgetLive.panels[index].model;
  if (grid) model.set("grid", grid);
  const plain = (v) => {
    if (v instanceof DataView) {
      return Array.from(new Uint8Array(v.buffer, v.byteOffset, v.byteLength));
    }
    if (Array.isArray(v)) return v.map(plain);
    if (v && typeof v === "object") {
      return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, plain(x)]));
    }
    return v;
  };
  const keys = ["prompt", "tokens", "token_kinds", "timesteps", "token", "available",
    "descriptions", "layer_options", "scales", "previews", "noisy_previews", "attention",
    "curves", "grid_data"];
  return Object.fromEntries(keys.map((k) => [k, plain(model.get(k))]));
}"""
RUN = """(index) => {
  const run = window.diffwidgetLive.panels[index].run;
  return {
    image: Array.from(run.image),
    previews: run.previews.map((p) => Array.from(p)),
    attention: Object.fromEntries(
      [...run.attention].map(([k, v]) => [k, v.map((a) => Array.from(a))])),
    millis: run.millis,
  };
}"""


def _array(payload: dict[str, Any]) -> np.ndarray:
    """A payload read back from the page (data as a list of bytes) as NumPy."""
    decoded = dict(payload, data=bytes(payload["data"]))
    if "scale" in payload:
        decoded["scale"] = dict(payload["scale"], data=bytes(payload["scale"]["data"]))
    return decode_array(decoded)


@pytest.fixture(scope="module")
def live_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return live.write_live_html(tmp_path_factory.mktemp("live") / "live.html")


@pytest.fixture(scope="module")
def reference():
    pipe = diffwidget.load_demo_pipeline()
    return diffwidget.trace(pipe, CAPTION, seed=SEED)


def _offline(page: Any, allowed: str = "file:") -> list[str]:
    blocked: list[str] = []

    def handle(route: Any) -> None:
        if route.request.url.startswith(allowed):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", handle)
    return blocked


def _generate(page: Any, caption: str, seed: int) -> None:
    page.fill(".dwl-caption-input >> nth=0", caption)
    page.fill(".dwl-number", str(seed))
    page.evaluate("() => window.diffwidgetLive.generate()")


def same_payloads(browser_page: Any, reference: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The page's explorer payloads against the kernel's for ``reference`` (texts, previews)."""
    got = browser_page.evaluate(STATE, [0, "attention"])
    explorer = Explorer(reference)
    want = standalone_state(explorer.export_source().state)
    explorer.close()
    for key in ("prompt", "tokens", "token_kinds", "timesteps", "token", "available", "scales"):
        assert got[key] == want[key], key
    assert got["descriptions"] == want["descriptions"]
    assert got["layer_options"] == want["layer_options"]
    for key, tolerance in (("previews", IMAGE_TOLERANCE), ("noisy_previews", NOISY_TOLERANCE)):
        a, b = _array(got[key]).astype(int), _array(want[key]).astype(int)
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= tolerance, key
    for key in ("layer", "head", "grid", "steps", "description"):
        assert got["attention"][key] == want["attention"][key], key
    return got, want


def test_a_typed_caption_gives_the_kernels_image_offline(page, live_file, reference) -> None:
    browser_page, console = page
    blocked = _offline(browser_page)
    browser_page.goto(live_file.as_uri())
    browser_page.wait_for_function(READY, timeout=LOAD_TIMEOUT_MS)
    assert browser_page.evaluate("() => window.diffwidgetLive.error") == ""
    _generate(browser_page, CAPTION, SEED)
    run = browser_page.evaluate(RUN, 0)
    image = np.asarray(run["image"], np.int64).reshape(reference.image.shape)
    assert np.abs(image - reference.image).max() <= IMAGE_TOLERANCE
    previews = np.asarray(run["previews"], np.int64).reshape(reference.previews.shape)
    assert np.abs(previews - reference.previews).max() <= IMAGE_TOLERANCE
    for layer, maps in reference.attention.items():
        got = np.asarray(run["attention"][layer], np.float32).reshape(maps.shape)
        assert np.abs(got - maps.astype(np.float32)).max() <= ATTENTION_TOLERANCE, layer
    assert blocked == []
    assert console.errors == []


FIRST = """() => {
  const live = window.diffwidgetLive;
  const button = document.querySelector(".dwl-generate");
  return { precomputed: live.precomputed, models: live.models.length, disabled: button.disabled,
    label: button.textContent, strip: document.querySelectorAll(".dwl-strip canvas").length,
    status: document.querySelector(".dwl-status").textContent };
}"""


def first_equals_live(browser_page: Any, panel: int = 0, models: int = 1) -> None:
    """The precomputed run drawn at once equals the page's own generation of it."""
    ahead = browser_page.evaluate(RUN, panel)
    ahead_state = browser_page.evaluate(STATE, [panel, None])
    browser_page.evaluate("() => window.diffwidgetLive.ready")
    after = browser_page.evaluate(FIRST)
    assert after["disabled"] is False
    assert after["label"] == "Generate"
    assert after["models"] == models
    live_handle = "() => [window.diffwidgetLive.firstImageMs, window.diffwidgetLive.assetsMs]"
    # Drawn before the graphs were even decoded, let alone compiled.
    first_image, assets = browser_page.evaluate(live_handle)
    assert first_image < assets
    # The browser's own generation of the same caption at the same defaults.
    browser_page.evaluate("() => window.diffwidgetLive.generate()")
    live_run = browser_page.evaluate(RUN, panel)
    assert np.abs(np.subtract(ahead["image"], live_run["image"])).max() <= IMAGE_TOLERANCE
    assert np.abs(np.subtract(ahead["previews"], live_run["previews"])).max() <= IMAGE_TOLERANCE
    assert ahead["attention"].keys() == live_run["attention"].keys()
    for layer, maps in ahead["attention"].items():
        difference = np.abs(np.subtract(maps, live_run["attention"][layer])).max()
        # The page carries attention in 8 bits (scale: the layer's max / 255 <= 1 / 255).
        assert difference <= ATTENTION_TOLERANCE + 0.5 / 255, layer
    # The noisy previews come from the latents the page replays from the float16 noise.
    live_state = browser_page.evaluate(STATE, [panel, None])
    assert ahead_state["tokens"] == live_state["tokens"]
    assert ahead_state["timesteps"] == live_state["timesteps"]
    for key, tolerance in (("previews", IMAGE_TOLERANCE), ("noisy_previews", NOISY_TOLERANCE)):
        a = _array(ahead_state[key]).astype(np.int64)
        b = _array(live_state[key]).astype(np.int64)
        assert np.abs(a - b).max() <= tolerance, key


def test_the_first_image_is_drawn_before_the_runtime_and_equals_its_run(page, live_file) -> None:
    browser_page, console = page
    blocked = _offline(browser_page)
    browser_page.goto(live_file.as_uri())
    browser_page.wait_for_function(READY, timeout=LOAD_TIMEOUT_MS)
    first = browser_page.evaluate(FIRST)
    assert first["precomputed"] is True
    assert first["strip"] == 20
    first_equals_live(browser_page)
    assert blocked == []
    assert console.errors == []


def test_a_page_written_without_the_first_image_generates_it(page, tmp_path) -> None:
    browser_page, console = page
    path = live.write_live_html(tmp_path / "plain.html", first_image=False)
    _offline(browser_page)
    browser_page.goto(path.as_uri())
    browser_page.wait_for_function(READY, timeout=LOAD_TIMEOUT_MS)
    state = browser_page.evaluate(FIRST)
    assert state["precomputed"] is False
    assert state["models"] == 1
    assert state["strip"] == 20
    assert console.errors == []


def test_the_browser_fills_the_payloads_the_kernel_sends(page, live_file, reference) -> None:
    browser_page, _ = page
    _offline(browser_page)
    browser_page.goto(live_file.as_uri())
    browser_page.wait_for_function(READY, timeout=LOAD_TIMEOUT_MS)
    _generate(browser_page, CAPTION, SEED)
    got, want = same_payloads(browser_page, reference)
    a, b = _array(got["attention"]["maps"]), _array(want["attention"]["maps"])
    assert a.shape == b.shape
    # Both are uint8 codes of their own maximum: maps within the tolerance may round one
    # code apart.
    code = _array(want["attention"]["maps"]["scale"]).max() / 255
    assert np.abs(a - b).max() <= ATTENTION_TOLERANCE + code
    assert [s["name"] for s in got["curves"]["series"]] == reference.tokens
    curves = _array(got["curves"]["values"]) - _array(want["curves"]["values"])
    assert np.abs(curves).max() <= ATTENTION_TOLERANCE
    # The layer × step grid, which the kernel computes on request, made in the page.
    grid = attention_grid(reference).to_json()
    for key in ("source", "steps", "tokens", "per_token", "description"):
        assert got["grid_data"][key] == grid[key], key
    assert len(got["grid_data"]["groups"]) == len(grid["groups"])
    for mine, theirs in zip(got["grid_data"]["groups"], grid["groups"], strict=True):
        for key in ("name", "layers", "labels", "grid"):
            assert mine[key] == theirs[key], key
        a, b = _array(mine["maps"]), _array(theirs["maps"])
        code = _array(theirs["maps"]["scale"]).max() / 255
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= ATTENTION_TOLERANCE + code


def test_slider_chips_overlay_and_strip_work_on_browser_data(page, live_file) -> None:
    browser_page, console = page
    _offline(browser_page)
    browser_page.goto(live_file.as_uri())
    browser_page.wait_for_function(READY, timeout=LOAD_TIMEOUT_MS)
    browser_page.wait_for_selector(".dw-canvas[data-draws]")
    assert browser_page.locator(".dwl-strip canvas").count() == 20
    first = browser_page.get_attribute(".dw-canvas", "data-draws")
    browser_page.fill(".dw-range", "4")
    browser_page.wait_for_selector('.dw-canvas[data-step="4"]')
    assert browser_page.inner_text(".dw-step-label").startswith("step 4 / 19")
    assert browser_page.get_attribute(".dw-canvas", "data-draws") != first
    browser_page.click(".dwl-strip canvas >> nth=9")
    browser_page.wait_for_selector('.dw-canvas[data-step="9"]')
    assert "dwl-current" in (
        browser_page.get_attribute(".dwl-strip canvas >> nth=9", "class") or ""
    )
    browser_page.click('.dw-chip[data-token="3"]')
    browser_page.select_option(".dw-overlay", "attention")
    browser_page.wait_for_selector('.dw-canvas[data-overlay="attention"]')
    caption = browser_page.locator(".dw-caption")
    assert "Cross-attention probability" in caption.inner_text()
    panel = browser_page.locator(".dwl-panel >> nth=0")
    assert "dwl-unfolded" not in (panel.get_attribute("class") or "")
    caption.click()
    assert "dwl-unfolded" in (panel.get_attribute("class") or "")
    assert console.errors == []


def test_two_captions_share_one_slider(page, live_file) -> None:
    browser_page, _ = page
    _offline(browser_page)
    browser_page.goto(live_file.as_uri())
    browser_page.wait_for_function(READY, timeout=LOAD_TIMEOUT_MS)
    browser_page.check(".dwl-compare")
    browser_page.fill(".dwl-caption-input >> nth=1", "a large green circle on the right")
    browser_page.evaluate("() => window.diffwidgetLive.generate()")
    assert browser_page.locator(".dw-root").count() == 2
    browser_page.fill(".dw-range >> nth=0", "6")
    browser_page.wait_for_selector('.dwl-panel >> nth=1 >> .dw-canvas[data-step="6"]')
    words = browser_page.locator(".dwl-panel >> nth=1 >> .dw-prompt").inner_text()
    assert words == "a large green circle on the right"


def test_unknown_words_are_named_as_python_names_them(page, live_file) -> None:
    from diffwidget.models.prompts import unknown_words_message

    browser_page, _ = page
    _offline(browser_page)
    browser_page.goto(live_file.as_uri())
    browser_page.wait_for_function(READY, timeout=LOAD_TIMEOUT_MS)
    _generate(browser_page, "a cat on the left", 0)
    warning = browser_page.inner_text(".dwl-warning >> nth=0")
    assert warning == unknown_words_message(["cat"])
    # A control's change regenerates at once: ten steps give a strip of ten.
    browser_page.fill(".dwl-range >> nth=1", "10")
    browser_page.wait_for_function(
        "() => document.querySelectorAll('.dwl-panel .dwl-strip canvas').length === 10"
        " && window.diffwidgetLive.panels[0].run.timesteps.length === 10",
        timeout=LOAD_TIMEOUT_MS,
    )


def test_a_csp_without_wasm_says_why_in_one_line(page, live_file, tmp_path) -> None:
    browser_page, _ = page
    csp = '<meta http-equiv="Content-Security-Policy" content="script-src \'unsafe-inline\' blob:">'
    text = live_file.read_text().replace("<head>", "<head>\n" + csp, 1)
    strict = tmp_path / "strict.html"
    strict.write_text(text)
    _offline(browser_page)
    browser_page.goto(strict.as_uri())
    browser_page.wait_for_function(READY, timeout=LOAD_TIMEOUT_MS)
    status = browser_page.inner_text(".dwl-status")
    assert "Content-Security-Policy" in status
    assert "'wasm-unsafe-eval'" in status
    assert "\n" not in status.strip()
    assert browser_page.is_disabled(".dwl-generate")


@contextlib.contextmanager
def _serve(folder: Path, host: str = "http.server") -> Iterator[str]:
    """``folder`` on a generic static host (Python's), or on ``demo --classroom live``'s."""
    if host == "classroom":
        server: http.server.ThreadingHTTPServer = make_server(folder, "127.0.0.1", 0)
    else:
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("host", ["http.server", "classroom"])
def test_the_folder_works_on_a_static_host(page, tmp_path, host) -> None:
    browser_page, console = page
    live.write_live_folder(tmp_path / "site", prompt="a red circle in the centre")
    with _serve(tmp_path / "site", host) as url:
        blocked = _offline(browser_page, allowed=url)
        browser_page.goto(url)
        browser_page.wait_for_function(READY, timeout=LOAD_TIMEOUT_MS)
        assert browser_page.evaluate("() => window.diffwidgetLive.error") == ""
        browser_page.wait_for_selector(".dw-canvas[data-draws]")
    assert blocked == []
    assert console.errors == []


def test_the_notebook_view_generates_after_the_kernel_died(jupyter_server, page) -> None:
    from bench.browserlib import run_all_cells, write_notebook

    browser_page, console = page
    code = (
        "from diffwidget.widget.live_widget import LiveExplorer\n"
        "live = LiveExplorer('a large red circle on the left')\n"
        "live"
    )
    write_notebook(jupyter_server.root / "live.ipynb", [code])
    browser_page.goto(jupyter_server.page_url("lab/tree/live.ipynb"))
    run_all_cells(browser_page)
    browser_page.wait_for_function(READY, timeout=LOAD_TIMEOUT_MS)
    browser_page.wait_for_selector(".dwl-root .dw-canvas[data-draws]")
    browser_page.evaluate(
        "() => window.jupyterapp.shell.currentWidget.sessionContext.session.shutdown()"
    )
    browser_page.wait_for_function(
        "() => !window.jupyterapp.shell.currentWidget.sessionContext.session"
    )
    browser_page.fill(".dwl-caption-input >> nth=0", "a small green triangle at the top")
    browser_page.evaluate("() => window.diffwidgetLive.generate()")
    prompt = browser_page.locator(".dwl-panel >> nth=0 >> .dw-prompt").inner_text()
    assert prompt == "a small green triangle at the top"
    assert console.widget_errors() == []
