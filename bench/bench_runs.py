"""Prompt-set runs: throughput over processes, a paper-scale projection, the attention default.

Three measurements, each with its baseline in the same run:

``throughput``
    The same scene prompts run by ``diffwidget run`` as one process with one torch thread,
    as one process with two threads, and as two processes (``torchrun``, gloo) with one
    thread each. Wall time of each whole command (start-up and model loading included) and
    the per-item compute time the items record.
``projection``
    A few items at the paper's settings (500 DF-RISE masks, DF-CAM, insertion/deletion with
    3 random orders, 20 steps) on the embedded model: time per phase, and the latents the
    UNet evaluated, counted by a forward hook. FLOPs per CFG call are counted by
    ``torch.utils.flop_counter`` for the embedded UNet and for an SD-1.5-shaped UNet (meta
    device, no weights). The study of 1000 captions on 8 GPUs is then *projected* from these
    counts and GPU throughputs quoted from DESIGN.md (measured on an H100 elsewhere): no GPU
    number here is a measurement.
``aggregation``
    ``diffwidget run scene-train:N`` and ``scene:M`` (attention only), then every candidate
    aggregation of ``diffwidget.runs.study`` and DAAM's on both splits; the candidate is
    chosen on the training split by mIoU at τ = 0.4 and confirmed on the held-out split.

Usage::

    python bench/bench_runs.py throughput --prompts 8
    python bench/bench_runs.py projection --prompts 2
    python bench/bench_runs.py aggregation --train 100 --heldout 100
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

#: GPU throughputs for the projection, seconds per CFG call of an SD-1.5 UNet on a 64×64
#: latent, quoted from DESIGN.md §5 (H100, fp16): the paper's code (one call per mask,
#: 12-14 s per 500 masks), naive batching (3.0 s per 500), and the FLOP floor (~790 TFLOP/s).
GPU_SECONDS_PER_CALL = {
    "paper's code (1 call per mask)": 13.0 / 500,
    "naive batching": 3.0 / 500,
    "FLOP floor, 790 TFLOP/s": None,
}
GPU_PEAK_FLOPS = 790e12
PAPER_CAPTIONS = 1000
GPUS = 8
#: DF-CAM's backward pass costs about two forward passes.
BACKWARD_FORWARDS = 2.0


def _env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _cli_run(launcher: list[str], args: list[str], threads: int) -> float:
    start = time.perf_counter()
    command = [*launcher, "-m", "diffwidget.cli", "run", *args, "--threads", str(threads)]
    result = subprocess.run(command, env=_env(threads), capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return time.perf_counter() - start


def _item_seconds(run_dir: Path) -> list[float]:
    from diffwidget.runs.open import load_run

    return [item.ok.timing["total"] for item in load_run(run_dir).records if item.ok]


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    """1 process × 1 thread, 1 process × 2 threads, 2 processes × 1 thread."""
    prompts = f"scene:{args.prompts}"
    settings = [
        "--rise-masks",
        str(args.rise_masks),
        "--n-random",
        str(args.n_random),
        "--inference-steps",
        str(args.inference_steps),
        "--no-progress",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    configs = {
        "1 process x 1 thread": ([sys.executable], 1),
        "1 process x 2 threads": ([sys.executable], 2),
        "2 processes x 1 thread": ([*torchrun, "--nproc_per_node", "2"], 1),
    }
    out: dict[str, Any] = {"settings": vars(args) | {"prompts": prompts}, "runs": {}}
    with tempfile.TemporaryDirectory() as folder:
        for name, (launcher, threads) in configs.items():
            run_dir = Path(folder) / name.replace(" ", "_")
            load_before = os.getloadavg()
            wall = _cli_run(launcher, [prompts, "--out", str(run_dir), *settings], threads)
            items = _item_seconds(run_dir)
            out["runs"][name] = {
                "wall_s": round(wall, 2),
                "items_per_min": round(60 * len(items) / wall, 2),
                "item_compute_s_mean": round(sum(items) / len(items), 2),
                "load_average_before_after": [
                    round(load_before[0], 2),
                    round(os.getloadavg()[0], 2),
                ],
            }
            print(name, out["runs"][name], flush=True)
    base = out["runs"]["1 process x 1 thread"]["wall_s"]
    for row in out["runs"].values():
        row["speedup_vs_1x1"] = round(base / row["wall_s"], 2)
    return out


def _flops_per_cfg_call() -> dict[str, float]:
    import torch
    from benchlib import SD15_UNET
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from diffwidget.models.loader import load_demo_pipeline

    with torch.device("meta"):
        sd15 = UNet2DConditionModel(**SD15_UNET)
    inputs = (
        torch.randn(2, 4, 64, 64, device="meta"),
        torch.tensor([500, 500], device="meta"),
        torch.randn(2, 77, 768, device="meta"),
    )
    with FlopCounterMode(display=False) as counter:
        sd15(*inputs)
    sd15_flops = counter.get_total_flops()
    unet = load_demo_pipeline().unet
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(torch.randn(2, 4, 16, 16), torch.tensor([500, 500]), torch.randn(2, 16, 64))
    return {"embedded": float(counter.get_total_flops()), "sd15_64x64": float(sd15_flops)}


def projection(args: argparse.Namespace) -> dict[str, Any]:
    """Per-item cost at the paper's settings on the CPU, projected to 8 GPUs."""
    import torch
    from benchlib import machine

    from diffwidget.models.loader import load_demo_pipeline
    from diffwidget.runs.open import load_run
    from diffwidget.runs.runner import run

    torch.set_num_threads(args.threads)
    pipe = load_demo_pipeline()
    latents = {"forward": 0, "calls": 0}

    def count(_module: Any, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = inputs[0] if inputs else kwargs["sample"]
        latents["forward"] += int(sample.shape[0]) // 2  # CFG: two halves per latent
        latents["calls"] += 1

    handle = pipe.unet.register_forward_pre_hook(count, with_kwargs=True)
    try:
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            # The methods' defaults are the paper's settings (500 masks, 3 random orders).
            run(f"scene:{args.prompts}", Path(folder) / "run", pipe=pipe, progress=False)
            wall = time.perf_counter() - start
            records = [item.ok for item in load_run(Path(folder) / "run").records if item.ok]
    finally:
        handle.remove()
    phases: dict[str, float] = {}
    for record in records:
        for phase, seconds in record.timing.items():
            phases[phase] = phases.get(phase, 0.0) + seconds / len(records)
    flops = _flops_per_cfg_call()
    per_item_latents = latents["forward"] / len(records)
    # DF-CAM runs one forward with grad and one backward per map: count the backward too.
    cams = sum(m.method == "df_cam" for m in records[0].maps)
    per_item_equiv = per_item_latents + BACKWARD_FORWARDS * cams
    cpu_flops = per_item_latents * flops["embedded"] / phases["total"]
    gpu: dict[str, Any] = {}
    for name, seconds_per_call in GPU_SECONDS_PER_CALL.items():
        per_call = seconds_per_call or flops["sd15_64x64"] / GPU_PEAK_FLOPS
        item_s = per_item_equiv * per_call
        gpu[name] = {
            "seconds_per_item": round(item_s, 2),
            "gpu_hours_1000_captions": round(item_s * PAPER_CAPTIONS / 3600, 2),
            "hours_on_8_gpus": round(item_s * PAPER_CAPTIONS / GPUS / 3600, 2),
        }
    return {
        "machine": machine(),
        "items": len(records),
        "wall_s": round(wall, 1),
        "seconds_per_item_by_phase": {k: round(v, 2) for k, v in phases.items()},
        "unet_cfg_latents_per_item": per_item_latents,
        "unet_calls_per_item": latents["calls"] / len(records),
        "forward_equivalents_per_item": per_item_equiv,
        "flops_per_cfg_call": flops,
        "cpu_achieved_gflops": round(cpu_flops / 1e9, 2),
        "projection_gpu": gpu,
    }


def aggregation(args: argparse.Namespace) -> dict[str, Any]:
    """Choose AttentionMaps' defaults on a training split, confirm on a held-out split."""
    import torch

    from diffwidget.explain.attention import AttentionMaps
    from diffwidget.runs.runner import run
    from diffwidget.runs.study import (
        DAAM,
        candidate_grid,
        choose,
        paired_gap,
        score_candidates,
        summary_table,
    )

    torch.set_num_threads(args.threads)
    folder = Path(args.out)
    candidates = candidate_grid()
    result: dict[str, Any] = {"settings": {"train": args.train, "heldout": args.heldout}}
    tables = {}
    splits = (("train", f"scene-train:{args.train}"), ("heldout", f"scene:{args.heldout}"))
    for split, source in splits:
        run(source, folder / split, methods=["attention"], metrics=["segmentation"], progress=False)
        per_item = score_candidates(folder / split, candidates)
        tables[split] = (summary_table(per_item, candidates), per_item)
    chosen = choose(tables["train"][0])
    default = AttentionMaps()
    result["chosen_on_train"] = chosen
    result["attention_maps_defaults"] = {
        "resolution": default.resolution,
        "window": default.window,
        "normalize": default.normalize,
    }
    previous = "all steps0-1 none"  # the former default: every layer, every step
    for split, (table, per_item) in tables.items():
        rows = table.set_index("name").loc[[chosen, previous, DAAM]]
        result[split] = {
            name: {k: float(v) for k, v in row.items() if isinstance(v, (int, float))}
            for name, row in rows.iterrows()
        }
        result[split]["gap_vs_daam_miou_tau"] = paired_gap(per_item[chosen], per_item[DAAM])
        result[split]["gap_vs_daam_map"] = paired_gap(per_item[chosen], per_item[DAAM], "map")
        best_ap = table[table["name"] != DAAM].sort_values("map", ascending=False).iloc[0]
        result[split]["best_threshold_free"] = {
            "name": best_ap["name"],
            "map": float(best_ap["map"]),
            "miou_best": float(best_ap["miou_best"]),
            "miou_tau": float(best_ap["miou_tau"]),
        }
        table.to_csv(folder / f"{split}_candidates.csv", index=False)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("throughput")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--rise-masks", type=int, default=100)
    p.add_argument("--n-random", type=int, default=1)
    p.add_argument("--inference-steps", type=int, default=20)
    p = sub.add_parser("projection")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("aggregation")
    p.add_argument("--train", type=int, default=100)
    p.add_argument("--heldout", type=int, default=100)
    p.add_argument("--out", default="bench-aggregation-runs")
    p.add_argument("--threads", type=int, default=1)
    for p in sub.choices.values():
        p.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args()
    result = {"throughput": throughput, "projection": projection, "aggregation": aggregation}[
        args.command
    ](args)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json is not None:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
