"""Extra peak memory of ``trace()`` over the plain pipeline: CPU, one process per call.

Run from the repository root::

    nice -n 10 python bench/bench_trace_memory.py                  # SD 1.5 512², SDXL 1024²
    python bench/bench_trace_memory.py --shapes sd15 --steps 2     # a quicker check

Shapes (random weights, published configs, nothing downloaded):

* ``sd15``: Stable Diffusion 1.5 at 512², full width (860 M-parameter UNet, SD VAE, a
  12-layer CLIP text encoder), DPM-Solver++;
* ``sdxl``: SDXL-base's block layout at 1024² (70 ``attn2`` layers on a 128² latent, 2048-wide
  text context) with the UNet's channels narrowed 10x and two layers per text encoder
  (``benchlib.SDXL_UNET_NARROW``), and SDXL's full VAE, Euler.

Variants, each called once per fresh process (same prompt, seed, size, steps, CFG 7.5,
``output_type="np"``, one torch thread): ``plain`` (the pipeline alone) and ``trace``
(``diffwidget.trace`` with its defaults: default tokens, previews on), for this checkout and,
with ``--baseline REF``, for the package as committed at ``REF`` (extracted with
``git archive``; the same script measures it).

What is measured: the process's resident-memory high-water mark during the one call —
``VmHWM`` of ``/proc/self/status``, reset through ``/proc/self/clear_refs`` right before the
call — minus the resident memory before it (``VmRSS``): the call's extra peak, model weights
excluded. The goal: ``trace``'s extra peak ≤ 1.25x ``plain``'s.

The results replace this script's section of ``bench/RESULTS_tracing.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import child_json, proc_status

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
SHAPES = ("sd15", "sdxl")
LABELS = {"sd15": "SD 1.5 512²", "sdxl": "SDXL-layout 1024²"}
SIZES = {"sd15": 512, "sdxl": 1024}
BUILDERS = {"sd15": "sd15", "sdxl": "sdxl_narrow"}
VARIANTS = ("plain", "trace")
#: Goal: trace()'s extra peak at most this multiple of the plain pipeline's.
GOAL_RATIO = 1.25
#: Every measuring process runs on one thread.
PROMPT = "a red circle on the left"
MB = 2**20


def measure(shape: str, variant: str, steps: int) -> dict[str, Any]:
    """One call of ``variant`` at ``shape`` in this process: extra peak RSS and time."""
    import gc

    import torch

    # The version measured is the one on PYTHONPATH: imported before bench_tracing puts
    # this checkout first on sys.path.
    import diffwidget.tracing.generate

    sys.path.insert(0, str(BENCH))
    import bench_tracing

    out: dict[str, Any] = {"package": str(Path(diffwidget.__file__).parent)}
    torch.set_num_threads(1)
    pipe = bench_tracing.BUILDERS[BUILDERS[shape]]("cpu", torch.float32)
    size = SIZES[shape]
    common = {"num_inference_steps": steps, "height": size, "width": size, "guidance_scale": 7.5}

    def call() -> Any:
        if variant == "plain":
            generator = torch.Generator("cpu").manual_seed(0)
            return pipe(PROMPT, generator=generator, output_type="np", **common)
        from diffwidget.tracing.generate import trace

        return trace(pipe, PROMPT, seed=0, **common)

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = proc_status("VmRSS")
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    out["wall_s"], out["cpu_s"] = time.perf_counter() - wall, time.process_time() - cpu
    out["extra_peak_mb"] = (proc_status("VmHWM") - before) / MB
    out["rss_before_mb"] = before / MB
    if variant == "trace":
        facts = result.facts
        out["stored_mb"] = result.nbytes_per_step() * result.n_steps / MB
        out["preview_decoder"] = facts.preview_decoder
        out["previews_shape"] = None if result.previews is None else list(result.previews.shape)
        out["missing"] = [m.part for m in getattr(facts, "missing", [])]
    return out


def _child(root: Path, shape: str, variant: str, steps: int) -> dict[str, Any]:
    return child_json(__file__, f"{shape},{variant},{steps}", root)


def _baseline(ref: str, where: Path) -> Path:
    """The package as committed at ``ref``, extracted under ``where``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", ref, "diffwidget"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
    return where


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    """CPU, cores and memory of this machine."""
    import platform

    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in info.read_text().splitlines()
            if "model name" in ln
        ]
        cpu = names[0] if names else cpu
    total = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            total = int(line.split()[1]) * 1024
    return f"{cpu}, {os.cpu_count()} cores, {total / 2**30:.0f} GB RAM"


