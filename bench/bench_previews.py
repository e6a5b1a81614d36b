"""Cost of per-step previews: traced with previews vs the plain pipeline, in the same run.

On the embedded model, one torch thread, the plain pipeline call and three traced variants
run interleaved (one warm-up each, then ``--repeats`` rounds), so load changes on a shared
machine hit all of them alike:

* ``trace``: no previews;
* ``trace_tiny``: previews by the shipped tiny preview decoder (the default, "auto");
* ``trace_vae``: previews by the full VAE (``preview_decoder="vae"``, the old default).

Reported: median wall and process-CPU seconds, each median over the plain one, and the
median of the per-round ratios (robust to drifting load). Goal: ``trace_tiny`` ≤ 1.10×.

One command (writes its section of bench/RESULTS_widget.md)::

    python bench/bench_previews.py --repeats 11 --out bench/RESULTS_widget.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import machine
from resultslib import write_section

from diffwidget.models.loader import DEFAULT_GUIDANCE, load_demo_pipeline
from diffwidget.tracing.generate import trace

PROMPT = "a large red circle on the left"
STEPS = 20


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="markdown file to update")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = load_demo_pipeline()
    common = {"num_inference_steps": STEPS, "guidance_scale": DEFAULT_GUIDANCE}

    def plain() -> Any:
        generator = torch.Generator("cpu").manual_seed(0)
        return pipe(PROMPT, generator=generator, output_type="np", **common)

    variants: dict[str, Callable[[], Any]] = {
        "plain": plain,
        "trace": lambda: trace(pipe, PROMPT, seed=0, decode_previews=False, **common),
        "trace_tiny": lambda: trace(pipe, PROMPT, seed=0, **common),
        "trace_vae": lambda: trace(pipe, PROMPT, seed=0, preview_decoder="vae", **common),
    }
    decoders = {}
    for name, fn in variants.items():  # warm-up
        out = fn()
        if name != "plain":
            decoders[name] = out.facts.preview_decoder
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            w, c = timed(fn)
            wall[name].append(w)
            cpu[name].append(c)
    info = machine()
    rows = []
    for name in variants:
        row = {"name": name, "decoder": decoders.get(name)}
        for label, times in (("wall", wall), ("cpu", cpu)):
            row[f"{label}_median"] = statistics.median(times[name])
            row[f"{label}_ratio"] = row[f"{label}_median"] / statistics.median(times["plain"])
            row[f"{label}_paired"] = statistics.median(
                t / p for t, p in zip(times[name], times["plain"], strict=True)
            )
        rows.append(row)
    command = "python bench/bench_previews.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    lines = [
        "## Per-step previews: traced vs plain (`bench/bench_previews.py`)",
        "",
        f"`{command.strip()}` — embedded model, {STEPS} steps, CFG {DEFAULT_GUIDANCE:g}, prompt "
        f"'{PROMPT}', {args.repeats} interleaved rounds after one warm-up each; "
        f"{info['cpu']}, {info['cores']} cores, torch threads {info['torch_threads']}, load "
        f"average at the end {info['load_average']}; torch {info['torch']}, diffusers "
        f"{info['diffusers']}. Goal: traced with previews ≤ 1.10× plain.",
        "",
        "| variant | previews by | wall median (s) | × plain | CPU median (s) | × plain "
        "| per-round CPU ratio, median |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['decoder'] or '–'} | {row['wall_median']:.3f} | "
            f"{row['wall_ratio']:.3f} | {row['cpu_median']:.3f} | {row['cpu_ratio']:.3f} | "
            f"{row['cpu_paired']:.3f} |"
        )
    section = "\n".join(lines)
    print(section)
    if args.out is not None:
        write_section(args.out, "bench_previews", section)
    return {"rows": rows, "wall": wall, "cpu": cpu}


if __name__ == "__main__":
    main()
