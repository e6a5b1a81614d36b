"""Capture the screenshots in this folder (run from the repository root).

    python docs/screenshots/capture.py            # tiny random-weight pipeline
    python docs/screenshots/capture.py --demo     # the embedded model (the pictures in the README)

Traces one prompt, computes DF-RISE and DF-CAM at one step and the faithfulness of the
DF-RISE map, and photographs the explorer in its standalone HTML export (attention, DF-RISE
with its faithfulness panel, DF-CAM on the noisy latent, the layer x step grid of attention
and of DF-CAM) and in JupyterLab with the linked bqplot figure.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

from bench.browserlib import CHROMIUM_ARGS, run_all_cells, serve, write_notebook  # noqa: E402

STEPS = 20
SHOWN_STEP = 12
#: DF-RISE masks for the pictures (the method's default is 500).
RISE_MASKS = 200


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", action="store_true", help="use the embedded model")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    from diffwidget.explain.faithfulness import InsertionDeletion
    from diffwidget.explain.rise import DFRise
    from diffwidget.tracing.generate import trace
    from diffwidget.widget.explorer import Explorer

    if args.demo:
        from diffwidget.models.loader import load_demo_pipeline

        pipe, prompt = load_demo_pipeline(), "a large red circle on the left"
    else:
        from diffwidget.testing.tiny import tiny_sd_pipeline

        pipe, prompt = tiny_sd_pipeline(), "a red circle on the left"
    traced = trace(pipe, prompt, num_inference_steps=STEPS, seed=0)
    explorer = Explorer(
        traced,
        pipe=pipe,
        methods={"df_rise": DFRise(n_masks=RISE_MASKS, progress_bar=False)},
        faithfulness=InsertionDeletion(operator="renoise"),
        noisy_decoder="vae",
    )
    for step in (4, 8, SHOWN_STEP, 16):
        explorer.compute("df_cam", step=step).result(600)
    explorer.compute("df_rise", step=SHOWN_STEP).result(600)
    explorer.step = SHOWN_STEP
    explorer.overlay = "df_rise"
    explorer.faithfulness().result(600)
    explorer.overlay = "attention"
    explorer.token = 3
    explorer.grid = "attention"
    with tempfile.TemporaryDirectory(prefix="diffwidget-shots-") as tmp:
        tmpdir = Path(tmp)
        trace_path = traced.save(tmpdir / "trace.safetensors")
        html = explorer.to_html(tmpdir / "explorer.html")
        explorer.overlay = "df_cam"
        explorer.grid = "df_cam"
        cam_html = explorer.to_html(tmpdir / "explorer_cam.html")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS
            )
            page = browser.new_page(viewport={"width": 1040, "height": 1000}, device_scale_factor=1)
            page.goto(html.as_uri())
            page.wait_for_selector(".dw-canvas[data-draws]")
            page.fill(".dw-range", str(SHOWN_STEP))
            page.locator(".dw-root").screenshot(path=str(HERE / "explorer_grid.png"))
            page.click(".dw-grid-toggle")  # close the grid for the single-view pictures
            page.locator(".dw-root").screenshot(path=str(HERE / "explorer_attention.png"))
            page.select_option(".dw-overlay", "df_rise")
            page.locator(".dw-root").screenshot(path=str(HERE / "explorer_df_rise.png"))
            page.select_option(".dw-overlay", "df_cam")
            page.select_option(".dw-mode", "noisy")
            page.locator(".dw-root").screenshot(path=str(HERE / "explorer_noisy_df_cam.png"))
            page.goto(cam_html.as_uri())
            page.wait_for_selector('figure.dw-grid[data-source="df_cam"]')
            page.fill(".dw-range", str(SHOWN_STEP))
            page.locator(".dw-root").screenshot(path=str(HERE / "explorer_grid_df_cam.png"))
            page.close()
            setup = (
                "from diffwidget.tracing.trace import Trace\n"
                "from diffwidget.widget.explorer import Explorer\n"
                f"explorer = Explorer(Trace.load({str(trace_path)!r}))\n"
                f"explorer.step = {SHOWN_STEP}; explorer.token = 3; explorer.overlay = 'attention'"
            )
            cells = [setup, "explorer", "explorer.figure('attention_mass')"]
            (tmpdir / "lab").mkdir()
            with serve(tmpdir / "lab", "lab") as server:
                write_notebook(server.root / "explorer.ipynb", cells)
                page = browser.new_page(viewport={"width": 1280, "height": 1100})
                page.set_default_timeout(120_000)
                page.goto(server.page_url("lab/tree/explorer.ipynb"))
                run_all_cells(page)
                page.wait_for_selector(".dw-canvas[data-draws]")
                page.wait_for_selector(".bqplot .line")
                page.wait_for_timeout(1500)  # let bqplot finish its transitions
                page.screenshot(path=str(HERE / "jupyterlab_explorer_bqplot.png"))
                page.close()
            browser.close()
    explorer.close()
    print("wrote", sorted(p.name for p in HERE.glob("*.png")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
