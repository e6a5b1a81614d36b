"""A prompt switch started with the mouse in a real JupyterLab: filmstrip, commitment panel."""

from __future__ import annotations

import textwrap

import pytest

from bench.browserlib import run_all_cells, write_notebook
from tests.browser.helpers import wait_for_json

pytestmark = pytest.mark.browser

#: Steps of the trace: the button switches at k = 0..6 (seven branches per seed).
N_STEPS = 6
#: Seeds typed in the panel: the explorer's (0) and one the kernel traces first (1).
N_SEEDS = 2
SWITCH_WAIT_S = 120

SETUP = textwrap.dedent(
    f"""
    import json
    from pathlib import Path
    import diffwidget
    from diffwidget.widget.explorer import Explorer

    pipe = diffwidget.load_demo_pipeline("unet")
    explorer = Explorer(diffwidget.trace(pipe, "a large red circle on the left",
                                         num_inference_steps={N_STEPS}, seed=0), pipe)
    STATE = Path("switch.state.json")
    def dump(_=None):
        w, c = explorer.widget, explorer.commitment
        on_axis = [] if c is None else [c.committed_step(a) for a in c.attributes]
        STATE.write_text(json.dumps({{"status": w.status, "error": w.error, "step": w.step,
            "word": w.switch_word, "replacement": w.switch_replacement,
            "seeds": w.switch_seeds, "commitment": c is not None,
            "judged": [] if c is None else c.seeds.tolist(),
            "prompt_b": None if c is None else c.prompt_b,
            "crossings": [k for k in on_axis if k is not None and k < {N_STEPS}]}}))
    explorer.widget.observe(dump, names=["status", "error", "step", "switch"])
    dump()
    """
)


def test_lab_switch_button_draws_filmstrip_and_commitment_curves(jupyter_server, page):
    browser_page, console = page
    # Second: the same trace without its pipeline, whose button must say why it cannot run.
    cells = [SETUP, "explorer", "Explorer(explorer.trace)"]
    write_notebook(jupyter_server.root / "switch.ipynb", cells)
    browser_page.goto(jupyter_server.page_url("lab/tree/switch.ipynb"))
    run_all_cells(browser_page)
    browser_page.wait_for_selector(".dw-canvas[data-draws]")
    root, bare = browser_page.locator(".dw-root").first, browser_page.locator(".dw-root").nth(1)
    bare.locator(".dw-switch-reason").wait_for()
    assert bare.locator(".dw-switch-reason").inner_text() == (
        "a prompt switch needs the pipeline: Explorer(trace, pipe=pipe)"
    )
    assert bare.locator(".dw-switch-run").is_disabled()
    state = jupyter_server.root / "switch.state.json"
    # The embedded UNet settles the position early (colour only at the end): a crossing to mark.
    root.locator(".dw-switch-word").select_option("left")
    root.locator(".dw-switch-replacement").press_sequentially("right")
    assert root.locator(".dw-switch-seeds").input_value() == "1"
    root.locator(".dw-switch-seeds").fill(str(N_SEEDS))
    root.locator(".dw-switch-run").click()
    done = wait_for_json(state, lambda s: s["commitment"] and s["status"] == "done", SWITCH_WAIT_S)
    assert (done["word"], done["replacement"], done["error"]) == ("left", "right", "")
    assert (done["seeds"], done["judged"]) == (N_SEEDS, [0, 1])
    assert done["prompt_b"] == "a large red circle on the right"
    # The picture: one drawn thumbnail per switch step, the commitment panel and its marks.
    root.locator(".dw-thumb-canvas[data-drawn]").first.wait_for()
    assert f"of {N_SEEDS} seeds" in root.locator(".dw-switch-summary").inner_text()
    assert root.locator(".dw-thumb-canvas[data-drawn]").count() == N_STEPS + 1
    labels = root.locator(".dw-thumb-label").all_inner_texts()
    assert labels == [*(f"switch at {k}" for k in range(N_STEPS)), "no switch (A)"]
    assert root.locator('svg[data-group="commitment"] polyline').count() >= 1
    # A mark where the page's curve crosses for good, at the step the kernel finds.
    assert len(done["crossings"]) >= 1
    marks = root.locator('svg[data-group="commitment"] .dw-crossing')
    assert [marks.nth(i).get_attribute("data-step") for i in range(marks.count())] == [
        str(k) for k in done["crossings"]
    ]
    # A thumbnail moves the slider, and the one shown is highlighted.
    root.locator('.dw-thumb[data-step="2"]').click()
    wait_for_json(state, lambda s: s["step"] == 2)
    assert root.locator(".dw-thumb-current").get_attribute("data-step") == "2"
    assert console.widget_errors() == []
