"""Concept curves on the embedded model: when are colour, shape, size and position decided?

Two independent answers, from one recorded run of one-object scene-world captions:

1. concept probes: cross-validated logistic regressions on pooled UNet activations, held-out
   ROC-AUC per step (``diffwidget.explain.probes``), on the conditional CFG half (which sees
   the prompt) and on the unconditional half (which only sees the latent);
2. x̂0 attribute curves: the scene reader applied to the decoded predicted clean image at
   each step, agreement with the final image (``diffwidget.explain.concepts``).

Baselines in the same run: the probes refitted on shuffled labels (what an AUC curve looks
like when nothing is decodable), and the plain pipeline on a subset of the prompts (the cost
of recording).

Usage::

    python bench/bench_probes.py                    # trained weights, 200 prompts, 20 steps
    python bench/bench_probes.py --random-weights --n-prompts 40   # plumbing only
    python bench/bench_probes.py --model dit --figure docs/concept_curves_dit.png

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
from diffwidget.tracing.activations import ActivationRecord, ActivationRecorder  # noqa: E402
from diffwidget.tracing.noise import PREDICTION_SOURCES  # noqa: E402

THRESHOLDS = (0.75, 0.9)
HALVES = ("cond", "uncond")
AUC_RANGE = (0.3, 1.0)  # held-out AUC dips below chance by noise; 0.3 keeps those visible
BASELINE_PROMPTS = 16

# ---------------------------------------------------------------- figure (PIL only)
COLUMNS = 2
ROW_H = 470  # panel height plus titles and step labels
PANEL_W, PANEL_H = 420, 360
MARGIN_L, MARGIN_T = 70, 70
GAP = 110
COLOURS = {
    "colour": (214, 39, 40),
    "shape": (31, 119, 180),
    "size": (44, 160, 44),
    "position": (148, 103, 189),
}
GREY = (120, 120, 120)
BAND_ALPHA = 50  # bands are translucent so that overlapping ones stay visible


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

    ticks = np.linspace(lo, hi, round((hi - lo) / 0.1) + 1)
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
    for row, name in enumerate(curves.concepts):
        colour = COLOURS.get(name, (0, 0, 0))
        upper = [px(s, curves.band_high[row, s]) for s in range(n)]
        lower = [px(s, curves.band_low[row, s]) for s in range(n)]
        draw.polygon(upper + lower[::-1], fill=(*colour, BAND_ALPHA))
    _, y_thr = px(0, threshold)
    for x in range(x0, x0 + PANEL_W, 10):
        draw.line((x, y_thr, x + 5, y_thr), fill=GREY, width=2)
    for row, name in enumerate(curves.concepts):
        colour = COLOURS.get(name, (0, 0, 0))
        points = [px(s, curves.curves[row, s]) for s in range(n)]
        draw.line(points, fill=colour, width=3)
        _, y_chance = px(0, float(curves.chance[row]))
        if curves.kind == "x0_agreement":  # chance differs per attribute: short ticks
            draw.line((x0 + PANEL_W - 18, y_chance, x0 + PANEL_W, y_chance), fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 2.5, y - 2.5, x + 2.5, y + 2.5), fill=colour)
    draw.rectangle((x0, y0, x0 + PANEL_W, y0 + PANEL_H), outline=(0, 0, 0))


def draw_figure(
    panels: list[tuple[ConceptCurves, str, str, tuple[float, float]]],
    path: Path,
    caption: str,
    threshold: float,
) -> None:
    """One panel per (curves, title, y label, y range), side by side, with one legend."""
    from PIL import Image, ImageDraw, ImageFont

    rows = -(-len(panels) // COLUMNS)
    width = MARGIN_L + min(len(panels), COLUMNS) * (PANEL_W + GAP)
    height = MARGIN_T + (rows - 1) * ROW_H + PANEL_H + 130
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image, "RGBA")  # RGBA mode blends translucent fills
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1 has no sized default font
        font = ImageFont.load_default()
    for k, (curves, title, label, y_range) in enumerate(panels):
        origin = (MARGIN_L + (k % COLUMNS) * (PANEL_W + GAP), MARGIN_T + (k // COLUMNS) * ROW_H)
        _panel(draw, origin, curves, title, y_range, label, threshold, font)
    legend_x = MARGIN_L
    legend_y = MARGIN_T + (rows - 1) * ROW_H + PANEL_H + 52
    for name in panels[0][0].concepts:
        colour = COLOURS.get(name, (0, 0, 0))
        draw.line((legend_x, legend_y + 7, legend_x + 24, legend_y + 7), fill=colour, width=3)
        draw.text((legend_x + 30, legend_y), name, fill=(0, 0, 0), font=font)
        legend_x += 120
    draw.line((legend_x, legend_y + 7, legend_x + 24, legend_y + 7), fill=GREY)
    draw.text((legend_x + 30, legend_y), f"threshold {threshold}", fill=(0, 0, 0), font=font)
    for k, line in enumerate(caption.split("\n")):
        draw.text((MARGIN_L, legend_y + 26 + 18 * k), line, fill=(90, 90, 90), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


# ---------------------------------------------------------------- analysis
def _order_table(named: dict[str, ConceptCurves]) -> list[str]:
    lines = [
        "| threshold | curves | first step at or above it for good (per concept) | order |",
        "|---|---|---|---|",
    ]
    for threshold in THRESHOLDS:
        for name, curves in named.items():
            first = curves.first_step_above(threshold)
            steps = ", ".join(f"{k} {'never' if v is None else v}" for k, v in first.items())
            lines.append(f"| {threshold} | {name} | {steps} | {_order_text(first)} |")
    return lines


def _order_text(first: dict[str, int | None]) -> str:
    """'colour = size < shape; never: position' from first steps."""
    reached = sorted({v for v in first.values() if v is not None})
    groups = [" = ".join(k for k, v in first.items() if v == step) for step in reached]
    never = [k for k, v in first.items() if v is None]
    text = " < ".join(groups)
    if never:
        text += ("; " if text else "") + "never: " + ", ".join(never)
    return text


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
    parser.add_argument("--model", choices=["unet", "dit"], default="unet")
    parser.add_argument(
        "--guidance-scale", type=float, default=None, help="default: the model's own"
    )
    parser.add_argument("--random-weights", action="store_true", help="untrained architecture")
    parser.add_argument("--weights", type=Path, default=None, help="a pipeline folder to load")
    parser.add_argument("--no-x0", action="store_true", help="skip the x̂0 attribute curves")
    parser.add_argument(
        "--x0-from",
        choices=PREDICTION_SOURCES,
        default="guided",
        help="noise prediction x̂0 is computed from (see ActivationRecorder)",
    )
    parser.add_argument("--figure", type=Path, default=ROOT / "docs" / "concept_curves.png")
    parser.add_argument("--json", type=Path, default=None, help="also save the curve sets")
    parser.add_argument(
        "--save-record", type=Path, default=None, help="save the activation record (.npz)"
    )
    parser.add_argument(
        "--load-record",
        type=Path,
        default=None,
        help="analyse a saved record instead of generating (development; timings then omit "
        "the generation)",
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if args.random_weights and args.model == "dit":
        from diffwidget.models.dit import build_dit_pipeline

        pipe = build_dit_pipeline(seed=0)
        weights = "random weights (build_dit_pipeline)"
    elif args.random_weights:
        from diffwidget.models.architecture import build_demo_pipeline

        pipe = build_demo_pipeline(seed=0)
        weights = "random weights (build_demo_pipeline)"
    else:
        import diffwidget

        pipe = diffwidget.load_demo_pipeline(args.model, path=args.weights)
        weights = f"trained weights ({args.weights or f'load_demo_pipeline({args.model!r})'})"
    if args.guidance_scale is None:
        args.guidance_scale = float(getattr(pipe, "recommended_guidance_scale", 3.0))
    timings["load pipeline"] = time.perf_counter() - start
    rss_loaded = _rss_mb()

    analysis_start = time.perf_counter()
    concepts = ConceptSet.from_scene_world(args.n_prompts, seed=args.seed)
    ConceptProbe(cv=args.cv).check(concepts)  # fail before generating anything
    settings: dict[str, Any] = {
        "pooling": args.pooling,
        "batch_size": args.batch_size,
        "decode_x0": not args.no_x0,
        "x0_from": args.x0_from,
        "halves": HALVES,
    }
    t = time.perf_counter()
    call: dict[str, Any] = {
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance_scale,
    }
    if args.load_record is not None:
        record = ActivationRecord.load(args.load_record)
        if record.prompts != concepts.prompts:
            raise SystemExit(f"{args.load_record} holds other prompts; drop --load-record")
    else:
        record = concepts.record(pipe, ActivationRecorder(**settings), **call)
    timings["generate + record both halves" + ("" if args.no_x0 else " + decode x̂0")] = (
        time.perf_counter() - t
    )
    if args.save_record is not None:
        t = time.perf_counter()
        record.save(args.save_record)
        analysis_start += time.perf_counter() - t  # saving is not part of the analysis

    probes: dict[str, ConceptCurves] = {}
    for half in HALVES:
        t = time.perf_counter()
        probe = ConceptProbe(cv=args.cv, seed=args.seed)
        probes[half] = probe.fit(record, concepts, half=half, progress=True)
        timings[f"fit probes, {half} half (concepts x steps x folds)"] = time.perf_counter() - t

    # Labels of what the model drew (read from the final images): the question the x̂0
    # curves answer, fair where the model does not follow its prompt.
    t = time.perf_counter()
    drawn = ConceptSet.from_images(record).drop_rare(args.cv)
    counts = drawn.class_counts()
    drawn.labels = {k: v for k, v in drawn.labels.items() if len(counts[k]) >= 2}
    probes["uncond, drawn"] = ConceptProbe(cv=args.cv, seed=args.seed).fit(
        record, drawn, half="uncond", progress=True
    )
    timings["read final images + fit probes on drawn labels, uncond half"] = time.perf_counter() - t

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
    # One control suffices: it shows the level of held-out AUC when labels carry nothing.
    control = ConceptProbe(cv=args.cv, seed=args.seed).fit(record, shuffled, half="cond")
    n_base = min(BASELINE_PROMPTS, args.n_prompts)
    t = time.perf_counter()
    generators = [torch.Generator().manual_seed(s) for s in concepts.seeds[:n_base]]
    pipe(concepts.prompts[:n_base], generator=generators, **call)
    plain_s = time.perf_counter() - t
    t = time.perf_counter()
    ActivationRecorder(**settings, progress=False).record(
        pipe,
        concepts.prompts[:n_base],
        seeds=concepts.seeds[:n_base],
        **call,
    )
    recorded_s = time.perf_counter() - t

    threshold = THRESHOLDS[-1]
    caption = (
        f"Embedded {args.model}, {weights}; {args.n_prompts} one-object captions, {args.steps} "
        f"{type(pipe.scheduler).__name__} steps, CFG {args.guidance_scale};\n"
        f"blocks {', '.join(record.blocks)} "
        f"({args.pooling} pooling)"
    )
    auc_label = f"held-out ROC-AUC (band: mean ± sd over {args.cv} folds; 0.5 = chance)"
    panels = [
        (probes["cond"], "Probes of caption labels, conditional half", auc_label, AUC_RANGE),
        (probes["uncond"], "Probes of caption labels, unconditional half", auc_label, AUC_RANGE),
        (
            probes["uncond, drawn"],
            "Probes of what the final image shows, unconditional half",
            auc_label,
            AUC_RANGE,
        ),
    ]
    if x0 is not None:
        panels.append(
            (
                x0,
                "Attributes read from the decoded x0 prediction, "
                + ("guided" if args.x0_from == "guided" else "conditional half"),
                "agreement with the final image (band: 95 % Wilson; ticks: chance)",
                (0.0, 1.0),
            )
        )
    draw_figure(panels, args.figure, caption, threshold)
    named = {
        "probe, caption labels, cond half": probes["cond"],
        "probe, caption labels, uncond half": probes["uncond"],
        "probe, drawn labels, uncond half": probes["uncond, drawn"],
    }
    if x0 is not None:
        named["x̂0 agreement"] = x0
    if args.json is not None:
        for name, curves in {**probes, "x0": x0}.items():
            if curves is not None:
                suffix = name.replace(", ", "_")
                curves.save(args.json.with_name(f"{args.json.stem}_{suffix}.json"))

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
        f"({probes['cond'].meta['n_features']} features per step and half), {record.n_steps} "
        f"steps, timesteps {record.timesteps.tolist()}",
        f"- probes: {probes['cond'].meta['classifier'].splitlines()[0]}..., {args.cv}-fold "
        "stratified CV",
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
    ]
    for name, curves in named.items():
        if curves.kind == "probe_auc":
            out += [f"### Concept-AUC curves, {name}", "", *_curve_table(curves, steps), ""]
            first = curves.first_step_above(THRESHOLDS[-1])
            out += [
                f"First step from which the AUC stays >= {THRESHOLDS[-1]}: "
                + ", ".join(f"{c} {'never' if v is None else v}" for c, v in first.items()),
                "",
            ]
    out += [
        "Drawn labels: classes with fewer than cv prompts left out: "
        + json.dumps(drawn.meta["dropped_classes"])
        + f"; labelled prompts per concept: {json.dumps(probes['uncond, drawn'].n_examples)}",
        "",
    ]
    out += [
        "Shuffled-label control (conditional half, labels permuted across prompts): mean "
        "over steps "
        + ", ".join(
            f"{c} {control.curves[i].mean():.2f} (max {control.curves[i].max():.2f})"
            for i, c in enumerate(control.concepts)
        ),
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
    out += ["### Order", "", *_order_table(named), ""]
    print("\n".join(out))


if __name__ == "__main__":
    main()
