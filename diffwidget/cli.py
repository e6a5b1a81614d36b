"""The ``diffwidget`` command: open the demo notebook, or export a standalone explorer.

Examples
--------
$ diffwidget demo                      # quickstart notebook in JupyterLab, embedded model
$ diffwidget demo --check              # run the quickstart headless and exit (CI, smoke test)
$ diffwidget export "a red circle on the left" -o explorer.html
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

QUICKSTART = "01_quickstart.ipynb"
DEFAULT_STEPS = 20
NOTEBOOK_TIMEOUT_S = 600


def notebooks_dir() -> Path:
    """The bundled notebooks: the repository's ``notebooks/`` or the copy inside the wheel."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "notebooks", package / "notebooks"):
        if (candidate / QUICKSTART).exists():
            return candidate
    raise FileNotFoundError(
        f"cannot find {QUICKSTART}; reinstall diffwidget (`pip install -e .` from a clone "
        "or `pip install diffwidget`)"
    )


def _run_notebook(path: Path) -> None:
    """Execute a notebook in a fresh kernel; raise with the failing cell's error."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=NOTEBOOK_TIMEOUT_S, resources={"metadata": {"path": str(path.parent)}})
    client.execute()


def demo(args: argparse.Namespace) -> int:
    """Copy the quickstart to a working folder and open it in JupyterLab."""
    source = notebooks_dir() / QUICKSTART
    workdir = Path(args.dir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    target = workdir / QUICKSTART
    if not target.exists():
        # Never overwrite a notebook the user may have edited.
        shutil.copy(source, target)
    if args.check:
        print(f"running {target} headless …", flush=True)
        _run_notebook(target)
        print("quickstart ran without errors")
        return 0
    if shutil.which("jupyter") is None:
        print("JupyterLab is not installed: run `pip install \"diffwidget[demo]\"`", file=sys.stderr)
        return 2
    command = ["jupyter", "lab", str(target), f"--ServerApp.root_dir={workdir}"]
    if args.no_browser:
        command.append("--no-browser")
    if args.port:
        command.append(f"--port={args.port}")
    print("opening", target, "in JupyterLab (Ctrl+C to stop)", flush=True)
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0


def export(args: argparse.Namespace) -> int:
    """Trace one prompt on the embedded model and write a standalone HTML explorer."""
    prompt = args.prompt.strip()
    if not prompt:
        print("the prompt is empty: pass a caption such as \"a red circle on the left\"", file=sys.stderr)
        return 2
    output = Path(args.output).expanduser()
    if output.suffix.lower() not in (".html", ".htm"):
        print(f"--output must end in .html, got {output}", file=sys.stderr)
        return 2
    if not output.parent.exists():
        print(f"folder {output.parent} does not exist: create it or choose another --output", file=sys.stderr)
        return 2

    from diffwidget.models.loader import load_demo_pipeline
    from diffwidget.tracing.context import trace
    from diffwidget.widget.explorer import Explorer

    pipe = load_demo_pipeline()
    record = trace(pipe, prompt, num_inference_steps=args.steps, seed=args.seed, guidance_scale=args.guidance)
    explorer = Explorer(record, pipe=pipe)
    for overlay in args.overlay:
        explorer.compute(overlay, step=args.step, wait=True)
    path = explorer.export_html(output)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB); open it in any browser, no kernel needed")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``diffwidget``."""
    parser = argparse.ArgumentParser(
        prog="diffwidget",
        description="Explain text-to-image diffusion step by step, in a notebook widget.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p_demo = sub.add_parser("demo", help="open the quickstart notebook on the embedded model")
    p_demo.add_argument("--dir", default="diffwidget-demo", help="working folder (default: %(default)s)")
    p_demo.add_argument("--port", type=int, default=None, help="JupyterLab port")
    p_demo.add_argument("--no-browser", action="store_true", help="start JupyterLab without opening a browser")
    p_demo.add_argument("--check", action="store_true", help="run the notebook headless and exit")
    p_demo.set_defaults(func=demo)

    p_export = sub.add_parser("export", help="write a standalone HTML explorer for one prompt")
    p_export.add_argument("prompt", help='a caption, e.g. "a red circle on the left"')
    p_export.add_argument("-o", "--output", default="explorer.html", help="HTML file to write")
    p_export.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="denoising steps")
    p_export.add_argument("--seed", type=int, default=0, help="random seed")
    p_export.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's)")
    p_export.add_argument(
        "--overlay",
        action="append",
        default=[],
        choices=["df_rise", "df_cam"],
        help="precompute a saliency overlay (repeatable)",
    )
    p_export.add_argument("--step", type=int, default=None, help="step for --overlay (default: all)")
    p_export.set_defaults(func=export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diffwidget`` command."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
