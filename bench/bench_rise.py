"""Benchmark the explanation methods at one step: DF-RISE (ours vs one UNet call per mask),
DF-CAM over every layer (its default), and token relevance per step.

Both DF-RISE variants run in the same process on the same trace: the batched
implementation, and the paper's call pattern (one CFG UNet call per mask, i.e. batch size 1
through the same code). Timings depend on shapes only, so random weights are used.

Usage::

    python bench/bench_rise.py                       # tiny test pipeline, CPU
    python bench/bench_rise.py --unet demo           # embedded-model architecture, CPU
    python bench/bench_rise.py --unet sd15 --device cuda --dtype fp16   # SD-1.5-shaped UNet
    python bench/bench_rise.py --results bench/RESULTS_explain.md       # append a section
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import SD15_UNET, machine, sd15_text_encoder, sync

from diffwidget.explain.cam import DFCam
from diffwidget.explain.relevance import TokenRelevance
from diffwidget.explain.rise import DFRise
from diffwidget.tracing.trace import Trace

PROMPT = "a red circle on the left"
GUIDANCE = 7.5
N_STEPS = 20
BENCH_STEP = 15  # the paper visualises step 15 of 20


#: Stable Diffusion 1.5's UNet and text encoder shapes (random weights; timings only).
def build(kind: str, latent: int | None = None) -> Any:
    """A pipeline-like object (unet, scheduler, text_encoder, tokenizer) with random weights."""
    from diffwidget.tracing.tiny import _tokenizer, make_scheduler, tiny_sd_pipeline

    if kind == "tiny":
        return tiny_sd_pipeline(seed=0)
    if kind == "demo":
        from diffwidget.models.architecture import build_demo_pipeline

        return build_demo_pipeline(seed=0)
    if kind == "sd15":
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        tokenizer = _tokenizer(None)
        text = sd15_text_encoder(tokenizer)
        config = dict(SD15_UNET, sample_size=latent or SD15_UNET["sample_size"])
        return SimpleNamespace(
            unet=UNet2DConditionModel(**config),
            scheduler=make_scheduler("dpm++"),
            text_encoder=text,
            tokenizer=tokenizer,
        )
    raise SystemExit(f"unknown --unet {kind!r}; use tiny, demo or sd15")


def synthetic_trace(pipe: Any, device: torch.device) -> Trace:
    """A trace with random latents at the scheduler's timesteps and real text embeddings."""
    pipe.scheduler.set_timesteps(N_STEPS)
    length = pipe.tokenizer.model_max_length
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=length, return_tensors="pt")
    empty = pipe.tokenizer("", padding="max_length", max_length=length, return_tensors="pt")
    with torch.no_grad():
        embeds = torch.cat(
            [
                pipe.text_encoder(empty.input_ids.to(device))[0],
                pipe.text_encoder(ids.input_ids.to(device))[0],
            ]
        )
    cfg = pipe.unet.config
    size = int(cfg.sample_size)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(N_STEPS, int(cfg.in_channels), size, size, generator=gen).numpy()
    n_tokens = len(pipe.tokenizer(PROMPT).input_ids) + 1
    kinds = ["start"] + ["word"] * (n_tokens - 3) + ["end", "pad"]
    return Trace(
        prompt=PROMPT,
        tokens=[f"t{i}" for i in range(n_tokens)],
        token_kinds=kinds,  # type: ignore[arg-type]
        timesteps=pipe.scheduler.timesteps.numpy().astype(np.int64),
        latents=latents,
        noise_pred=np.zeros_like(latents),
        pred_x0=np.zeros_like(latents),
        final_latent=latents[0],
        prompt_embeds=embeds.float().cpu().numpy(),
        attention={},
        guidance_scale=GUIDANCE,
    )


CPU_TIMES: dict[int, float] = {}


