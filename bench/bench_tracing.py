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

and SDXL-base-shaped (``--unet sdxl``, 1024² by default). On a GPU the models are built on
the device, which takes seconds even at SDXL size. ``bench/gpu_suite.py`` calls
:func:`overhead` for both.

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

from benchlib import (
    SD15_TEXT,
    SD15_UNET,
    SD15_VAE,
    SDXL_TEXT_2,
    SDXL_TEXT_2_NARROW,
    SDXL_TEXT_NARROW,
    SDXL_UNET,
    SDXL_UNET_NARROW,
    SDXL_VAE,
    clip_text_config,
    machine,
    rounds,
    sd15_text_encoder,
    sync,
)

from diffwidget.testing.tiny import make_scheduler
from diffwidget.tracing.budget import BYTES_PER_MB
from diffwidget.tracing.context import TraceContext
from diffwidget.tracing.generate import trace

PROMPT = "a red circle on the left"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_sd15(device: str, dtype: torch.dtype) -> Any:
    """An SD-1.5-shaped ``StableDiffusionPipeline`` with random weights (no downloads)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = _word_tokenizer()
    scheduler = make_scheduler("dpm++")
    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = sd15_text_encoder(tokenizer)
        unet = UNet2DConditionModel(**SD15_UNET)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return _to(pipe, device, dtype)


def build_sdxl(device: str, dtype: torch.dtype, *, narrow: bool = False) -> Any:
    """An SDXL-base-shaped ``StableDiffusionXLPipeline`` with random weights (no downloads).

    Both text encoders have their published shapes (CLIP ViT-L and OpenCLIP ViT-bigG, whose
    penultimate layers give the UNet its 768 + 1280 = 2048-wide context); the scheduler is
    SDXL's default, Euler. ``narrow``: the UNet's channels narrowed 10x and two layers per
    text encoder (``benchlib.SDXL_UNET_NARROW``); the VAE keeps its full shape.
    """
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _word_tokenizer()
    scheduler = make_scheduler("euler")
    torch.manual_seed(0)
    text, text_2, unet_config = (
        (SDXL_TEXT_NARROW, SDXL_TEXT_2_NARROW, SDXL_UNET_NARROW)
        if narrow
        else (SD15_TEXT, SDXL_TEXT_2, SDXL_UNET)
    )
    with torch.device(device):
        vae = AutoencoderKL(**SDXL_VAE)
        text_encoder = CLIPTextModel(clip_text_config(tokenizer, text))
        text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer, text_2))
        unet = UNet2DConditionModel(**unet_config)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return _to(pipe, device, dtype)


def _word_tokenizer() -> Any:
    """The tiny word-level CLIP tokenizer, padded to CLIP's 77 positions (built locally)."""
    from transformers import CLIPTokenizer

    from diffwidget.models.tokenizer import write_word_tokenizer
    from diffwidget.testing.tiny import TINY_WORDS

    folder = write_word_tokenizer(TINY_WORDS, tempfile.mkdtemp(prefix="bench-tok-"), 77)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


def _to(pipe: Any, device: str, dtype: torch.dtype) -> Any:
    # Models are built in float32; cast only when asked (diffusers warns on any cast).
    return pipe.to(device) if dtype == torch.float32 else pipe.to(device=device, dtype=dtype)


def build_tiny(device: str, dtype: torch.dtype) -> Any:
    """The tests' tiny random-weight pipeline."""
    from diffwidget.testing.tiny import tiny_sd_pipeline

    return _to(tiny_sd_pipeline(), device, dtype)


def build_tiny_sdxl(device: str, dtype: torch.dtype) -> Any:
    """The tests' tiny random-weight SDXL pipeline (two text encoders, added conditioning)."""
    from diffwidget.testing.tiny import tiny_sdxl_pipeline

    return _to(tiny_sdxl_pipeline(), device, dtype)


