"""``diffwidget run``: a prompt set, one result file per item."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from diffwidget.cli.common import (
    DEFAULT_STEPS,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_STOPPED,
    UsageError,
)

if TYPE_CHECKING:
    from diffwidget.runs.runner import RunReport


def run_prompts(args: argparse.Namespace) -> int:
    """Run a prompt set (``diffwidget.runs.run``) and say where the results are.

    Exit status: 0 when every item this process took succeeded; 1 when some failed (the
    first error is named); 2 for bad input, refused before any work; 3 when an I/O error
    such as a full disk stopped the run.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from diffwidget.runs.prompts import PromptSourceError
    from diffwidget.runs.runner import RunStoppedError, run
    from diffwidget.runs.sharding import DuplicatedProcessError
    from diffwidget.runs.store import RunSetupError

    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    try:
        report = run(
            args.prompts,
            args.out,
            methods=args.methods,
            steps=args.steps,
            seeds=args.seeds,
            shard=args.shard,
            inference_steps=args.inference_steps,
            guidance=args.guidance,
            model=args.model,
            rise_masks=args.rise_masks,
            n_random=args.n_random,
            cells_per_stage=args.cells_per_stage,
            metrics=args.metrics,
            save_traces=not args.no_traces,
            device="cpu" if args.cpu else None,
            progress=not args.no_progress,
        )
    except (PromptSourceError, RunSetupError, DuplicatedProcessError) as error:
        raise UsageError(str(error)) from None
    except RunStoppedError as error:
        _say(error.report)
        print(f"diffwidget run: error: {error}", file=sys.stderr)
        return EXIT_STOPPED
    _say(report)
    if report.failed:
        print(
            f"diffwidget run: error: {len(report.failed)} items failed; the first: "
            f"{report.first_error}. Rerun the command to retry them",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_OK


def _say(report: RunReport) -> None:
    """One line of what this process did, and what it left to others."""
    busy = f", {len(report.busy)} left to other processes" if report.busy else ""
    summary = f"; summary: {report.summary}" if report.summary else ""
    print(
        f"process {report.rank}/{report.processes}: {len(report.computed)} computed, "
        f"{len(report.failed)} failed, {len(report.skipped)} already done{busy} in "
        f"{report.out}{summary}",
        file=sys.stderr,
    )
    if report.no_summary:
        print(f"diffwidget run: {report.no_summary}", file=sys.stderr)


def add_parser(sub: Any) -> None:
    """Add ``diffwidget run`` to the subcommands ``sub``."""
    from diffwidget.runs.metrics import DEFAULT_METRICS, MAP_METHODS, METRICS

    p_run = sub.add_parser(
        "run",
        help="compute maps and metrics for every prompt of a set, one result file per item",
        description="Trace every prompt of a set, compute the chosen maps at the chosen "
        "steps, score them (faithfulness; on scene-world captions, segmentation against the "
        "generated image), and aggregate. Resumable; runs as one process, under torchrun or "
        "`accelerate launch` (items split between processes), or as --shard k/N of a job "
        "array.",
        epilog="examples:\n  diffwidget run scene:50 --out scene-run\n"
        "  torchrun --nproc_per_node 2 -m diffwidget.cli run prompts.txt --out run\n"
        "  diffwidget run prompts.jsonl --out run --shard 0/8 --methods df_rise df_cam",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p_run.add_argument(
        "prompts",
        help="a text file (one caption a line), a .jsonl file (id, prompt, labels, roles), "
        "scene:N (held-out scene-world captions) or scene-train:N",
    )
    p_run.add_argument(
        "--out", required=True, metavar="DIR", help="run folder (resumed if it exists)"
    )
    p_run.add_argument(
        "--methods",
        nargs="+",
        choices=MAP_METHODS,
        default=list(MAP_METHODS),
        help="maps computed at every explained step (default: all)",
    )
    p_run.add_argument(
        "--steps",
        nargs="+",
        type=int,
        default=None,
        help="loop indices explained (default: the paper's step 15 of 20, scaled)",
    )
    p_run.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=[0],
        help="seed offsets; each prompt runs once per offset, seeded from its id (default: 0)",
    )
    p_run.add_argument("--shard", default=None, metavar="k/N", help="only shard k (0-based) of N")
    p_run.add_argument(
        "--inference-steps",
        type=int,
        default=DEFAULT_STEPS,
        help="denoising steps per prompt (default: %(default)s)",
    )
    p_run.add_argument("--guidance", type=float, default=None, help="CFG scale above 1")
    p_run.add_argument(
        "--model",
        default=None,
        metavar="unet|dit|DIR",
        help="embedded model (unet, the default, or dit) or a local diffusers pipeline folder",
    )
    p_run.add_argument(
        "--rise-masks", type=int, default=500, help="DF-RISE masks (default: %(default)s)"
    )
    p_run.add_argument(
        "--n-random",
        type=int,
        default=3,
        help="random orders beside each AUC (default: %(default)s)",
    )
    p_run.add_argument(
        "--cells-per-stage",
        type=int,
        default=None,
        help="faithfulness stage size (default: the paper's, scaled to the latent)",
    )
    p_run.add_argument(
        "--metrics",
        nargs="+",
        choices=METRICS,
        default=list(DEFAULT_METRICS),
        help="metrics per item (default: %(default)s; probes records activations too)",
    )
    p_run.add_argument("--no-traces", action="store_true", help="do not keep each item's trace")
    p_run.add_argument("--cpu", action="store_true", help="stay on the CPU where CUDA exists")
    p_run.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p_run.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_run.set_defaults(func=run_prompts)
