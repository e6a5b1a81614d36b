"""``diffwidget run``: a prompt set, one result file per item."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any

from diffwidget.cli.common import EXIT_FAILED, EXIT_OK, EXIT_STOPPED, UsageError

if TYPE_CHECKING:
    from diffwidget.explain.config import MethodConfig
    from diffwidget.explain.faithfulness import InsertionDeletionConfig
    from diffwidget.runs.runner import RunReport

#: The one place where the command line meets the methods' typed configs: each flag sets
#: one setting of one method (``faithfulness``: the insertion/deletion evaluator); ``--set
#: METHOD.SETTING=VALUE`` reaches every other setting. Unset, the configs' defaults hold.
#: (``faithfulness`` is :data:`diffwidget.runs.settings.FAITHFULNESS`, not imported here:
#: the parser is built without the runs' modules.)
CONFIG_FLAGS: dict[str, tuple[str, str, str]] = {
    "--rise-masks": ("df_rise", "n_masks", "DF-RISE masks per map"),
    "--n-random": ("faithfulness", "n_random", "random orders beside each AUC"),
    "--cells-per-stage": ("faithfulness", "cells_per_stage", "cells per faithfulness stage"),
}


def _config_class(method: str) -> type[MethodConfig]:
    from diffwidget.explain.faithfulness import InsertionDeletionConfig
    from diffwidget.explain.registry import config_class
    from diffwidget.runs.settings import FAITHFULNESS

    return InsertionDeletionConfig if method == FAITHFULNESS else config_class(method)


class _ConfigDefault:
    """A flag's value until it is given: the config's default, read only when ``--help``
    prints it (configs import torch)."""

    def __init__(self, method: str, setting: str) -> None:
        self.method, self.setting = method, setting

    def __str__(self) -> str:
        return str(getattr(_config_class(self.method)(), self.setting))


def method_configs(
    args: argparse.Namespace,
) -> tuple[list[str | MethodConfig], InsertionDeletionConfig]:
    """The run's methods (names, or configs where settings were given) and the evaluator's
    config, from the flags of :data:`CONFIG_FLAGS` and ``--set``."""
    from diffwidget.explain.faithfulness import InsertionDeletionConfig
    from diffwidget.runs.metric_names import METRIC_METHODS
    from diffwidget.runs.settings import FAITHFULNESS

    given = [
        (method, setting, value)
        for flag, (method, setting, _) in CONFIG_FLAGS.items()
        if not isinstance(value := getattr(args, flag[2:].replace("-", "_")), _ConfigDefault)
    ]
    for text in args.set:
        target, equals, value = text.partition("=")
        method, dot, setting = target.partition(".")
        if not equals or not dot:
            raise UsageError(f"--set takes METHOD.SETTING=VALUE (e.g. df_rise.p=0.3), got {text!r}")
        given.append((method, setting, value))
    # A metric's method takes --set like a map's (prompt_switch.*, concept_maps.*).
    of_metric = {method: metric for metric, method in METRIC_METHODS.items()}
    switch = [METRIC_METHODS[m] for m in args.metrics or () if m in METRIC_METHODS]
    configs: dict[str, MethodConfig] = {}
    for method, setting, value in given:
        if method in of_metric and method not in switch:
            raise UsageError(f"{method}.{setting} is set, but --metrics has no {of_metric[method]}")
        if method not in (*args.methods, FAITHFULNESS, *switch):
            raise UsageError(f"{method}.{setting} is set, but --methods does not compute {method}")
        try:
            config = configs.get(method) or _config_class(method)()
            configs[method] = config.with_text(setting, value)
        except ValueError as error:
            raise UsageError(f"{method}.{setting}: {error}") from None
    evaluator = configs.pop(FAITHFULNESS, None) or InsertionDeletionConfig()
    assert isinstance(evaluator, InsertionDeletionConfig)
    extra = [configs[name] for name in switch if name in configs]
    return [*(configs.get(name, name) for name in args.methods), *extra], evaluator


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
    methods, faithfulness = method_configs(args)
    try:
        report = run(
            args.prompts,
            args.out,
            methods=methods,
            steps=args.steps,
            seeds=args.seeds,
            shard=args.shard,
            inference_steps=args.inference_steps,
            guidance=args.guidance,
            model=args.model,
            faithfulness=faithfulness,
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
    from diffwidget.runs.metric_names import METRICS
    from diffwidget.runs.metrics import DEFAULT_METHODS, DEFAULT_METRICS, MAP_METHODS
    from diffwidget.runs.settings import RunSettings

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
        default=list(DEFAULT_METHODS),
        help="maps computed at every explained step (default: %(default)s)",
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
        default=RunSettings.inference_steps,
        help="denoising steps per prompt (default: %(default)s)",
    )
    p_run.add_argument("--guidance", type=float, default=None, help="CFG scale above 1")
    p_run.add_argument(
        "--model",
        default=None,
        metavar="unet|dit|DIR",
        help="embedded model (unet, the default, or dit) or a local diffusers pipeline folder",
    )
    for flag, (method, setting, text) in CONFIG_FLAGS.items():
        p_run.add_argument(
            flag,
            default=_ConfigDefault(method, setting),
            help=f"{text} (default: %(default)s; sets {method}.{setting})",
        )
    p_run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.SETTING=VALUE",
        help="any setting of a method's config, e.g. df_rise.p=0.3 or faithfulness.operator=zero "
        "or, with --metrics commitment, prompt_switch.switch_steps=[0,5,10], or, with --metrics "
        'concepts, concept_maps.words=["sky","dog"] (the absent-word controls) (repeatable)',
    )
    p_run.add_argument(
        "--metrics",
        nargs="+",
        choices=METRICS,
        default=list(DEFAULT_METRICS),
        help="metrics per item (default: %(default)s; probes records activations too; "
        "concepts maps each scene caption's colour and shape words)",
    )
    p_run.add_argument("--no-traces", action="store_true", help="do not keep each item's trace")
    p_run.add_argument("--cpu", action="store_true", help="stay on the CPU where CUDA exists")
    p_run.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p_run.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_run.set_defaults(func=run_prompts)