def timed(fn: Any, device: torch.device) -> tuple[float, Any]:
    """Wall seconds of ``fn()``; its CPU seconds (this process) go to ``CPU_TIMES[id(result)]``.

    On a shared machine the wall time includes waiting for other processes; the CPU time
    (with one torch thread) is what the same work costs on an idle core.
    """
    sync(device)
    cpu_start = time.process_time()
    start = time.perf_counter()
    out = fn()
    sync(device)
    CPU_TIMES[id(out)] = time.process_time() - cpu_start
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", default="tiny", choices=["tiny", "demo", "sd15"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--n-masks", type=int, default=500)
    parser.add_argument(
        "--latent",
        type=int,
        default=None,
        help="sd15 only: latent side (default 64; smaller for a quick build check)",
    )
    parser.add_argument("--cam-repeats", type=int, default=3)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="time DF-RISE (both variants) with torch.compile(unet); a full untimed run "
        "first absorbs the compilation",
    )
    parser.add_argument(
        "--paper-masks",
        type=int,
        default=None,
        help="masks for the one-call-per-mask baseline (default: all); fewer are "
        "extrapolated linearly and reported as such",
    )
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--relevance-steps", type=int, default=2)
    parser.add_argument("--skip-relevance", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--results", type=Path, default=None, help="append a markdown section")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    t_build, pipe = timed(lambda: build(args.unet, args.latent), torch.device("cpu"))
    for module in (pipe.unet, pipe.text_encoder):
        # Only cast when asked: diffusers warns about any dtype cast through .to().
        if dtype == torch.float32:
            module.to(device)
        else:
            module.to(device=device, dtype=dtype)
        module.eval()
    trace = synthetic_trace(pipe, device)
    step = min(BENCH_STEP, trace.n_steps - 1)
    n_params = sum(p.numel() for p in pipe.unet.parameters())
    print(f"built {args.unet} UNet ({n_params / 1e6:.1f} M params) in {t_build:.1f} s", flush=True)

    eager_unet = pipe.unet
    ours = DFRise(n_masks=args.n_masks, batch_size=args.batch_size, progress_bar=False)
    paper_n = args.paper_masks or args.n_masks
    paper = DFRise(n_masks=paper_n, batch_size=1, progress_bar=False)
    if args.compile:
        # DF-RISE only reads pipe.unet; DF-CAM and relevance below use the eager module,
        # whose module paths they address.
        pipe.unet = torch.compile(eager_unet)
        ours.attribute(pipe, trace, step)
        DFRise(n_masks=2, batch_size=1, progress_bar=False).attribute(pipe, trace, step)
    else:
        # Warm-up: kernels, allocator, lazy inits.
        DFRise(n_masks=4, batch_size=4, progress_bar=False).attribute(pipe, trace, step)

    t_ours, sal = timed(lambda: ours.attribute(pipe, trace, step), device)
    t_paper_measured, paper_sal = timed(lambda: paper.attribute(pipe, trace, step), device)
    t_paper = t_paper_measured * args.n_masks / paper_n
    cpu_ours = CPU_TIMES[id(sal)]
    cpu_paper = CPU_TIMES[id(paper_sal)] * args.n_masks / paper_n
    pipe.unet = eager_unet

    cam_times = []
    for _ in range(args.cam_repeats):
        t_cam, cam = timed(lambda: DFCam().attribute(pipe, trace, step), device)
        cam_times.append(t_cam)
    rel_per_step = None
    if not args.skip_relevance:
        steps = list(range(step - args.relevance_steps + 1, step + 1))
        TokenRelevance(progress_bar=False).attribute(pipe, trace, steps=[step])  # warm-up
        t_rel, _ = timed(
            lambda: TokenRelevance(progress_bar=False).attribute(pipe, trace, steps=steps), device
        )
        rel_per_step = t_rel / len(steps)

    result = {
        "unet": args.unet,
        "params_M": round(n_params / 1e6, 2),
        "latent": list(trace.latent_shape),
        "device": str(device),
        "dtype": args.dtype,
        "compiled": args.compile,
        "n_masks": args.n_masks,
        "batch_size": sal.meta["batch_size"],
        "batch_size_source": sal.meta["batch_size_source"],
        "rise_ours_s": round(t_ours, 3),
        "rise_paper_style_s": round(t_paper, 3),
        "rise_paper_style_masks_measured": paper_n,
        "speedup": round(t_paper / t_ours, 2),
        "rise_ours_cpu_s": round(cpu_ours, 3),
        "rise_paper_style_cpu_s": round(cpu_paper, 3),
        "speedup_cpu_time": round(cpu_paper / cpu_ours, 2),
        "cam_all_layers_s": round(statistics.median(cam_times), 3),
        "cam_layers": len(cam.layers),
        "cam_repeats": args.cam_repeats,
        "relevance_per_step_s": None if rel_per_step is None else round(rel_per_step, 3),
        "machine": machine(device),
    }
    print(json.dumps(result, indent=2))
    if args.results is not None:
        write_section(args.results, result)


def write_section(path: Path, r: dict[str, Any]) -> None:
    m = r["machine"]
    where = m.get("gpu", m["cpu"])
    extrapolated = (
        ""
        if r["rise_paper_style_masks_measured"] == r["n_masks"]
        else f" (measured on {r['rise_paper_style_masks_measured']} masks, scaled linearly)"
    )
    lines = [
        f"\n### {r['unet']} UNet ({r['params_M']} M params), latent "
        f"{r['latent'][0]}x{r['latent'][1]}, {r['device']} {r['dtype']}"
        + (" (DF-RISE with torch.compile)" if r["compiled"] else "")
        + "\n",
        f"- machine: {where}; {m['cores']} cores, torch threads {m['torch_threads']}, "
        f"load average at the end {m['load_average']}; torch {m['torch']}, diffusers "
        f"{m['diffusers']}, transformers {m['transformers']}, Python {m['python']}",
        f"- DF-RISE, {r['n_masks']} masks, one step: **ours {r['rise_ours_s']} s** (batch "
        f"{r['batch_size']}, {r['batch_size_source']}) vs one UNet call per mask "
        f"{r['rise_paper_style_s']} s{extrapolated}: **{r['speedup']}x** wall time; "
        f"process CPU time {r['rise_ours_cpu_s']} s vs {r['rise_paper_style_cpu_s']} s "
        f"({r['speedup_cpu_time']}x)",
        f"- DF-CAM, all {r['cam_layers']} layers, one step (one forward + one backward): "
        f"{r['cam_all_layers_s']} s (median of {r['cam_repeats']})",
        f"- token relevance: {r['relevance_per_step_s']} s per step",
        "",
    ]
    with path.open("a") as handle:
        handle.write("\n".join(lines))


if __name__ == "__main__":
    main()
