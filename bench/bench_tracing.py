"""Tracing overhead: traced vs plain pipeline in the same run, and bytes stored per step.

Runs the plain pipeline and ``diffwidget.trace`` alternately on the same prompt and seed
(warm-up first, then ``--repeats`` interleaved pairs, median of each), so shared-machine
load drifts hit both sides alike. Three traced variants are timed:

* ``trace``: default tokens (start, words, end, one padding), no previews;
* ``trace_all_tokens``: every one of the 77 token positions, no previews;
* ``trace_previews``: default tokens plus a VAE-decoded preview per step.

Examples
--------
Tiny random-weight pipeline on the CPU (seconds)::

    python bench/bench_tracing.py

SD-1.5-shaped UNet/VAE/text encoder built from configs with random weights (no downloads),
on a GPU::

    python bench/bench_tracing.py --unet sd15 --device cuda --dtype fp16 --size 512 --steps 20

``--build-only`` builds the pipeline and prints the exact bytes per step without running it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import SD15_UNET, SD15_VAE, machine, sd15_text_encoder, sync

from diffwidget.tracing.budget import BYTES_PER_MB
from diffwidget.tracing.context import TraceContext, trace

PROMPT = "a red circle on the left"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_sd15(device: str, dtype: torch.dtype) -> Any:
    """An SD-1.5-shaped ``StableDiffusionPipeline`` with random weights (no downloads)."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTokenizer

    from diffwidget.models.tokenizer import write_word_tokenizer
    from diffwidget.tracing.tiny import TINY_WORDS

    folder = write_word_tokenizer(TINY_WORDS, tempfile.mkdtemp(prefix="bench-tok-"), 77)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15_VAE),
        text_encoder=sd15_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**SD15_UNET),
        scheduler=DPMSolverMultistepScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return _to(pipe, device, dtype)


def _to(pipe: Any, device: str, dtype: torch.dtype) -> Any:
    # Models are built in float32; cast only when asked (diffusers warns on any cast).
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)


def build_tiny(device: str, dtype: torch.dtype) -> Any:
    """The tests' tiny random-weight pipeline."""
    from diffwidget.tracing.tiny import tiny_sd_pipeline

    return _to(tiny_sd_pipeline(), device, dtype)


def timed(fn: Callable[[], Any], device: str) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call."""
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 on the CPU, so a loaded shared machine adds "
        "less noise; CPU time is then the work done)",
    )
    parser.add_argument(
        "--variants",
        default="trace,trace_all_tokens,trace_previews",
        help="comma-separated traced variants to time against the plain pipeline",
    )
    parser.add_argument("--build-only", action="store_true", help="print bytes per step only")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    args = parser.parse_args(argv)

    dtype = DTYPES[args.dtype]
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    start = time.perf_counter()
    pipe = (build_sd15 if args.unet == "sd15" else build_tiny)(args.device, dtype)
    build_s = time.perf_counter() - start
    size = args.size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    estimates = {}
    for tokens in ("default", "all"):
        for previews in (False, True):
            ctx = TraceContext(pipe, prompt=PROMPT, tokens=tokens, decode_previews=previews)
            estimates[f"tokens={tokens},previews={previews}"] = ctx.step_bytes(size, size).total
    result: dict[str, Any] = {
        "config": {**vars(args), "json": None, "size": size},
        "machine": machine(),
        "build_s": build_s,
        "unet_params_M": sum(p.numel() for p in pipe.unet.parameters()) / 1e6,
        "bytes_per_step_estimate": estimates,
    }
    if args.build_only:
        print(json.dumps(result, indent=2, default=str))
        return result

    common = {
        "num_inference_steps": args.steps,
        "height": size,
        "width": size,
        "guidance_scale": 7.5,
    }

    def plain() -> Any:
        generator = torch.Generator("cpu").manual_seed(0)
        return pipe(PROMPT, generator=generator, output_type="np", **common)

    variants: dict[str, Callable[[], Any]] = {
        "plain": plain,
        "trace": lambda: trace(pipe, PROMPT, seed=0, decode_previews=False, **common),
        "trace_all_tokens": lambda: trace(
            pipe, PROMPT, seed=0, decode_previews=False, tokens="all", **common
        ),
        "trace_previews": lambda: trace(pipe, PROMPT, seed=0, decode_previews=True, **common),
    }
    chosen = {"plain", *args.variants.split(",")}
    unknown = chosen - set(variants)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {sorted(variants)}")
    variants = {name: fn for name, fn in variants.items() if name in chosen}
    stored = {}
    for name, fn in variants.items():  # warm-up, and the bytes each variant stores
        out = fn()
        if name != "plain":
            stored[name] = out.nbytes_per_step()
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            seconds, cpu_seconds = timed(fn, args.device)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
    for label, times in (("wall", wall), ("cpu", cpu)):
        medians = {name: statistics.median(values) for name, values in times.items()}
        result[f"{label}_seconds_median"] = medians
        result[f"{label}_seconds_all"] = times
        result[f"{label}_overhead_vs_plain"] = {
            name: medians[name] / medians["plain"] - 1.0 for name in variants if name != "plain"
        }
        # Ratio within each interleaved pair, then the median: robust to load drifting.
        result[f"{label}_paired_overhead_median"] = {
            name: statistics.median(
                t / p - 1.0 for t, p in zip(times[name], times["plain"], strict=True)
            )
            for name in variants
            if name != "plain"
        }
    result["bytes_per_step_stored"] = stored
    result["mb_per_step_stored"] = {k: v / BYTES_PER_MB for k, v in stored.items()}
    if args.device.startswith("cuda"):
        result["cuda_max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() / BYTES_PER_MB
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text)
    return result


if __name__ == "__main__":
    main()
