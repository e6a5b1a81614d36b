"""``diffwidget demo``: open a bundled notebook, serve it as a classroom app, or check it."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffwidget._threads import HOW_TO_CHANGE, kernel_thread_env
from diffwidget.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    QUICKSTART,
    UsageError,
    install_hint,
    jupyter_config_dir,
    python_module_command,
    resolve_notebook,
)

if TYPE_CHECKING:
    from nbformat import NotebookNode

NOTEBOOK_TIMEOUT_S = 600  # per cell; the slowest bundled cell takes about a minute on 2 cores
DEFAULT_PORT_LAB = 8888
DEFAULT_PORT_CLASSROOM = 8866


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


def classroom_command(
    notebook: Path, *, port: int, ip: str, open_browser: bool, model: str = "unet"
) -> tuple[list[str], dict[str, str]]:
    """The Voila command line and environment that serve ``notebook`` as a code-free app.

    ``jupyter-config/voila.json`` is put on ``JUPYTER_CONFIG_PATH`` rather than installed
    globally, so it governs this app only and the user's own Jupyter config still wins.
    What it sets, and why:

    - kernels idle for 15 minutes with no page attached are culled: each student's kernel
      holds the model, and laptops that sleep or leave the network never close their tab
      cleanly; a kernel whose page is still open is never culled;
    - ``@jupyter-notebook/lab-extension`` is not loaded: Voila 0.5 ships an older
      JupyterLab core that this Notebook 7 extension fails against, on every page load.

    Voila's defaults already strip code cells, stderr and tracebacks from the page.
    """
    voila = python_module_command("voila", "classroom")
    env = _kernel_env(model)
    config = str(jupyter_config_dir())
    env["JUPYTER_CONFIG_PATH"] = os.pathsep.join(
        p for p in (config, env.get("JUPYTER_CONFIG_PATH", "")) if p
    )
    command = [*voila, str(notebook), f"--port={port}", f"--Voila.ip={ip}"]
    if not open_browser:
        command.append("--no-browser")
    return command, env


def _serve(command: list[str], env: dict[str, str], what: str) -> int:
    print(f"serving {what} (Ctrl+C to stop)", file=sys.stderr, flush=True)
    threads = env.get("OMP_NUM_THREADS") or env.get("MKL_NUM_THREADS")
    if threads:
        print(
            f"notebook kernels start torch with {threads} thread(s); to change, {HOW_TO_CHANGE}",
            file=sys.stderr,
        )
    try:
        return subprocess.call(command, env=env)
    except KeyboardInterrupt:
        return EXIT_OK


def demo(args: argparse.Namespace) -> int:
    """Open a bundled notebook in JupyterLab, serve it with Voila, or run it headless."""
    source = resolve_notebook(args.notebook)
    if args.check:
        return _check(source, args.model)
    target = _working_copy(source, args.dir)
    if args.classroom:
        port = args.port or DEFAULT_PORT_CLASSROOM
        command, env = classroom_command(
            target, port=port, ip=args.ip, open_browser=not args.no_browser, model=args.model
        )
        return _serve(command, env, f"{target.name} as a classroom app at http://{args.ip}:{port}/")
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
    return _serve(command, _kernel_env(args.model), f"{target} in JupyterLab")


def add_parser(sub: Any) -> None:
    """Add ``diffwidget demo`` to the subcommands ``sub``."""
    p_demo = sub.add_parser(
        "demo",
        help="open the quickstart notebook (or another bundled one)",
        description="Copy a bundled notebook into --dir and open it in JupyterLab; with "
        "--classroom serve it as an app without code (Voila); with --check run it headless.",
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
        "--ip", default="127.0.0.1", help="address to serve on; 0.0.0.0 for a classroom network"
    )
    p_demo.add_argument(
        "--no-browser", action="store_true", help="start the server without opening a browser"
    )
    p_demo.add_argument(
        "--model",
        choices=("unet", "dit"),
        default="unet",
        help="embedded model the notebooks load: the UNet or its DiT twin (default: %(default)s)",
    )
    mode = p_demo.add_mutually_exclusive_group()
    mode.add_argument(
        "--check", action="store_true", help="run the notebook headless and exit (0 = it ran)"
    )
    mode.add_argument(
        "--classroom",
        action="store_true",
        help="serve the notebook as an app that hides the code (needs diffwidget[classroom])",
    )
    p_demo.set_defaults(func=demo)
