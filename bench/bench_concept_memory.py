"""Extra peak memory of concept maps beside the joint-attention capture, at Flux-1024² shapes.

One denoiser step of a ``FluxPipeline`` whose transformer has one double-stream and one
single-stream block at Flux's published width (hidden 3072, 24 heads of 128, MLP ratio 4,
RoPE axes 16/56/56; random weights, nothing downloaded), on 4096 image tokens (a 1024² Flux
image: a 128² latent packed 2×2) and 512 text tokens (``max_sequence_length=512``). The text
encoders and the VAE are the test suite's tiny ones (``tiny_flux_pipeline``): they set only
the transformer's input and text-embedding widths, never the blocks' shapes, and the output
stays a latent (no decode in any variant).

Variants, each in a fresh process (one torch thread, same prompt, seed, one step, guidance 3.5):

* ``plain``: the pipeline call alone;
* ``capture``: inside ``TraceContext`` as ``trace()`` runs it (the joint attention capture of
  both blocks; no previews);
* ``concepts``: inside ``TraceContext(record="taps")`` with a ``ConceptTap`` of five words (the
  concept maps alone, no attention capture);
* ``both``: the capture and the concept tap together.

Measured: the process's resident-memory high-water mark during the call (``VmHWM``, reset
through ``/proc/self/clear_refs`` right before it) minus the resident memory before it: the
call's extra peak, weights excluded. The goal: the concept tap's extra over ``plain`` at most
the capture's. Usage::

    nice -n 10 python bench/bench_concept_memory.py --json m.json
    python bench/bench_concept_memory.py --image-tokens 256 --text-tokens 64   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import child_json, proc_status

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "capture", "concepts", "both")
#: Flux.1's transformer width (diffusers' FluxTransformer2DModel config of FLUX.1-dev).
FLUX_BLOCKS = {
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "axes_dims_rope": [16, 56, 56],
}
WORDS = ("circle", "square", "sky", "dog", "red")
PROMPT = "a red circle on the left"
MB = 2**20


def flux_pipeline(seed: int = 0) -> Any:
    """The tiny test pipeline with a transformer of one double and one single Flux block."""
    import torch
    from diffusers import FluxTransformer2DModel

    from diffwidget.testing.tiny_dit import tiny_flux_pipeline

    pipe = tiny_flux_pipeline(seed)
    small = pipe.transformer.config
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=small.in_channels,
        num_layers=1,
        num_single_layers=1,
        joint_attention_dim=small.joint_attention_dim,
        pooled_projection_dim=small.pooled_projection_dim,
        guidance_embeds=True,
        **FLUX_BLOCKS,
    ).eval()
    pipe.register_modules(transformer=transformer)
    return pipe


def measure(variant: str, image_tokens: int, text_tokens: int) -> dict[str, Any]:
    """One pipeline step of ``variant`` in this process: extra peak RSS and seconds."""
    import gc
    import warnings

    import torch

    from diffwidget.tracing.concepts import ConceptTap
    from diffwidget.tracing.context import TraceContext

    torch.set_num_threads(1)
    pipe = flux_pipeline()
    side = round(image_tokens**0.5)
    if side * side != image_tokens:
        raise SystemExit(f"--image-tokens must be a square number, got {image_tokens}")
    # Packed 2x2 latent cells per token, vae_scale_factor pixels per latent cell.
    size = side * 2 * pipe.vae_scale_factor
    call = {"max_sequence_length": text_tokens}
    args = {"height": size, "width": size, "num_inference_steps": 1, "guidance_scale": 3.5}
    taps = [ConceptTap(pipe, WORDS, call_kwargs=call)] if variant in ("concepts", "both") else []
    context = None
    if variant != "plain":
        context = TraceContext(
            pipe,
            prompt=PROMPT,
            decode_previews=False,
            seed=0,
            guidance_scale=args["guidance_scale"],
            call_kwargs=call,
            taps=taps,
            record="taps" if variant == "concepts" else "trace",
        )
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = proc_status("VmRSS")
    wall = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny encoders' and an undecoded trace's notes
        if context is None:
            pipe(
                PROMPT,
                generator=torch.Generator().manual_seed(0),
                output_type="latent",
                **call,
                **args,
            )
        else:
            with context:
                pipe(
                    PROMPT,
                    generator=torch.Generator().manual_seed(0),
                    output_type="latent",
                    **call,
                    **args,
                )
    out: dict[str, Any] = {
        "variant": variant,
        "extra_peak_mb": round((proc_status("VmHWM") - before) / MB, 1),
        "rss_before_mb": round(before / MB, 1),
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    if taps:
        scores = taps[0].result()
        out["concept_mode"] = taps[0].mode
        out["concept_layers"] = scores.layers
        out["concept_grid"] = scores.grids[scores.layers[0]]
    return out


def _child(variant: str, image_tokens: int, text_tokens: int) -> dict[str, Any]:
    out = child_json(__file__, f"{variant},{image_tokens},{text_tokens}", REPO)
    if "error" in out:
        out["variant"] = variant
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-tokens", type=int, default=4096)
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, image, text = args.child.split(",")
        print(json.dumps(measure(variant, int(image), int(text))))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from benchlib import machine

    torch.set_num_threads(1)
    result: dict[str, Any] = {
        "machine": machine(),
        "image_tokens": args.image_tokens,
        "text_tokens": args.text_tokens,
        "words": list(WORDS),
    }
    start = time.perf_counter()
    runs = {v: _child(v, args.image_tokens, args.text_tokens) for v in args.variants}
    result["runs"] = runs
    plain = runs.get("plain", {}).get("extra_peak_mb")
    if plain is not None:
        result["over_plain_mb"] = {
            v: round(r["extra_peak_mb"] - plain, 1) for v, r in runs.items() if "extra_peak_mb" in r
        }
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = round(time.perf_counter() - start, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
