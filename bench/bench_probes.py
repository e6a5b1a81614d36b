"""Concept curves on the embedded model: when are colour, shape, size and position decided?

Two independent answers, from one recorded run of one-object scene-world captions:

1. concept probes: cross-validated logistic regressions on pooled UNet activations of the
   conditional CFG half, held-out ROC-AUC per step (``diffwidget.explain.probes``);
2. x̂0 attribute curves: the scene reader applied to the decoded predicted clean image at
   each step, agreement with the final image (``diffwidget.explain.concepts``).

Baselines in the same run: the probes refitted on shuffled labels (what an AUC curve looks
like when nothing is decodable), and the plain pipeline on a subset of the prompts (the cost
of recording).

Usage::

    python bench/bench_probes.py                    # trained weights, 200 prompts, 20 steps
    python bench/bench_probes.py --random-weights --n-prompts 40   # plumbing only

Writes the figure to ``docs/concept_curves.png`` and prints a Markdown summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffwidget.explain.concepts import ConceptSet, x0_attribute_curves  # noqa: E402
from diffwidget.explain.probes import ConceptCurves, ConceptProbe  # noqa: E402
from diffwidget.tracing.activations import ActivationRecorder  # noqa: E402

THRESHOLDS = (0.75, 0.9)
BASELINE_PROMPTS = 24

# ---------------------------------------------------------------- figure (PIL only)
WIDTH, HEIGHT = 1200, 520
PANEL_W, PANEL_H = 480, 360
MARGIN_L, MARGIN_T = 70, 70
GAP = 110
COLOURS = {
    "colour": (214, 39, 40),
    "shape": (31, 119, 180),
    "size": (44, 160, 44),
    "position": (148, 103, 189),
}
GREY = (150, 150, 150)


def _rss_mb() -> float:
    # ru_maxrss is in KiB on Linux: the peak resident set of this process so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _panel(
    draw: Any,
    origin: tuple[int, int],
    curves: ConceptCurves,
    title: str,
    y_range: tuple[float, float],
    y_label: str,
    threshold: float,
    font: Any,
) -> None:
    x0, y0 = origin
    lo, hi = y_range
    n = curves.n_steps

    def px(step: float, value: float) -> tuple[float, float]:
        x = x0 + step / max(n - 1, 1) * PANEL_W
        y = y0 + PANEL_H - (np.clip(value, lo, hi) - lo) / (hi - lo) * PANEL_H
        return (x, y)

    draw.rectangle((x0, y0, x0 + PANEL_W, y0 + PANEL_H), outline=(0, 0, 0))
    ticks = np.linspace(lo, hi, 6)
    for value in ticks:
        _, y = px(0, value)
        draw.line((x0 - 5, y, x0, y), fill=(0, 0, 0))
        draw.line((x0, y, x0 + PANEL_W, y), fill=(235, 235, 235))
        draw.text((x0 - 40, y - 6), f"{value:.1f}", fill=(0, 0, 0), font=font)
    for step in range(0, n, max(n // 10, 1)):
        x, _ = px(step, lo)
        draw.line((x, y0 + PANEL_H, x, y0 + PANEL_H + 5), fill=(0, 0, 0))
        draw.text((x - 4, y0 + PANEL_H + 8), str(step), fill=(0, 0, 0), font=font)
    draw.text(
        (x0 + PANEL_W / 2 - 90, y0 + PANEL_H + 26),
        "step (0 = pure noise)",
        fill=(0, 0, 0),
        font=font,
    )
    draw.text((x0, y0 - 40), title, fill=(0, 0, 0), font=font)
    draw.text((x0, y0 - 22), y_label, fill=(90, 90, 90), font=font)
    _, y_thr = px(0, threshold)
    for x in range(x0, x0 + PANEL_W, 10):
        draw.line((x, y_thr, x + 5, y_thr), fill=GREY)
    for row, name in enumerate(curves.concepts):
        colour = COLOURS.get(name, (0, 0, 0))
        light = tuple(int(c + (255 - c) * 0.75) for c in colour)
        upper = [px(s, curves.band_high[row, s]) for s in range(n)]
        lower = [px(s, curves.band_low[row, s]) for s in range(n)]
        draw.polygon(upper + lower[::-1], fill=light)
    for row, name in enumerate(curves.concepts):
        colour = COLOURS.get(name, (0, 0, 0))
        points = [px(s, curves.curves[row, s]) for s in range(n)]
        draw.line(points, fill=colour, width=3)
        _, y_chance = px(0, float(curves.chance[row]))
        if curves.kind == "x0_agreement":  # chance differs per attribute: short ticks
            draw.line((x0 + PANEL_W - 18, y_chance, x0 + PANEL_W, y_chance), fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=colour)


def draw_figure(
    probe: ConceptCurves,
    x0: ConceptCurves | None,
    path: Path,
    caption: str,
    threshold: float,
) -> None:
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (WIDTH, HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1 has no sized default font
        font = ImageFont.load_default()
    _panel(
        draw,
        (MARGIN_L, MARGIN_T),
        probe,
        "Concept probes on UNet activations",
        (0.4, 1.0),
        "held-out ROC-AUC (band: mean ± sd over 5 folds; 0.5 = chance)",
        threshold,
        font,
    )
    if x0 is not None:
        _panel(
            draw,
            (MARGIN_L + PANEL_W + GAP, MARGIN_T),
            x0,
            "Attributes read from decoded x̂0",
            (0.0, 1.0),
            "agreement with the final image (band: 95 % Wilson; ticks: chance)",
            threshold,
            font,
        )
    legend_x = MARGIN_L
    legend_y = MARGIN_T + PANEL_H + 52
    for name in probe.concepts:
        colour = COLOURS.get(name, (0, 0, 0))
        draw.line((legend_x, legend_y + 7, legend_x + 24, legend_y + 7), fill=colour, width=3)
        draw.text((legend_x + 30, legend_y), name, fill=(0, 0, 0), font=font)
        legend_x += 120
    draw.line((legend_x, legend_y + 7, legend_x + 24, legend_y + 7), fill=GREY)
    draw.text((legend_x + 30, legend_y), f"threshold {threshold}", fill=(0, 0, 0), font=font)
    draw.text((MARGIN_L, HEIGHT - 24), caption, fill=(90, 90, 90), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


# ---------------------------------------------------------------- analysis
def _order_table(probe: ConceptCurves, x0: ConceptCurves | None) -> list[str]:
    lines = [
        "| threshold | probe: first step decodable (sustained) | probe order | "
        "x̂0: first step fixed (sustained) | x̂0 order |",
        "|---|---|---|---|---|",
    ]
    for threshold in THRESHOLDS:
        first = probe.first_step_above(threshold)
        cells = [
            str(threshold),
            ", ".join(f"{k} {v}" for k, v in first.items()),
            " < ".join(probe.order(threshold)),
        ]
        if x0 is not None:
            fixed = x0.first_step_above(threshold)
            cells += [
                ", ".join(f"{k} {v}" for k, v in fixed.items()),
                " < ".join(x0.order(threshold)),
            ]
        else:
            cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _chance(curves: ConceptCurves) -> dict[str, float]:
    return {c: round(float(v), 2) for c, v in zip(curves.concepts, curves.chance, strict=True)}


def _curve_table(curves: ConceptCurves, steps: list[int]) -> list[str]:
    lines = [
        "| concept | " + " | ".join(f"step {s}" for s in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for row, name in enumerate(curves.concepts):
        values = " | ".join(f"{curves.curves[row, s]:.2f}" for s in steps)
        lines.append(f"| {name} | {values} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-prompts", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="scene world and generator seeds")
    parser.add_argument("--cv", type=int, default=5)
    parser.add_argument("--pooling", choices=["mean", "grid"], default="grid")
    parser.add_argument("--random-weights", action="store_true", help="untrained architecture")
    parser.add_argument("--no-x0", action="store_true", help="skip the x̂0 attribute curves")
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "concept_curves.png")
    parser.add_argument("--json", type=Path, default=None, help="also save both curve sets")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if args.random_weights:
        from diffwidget.models.architecture import build_demo_pipeline

        pipe = build_demo_pipeline(seed=0)
        weights = "random weights (build_demo_pipeline)"
    else:
        import diffwidget

        pipe = diffwidget.load_demo_pipeline()
        weights = "trained weights (load_demo_pipeline)"
    timings["load pipeline"] = time.perf_counter() - start
    rss_loaded = _rss_mb()

    analysis_start = time.perf_counter()
    concepts = ConceptSet.from_scene_world(args.n_prompts, seed=args.seed)
    recorder = ActivationRecorder(
        pooling=args.pooling, batch_size=args.batch_size, decode_x0=not args.no_x0
    )
    t = time.perf_counter()
    record = concepts.record(pipe, recorder, num_inference_steps=args.steps)
    timings["generate + record activations" + ("" if args.no_x0 else " + decode x̂0")] = (
        time.perf_counter() - t
    )

    t = time.perf_counter()
    probe = ConceptProbe(cv=args.cv, seed=args.seed).fit(record, concepts, progress=True)
    timings["fit probes (4 concepts x steps x folds)"] = time.perf_counter() - t

    x0 = None
    if not args.no_x0:
        t = time.perf_counter()
        try:
            x0 = x0_attribute_curves(record, truth=concepts, progress=True)
        except ValueError as error:  # untrained weights draw nothing the reader can read
            print(f"no x̂0 attribute curves: {error}", file=sys.stderr)
        timings["read x̂0 attributes"] = time.perf_counter() - t
    timings["whole analysis"] = time.perf_counter() - analysis_start
    rss_peak = _rss_mb()

    # Baselines, outside the timed analysis.
    rng = np.random.default_rng(args.seed)
    shuffled = {
        k: list(rng.permutation(np.array(v, dtype=object))) for k, v in concepts.labels.items()
    }
    control = ConceptProbe(cv=args.cv, seed=args.seed).fit(record, shuffled)
    n_base = min(BASELINE_PROMPTS, args.n_prompts)
    t = time.perf_counter()
    generators = [torch.Generator().manual_seed(s) for s in concepts.seeds[:n_base]]
    pipe(concepts.prompts[:n_base], num_inference_steps=args.steps, generator=generators)
    plain_s = time.perf_counter() - t
    t = time.perf_counter()
    ActivationRecorder(
        pooling=args.pooling, batch_size=args.batch_size, decode_x0=not args.no_x0, progress=False
    ).record(
        pipe,
        concepts.prompts[:n_base],
        seeds=concepts.seeds[:n_base],
        num_inference_steps=args.steps,
    )
    recorded_s = time.perf_counter() - t

    threshold = THRESHOLDS[-1]
    caption = (
        f"Embedded model, {weights}; {args.n_prompts} one-object captions, {args.steps} "
        f"DPM-Solver++ steps, CFG 7.5; blocks {', '.join(record.blocks)} ({args.pooling} pooling)"
    )
    draw_figure(probe, x0, args.figure, caption, threshold)
    if args.json is not None:
        probe.save(args.json.with_name(args.json.stem + "_probe.json"))
        if x0 is not None:
            x0.save(args.json.with_name(args.json.stem + "_x0.json"))

    steps = sorted({0, 2, 4, 6, 8, 10, 12, 15, args.steps - 1} & set(range(args.steps)))
    out = [
        f"## Concept curves, {weights}",
        "",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch threads {args.threads}, 1-min load average at start {load_start[0]:.1f}, "
        f"at end {os.getloadavg()[0]:.1f} (the cores are shared)",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}",
        f"- prompts: {args.n_prompts} one-object scene-world captions (seed {args.seed}); class "
        f"counts {json.dumps(concepts.class_counts())}",
        f"- recorded: {', '.join(record.blocks)}, {args.pooling} pooling "
        f"({probe.meta['n_features']} features per step), conditional CFG half, "
        f"{record.n_steps} steps, timesteps {record.timesteps.tolist()}",
        f"- probes: {probe.meta['classifier'].splitlines()[0]}..., {args.cv}-fold stratified CV",
        "",
        "### Time and memory",
        "",
        "| phase | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in timings.items()],
        "",
        f"- peak RSS: {rss_loaded:.0f} MB after loading the pipeline, {rss_peak:.0f} MB at the "
        f"end of the analysis (+{rss_peak - rss_loaded:.0f} MB); activation record "
        f"{record.nbytes() / 2**20:.1f} MB (of which x̂0 images "
        f"{0 if record.x0_images is None else record.x0_images.nbytes / 2**20:.1f} MB)",
        f"- recording overhead on {n_base} prompts: plain pipeline {plain_s:.1f} s, recorded "
        f"{recorded_s:.1f} s (x{recorded_s / plain_s:.2f})",
        "",
        "### Concept-AUC curves (probe)",
        "",
        *_curve_table(probe, steps),
        "",
        "Shuffled-label control (same probes, labels permuted): max over steps "
        + ", ".join(f"{c} {control.curves[i].max():.2f}" for i, c in enumerate(control.concepts)),
        "",
    ]
    if x0 is not None:
        out += [
            "### x̂0 attribute agreement with the final image",
            "",
            *_curve_table(x0, steps),
            "",
            f"chance agreement: {json.dumps(_chance(x0))}"
            f"; final image matches its caption: "
            f"{json.dumps(x0.meta.get('final_matches_caption'))}; unreadable final images: "
            f"{x0.meta['n_unreadable_final']}",
            "",
        ]
    out += ["### Order", "", *_order_table(probe, x0), ""]
    print("\n".join(out))


if __name__ == "__main__":
    main()
