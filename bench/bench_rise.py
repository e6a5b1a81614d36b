"""Benchmark the explanation methods at one step: DF-RISE (ours vs one UNet call per mask),
DF-CAM over every layer (its default), and token relevance per step.

Both DF-RISE variants run in the same process on the same trace: the batched
implementation, and the paper's call pattern (one CFG UNet call per mask, i.e. batch size 1
through the same code). Timings depend on shapes only, so random weights are used (``--unet
embedded`` loads the shipped weights of the embedded model instead).

Beside them, DF-RISE is measured against its **FLOP floor** in the same process: the FLOPs
DF-RISE runs (``FlopCounterMode`` on one CFG call of the denoiser and on scoring one mask,
times the number of masks; attention counted as its two matrix products) divided by the
rate of a large float32 matmul timed with the same thread count. DF-RISE runs and matmul
timings alternate (``--repeats``), so a loaded machine slows both alike; medians are reported,
by wall clock and by process CPU time.

Usage::

    python bench/bench_rise.py                       # tiny test pipeline, CPU
    python bench/bench_rise.py --unet demo           # embedded-model architecture, CPU
    python bench/bench_rise.py --unet embedded --threads 1 --variants 32,64,128,compile
    python bench/bench_rise.py --unet sd15 --device cuda --dtype fp16   # SD-1.5-shaped UNet
    python bench/bench_rise.py --results bench/RESULTS_explain.md       # append a section
"""

from __future__ import annotations

import argparse
import json
import os
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
    from diffwidget.testing.tiny import _tokenizer, make_scheduler, tiny_sd_pipeline

    if kind == "tiny":
        return tiny_sd_pipeline(seed=0)
    if kind == "embedded":
        from diffwidget.models.loader import load_demo_pipeline

        return load_demo_pipeline()
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
    raise SystemExit(f"unknown --unet {kind!r}; use tiny, demo, embedded or sd15")


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


#: Side of the square matmul whose rate is the peak (large enough to saturate the BLAS).
GEMM_SIDE = {"cpu": 4096, "cuda": 8192}
#: Process CPU seconds (wall seconds on a GPU) of matmuls per rate measurement.
GEMM_SECONDS = 1.5


def _attention_flops(
    query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any
) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return int(sdpa_flop_count(query_shape, key_shape, value_shape))


def count_flops(fn: Any) -> tuple[int, dict[str, int]]:
    """FLOPs of ``fn()`` by ``FlopCounterMode``, total and per operator.

    ``FlopCounterMode`` has no formula for the CPU flash-attention kernel that
    ``scaled_dot_product_attention`` runs on the CPU (it would count attention as zero);
    it is counted like the GPU kernels, as its two matrix products.
    """
    from torch.utils.flop_counter import FlopCounterMode

    cpu_attention = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    mapping = {cpu_attention: _attention_flops} if cpu_attention is not None else {}
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    by_op = {str(k): int(v) for k, v in counter.get_flop_counts()["Global"].items()}
    return int(counter.get_total_flops()), by_op


def rise_flops(pipe: Any, trace: Trace, step: int, rise: DFRise) -> dict[str, Any]:
    """What DF-RISE computes, counted: one CFG denoiser call and one SSIM score per mask,
    plus the unmasked reference call."""
    from diffwidget.tracing.replay import StepReplay

    replay = StepReplay(pipe, trace)
    x = replay.latent(step)
    ref = replay.predict(x, step, rise.target)
    call, by_op = count_flops(lambda: replay.predict(x, step, rise.target))
    score, _ = count_flops(lambda: rise._score(ref, ref))
    total = (rise.n_masks + 1) * call + rise.n_masks * score
    return {"per_cfg_call": call, "per_score": score, "total": total, "call_by_op": by_op}


