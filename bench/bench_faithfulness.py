"""Deletion/insertion AUC of DF-RISE and DF-CAM against random orders on held-out prompts.

For each held-out caption of the embedded model's scene world: trace a generation, compute
DF-RISE and DF-CAM at one step, and evaluate both maps with insertion/deletion curves beside
seeded random orders. Prints per-prompt mean +- sd, the share of prompts whose map beats
random, and the paper's mean-curve aggregation.

Usage::

    python bench/bench_faithfulness.py --prompts 50             # shipped embedded model
    python bench/bench_faithfulness.py --path runs/cpu/ckpt     # a training checkpoint
    python bench/bench_faithfulness.py --model dit --n-masks 200    # the embedded DiT
    python bench/bench_faithfulness.py --random-weights --prompts 3 --n-masks 50   # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffwidget.explain.cam import DFCam
from diffwidget.explain.faithfulness import InsertionDeletion, summarize
from diffwidget.explain.rise import DFRise

STEPS = 20
#: Step explained: the paper visualises step 15 of 20.
STEP = 15


def load(args: argparse.Namespace) -> Any:
    if args.random_weights:
        if args.model == "dit":
            from diffwidget.models.dit import build_dit_pipeline

            return build_dit_pipeline(seed=0)
        from diffwidget.models.architecture import build_demo_pipeline

        return build_demo_pipeline(seed=0)
    from diffwidget.models.loader import load_demo_pipeline

    return load_demo_pipeline(args.model, path=args.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument(
        "--first", type=int, default=0, help="index of the first held-out caption (and seed)"
    )
    parser.add_argument("--n-masks", type=int, default=500)
    parser.add_argument("--step", type=int, default=STEP)
    parser.add_argument("--model", choices=["unet", "dit"], default="unet")
    parser.add_argument(
        "--guidance", type=float, default=None, help="CFG scale (default: the model's own)"
    )
    parser.add_argument("--n-random", type=int, default=3, help="random orders per prompt")
    parser.add_argument("--path", type=Path, default=None)
    parser.add_argument("--random-weights", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--paper-estimator",
        action="store_true",
        help="also evaluate DF-RISE with center=False (the paper's estimator, no control variate)",
    )
    parser.add_argument(
        "--cam-top-blocks",
        action="store_true",
        help="also evaluate DF-CAM over the top-level blocks instead of every layer",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the summary here")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from diffwidget.models.scenes import SceneWorld
    from diffwidget.tracing.generate import trace

    pipe = load(args)
    if args.guidance is None:
        args.guidance = float(getattr(pipe, "recommended_guidance_scale", 3.0))
    captions = SceneWorld(seed=0).held_out_captions(args.first + args.prompts)[args.first :]
    methods: dict[str, Any] = {
        "df_rise": DFRise(n_masks=args.n_masks, progress_bar=False),
        "df_cam": DFCam(),
    }
    if args.cam_top_blocks:
        from diffwidget.tracing.families.unet import block_paths

        if args.model != "unet":
            parser.error("--cam-top-blocks names the UNet's blocks; use it with --model unet")
        methods["df_cam_top_blocks"] = DFCam(blocks=block_paths(pipe.unet))
    if args.paper_estimator:
        methods["df_rise_paper"] = DFRise(n_masks=args.n_masks, progress_bar=False, center=False)
    evaluator = InsertionDeletion(n_random=args.n_random)
    results: dict[str, list[Any]] = {name: [] for name in methods}
    start = time.perf_counter()
    for i, caption in enumerate(captions, start=args.first):
        tr = trace(
            pipe, caption, num_inference_steps=STEPS, guidance_scale=args.guidance, seed=i,
            decode_previews=False,
        )  # fmt: skip
        for name, method in methods.items():
            sal = method.attribute(pipe, tr, args.step)
            results[name].append(evaluator.evaluate(pipe, tr, args.step, sal))
        print(
            f"[{i + 1 - args.first}/{len(captions)}] {caption!r}: "
            + ", ".join(
                f"{n} deletion {r[-1].saliency.deletion_auc:.3f} vs random "
                f"{r[-1].random.deletion_auc:.3f}"
                for n, r in results.items()
            ),
            flush=True,
        )
        if args.json is not None:
            # Written after every prompt, so an interrupted run keeps what it measured.
            write_summary(args, results, len(captions), time.perf_counter() - start)
    print(write_summary(args, results, len(captions), time.perf_counter() - start))


def write_summary(
    args: argparse.Namespace, results: dict[str, list[Any]], n_captions: int, seconds: float
) -> str:
    """Summarise the prompts done so far; write the JSON when ``--json`` is given."""
    summary: dict[str, Any] = {name: summarize(res) for name, res in results.items()}
    # Per prompt, so that runs over disjoint prompt ranges (--first) can be pooled exactly.
    summary["per_prompt"] = {
        name: [
            {
                "prompt": args.first + i,
                "deletion_auc": r.saliency.deletion_auc,
                "insertion_auc": r.saliency.insertion_auc,
                "random_deletion_auc": r.random.deletion_auc,
                "random_insertion_auc": r.random.insertion_auc,
            }
            for i, r in enumerate(res)
        ]
        for name, res in results.items()
    }
    summary["settings"] = {
        "prompts_done": len(next(iter(results.values()))),
        "prompts_planned": n_captions,
        "first": args.first,
        "n_masks": args.n_masks,
        "step": args.step,
        "steps": STEPS,
        "guidance": args.guidance,
        "model": args.model,
        "weights": "random" if args.random_weights else str(args.path or "shipped"),
        "similarity": "ssim",
        "n_random": args.n_random,
        "seconds": round(seconds, 1),
    }
    text = json.dumps(summary, indent=2)
    if args.json is not None:
        args.json.write_text(text)
    return text


if __name__ == "__main__":
    main()