def run_all(args: argparse.Namespace, tmpdir: Path) -> dict[str, Any]:
    """Every (shape, version, variant) in its own process; plain once per shape."""
    roots = {"this checkout": REPO}
    if args.baseline != "none":
        roots = {f"baseline {args.baseline}": _baseline(args.baseline, tmpdir), **roots}
    results: dict[str, Any] = {}
    for shape in args.shapes:
        steps = args.steps[shape]
        rec: dict[str, Any] = {"steps": steps}
        for name, root in roots.items():
            for variant in VARIANTS:
                if variant == "plain" and name != "this checkout":
                    continue  # the plain pipeline does not depend on diffwidget's version
                key = f"{variant} ({name})" if variant == "trace" else "plain"
                load = _load()
                print(f"[{shape}] {key}: running (load {load})", file=sys.stderr, flush=True)
                rec[key] = {**_child(root, shape, variant, steps), "load_before": load}
                print(f"[{shape}] {key}: {rec[key]}", file=sys.stderr, flush=True)
        results[shape] = rec
    return results


def section(args: argparse.Namespace, results: dict[str, Any]) -> str:
    """The markdown section for ``RESULTS_tracing.md``."""
    lines = [
        "## Extra peak memory of `trace()` over the plain pipeline (`bench/bench_trace_memory.py`)",
        "",
        "Each call in a fresh process, one torch thread, fp32 on the CPU: the resident-memory",
        "high-water mark during the call (`VmHWM`, reset through `/proc/self/clear_refs` just",
        "before it) minus the resident memory before it; model weights are not counted. Same",
        f"prompt, seed, CFG 7.5 and steps for every variant. Goal: `trace` ≤ {GOAL_RATIO}× plain.",
        "",
        f"Machine: {machine()}; shared with other jobs. `python bench/bench_trace_memory.py "
        + " ".join(args.argv)
        + "`",
        "",
        "| shape | steps | variant | extra peak | × plain | wall s | CPU s | previews "
        "| load before |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, rec in results.items():
        plain = rec.get("plain", {}).get("extra_peak_mb")
        for key, value in rec.items():
            if key == "steps":
                continue
            if "error" in value:
                lines.append(
                    f"| {LABELS[shape]} | {rec['steps']} | {key} | error: {value['error']} "
                    "| | | | | |"
                )
                continue
            ratio = f"{value['extra_peak_mb'] / plain:.2f}×" if plain else "—"
            previews = value.get("preview_decoder") or "—"
            if value.get("previews_shape"):
                previews += " " + "×".join(str(n) for n in value["previews_shape"][1:3])
            lines.append(
                f"| {LABELS[shape]} | {rec['steps']} | {key} | +{value['extra_peak_mb']:.0f} MB | "
                f"{ratio} | {value['wall_s']:.0f} | {value['cpu_s']:.0f} | {previews} | "
                f"{value['load_before']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument(
        "--steps",
        default="sd15=4,sdxl=2",
        help="steps per shape (SHAPE=N,...), or one number for all; the baseline decodes "
        "min(steps, 4) previews at once, ~4 GB each at 1024² on the CPU",
    )
    parser.add_argument("--baseline", default="main", help="git ref to compare; 'none' to skip")
    parser.add_argument("--out", type=Path, default=BENCH / "RESULTS_tracing.md")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        shape, variant, steps = args.child.split(",")
        print(json.dumps(measure(shape, variant, int(steps))))
        return 0
    args.argv = sys.argv[1:] if argv is None else argv
    args.shapes = [s for s in args.shapes.split(",") if s]
    if args.steps.isdigit():
        args.steps = dict.fromkeys(SHAPES, int(args.steps))
    else:
        args.steps = {k: int(v) for k, _, v in (i.partition("=") for i in args.steps.split(","))}
    unknown = set(args.shapes) - set(SHAPES)
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}; choose from {', '.join(SHAPES)}")
    with tempfile.TemporaryDirectory(prefix="bench-trace-memory-") as tmp:
        results = run_all(args, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    sys.path.insert(0, str(BENCH))
    from resultslib import write_section

    text = section(args, results)
    write_section(args.out, "bench_trace_memory", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