def gemm_rate(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """FLOP/s of a large square matmul in ``dtype``: (by wall clock, by process CPU time).

    Matmuls run back to back for about ``GEMM_SECONDS`` of process CPU time (of wall time
    on a GPU), as long as a share of a DF-RISE run, so both see the same machine load.
    """
    n = GEMM_SIDE["cuda" if device.type == "cuda" else "cpu"]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    out = torch.mm(a, b)  # warm-up
    sync(device)
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    count, wall, cpu, start = 0, time.perf_counter(), time.process_time(), clock()
    while clock() - start < GEMM_SECONDS:
        torch.mm(a, b, out=out)
        sync(device)
        count += 1
    flop = 2.0 * n**3 * count
    return flop / (time.perf_counter() - wall), flop / max(time.process_time() - cpu, 1e-9)


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


def variant(spec: str, n_masks: int, batch_size: int | None) -> tuple[DFRise, bool]:
    """A DF-RISE configuration from ``--variants``: ``auto``, ``64`` (batch size), ``cl64``
    (channels_last UNet), ``compile`` or ``compile64``; returns it and whether channels_last."""
    channels_last = spec.startswith("cl")
    compiled = spec.startswith("compile")
    rest = spec.removeprefix("cl").removeprefix("compile")
    if rest not in ("", "auto") and not rest.isdigit():
        raise SystemExit(f"unknown variant {spec!r}; use auto, 64, cl64, compile or compile64")
    batch = int(rest) if rest.isdigit() else batch_size
    rise = DFRise(n_masks=n_masks, batch_size=batch, progress_bar=False, compile=compiled)
    return rise, channels_last


def run_variant(
    pipe: Any, trace: Trace, step: int, configured: tuple[DFRise, bool], args: Any
) -> tuple[float, Any]:
    """Time one DF-RISE run of a :func:`variant` (wall seconds; CPU seconds in ``CPU_TIMES``).

    The same ``DFRise`` object serves every run of a variant, so a compiled one compiles in
    its first (untimed) run only, as in a user's session.
    """
    rise, channels_last = configured
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    try:
        return timed(lambda: rise.attribute(pipe, trace, step), torch.device(args.device))
    finally:
        if channels_last:
            pipe.unet.to(memory_format=torch.contiguous_format)


def against_floor(
    pipe: Any, trace: Trace, step: int, args: Any, dtype: torch.dtype
) -> dict[str, Any]:
    """DF-RISE variants and matmul rates, alternating; medians and ratios to the floor."""
    device = torch.device(args.device)
    specs = args.variants.split(",")
    configured = {spec: variant(spec, args.n_masks, args.batch_size) for spec in specs}
    flops = rise_flops(pipe, trace, step, configured[specs[0]][0])
    cold: dict[str, tuple[float, float]] = {}
    for spec in specs:  # warm-up; compiles the compile variants
        wall, sal = run_variant(pipe, trace, step, configured[spec], args)
        cold[spec] = (wall, CPU_TIMES[id(sal)])
        print(f"{spec}: first run {wall:.1f} s wall, {cold[spec][1]:.1f} s CPU", flush=True)
    rates = [gemm_rate(device, dtype)]
    runs: dict[str, list[dict[str, float]]] = {spec: [] for spec in specs}
    metas: dict[str, dict[str, Any]] = {}
    for r in range(args.repeats):
        for spec in specs if r % 2 == 0 else specs[::-1]:
            wall, sal = run_variant(pipe, trace, step, configured[spec], args)
            rates.append(gemm_rate(device, dtype))
            rate_wall = (rates[-2][0] + rates[-1][0]) / 2
            rate_cpu = (rates[-2][1] + rates[-1][1]) / 2
            cpu = CPU_TIMES[id(sal)]
            runs[spec].append(
                {
                    "wall_s": wall,
                    "cpu_s": cpu,
                    "gemm_gflops_wall": rate_wall / 1e9,
                    "gemm_gflops_cpu": rate_cpu / 1e9,
                    "ratio_wall": wall * rate_wall / flops["total"],
                    "ratio_cpu": cpu * rate_cpu / flops["total"],
                }
            )
            metas[spec] = {k: sal.meta[k] for k in ("batch_size", "batch_size_source", "compile")}
    out: dict[str, Any] = {
        "flops": flops,
        "gemm_dtype": str(dtype).removeprefix("torch."),
        "gemm_side": GEMM_SIDE["cuda" if device.type == "cuda" else "cpu"],
        "repeats": args.repeats,
        "variants": {},
    }
    for spec in specs:
        rows = runs[spec]
        med = {k: round(statistics.median(row[k] for row in rows), 3) for k in rows[0]}
        med["floor_wall_s"] = round(flops["total"] / (med["gemm_gflops_wall"] * 1e9), 3)
        med["floor_cpu_s"] = round(flops["total"] / (med["gemm_gflops_cpu"] * 1e9), 3)
        med["first_run_wall_s"] = round(cold[spec][0], 2)
        med["first_run_cpu_s"] = round(cold[spec][1], 2)
        if metas[spec]["compile"]:
            med["compile_wall_s"] = round(cold[spec][0] - med["wall_s"], 1)
            med["compile_cpu_s"] = round(cold[spec][1] - med["cpu_s"], 1)
        out["variants"][spec] = {**metas[spec], **med, "runs": rows}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet", default="tiny", choices=["tiny", "demo", "embedded", "sd15"])
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
    parser.add_argument(
        "--variants",
        default="auto",
        help="comma-separated DF-RISE variants timed against the floor, alternating: auto "
        "(the default batch size or --batch-size), a batch size (64), cl64 (channels_last "
        "UNet), compile / compile64 (DFRise(compile=True)); the first is 'ours'",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs of each variant (medians reported)"
    )
    parser.add_argument("--relevance-steps", type=int, default=2)
    parser.add_argument("--skip-relevance", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--results", type=Path, default=None, help="append a markdown section")
    parser.add_argument("--json", type=Path, default=None, help="write the results as JSON")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    load_start = [round(x, 2) for x in os.getloadavg()]
    t_build, pipe = timed(lambda: build(args.unet, args.latent), torch.device("cpu"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # load_demo_pipeline picks its own count
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

    if args.compile:
        args.variants = ",".join(
            v if v.startswith("compile") else "compile" + v.removeprefix("auto")
            for v in args.variants.split(",")
        )
    floor = against_floor(pipe, trace, step, args, dtype)
    ours_spec = args.variants.split(",")[0]
    ours = floor["variants"][ours_spec]
    t_ours, cpu_ours = ours["wall_s"], ours["cpu_s"]
    paper_n = args.paper_masks or args.n_masks
    paper = DFRise(n_masks=paper_n, batch_size=1, progress_bar=False, compile=args.compile)
    if args.compile:  # absorb the compilation for batch size 1
        DFRise(n_masks=2, batch_size=1, progress_bar=False, compile=True).attribute(
            pipe, trace, step
        )
    t_paper_measured, paper_sal = timed(lambda: paper.attribute(pipe, trace, step), device)
    t_paper = t_paper_measured * args.n_masks / paper_n
    cpu_paper = CPU_TIMES[id(paper_sal)] * args.n_masks / paper_n

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
        "batch_size": ours["batch_size"],
        "batch_size_source": ours["batch_size_source"],
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
        "floor": floor,
        "load_average_start": load_start,
        "machine": machine(device),
    }
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
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
        *(
            [f"- token relevance: {r['relevance_per_step_s']} s per step"]
            if r["relevance_per_step_s"] is not None
            else []
        ),
        *floor_lines(r),
        "",
    ]
    with path.open("a") as handle:
        handle.write("\n".join(lines))


def floor_lines(r: dict[str, Any]) -> list[str]:
    """The FLOP-floor part of a results section: the count, the matmul rate, the table."""
    f = r["floor"]
    flops = f["flops"]
    by_op = flops["call_by_op"]
    conv = by_op.get("aten.convolution", 0)
    attention = sum(v for k, v in by_op.items() if "attention" in k)
    lines = [
        f"- FLOP floor: {flops['per_cfg_call'] / 1e9:.3f} GFLOP per CFG call of the UNet "
        f"(convolutions {conv / 1e9:.3f}, attention products {attention / 1e9:.3f}, "
        f"linear layers {(flops['per_cfg_call'] - conv - attention) / 1e9:.3f}), SSIM score "
        f"{flops['per_score'] / 1e6:.2f} MFLOP per mask; {flops['total'] / 1e9:.1f} GFLOP "
        f"for {r['n_masks']} masks and the reference call. Peak: {f['gemm_side']}² "
        f"{f['gemm_dtype']} matmul, timed between the DF-RISE runs; medians of "
        f"{f['repeats']} runs each, alternating:",
        "",
        "| variant | batch | wall s | CPU s | matmul GFLOP/s (wall / per CPU s) | floor s "
        "(wall / CPU) | **ratio to floor (wall / CPU)** | first run s (wall / CPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in f["variants"].items():
        first = f"{v['first_run_wall_s']} / {v['first_run_cpu_s']}"
        if "compile_wall_s" in v:
            first += f" (compilation ≈ {v['compile_wall_s']} / {v['compile_cpu_s']})"
        lines.append(
            f"| {name} | {v['batch_size']} | {v['wall_s']} | {v['cpu_s']} | "
            f"{v['gemm_gflops_wall']:.1f} / {v['gemm_gflops_cpu']:.1f} | "
            f"{v['floor_wall_s']} / {v['floor_cpu_s']} | "
            f"**{v['ratio_wall']:.2f} / {v['ratio_cpu']:.2f}** | {first} |"
        )
    lines.append(
        f"\nLoad average at the start {r['load_average_start']}, at the end "
        f"{r['machine']['load_average']}."
    )
    return lines


if __name__ == "__main__":
    main()
