"""The live page with the embedded DiT in headless chromium: equal to the kernel's trace.

The DiT's graphs (joint text embeddings, MMDiT with joint attention, flow-matching Euler in
JavaScript) run from a file:// page with the network blocked; the reference is
:func:`diffwidget.trace` of the same caption and seed on the DiT pipeline. A page with both
models shows one caption through each, each equal to its own trace.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import diffwidget
from diffwidget.widget import live
from tests.browser.test_browser_live import (
    ATTENTION_TOLERANCE,
    CAPTION,
    IMAGE_TOLERANCE,
    LOAD_TIMEOUT_MS,
    READY,
    RUN,
    SEED,
    _generate,
    _offline,
    first_equals_live,
    same_payloads,
)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not live.LIVE_JS.is_file(), reason="needs npm run build in js/"),
]


@pytest.fixture(scope="module")
def dit_reference():
    return diffwidget.trace(diffwidget.load_demo_pipeline("dit"), CAPTION, seed=SEED)


def _same_run(run: dict, reference) -> None:
    image = np.asarray(run["image"], np.int64).reshape(reference.image.shape)
    assert np.abs(image - reference.image).max() <= IMAGE_TOLERANCE
    previews = np.asarray(run["previews"], np.int64).reshape(reference.previews.shape)
    assert np.abs(previews - reference.previews).max() <= IMAGE_TOLERANCE
    assert sorted(run["attention"]) == sorted(reference.attention)
    for layer, maps in reference.attention.items():
        got = np.asarray(run["attention"][layer], np.float32).reshape(maps.shape)
        assert np.abs(got - maps.astype(np.float32)).max() <= ATTENTION_TOLERANCE, layer


def test_a_typed_caption_gives_the_kernels_dit_image_offline(
    page, tmp_path: Path, dit_reference
) -> None:
    browser_page, console = page
    blocked = _offline(browser_page)
    path = live.write_live_html(tmp_path / "dit.html", models="dit")
    browser_page.goto(path.as_uri())
    browser_page.wait_for_function(READY, timeout=LOAD_TIMEOUT_MS)
    assert browser_page.evaluate("() => window.diffwidgetLive.error") == ""
    _generate(browser_page, CAPTION, SEED)
    _same_run(browser_page.evaluate(RUN, 0), dit_reference)
    # The explorer's payloads: the kernel's own for this trace (tokens with the T5 tail,
    # flow-matching timesteps, joint-attention texts and scales, previews, attention).
    same_payloads(browser_page, dit_reference)
    assert blocked == []
    assert console.errors == []


def test_one_caption_through_both_models_side_by_side(page, tmp_path: Path, dit_reference) -> None:
    browser_page, console = page
    blocked = _offline(browser_page)
    path = live.write_live_html(tmp_path / "both.html", models=("unet", "dit"))
    browser_page.goto(path.as_uri())
    browser_page.wait_for_function(READY, timeout=LOAD_TIMEOUT_MS)
    assert browser_page.evaluate("() => window.diffwidgetLive.error") == ""
    _generate(browser_page, CAPTION, SEED)
    unet_reference = diffwidget.trace(diffwidget.load_demo_pipeline("unet"), CAPTION, seed=SEED)
    _same_run(browser_page.evaluate(RUN, 0), unet_reference)
    _same_run(browser_page.evaluate(RUN, 1), dit_reference)
    labels = browser_page.locator(".dwl-model").all_inner_texts()
    assert labels[:2] == [live.MODEL_LABELS["unet"], live.MODEL_LABELS["dit"]]
    # One slider: moving the UNet's step moves the DiT's.
    browser_page.locator(".dw-range >> nth=0").fill("4")
    browser_page.wait_for_function("() => window.diffwidgetLive.panels[1].model.get('step') === 4")
    assert blocked == []
    assert console.errors == []


def test_the_dit_pages_first_image_is_drawn_at_once_and_equals_its_run(page, tmp_path) -> None:
    browser_page, console = page
    blocked = _offline(browser_page)
    path = live.write_live_html(tmp_path / "dit.html", models="dit", first_image=True)
    browser_page.goto(path.as_uri())
    browser_page.wait_for_function(READY, timeout=LOAD_TIMEOUT_MS)
    assert browser_page.evaluate("() => window.diffwidgetLive.precomputed") is True
    first_equals_live(browser_page)
    assert blocked == []
    assert console.errors == []
