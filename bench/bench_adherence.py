"""Benchmark of the embedded models: CPU generation time, weights size and prompt adherence.

    python bench/bench_adherence.py --n 200 --threads 1 --runs 7 --no-size --grid docs/samples.png

For the UNet and the DiT: the median wall time of a 20-step generation with classifier-free
guidance at the model's recommended scale (batch of one prompt, so a denoiser batch of two),
interleaved run by run with the same architecture with random weights as the baseline (same
shapes, so the same cost); the size of the shipped safetensors; the reader's accuracy on
rendered scenes; each model's per-attribute adherence on held-out captions, with their
size words and (``--no-size``) without.

``--patch-sizes 1 2`` compares DiT patch sizes (random weights, otherwise the shipped
architecture), interleaved: a 20-step generation, and a training step at the recipe's batch
(forward and backward with the tail-weighted attention of training).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "a large red circle on the left"
MODELS = ("unet", "dit")
GRID_CAPTIONS = 12  # per model


def time_once(pipe: Any, steps: int, guidance: float) -> float:
    """Wall-clock seconds of one generation of :data:`PROMPT`."""
    import torch

    start = time.perf_counter()
    pipe(
        PROMPT,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return time.perf_counter() - start


#: Process CPU seconds of the runs of the last :func:`time_interleaved` call, per pipeline
#: (less sensitive than wall time to other jobs on a shared machine).
CPU_SECONDS: dict[str, list[float]] = {}


def time_interleaved(
    pipes: dict[str, Any], runs: int, steps: int, guidance: float
) -> dict[str, list[float]]:
    """``runs`` timings of each pipeline, alternating between them, after one warm-up each."""
    for pipe in pipes.values():
        time_once(pipe, steps, guidance)
    times: dict[str, list[float]] = {name: [] for name in pipes}
    CPU_SECONDS.clear()
    CPU_SECONDS.update({name: [] for name in pipes})
    for _ in range(runs):
        for name, pipe in pipes.items():
            cpu = time.process_time()
            times[name].append(time_once(pipe, steps, guidance))
            CPU_SECONDS[name].append(time.process_time() - cpu)
    return times


def time_patch_sizes(patches: list[int], runs: int, steps: int) -> dict[str, Any]:
    """Generation and training-step seconds of the DiT architecture per patch size."""
    import torch
    from diffusers import SD3Transformer2DModel

    from diffwidget.models.dit import (
        TRANSFORMER_CONFIG,
        assemble_dit_pipeline,
        build_dit_components,
        tail_tokens,
        tail_weighted_attention,
    )
    from diffwidget.models.recipes import CONFIGS

    batch = CONFIGS["dit"]["cpu"].batch
    pipes = {}
    for patch in patches:
        components = build_dit_components(0)
        config = dict(TRANSFORMER_CONFIG, patch_size=patch, pos_embed_max_size=16 // patch)
        components["transformer"] = SD3Transformer2DModel(**config)
        pipes[f"patch {patch}"] = assemble_dit_pipeline(components)
    generation = time_interleaved(pipes, runs, steps, 4.0)

    def train_step(pipe: Any) -> float:
        transformer = pipe.transformer.train()
        width = transformer.config.joint_attention_dim
        start = time.perf_counter()
        with tail_weighted_attention(transformer, tail_tokens()):
            out = transformer(
                hidden_states=torch.randn(batch, 4, 16, 16),
                timestep=torch.rand(batch) * 1000,
                encoder_hidden_states=torch.randn(batch, 17, width),
                pooled_projections=torch.randn(batch, transformer.config.pooled_projection_dim),
            ).sample
        out.pow(2).mean().backward()
        transformer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    training: dict[str, list[float]] = {name: [] for name in pipes}
    for _ in range(max(3, runs // 2)):
        for name, pipe in pipes.items():
            training[name].append(train_step(pipe))
    return {
        "generation_s": {k: statistics.median(v) for k, v in generation.items()},
        "train_step_s": {k: statistics.median(v) for k, v in training.items()},
        "batch": batch,
        "runs": {"generation": generation, "training": training},
    }


def main() -> None:
    """Run the benchmark and print (and optionally save) the numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-size", action="store_true", help="also size-less captions")
    parser.add_argument("--grid", default=None, help="PNG of samples of every model")
    parser.add_argument("--json", default=None)
    parser.add_argument("--skip-adherence", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--patch-sizes", type=int, nargs="*", default=[], help="e.g. 1 2")
    args = parser.parse_args()

    import numpy as np
    import torch

    from diffwidget.models.architecture import build_demo_pipeline
    from diffwidget.models.dit import build_dit_pipeline
    from diffwidget.models.evaluate import evaluate, reader_accuracy, sample_grid
    from diffwidget.models.loader import DEMO_DIRS, load_demo_pipeline, weights_size_bytes

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    results: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        }
    }
    if args.patch_sizes:
        results["dit_patch_sizes"] = time_patch_sizes(args.patch_sizes, args.runs, args.steps)
        for key in ("generation_s", "train_step_s"):
            print(f"DiT patch sizes, {key}: {results['dit_patch_sizes'][key]}")
    pipes = {model: load_demo_pipeline(model) for model in args.models}
    sizes = {model: weights_size_bytes(DEMO_DIRS[model]) / 1e6 for model in args.models}
    results["weights_mb"] = {**sizes, "total": sum(sizes.values())}
    print(f"weights (MB of float16 safetensors): {results['weights_mb']}")
    baselines = {"unet": build_demo_pipeline, "dit": build_dit_pipeline}
    for model in [] if args.skip_timing else args.models:
        guidance = pipes[model].recommended_guidance_scale
        times = time_interleaved(
            {"trained": pipes[model], "random": baselines[model](0)},
            args.runs,
            args.steps,
            guidance,
        )
        medians = {k: statistics.median(v) for k, v in times.items()}
        cpu = {k: statistics.median(v) for k, v in CPU_SECONDS.items()}
        results[f"generation_s_{model}"] = {
            "runs": times,
            "median": medians,
            "cpu_runs": dict(CPU_SECONDS),
            "cpu_median": cpu,
            "load_average": os.getloadavg(),
            "cfg": guidance,
        }
        print(
            f"{model}: {args.steps}-step generation, CFG {guidance}, {args.threads} thread(s): "
            f"median {medians['trained']:.3f} s wall, {cpu['trained']:.3f} s CPU over "
            f"{args.runs} runs (random weights, interleaved: {medians['random']:.3f} s wall, "
            f"{cpu['random']:.3f} s CPU); load average {os.getloadavg()[0]:.1f}"
        )
    if not args.skip_adherence:
        reader = reader_accuracy(seed=1234)
        results["reader"] = reader.accuracy()
        print("reader on rendered held-out scenes:\n" + reader.table())
    tiles, labels = [], []
    for model in [] if args.skip_adherence else args.models:
        guidance = pipes[model].recommended_guidance_scale
        for size_words in (True, False) if args.no_size else (True,):
            start = time.perf_counter()
            report, scenes, images = evaluate(
                pipes[model],
                args.n,
                steps=args.steps,
                guidance_scale=guidance,
                size_words=size_words,
            )
            key = f"adherence_{model}" + ("" if size_words else "_no_size")
            results[key] = {
                "accuracy": report.accuracy(),
                "n": report.sizes(),
                "cfg": guidance,
                "seconds": time.perf_counter() - start,
            }
            what = "" if size_words else " without size words"
            print(f"\n{model}, {args.n} held-out captions{what}, CFG {guidance}:\n{report.table()}")
            if size_words:
                tiles.append(images[:GRID_CAPTIONS])
                labels += [f"{model}: {s.caption}" for s in scenes[:GRID_CAPTIONS]]
    if args.grid and tiles:
        sample_grid(np.concatenate(tiles), labels).save(args.grid)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
