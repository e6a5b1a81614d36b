"""Benchmark the live page in a real browser against the Python baseline in the same run.

For one caption and seed, alternating so that machine load hits both alike:

* ``trace``: :func:`diffwidget.trace` on the embedded UNet, or with ``--model dit`` the
  embedded DiT (torch, one thread);
* ``pipeline``: the plain pipeline call, no tracing (torch, one thread);
* ``onnxruntime``: the exported graphs in Python's onnxruntime (one thread), the same loop
  the browser runs (:mod:`diffwidget.tracing.live_run`);
* ``browser``: a generation in headless chromium, onnxruntime-web's single-thread wasm
  (the page's own ``generate``, after a warm-up run).

Then, opening the page (from ``file://``, new browser context each time, navigation start
as zero): the first image drawn (the caption computed when the page was written, drawn
while the runtime loads), the runtime ready (graphs decoded, wasm compiled, sessions made)
and the first generation in the browser (the same caption generated again as soon as the
runtime is ready); then the download sizes (raw and gzip) of every
artifact, and the agreement with ``trace()`` on held-out scene-grammar captions (half of
them with their size words removed), each with its own seed.

Usage::

    python bench/bench_live.py                           # full run
    python bench/bench_live.py --repeats 2 --captions 4  # quick check
    python bench/bench_live.py --results bench/RESULTS_live.md
    python bench/bench_live.py --model dit --results bench/RESULTS_live.md
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import machine
from browserlib import CHROMIUM_ARGS

import diffwidget
from diffwidget.models.live_manifest import live_folder, load_live_manifest
from diffwidget.models.scenes import SceneWorld
from diffwidget.tracing.live_run import LiveGraphs, generate
from diffwidget.widget import live

CAPTION = "a large red circle on the left"
SEED = 0
#: Navigation-relative seconds of the moments a load measures, once the runtime is ready.
LOAD_TIMES = """async () => {
  const live = window.diffwidgetLive;
  await live.ready;
  await live.generate();
  const start = live.firstImageAt - live.firstImageMs;
  return { first_image: live.firstImageAt / 1000, precomputed: live.precomputed,
    ready: (start + live.loadMs) / 1000, first_live: live.firstLiveAt / 1000 };
}"""
READY = """() => window.diffwidgetLive
  && (window.diffwidgetLive.error || !isNaN(window.diffwidgetLive.firstImageMs))"""
GENERATE = """async ([caption, seed]) => {
  document.querySelector(".dwl-caption-input").value = caption;
  document.querySelector(".dwl-number").value = String(seed);
  const runs = await window.diffwidgetLive.generate();
  const run = runs[0];
  return {millis: run.millis, image: Array.from(run.image),
          previews: run.previews.map((p) => Array.from(p)),
          attention: Object.fromEntries(
            [...run.attention].map(([k, v]) => [k, v.map((a) => Array.from(a))]))};
}"""
LOAD_TIMEOUT_MS = 300_000


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _open(browser: Any, path: Path) -> tuple[Any, Any]:
    context = browser.new_context()
    page = context.new_page()
    page.route("http*://**", lambda route: route.abort())
    page.goto(path.as_uri())
    page.wait_for_function(READY, timeout=LOAD_TIMEOUT_MS)
    error = page.evaluate("() => window.diffwidgetLive.error")
    if error:
        raise RuntimeError(f"the page failed: {error}")
    return context, page


def sizes(page_file: Path, folder: Path) -> dict[str, Any]:
    """Raw and gzip (level 6, what web servers use) bytes of every artifact."""
    out: dict[str, Any] = {}
    files = {
        f.relative_to(folder).as_posix(): f
        for f in folder.rglob("*")
        if f.is_file() and "licenses" not in f.parts
    }
    for name, path in sorted(files.items()):
        data = path.read_bytes()
        out[name] = {"raw": len(data), "gzip": len(gzip.compress(data, 6))}
    out["folder total"] = {k: sum(v[k] for v in out.values()) for k in ("raw", "gzip")}
    data = page_file.read_bytes()
    out["single file"] = {"raw": len(data), "gzip": len(gzip.compress(data, 6))}
    widget = live.STATIC / "widget.js"
    out["widget.js (main bundle)"] = {
        "raw": widget.stat().st_size,
        "gzip": len(gzip.compress(widget.read_bytes(), 6)),
    }
    return out


def held_out(n: int) -> list[str]:
    """``n`` held-out captions; every second one without its size words."""
    captions = SceneWorld().held_out_captions(n)
    return [re.sub(r"\b(small|large) ", "", c) if i % 2 else c for i, c in enumerate(captions)]


def agreement(page: Any, pipe: Any, captions: list[str]) -> dict[str, Any]:
    worst_image = worst_preview = 0
    worst_attention = 0.0
    rows = []
    for i, caption in enumerate(captions):
        seed = 1000 + i
        ref = diffwidget.trace(pipe, caption, seed=seed)
        got = page.evaluate(GENERATE, [caption, seed])
        image = np.abs(np.asarray(got["image"]).reshape(ref.image.shape) - ref.image.astype(int))
        previews = np.abs(
            np.asarray(got["previews"]).reshape(ref.previews.shape) - ref.previews.astype(int)
        )
        attention = max(
            float(np.abs(np.asarray(got["attention"][k], np.float32).reshape(v.shape) - v).max())
            for k, v in ref.attention.items()
        )
        worst_image = max(worst_image, int(image.max()))
        worst_preview = max(worst_preview, int(previews.max()))
        worst_attention = max(worst_attention, attention)
        rows.append([caption, seed, int(image.max()), int(previews.max()), attention])
    return {
        "captions": len(captions),
        "with_size_words": sum(bool(re.search(r"\b(small|large)\b", c)) for c in captions),
        "max_image_diff_255": worst_image,
        "max_preview_diff_255": worst_preview,
        "max_attention_diff": worst_attention,
        "within_goal": worst_image <= 1 and worst_preview <= 1 and worst_attention <= 1e-3,
        "rows": rows,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    torch.set_num_threads(1)
    model = args.model
    pipe = diffwidget.load_demo_pipeline(model)
    graphs = LiveGraphs(model, threads=1)
    work = Path(tempfile.mkdtemp(prefix="diffwidget-bench-live-"))
    page_file = live.write_live_html(work / "live.html", prompt=CAPTION, models=model)
    folder = work / "site"
    live.write_live_folder(folder, prompt=CAPTION, models=model)
    result: dict[str, Any] = {
        "model": model,
        "machine": machine("cpu"),
        "load_before": os.getloadavg(),
        "manifest": {k: load_live_manifest(model).versions[k] for k in ("onnxruntime", "torch")},
        "onnxruntime_web": live.runtime_version(),
        "caption": CAPTION,
        "seed": SEED,
        "threads": {"torch": torch.get_num_threads(), "onnxruntime": 1, "browser wasm": 1},
    }
    times: dict[str, list[float]] = {"trace": [], "pipeline": [], "onnxruntime": [], "browser": []}
    loads: dict[str, list[float]] = {"first_image": [], "ready": [], "first_live": []}
    precomputed: list[bool] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
        try:
            context, page = _open(browser, page_file)
            page.evaluate(GENERATE, [CAPTION, SEED])  # warm-up
            guidance = pipe.recommended_guidance_scale
            for _ in range(args.repeats):
                times["trace"].append(_timed(lambda: diffwidget.trace(pipe, CAPTION, seed=SEED)))
                times["pipeline"].append(
                    _timed(
                        lambda: pipe(
                            CAPTION,
                            num_inference_steps=20,
                            guidance_scale=guidance,
                            generator=torch.Generator().manual_seed(SEED),
                            output_type="np",
                        )
                    )
                )
                times["onnxruntime"].append(
                    _timed(
                        lambda: generate(graphs, pipe, CAPTION, seed=SEED, guidance_scale=guidance)
                    )
                )
                times["browser"].append(page.evaluate(GENERATE, [CAPTION, SEED])["millis"] / 1000)
            result["agreement"] = agreement(page, pipe, held_out(args.captions))
            context.close()
            for _ in range(args.loads):
                context, page = _open(browser, page_file)
                moments = page.evaluate(LOAD_TIMES)
                precomputed.append(moments.pop("precomputed"))
                for key, value in moments.items():
                    loads[key].append(value)
                context.close()
        finally:
            browser.close()
    result["seconds"] = {k: statistics.median(v) for k, v in times.items()}
    result["all_seconds"] = times
    result["browser_over_trace"] = result["seconds"]["browser"] / result["seconds"]["trace"]
    result["load_s"] = {k: {"median": statistics.median(v), "all": v} for k, v in loads.items()}
    result["first_image_precomputed"] = all(precomputed)
    result["sizes"] = sizes(page_file, folder)
    result["load_after"] = os.getloadavg()
    shutil.rmtree(work)
    return result


def markdown(r: dict[str, Any]) -> str:
    s = r["seconds"]
    lines = [
        f"## Live page ({r['model']}), {time.strftime('%Y-%m-%d')} "
        f"({r['machine'].get('cpu', 'cpu')}, "
        f"load {r['load_before'][0]:.1f} before, {r['load_after'][0]:.1f} after)",
        "",
        f"Caption {r['caption']!r}, seed {r['seed']}, 20 steps, one thread each; "
        f"onnxruntime-web {r['onnxruntime_web']} (wasm, headless chromium), "
        f"onnxruntime {r['manifest']['onnxruntime']}, torch {r['manifest']['torch']}.",
        "",
        "| generation (median) | s | × trace() |",
        "|---|---|---|",
    ]
    for key in ("trace", "pipeline", "onnxruntime", "browser"):
        lines.append(f"| {key} | {s[key]:.2f} | {s[key] / s['trace']:.2f} |")
    first = (
        "computed when the page was written"
        if r["first_image_precomputed"]
        else "generated in the browser"
    )
    lines += [
        "",
        f"Opening the page (file://, seconds from navigation start, median of "
        f"{len(r['load_s']['first_image']['all'])} loads):",
        "",
        "| moment | s |",
        "|---|---|",
        f"| first image drawn ({first}) | {r['load_s']['first_image']['median']:.2f} |",
        f"| runtime ready (graphs decoded, wasm compiled, sessions made) | "
        f"{r['load_s']['ready']['median']:.2f} |",
        f"| first generation in the browser (default caption, as soon as ready) | "
        f"{r['load_s']['first_live']['median']:.2f} |",
        "",
        "| artifact | raw bytes | gzip bytes |",
        "|---|---|---|",
    ]
    for name, v in r["sizes"].items():
        lines.append(f"| {name} | {v['raw']:,} | {v['gzip']:,} |")
    a = r["agreement"]
    lines += [
        "",
        f"Agreement with trace() on {a['captions']} held-out captions ({a['with_size_words']} "
        f"with size words), one seed each: image max |Δ| {a['max_image_diff_255']}/255, "
        f"previews {a['max_preview_diff_255']}/255, attention {a['max_attention_diff']:.2e} "
        f"(goal: 1/255, 1/255, 1e-3: {'met' if a['within_goal'] else 'NOT met'}).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="unet", choices=["unet", "dit"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--captions", type=int, default=50)
    parser.add_argument("--results", default=None, help="append a section to this file")
    parser.add_argument("--json", default=None, help="write the raw results here")
    args = parser.parse_args(argv)
    manifest = live_folder(args.model) / "manifest.json"
    if not manifest.is_file() or not live.LIVE_JS.is_file():
        sys.exit("export the graphs and build js/ first (npm run build)")
    result = run(args)
    text = markdown(result)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    if args.results:
        with open(args.results, "a") as handle:
            handle.write("\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
