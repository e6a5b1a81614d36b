"""Measure the explorer in a real browser: scrubbing frame rate, first paint, payload size.

Run from the repository root (the front end must be built: ``npm run build`` in js/)::

    python bench/bench_browser.py                 # tiny random-weight pipeline, 20 steps
    python bench/bench_browser.py --trace demo    # the embedded model, once its weights exist
    python bench/bench_browser.py --trace demo-random  # its architecture, random weights
    python bench/bench_browser.py --trace run.safetensors
    python bench/bench_browser.py --trace sdxl    # synthetic, SDXL 1024² shapes, 50 steps
                                                  # (also sd15, flux: diffwidget.testing)

What is measured (each in the same run, on the same trace):

* payload: bytes of binary buffers in the synced state (what the comm sends besides JSON)
  plus the JSON text of the remaining traits;
* first paint: from the moment the display cell is executed in JupyterLab (kernel already
  warm, explorer built) to the first canvas draw of the view; and from navigation start to
  the first draw for the standalone HTML file (no kernel);
* scrubbing: the slider is moved one step per animation frame across all steps, forward
  and back (several sweeps), with the attention overlay on; frames per second = frames /
  wall time, capped by the display's frame rate. Separately, the mean cost of one redraw
  (image + overlay) from 500 back-to-back slider events, and the rate it would allow. Both
  again with the layer × step grid open (its data fetched on request, counted separately);
* the grid's redraw: the canvas time of one redraw after a token click (standalone file,
  every token's cells in the page) and the number of cells drawn (only those in view).

The results replace this script's section of ``--out`` (between its markers), so other
benchmarks can write their own sections in the same file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from browserlib import (  # noqa: E402
    CHROMIUM_ARGS,
    run_all_cells,
    run_code,
    serve,
    write_notebook,
)
from resultslib import write_section  # noqa: E402

from diffwidget.widget import schema  # noqa: E402
from diffwidget.widget.codecs import payload_nbytes  # noqa: E402
from diffwidget.widget.explorer import Explorer  # noqa: E402

#: Full forward+back sweeps over all steps per frame-rate measurement.
SWEEPS = 3
#: Repeats of the frame-rate measurement (the median is reported: the machine is shared).
REPEATS = 5
#: Back-to-back slider events for the per-redraw cost.
REDRAW_EVENTS = 500
STEPS = 20

SCRUB_JS = """async (sweeps) => {
    const input = document.querySelector('.dw-range');
    const canvas = document.querySelector('.dw-canvas');
    const n = Number(input.max) + 1;
    const order = [];
    for (let s = 0; s < sweeps; s++) {
        for (let i = 0; i < n; i++) order.push(i);
        for (let i = n - 1; i >= 0; i--) order.push(i);
    }
    const frame = () => new Promise((r) => requestAnimationFrame(r));
    await frame();
    const drawMs = [];
    const start = performance.now();
    for (const step of order) {
        input.value = String(step);
        input.dispatchEvent(new Event('input', { bubbles: true }));
        drawMs.push(Number(canvas.dataset.drawMs));
        await frame();
    }
    const seconds = (performance.now() - start) / 1000;
    const drawn = Number(canvas.dataset.step) === order[order.length - 1];
    return { frames: order.length, seconds, drawMs, drawn, overlay: canvas.dataset.overlay };
}"""

REDRAW_JS = """(events) => {
    const input = document.querySelector('.dw-range');
    const n = Number(input.max) + 1;
    const start = performance.now();
    for (let k = 0; k < events; k++) {
        input.value = String(k % n);
        input.dispatchEvent(new Event('input', { bubbles: true }));
    }
    return (performance.now() - start) / events;
}"""


def make_trace(kind: str) -> tuple[Any, Any, str]:
    """Return (trace, pipe, description)."""
    from diffwidget.testing.synthetic import SHAPES

    if kind in SHAPES:
        from diffwidget.testing.synthetic import shaped_trace

        traced = shaped_trace(kind)  # type: ignore[arg-type]
        label = (
            f"synthetic trace with the stored shapes of {kind} ({traced.n_steps} steps, "
            f"{len(traced.attention)} attention layers, {traced.previews.shape[1]}² previews)"
        )
        return traced, None, label
    if kind == "synthetic":
        from diffwidget.testing.synthetic import synthetic_trace

        return synthetic_trace(n_steps=STEPS), None, "synthetic NumPy trace, 64×64 previews"
    if kind.endswith(".safetensors"):
        from diffwidget.tracing.trace import Trace

        return Trace.load(kind), None, f"saved trace {kind}"
    from diffwidget.tracing.generate import trace

    if kind == "demo":
        from diffwidget.models.loader import load_demo_pipeline

        pipe = load_demo_pipeline()
        prompt, label = "a large red circle on the left", "embedded demo model"
    elif kind == "demo-random":
        from diffwidget.models.architecture import build_demo_pipeline

        pipe = build_demo_pipeline(seed=0)
        prompt = "a large red circle on the left"
        label = "embedded model architecture with random weights (sizes as shipped)"
    else:
        from diffwidget.testing.tiny import tiny_sd_pipeline

        pipe = tiny_sd_pipeline()
        prompt, label = "a red circle on the left", "tiny random-weight SD pipeline (tests)"
    traced = trace(pipe, prompt, num_inference_steps=STEPS, seed=0)
    return traced, pipe, f"{label}, {STEPS} steps, prompt '{prompt}'"


def payload_bytes(explorer: Explorer) -> dict[str, int]:
    """Binary and JSON bytes of the synced state."""
    state = {spec.name: getattr(explorer.widget, spec.name) for spec in schema.TRAITS}
    binary = sum(payload_nbytes(value) for value in state.values())

    def strip(value: Any) -> Any:
        if isinstance(value, (bytes, bytearray, memoryview)):
            return None
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    text = len(json.dumps(strip(state)).encode())
    per_trait = {spec.name: payload_nbytes(state[spec.name]) for spec in schema.TRAITS}
    return {"binary": binary, "json": text, "total": binary + text, **per_trait}


def open_grid(page: Any) -> None:
    """Open the layer × step grid from the view and wait for its cells."""
    page.click(".dw-grid-toggle")
    page.wait_for_selector('figure.dw-grid[data-source="attention"]:not([hidden])')


def scrub(page: Any) -> dict[str, float]:
    rates, draws = [], []
    for _ in range(REPEATS):
        result = page.evaluate(SCRUB_JS, SWEEPS)
        if not result["drawn"] or result["overlay"] != "attention":
            raise RuntimeError(f"scrub did not redraw with the overlay: {result}")
        rates.append(result["frames"] / result["seconds"])
        draws += [d for d in result["drawMs"] if d == d]  # drop NaN
    per_redraw = page.evaluate(REDRAW_JS, REDRAW_EVENTS)
    return {
        "frames": result["frames"],
        "fps": statistics.median(rates),
        "fps_min": min(rates),
        "fps_max": max(rates),
        "draw_ms_median": statistics.median(draws),
        "draw_ms_p95": sorted(draws)[int(0.95 * (len(draws) - 1))],
        "redraw_ms": per_redraw,
        "redraw_rate": 1000.0 / per_redraw,
    }


def measure_lab(browser: Any, trace_path: Path, workdir: Path) -> dict[str, float]:
    setup = (
        "from diffwidget.tracing.trace import Trace\n"
        "from diffwidget.widget.explorer import Explorer\n"
        f"explorer = Explorer(Trace.load({str(trace_path)!r}))\n"
        "explorer.overlay = 'attention'\n"
        "explorer.token = 2\n"
    )
    with serve(workdir, "lab") as server:
        write_notebook(server.root / "bench.ipynb", [setup])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        page.goto(server.page_url("lab/tree/bench.ipynb"))
        run_all_cells(page)
        page.wait_for_function(
            "() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status"
            " === 'idle' && document.querySelector('.jp-InputArea-prompt').textContent"
            ".includes('1')"
        )
        started = page.evaluate("() => performance.now()")
        run_code(page, "explorer")
        page.wait_for_selector(".dw-canvas[data-first-draw-at]")
        first = float(page.get_attribute(".dw-canvas", "data-first-draw-at"))
        out: dict[str, Any] = {"first_paint_ms": first - started, **scrub(page)}
        open_grid(page)
        out["grid"] = scrub(page)
        page.close()
    return out


#: Token chips clicked to time the grid's redraw (the page holds every token's cells).
TOKEN_CLICKS = 12

TOKEN_REDRAW_JS = """async (clicks) => {
    const chips = [...document.querySelectorAll('.dw-chip[data-token]')];
    const box = document.querySelector('figure.dw-grid');
    const ms = [], cells = [];
    for (let k = 0; k < clicks; k++) {
        const chip = chips[k % chips.length];
        chip.click();
        await new Promise((r) => requestAnimationFrame(r));
        if (box.dataset.token !== chip.dataset.token) throw new Error('grid not redrawn');
        ms.push(Number(box.dataset.drawMs));
        cells.push(Number(box.dataset.drawnCells));
    }
    ms.sort((a, b) => a - b);
    return { ms: ms[Math.floor(ms.length / 2)], cells: Math.max(...cells),
             rows: Number(box.dataset.rows), columns: Number(box.dataset.columns) };
}"""


def measure_html(browser: Any, html: Path) -> dict[str, float]:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.route("http*://**", lambda route: route.abort())
    page.goto(html.as_uri())
    page.wait_for_selector(".dw-canvas[data-first-draw-at]")
    first = float(page.get_attribute(".dw-canvas", "data-first-draw-at"))
    page.select_option(".dw-overlay", "attention")
    # The file was exported with the grid open: scrub with it, then close it and scrub again.
    page.wait_for_selector('figure.dw-grid[data-source="attention"]:not([hidden])')
    token_redraw = page.evaluate(TOKEN_REDRAW_JS, TOKEN_CLICKS)
    with_grid = scrub(page)
    page.click(".dw-grid-toggle")
    page.wait_for_selector("figure.dw-grid[hidden]", state="attached")
    out: dict[str, Any] = {"first_paint_ms": first, **scrub(page), "grid": with_grid}
    out["token_redraw"] = token_redraw
    page.close()
    return out


def versions(browser: Any) -> str:
    import anywidget
    import jupyterlab

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cores (load average {load:.1f} at start), torch threads "
        f"{torch.get_num_threads()} in the benchmark's process; "
        f"Python {platform.python_version()}, JupyterLab {jupyterlab.__version__}, "
        f"anywidget {anywidget.__version__}, Chromium {browser.version} headless"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--trace", default="tiny", help="tiny | demo | demo-random | synthetic | FILE"
    )
    parser.add_argument("--out", default=str(REPO / "bench" / "RESULTS_widget.md"))
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    started = time.perf_counter()
    traced, pipe, label = make_trace(args.trace)
    tick = time.perf_counter()
    explorer = Explorer(traced, pipe=pipe)  # attention for all steps, payloads encoded
    ready_s = time.perf_counter() - tick
    ready_vae_s = float("nan")
    if pipe is not None:
        tick = time.perf_counter()
        Explorer(traced, pipe=pipe, noisy_decoder="vae").close()
        ready_vae_s = time.perf_counter() - tick
    sizes = payload_bytes(explorer)
    explorer.grid = "attention"  # the grid's data, fetched on request, counted on its own
    grid_bytes = payload_bytes(explorer)["grid_data"]
    explorer.image_mode = "noisy"  # sent when first shown
    noisy_bytes = payload_bytes(explorer)["noisy_previews"]
    explorer.image_mode = "x0"
    with tempfile.TemporaryDirectory(prefix="diffwidget-bench-") as tmp:
        tmpdir = Path(tmp)
        trace_path = traced.save(tmpdir / "trace.safetensors")
        html = explorer.to_html(tmpdir / "explorer.html")  # exported with the grid open
        html_bytes = html.stat().st_size
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS
            )
            machine = versions(browser)
            (tmpdir / "lab").mkdir()
            lab = measure_lab(browser, trace_path, tmpdir / "lab")
            standalone = measure_html(browser, html)
            browser.close()
    explorer.close()
    rows = [
        ("JupyterLab", lab),
        ("standalone HTML (file://)", standalone),
    ]
    lines = [
        f"## Widget in the browser: {args.trace} (`bench/bench_browser.py`)",
        "",
        f"Trace: {label}. Machine: {machine}.",
        f"Command: `python bench/bench_browser.py --trace {args.trace}` "
        f"({time.perf_counter() - started:.0f} s in all).",
        "",
        f"Explorer ready (attention aggregated for all steps, payloads encoded, noisy "
        f"latents through the fitted linear map): {ready_s:.2f} s (goal ≤ 5 s on the "
        f'embedded model); with `noisy_decoder="vae"` (one VAE decode per step): '
        f"{ready_vae_s:.2f} s.",
        "",
        "### Payload (goal ≤ 2 MB for a 20-step trace)",
        "",
        "| part | bytes |",
        "|---|---:|",
    ]
    for key in ("previews", "noisy_previews", "attention", "curves", "overlays"):
        lines.append(f"| {key} (binary) | {sizes[key]:,} |")
    lines.append(f"| noisy_previews, sent when the view first shows them | {noisy_bytes:,} |")
    lines += [
        f"| other traits (JSON) | {sizes['json']:,} |",
        f"| **total synced state** | **{sizes['total']:,}** |",
        f"| layer × step grid of attention (binary, sent when the grid is opened) | "
        f"{grid_bytes:,} |",
        f"| **total with the grid open** | **{sizes['total'] + grid_bytes:,}** |",
        f"| standalone HTML file (JS + state with every token's grid, gzip + base64) | "
        f"{html_bytes:,} |",
        "",
        "### Scrubbing and first paint",
        "",
        f"Scrubbing: the slider moves one step per animation frame over all {traced.n_steps} "
        f"steps forward and back, {SWEEPS} sweeps per run, {REPEATS} runs, attention overlay "
        "on (goal ≥ 50 fps; the "
        "frame rate cannot exceed the display's, 60 Hz). Redraw cost: mean time of one "
        f"slider event with its full redraw, over {REDRAW_EVENTS} back-to-back events.",
        "",
        "| where | first paint (ms) | scrub fps, median (min–max) | frames per run | "
        "draw ms median / p95 | redraw ms | redraws/s possible |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        for label, s in ((name, r), (f"{name}, grid open", r.get("grid"))):
            if s is None:
                continue
            first = f"{r['first_paint_ms']:.0f}" if s is r else ""
            lines.append(
                f"| {label} | {first} | {s['fps']:.1f} "
                f"({s['fps_min']:.1f}–{s['fps_max']:.1f}) | {s['frames']} | "
                f"{s['draw_ms_median']:.2f} / {s['draw_ms_p95']:.2f} | {s['redraw_ms']:.3f} | "
                f"{s['redraw_rate']:.0f} |"
            )
    redraw = standalone["token_redraw"]
    lines += [
        "",
        "First paint in JupyterLab: from executing the display cell (kernel warm, explorer "
        "already built) to the first canvas draw; for the HTML file: from navigation start.",
        "",
        f"Grid redraw after a token click (standalone file, median of {TOKEN_CLICKS} clicks): "
        f"{redraw['ms']:.1f} ms for {redraw['cells']} cells in view of "
        f"{redraw['rows']} layers × {redraw['columns']} steps.",
        "",
    ]
    from diffwidget.testing.synthetic import SHAPES

    section = f"bench_browser_{args.trace}" if args.trace in SHAPES else "bench_browser"
    write_section(Path(args.out), section, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
