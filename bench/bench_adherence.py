"""Benchmark of the embedded model: CPU generation time, weights size and prompt adherence.

    python bench/bench_adherence.py --n 200 --threads 2 --runs 7 --grid docs/samples.png

Prints the median wall time of a 20-step DPM-Solver++ generation with classifier-free
guidance (batch of one prompt, so a UNet batch of two), next to the same pipeline with
random weights as a baseline (same shapes, so the same cost), the size of the shipped
safetensors, the reader's accuracy on rendered scenes and the model's per-attribute
adherence on held-out captions.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "a large red circle on the left"


def time_generation(pipe, runs: int, steps: int, guidance: float) -> list[float]:  # type: ignore[no-untyped-def]
    """Wall-clock seconds of ``runs`` generations after one warm-up."""
    import torch

    def once() -> float:
        start = time.perf_counter()
        pipe(
            PROMPT,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )
        return time.perf_counter() - start

    once()
    return [once() for _ in range(runs)]


def main() -> None:
    """Run the benchmark and print (and optionally save) the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, nargs="+", default=[3.0])
    parser.add_argument("--path", default=None, help="pipeline folder (default: shipped)")
    parser.add_argument("--grid", default=None)
    parser.add_argument("--json", default=None)
    parser.add_argument("--skip-adherence", action="store_true")
    args = parser.parse_args()

    import torch

    from diffwidget.models.architecture import build_demo_pipeline
    from diffwidget.models.evaluate import evaluate, reader_accuracy, sample_grid
    from diffwidget.models.loader import DEMO_DIR, load_demo_pipeline, weights_size_bytes

    torch.set_num_threads(args.threads)
    results: dict = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        }
    }
    pipe = load_demo_pipeline(path=args.path)
    folder = Path(args.path) if args.path else DEMO_DIR
    results["weights_mb"] = weights_size_bytes(folder) / 1e6
    trained = time_generation(pipe, args.runs, args.steps, args.guidance[0])
    baseline = time_generation(build_demo_pipeline(0), args.runs, args.steps, args.guidance[0])
    results["generation_s"] = {
        "trained_median": statistics.median(trained),
        "trained_runs": trained,
        "random_weights_median": statistics.median(baseline),
        "random_weights_runs": baseline,
    }
    print(f"weights: {results['weights_mb']:.2f} MB of safetensors in {folder}")
    print(
        f"{args.steps}-step generation, {args.threads} threads: median "
        f"{statistics.median(trained):.3f} s over {args.runs} runs "
        f"(random-weight pipeline: {statistics.median(baseline):.3f} s)"
    )
    if not args.skip_adherence:
        reader = reader_accuracy(seed=1234)
        results["reader"] = reader.accuracy()
        print("reader on rendered held-out scenes:\n" + reader.table())
        for guidance in args.guidance:
            report, scenes, images = evaluate(
                pipe, args.n, steps=args.steps, guidance_scale=guidance
            )
            results[f"adherence_cfg_{guidance}"] = {
                "accuracy": report.accuracy(),
                "n": report.sizes(),
            }
            print(f"\nadherence, {args.n} held-out captions, CFG {guidance}:\n" + report.table())
            if args.grid and guidance == args.guidance[0]:
                grid = sample_grid(images[:24], [s.caption for s in scenes[:24]])
                grid.save(args.grid)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