def timed(fn: Callable[[], Any], device: str) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call."""
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


VARIANTS = ("trace", "trace_all_tokens", "trace_previews")


def variant_calls(pipe: Any, size: int, steps: int) -> dict[str, Callable[[], Any]]:
    """The plain pipeline call and the traced variants, as zero-argument calls."""
    common = {
        "num_inference_steps": steps,
        "height": size,
        "width": size,
        "guidance_scale": 7.5,
    }

    def plain() -> Any:
        generator = torch.Generator("cpu").manual_seed(0)
        return pipe(PROMPT, generator=generator, output_type="np", **common)

    return {
        "plain": plain,
        "trace": lambda: trace(pipe, PROMPT, seed=0, decode_previews=False, **common),
        "trace_all_tokens": lambda: trace(
            pipe, PROMPT, seed=0, decode_previews=False, tokens="all", **common
        ),
        "trace_previews": lambda: trace(pipe, PROMPT, seed=0, decode_previews=True, **common),
    }


def overhead(
    pipe: Any,
    size: int,
    steps: int,
    repeats: int,
    device: str,
    variants: tuple[str, ...] = VARIANTS,
    *,
    time_left: Callable[[], float] | None = None,
    keep: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Time the plain pipeline against the traced ``variants``, interleaved round by round.

    One untimed call of each variant first (its trace goes to ``keep[name]`` when given),
    then up to ``repeats`` rounds; fewer when ``time_left()`` says the next round would not
    fit (``rounds`` in the result says how many ran).
    """
    every = variant_calls(pipe, size, steps)
    unknown = set(variants) - set(every)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {sorted(every)}")
    chosen = {name: fn for name, fn in every.items() if name == "plain" or name in variants}
    stored = {}
    for name, fn in chosen.items():  # warm-up, and the bytes each variant stores
        out = fn()
        if name != "plain":
            stored[name] = out.nbytes_per_step()
            if keep is not None:
                keep[name] = out
    wall: dict[str, list[float]] = {name: [] for name in chosen}
    cpu: dict[str, list[float]] = {name: [] for name in chosen}
    for _ in rounds(repeats, time_left):
        for name, fn in chosen.items():
            seconds, cpu_seconds = timed(fn, device)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
    result: dict[str, Any] = {"rounds": len(wall["plain"])}
    for label, times in (("wall", wall), ("cpu", cpu)):
        medians = {name: statistics.median(values) for name, values in times.items()}
        result[f"{label}_seconds_median"] = medians
        result[f"{label}_seconds_all"] = times
        result[f"{label}_overhead_vs_plain"] = {
            name: medians[name] / medians["plain"] - 1.0 for name in chosen if name != "plain"
        }
        # Ratio within each interleaved pair, then the median: robust to load drifting.
        result[f"{label}_paired_overhead_median"] = {
            name: statistics.median(
                t / p - 1.0 for t, p in zip(times[name], times["plain"], strict=True)
            )
            for name in chosen
            if name != "plain"
        }
    result["bytes_per_step_stored"] = stored
    result["mb_per_step_stored"] = {k: v / BYTES_PER_MB for k, v in stored.items()}
    if device.startswith("cuda"):
        result["cuda_max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() / BYTES_PER_MB
    return result


def build_sdxl_narrow(device: str, dtype: torch.dtype) -> Any:
    """SDXL's block layout with narrow channels and its full VAE (see :func:`build_sdxl`)."""
    return build_sdxl(device, dtype, narrow=True)


BUILDERS = {
    "tiny": build_tiny,
    "tiny_sdxl": build_tiny_sdxl,
    "sd15": build_sd15,
    "sdxl": build_sdxl,
    "sdxl_narrow": build_sdxl_narrow,
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", choices=tuple(BUILDERS), default="tiny")
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
        default=",".join(VARIANTS),
        help="comma-separated traced variants to time against the plain pipeline",
    )
    parser.add_argument("--build-only", action="store_true", help="print bytes per step only")
    parser.add_argument("--json", type=Path, default=None, help="write results here")
    args = parser.parse_args(argv)

    dtype = DTYPES[args.dtype]
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    start = time.perf_counter()
    pipe = BUILDERS[args.unet](args.device, dtype)
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
    if not args.build_only:
        variants = tuple(v for v in args.variants.split(",") if v)
        try:
            result.update(overhead(pipe, size, args.steps, args.repeats, args.device, variants))
        except ValueError as exc:
            parser.error(str(exc))
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text)
    return result


if __name__ == "__main__":
    main()
