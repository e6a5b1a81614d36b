"""``diffwidget export``: trace one prompt and write a standalone HTML explorer.

With ``--live``: write the live page instead, where the embedded UNet (``--model dit``: the
DiT; ``--model unet dit``: both side by side) generates any caption in the reader's browser
(one offline HTML file, or ``--folder`` for a static web host).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffwidget.cli.common import (
    DEFAULT_STEPS,
    EXIT_OK,
    MAX_STEPS,
    UsageError,
    check_model,
    load_pipeline,
    tqdm_progress,
)
from diffwidget.explain.protocol import SALIENCY_METHOD_NAMES
from diffwidget.tracing.noise import PREDICTION_SOURCES

if TYPE_CHECKING:
    from diffwidget.tracing.trace import Trace
    from diffwidget.widget.explorer import Explorer

#: Saliency overlays the export can precompute (the registered methods).
OVERLAYS: tuple[str, ...] = SALIENCY_METHOD_NAMES


def check_output(path: str) -> Path:
    """Validate the ``--output`` path of ``export``."""
    output = Path(path).expanduser()
    if output.suffix.lower() not in (".html", ".htm"):
        raise UsageError(f"--output must be an .html file, got {str(output)!r}")
    if output.is_dir():
        raise UsageError(f"--output {output} is a folder; give a file name such as {output}.html")
    parent = output.parent.resolve()
    if not parent.is_dir():
        raise UsageError(f"folder {parent} does not exist: create it or choose another --output")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write to {parent}: choose another --output")
    return output


def check_prompt(prompt: str) -> list[str]:
    """Check a prompt against the embedded models' vocabulary and length.

    The prompt is read as the models' tokenizer reads it (case, punctuation and the spelling
    "center" normalised).

    Parameters
    ----------
    prompt : str
        The caption to trace.

    Returns
    -------
    list of str
        Notes for the user (e.g. the caption is outside the training grammar); empty if none.

    Raises
    ------
    UsageError
        If the prompt is empty, uses words the model has no token for, or is too long.
    """
    from diffwidget.models.prompts import MAX_WORDS, unknown_words, unknown_words_message
    from diffwidget.models.scenes import EXAMPLE_CAPTIONS, parse_caption
    from diffwidget.models.tokenizer import normalise_caption

    example = f'"{EXAMPLE_CAPTIONS[0]}"'
    words = normalise_caption(prompt).split()
    if not words:
        raise UsageError(f"the prompt is empty: pass a caption such as {example}")
    unknown = unknown_words(prompt)
    if unknown:
        raise UsageError(
            f"{unknown_words_message(unknown)}. Or pass --model DIR for a local Stable "
            "Diffusion pipeline folder"
        )
    if len(words) > MAX_WORDS:
        raise UsageError(
            f"the prompt has {len(words)} words; the embedded model reads at most {MAX_WORDS}"
        )
    try:
        parse_caption(prompt)
    except ValueError:
        return [
            f"note: {prompt!r} is not a caption of the model's training grammar (e.g. "
            f"{example}); the image may not follow it"
        ]
    return []


def check_numbers(args: argparse.Namespace) -> None:
    """Validate the numeric options of ``export``."""
    if not 1 <= args.steps <= MAX_STEPS:
        raise UsageError(f"--steps must be between 1 and {MAX_STEPS}, got {args.steps}")
    if args.seed < 0:
        raise UsageError(f"--seed must be zero or positive, got {args.seed}")
    if args.guidance is not None and args.guidance <= 1:
        raise UsageError(
            f"--guidance must be above 1 (classifier-free guidance), got {args.guidance}"
        )
    if args.step is not None and not 0 <= args.step < args.steps:
        raise UsageError(f"--step must be a loop index in 0..{args.steps - 1}, got {args.step}")
    if args.overlay and args.step is None:
        raise UsageError("--overlay needs --step: the step whose saliency to compute")


def export_live(args: argparse.Namespace) -> int:
    """Write the live page: one offline HTML file, or a folder for a static web host."""
    from diffwidget.models.live_manifest import LIVE_MODELS
    from diffwidget.widget.live import write_live_folder, write_live_html

    models = tuple(args.model or ("unet",))
    if any(m not in LIVE_MODELS for m in models) or len(set(models)) != len(models):
        raise UsageError(
            f"--live runs the embedded models in the browser: --model takes "
            f"{' and/or '.join(LIVE_MODELS)} (e.g. --model unet dit for both side by side), "
            f"got {' '.join(models)}"
        )
    if args.overlay or args.step is not None:
        raise UsageError("--overlay and --step need the kernel; the live page has none")
    prompt = (args.prompt or "").strip()
    for caption in (prompt, args.compare):
        if caption:
            for note in check_prompt(caption):
                print(note, file=sys.stderr)
    # The page's first caption is generated now (onnxruntime) so the page shows it at once.
    if importlib.util.find_spec("onnxruntime") is not None:
        print("generating the first caption ahead …", file=sys.stderr, flush=True)
    if args.folder is not None:
        folder = Path(args.folder).expanduser()
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"--folder {folder} is a file; give a folder")
        if folder.is_dir() and (folder / "index.html").exists() and not args.force:
            raise UsageError(f"{folder}/index.html exists; pass --force to replace it")
        write_live_folder(folder, prompt=prompt, compare=args.compare, models=models)
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6
        print(f"wrote {folder} ({size:.1f} MB): copy the folder to any static web host")
        return EXIT_OK
    output = check_output(args.output)
    path = write_live_html(output, prompt=prompt, compare=args.compare, models=models)
    size_mb = path.stat().st_size / 1e6
    print(
        f"wrote {path} ({size_mb:.1f} MB): open it in a browser, type a caption; no kernel needed"
    )
    return EXIT_OK


def _check_trace_args(args: argparse.Namespace) -> tuple[str, Path]:
    """Validate the options of a traced export; returns the prompt and the output file.

    Replaces ``args.model``'s one-item list by the model itself, as the loader takes it.
    """
    if args.folder is not None or args.compare:
        raise UsageError("--folder and --compare belong to --live")
    if args.model is not None:
        if len(args.model) != 1:
            raise UsageError("--model takes one model to trace (several only with --live)")
        args.model = args.model[0]
    if args.prompt is None:
        raise UsageError(
            'pass a caption to trace, e.g. "a large red circle on the left" (or --live for '
            "a page that generates captions in the browser)"
        )
    prompt = args.prompt.strip()
    output = check_output(args.output)
    check_numbers(args)
    from diffwidget.models.loader import DEMO_MODELS

    if args.model is None or args.model in DEMO_MODELS:
        for note in check_prompt(prompt):
            print(note, file=sys.stderr)
    else:
        check_model(args.model)
        if not prompt:
            raise UsageError('the prompt is empty: pass a caption such as "a red circle"')
    return prompt, output


def _add_overlays(explorer: Explorer, pipe: Any, record: Trace, args: argparse.Namespace) -> None:
    """Compute each ``--overlay`` at ``--step``, with a progress bar, and add it to the page."""
    for overlay in args.overlay:
        from diffwidget.explain.registry import saliency_method

        progress, close = tqdm_progress(f"{overlay} at step {args.step}")
        try:
            result = saliency_method(overlay)().attribute(
                pipe, record, args.step, progress=progress
            )
        finally:
            close()
        explorer.add_overlay(overlay, args.step, result)


def export(args: argparse.Namespace) -> int:
    """Trace one prompt and write a standalone HTML explorer."""
    if args.live:
        return export_live(args)
    prompt, output = _check_trace_args(args)

    # Library chatter (optional torchvision, accelerate) is noise on a command line; errors
    # still show. Set before transformers is imported, which reads it once.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from diffwidget.tracing.generate import trace
    from diffwidget.widget.explorer import Explorer

    print("loading the model …", file=sys.stderr, flush=True)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=False, desc="denoising", file=sys.stderr)
    kwargs: dict[str, Any] = {
        "num_inference_steps": args.steps,
        "seed": args.seed,
        "preview_from": args.preview_from,
    }
    if args.guidance is not None:
        kwargs["guidance_scale"] = args.guidance
    record = trace(pipe, prompt, **kwargs)
    explorer = Explorer(record, pipe=pipe)
    _add_overlays(explorer, pipe, record, args)
    plan = explorer.export(title=prompt)
    print(plan.summary(), file=sys.stderr)
    path = plan.write(output)
    size_mb = path.stat().st_size / 1e6
    print(f"wrote {path} ({size_mb:.2f} MB): open it in any browser, no kernel needed")
    return EXIT_OK


def add_parser(sub: Any) -> None:
    """Add ``diffwidget export`` to the subcommands ``sub``."""
    p_export = sub.add_parser(
        "export",
        help="write a standalone HTML explorer for one prompt",
        description="Trace one prompt and write an explorer that works offline in any "
        "browser, without Jupyter.",
    )
    p_export.add_argument(
        "prompt",
        nargs="?",
        default=None,
        help='a caption, e.g. "a large red circle on the left" (with --live: the first one shown)',
    )
    p_export.add_argument(
        "--live",
        action="store_true",
        help="write a page that generates any caption in the browser (embedded UNet, "
        "onnxruntime-web; no kernel, no server, nothing downloaded)",
    )
    p_export.add_argument(
        "--folder",
        default=None,
        help="with --live: write the page as a folder (index.html and its files) for a static "
        "web host such as a course page, instead of one HTML file",
    )
    p_export.add_argument(
        "--compare", default="", help="with --live: a second caption shown side by side"
    )
    p_export.add_argument(
        "--force", action="store_true", help="with --folder: replace an existing page"
    )
    p_export.add_argument(
        "-o", "--output", default="explorer.html", help="HTML file to write (default: %(default)s)"
    )
    p_export.add_argument(
        "--steps", type=int, default=DEFAULT_STEPS, help="denoising steps (default: %(default)s)"
    )
    p_export.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p_export.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="CFG scale above 1 (default: the model's recommended scale, 3 on the embedded model)",
    )
    p_export.add_argument(
        "--preview-from",
        choices=PREDICTION_SOURCES,
        default="guided",
        help="noise prediction the x̂0 previews show: the guided one the sampler follows, or "
        "the conditional half alone (default: %(default)s)",
    )
    p_export.add_argument(
        "--overlay",
        action="append",
        default=[],
        choices=OVERLAYS,
        help="precompute a saliency overlay at --step (repeatable)",
    )
    p_export.add_argument("--step", type=int, default=None, help="loop index for --overlay")
    p_export.add_argument(
        "--model",
        default=None,
        nargs="+",
        metavar="unet|dit|DIR",
        help="embedded model (unet, the default, or its DiT twin dit) or a local diffusers "
        "pipeline folder; with --live: unet, dit or both side by side (write the caption "
        "before --model)",
    )
    p_export.set_defaults(func=export)
