"""``diffwidget demo``: open a bundled notebook, serve it as a classroom app, or check it."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffwidget._threads import HOW_TO_CHANGE, kernel_thread_env
from diffwidget.cli import classroom
from diffwidget.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    QUICKSTART,
    UsageError,
    install_hint,
    python_module_command,
    resolve_notebook,
)
from diffwidget.cli.serve import serve

if TYPE_CHECKING:
    from nbformat import NotebookNode

NOTEBOOK_TIMEOUT_S = 600  # per cell; the slowest bundled cell takes about a minute on 2 cores
DEFAULT_PORT_LAB = 8888


def _kernel_env(model: str = "unet") -> dict[str, str]:
    """Environment for notebook kernels: they must import this very diffwidget.

    From a clone that is not pip-installed, or with several environments on the machine,
    a kernel would otherwise import another copy (or none); offline flags keep hub
    libraries from reaching the network in a headless check. ``model`` is the embedded
    model the notebooks' ``load_demo_pipeline()`` loads.
    """
    from diffwidget.models.loader import DEMO_MODEL_ENV

    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    # The bundled notebooks run the embedded model, fastest on one torch thread.
    env.update(kernel_thread_env(env))
    env[DEMO_MODEL_ENV] = model
    return env


def run_notebook(path: Path, *, progress: bool = True, model: str = "unet") -> NotebookNode:
    """Execute a notebook in a fresh kernel, in its own folder.

    Parameters
    ----------
    path : Path
        The ``.ipynb`` file; it is not modified.
    progress : bool
        Show a progress bar over the code cells on stderr.
    model : {"unet", "dit"}
        The embedded model the notebook's ``load_demo_pipeline()`` loads.

    Returns
    -------
    NotebookNode
        The executed notebook, outputs included.

    Raises
    ------
    nbclient.exceptions.CellExecutionError
        If a cell raises; its message holds the cell's source and traceback.
    UsageError
        If the notebook tools (``diffwidget[demo]``) are not installed.
    """
    try:
        import nbformat
        from nbclient import NotebookClient
    except ImportError as error:
        raise UsageError(
            f"running notebooks needs {error.name}: run `{install_hint('demo')}`"
        ) from None
    from tqdm.auto import tqdm

    notebook = nbformat.read(path, as_version=4)
    n_code = sum(cell.cell_type == "code" for cell in notebook.cells)
    bar = tqdm(total=n_code, desc=path.name, unit="cell", disable=not progress, file=sys.stderr)

    def advance(**_: Any) -> None:
        bar.update(1)

    client = NotebookClient(
        notebook,
        timeout=NOTEBOOK_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        on_cell_executed=advance,
    )
    try:
        client.execute(env=_kernel_env(model))
    finally:
        bar.close()
    return notebook


def _check(source: Path, model: str = "unet") -> int:
    """Run ``source`` headless in a temporary copy; report the failing cell, if any."""
    try:
        from nbclient.exceptions import CellExecutionError
    except ImportError:
        raise UsageError(
            f"running notebooks needs nbclient: run `{install_hint('demo')}`"
        ) from None

    with tempfile.TemporaryDirectory(prefix="diffwidget-check-") as tmp:
        # A copy, so files the notebook writes (saved traces, exports) land in the temp dir.
        target = Path(tmp) / source.name
        shutil.copy(source, target)
        print(f"running {source.name} headless …", file=sys.stderr, flush=True)
        try:
            run_notebook(target, model=model)
        except CellExecutionError as error:
            print(f"{source.name} failed:\n{error}", file=sys.stderr)
            return EXIT_FAILED
    print(f"{source.name} ran without errors")
    return EXIT_OK


def _working_copy(source: Path, directory: str) -> Path:
    """Copy ``source`` into ``directory`` unless a copy (maybe edited) is already there."""
    workdir = Path(directory).expanduser().resolve()
    if workdir.exists() and not workdir.is_dir():
        raise UsageError(f"--dir {workdir} is a file; pass a folder for the working copy")
    workdir.mkdir(parents=True, exist_ok=True)
    target = workdir / source.name
    if not target.exists():
        # Never overwrite a notebook the user may have edited.
        shutil.copy(source, target)
    return target


def _announce_threads(env: dict[str, str]) -> None:
    threads = env.get("OMP_NUM_THREADS") or env.get("MKL_NUM_THREADS")
    if threads:
        print(
            f"notebook kernels start torch with {threads} thread(s); to change, {HOW_TO_CHANGE}",
            file=sys.stderr,
        )


def _check_live_options(args: argparse.Namespace) -> None:
    """Refuse the options that ``--classroom live`` cannot honour (it serves no notebook)."""
    given = [
        option
        for option, value in (
            ("--notebook", args.notebook),
            ("--token/--no-token", args.token),
            ("--max-students", args.max_students),
        )
        if value is not None
    ]
    if given:
        raise UsageError(
            f"--classroom live serves the live page (the embedded models, run in each student's "
            f"browser; no kernel, no code on this machine): {', '.join(given)} do not apply; "
            "use --classroom voila for a notebook"
        )


def _models(chosen: Sequence[str] | None, live: bool) -> tuple[str, ...]:
    """The ``--model`` choice: one model for a notebook, one or both for the live page."""
    models = tuple(chosen or ("unet",))
    if len(set(models)) != len(models):
        raise UsageError(f"--model names a model twice: {' '.join(models)}")
    if len(models) > 1 and not live:
        raise UsageError(
            "--model takes one model for a notebook; both (--model unet dit) only with "
            "--classroom live, whose page shows them side by side"
        )
    return models


def demo(args: argparse.Namespace) -> int:
    """Open a bundled notebook in JupyterLab, serve it with Voila, or run it headless."""
    if not args.classroom and (args.token is not None or args.max_students is not None):
        raise UsageError("--token, --no-token and --max-students apply to --classroom only")
    live = args.classroom == classroom.LIVE_MODE
    models = _models(args.model, live)
    if live:
        _check_live_options(args)
    args.model = models[0]
    source = resolve_notebook(args.notebook)
    if args.check:
        return _check(source, args.model)
    # The live page is no notebook: nothing to copy into --dir.
    target = source if live else _working_copy(source, args.dir)
    kernel_env = _kernel_env(args.model)
    if args.classroom:
        room = classroom.make_classroom(
            target,
            ip=args.ip,
            port=args.port,
            token=False if live else args.token,
            max_students=args.max_students,
            open_browser=not args.no_browser,
        )
        room = replace(room, models=models)
        if not live:
            _announce_threads(kernel_env)
        return classroom.CLASSROOM_MODES[args.classroom](room, kernel_env)
    command = [
        *python_module_command("jupyterlab", "demo"),
        str(target),
        f"--ServerApp.root_dir={target.parent}",
        f"--ServerApp.ip={args.ip}",
        f"--ServerApp.port={args.port or DEFAULT_PORT_LAB}",
    ]
    if args.no_browser:
        command.append("--no-browser")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Containers (Docker, CI images) often run as root, where JupyterLab refuses to
        # start without this flag; whoever runs as root has already made that choice.
        command.append("--allow-root")
    print(f"serving {target} in JupyterLab (Ctrl+C to stop)", file=sys.stderr, flush=True)
    _announce_threads(kernel_env)
    return serve(command, kernel_env)


def add_parser(sub: Any) -> None:
    """Add ``diffwidget demo`` to the subcommands ``sub``."""
    p_demo = sub.add_parser(
        "demo",
        help="open the quickstart notebook (or another bundled one)",
        description="Copy a bundled notebook into --dir and open it in JupyterLab; with "
        "--classroom serve it as an app without code (Voila), or with --classroom live serve "
        "the live page as static files; with --check run it headless.",
    )
    p_demo.add_argument(
        "--notebook",
        default=None,
        metavar="NAME",
        help="bundled notebook by number or name (01 … 06) or a .ipynb path "
        f"(default: {QUICKSTART})",
    )
    p_demo.add_argument(
        "--dir", default="diffwidget-demo", help="working folder (default: %(default)s)"
    )
    p_demo.add_argument("--port", type=int, default=None, help="server port")
    p_demo.add_argument(
        "--ip",
        default="127.0.0.1",
        help="address to serve on (default: %(default)s, this machine only); 0.0.0.0 for a "
        "classroom network, where --classroom requires a token",
    )
    p_demo.add_argument(
        "--no-browser", action="store_true", help="start the server without opening a browser"
    )
    p_demo.add_argument(
        "--model",
        choices=("unet", "dit"),
        nargs="+",
        default=None,
        help="embedded model the notebooks load: the UNet (default) or its DiT twin; with "
        "--classroom live one or both side by side (--model unet dit)",
    )
    mode = p_demo.add_mutually_exclusive_group()
    mode.add_argument(
        "--check", action="store_true", help="run the notebook headless and exit (0 = it ran)"
    )
    mode.add_argument(
        "--classroom",
        nargs="?",
        const="voila",
        default=None,
        choices=sorted(classroom.CLASSROOM_MODES),
        metavar="MODE",
        help="serve to a room; MODE (one of %(choices)s): voila (default; the notebook as an "
        "app that hides the code, one kernel per student, needs diffwidget[classroom]) or live "
        "(the live page as static files: the embedded models run in each student's browser, "
        "nothing runs on this machine, so no token and no student cap)",
    )
    room = p_demo.add_argument_group("classroom options")
    room.add_argument(
        "--token",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="voila: require a token in the URL (default: off loopback only; it is printed with "
        "the URL, or taken from JUPYTER_TOKEN); --no-token serves anyone who can reach the "
        "machine. live has no token: its server runs no code, only hands out the page",
    )
    room.add_argument(
        "--max-students",
        type=int,
        default=None,
        metavar="N",
        help="voila: most students (kernels) at once; a page load beyond them is refused (default: "
        f"what the available memory holds at about {classroom.KERNEL_MEMORY_MB} MB each)",
    )
    p_demo.set_defaults(func=demo)
