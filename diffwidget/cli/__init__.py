"""The ``diffwidget`` command: open a demo notebook, export an explorer, run a prompt set.

One module per command (:mod:`~diffwidget.cli.demo`, :mod:`~diffwidget.cli.export`,
:mod:`~diffwidget.cli.run`), each with its function and its ``add_parser``; what they share is
in :mod:`~diffwidget.cli.common`.

Examples
--------
$ diffwidget demo                      # quickstart notebook in JupyterLab, embedded model
$ diffwidget demo --check              # run the quickstart headless and exit (CI, smoke test)
$ diffwidget demo --classroom          # the quickstart as an app without code (Voila)
$ diffwidget demo --classroom live     # the live page as static files (no kernel)
$ diffwidget demo --notebook 03        # another bundled notebook
$ diffwidget demo --model dit          # the notebooks on the embedded DiT
$ diffwidget export "a large red circle on the left" -o explorer.html
$ diffwidget export "a red circle in the middle" --model dit -o dit.html
$ diffwidget export --live -o live.html   # any caption, generated in the browser
$ diffwidget export --live --folder site/diffusion  # the same page for a static web host
$ diffwidget run scene:50 --out scene-run  # a prompt set: maps and metrics per item
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from diffwidget.cli import demo, export, run
from diffwidget.cli.common import EXIT_FAILED, EXIT_OK, EXIT_STOPPED, EXIT_USAGE, UsageError

__all__ = [
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_STOPPED",
    "EXIT_USAGE",
    "UsageError",
    "build_parser",
    "main",
]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``diffwidget``."""
    parser = argparse.ArgumentParser(
        prog="diffwidget",
        description="Explain text-to-image diffusion step by step, in a notebook widget. "
        "Everything runs offline on the embedded model unless --model is given.",
        epilog="examples:\n  diffwidget demo\n  diffwidget demo --classroom\n"
        '  diffwidget export "a large red circle on the left" -o explorer.html\n'
        '  diffwidget export "a large red circle on the left" --model dit -o dit.html\n'
        "  diffwidget export --live -o live.html\n"
        "  diffwidget run scene:50 --out scene-run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,export,run}")

    demo.add_parser(sub)
    export.add_parser(sub)
    run.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diffwidget`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (UsageError, FileNotFoundError) as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
