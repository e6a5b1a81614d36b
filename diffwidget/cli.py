"""The ``diffwidget`` command: open a demo notebook, or export a standalone explorer.

Examples
--------
$ diffwidget demo                      # quickstart notebook in JupyterLab, embedded model
$ diffwidget demo --check              # run the quickstart headless and exit (CI, smoke test)
$ diffwidget demo --classroom          # the quickstart as an app without code (Voila)
$ diffwidget demo --notebook 03        # another bundled notebook
$ diffwidget demo --model dit          # the notebooks on the embedded DiT
$ diffwidget export "a large red circle on the left" -o explorer.html
$ diffwidget export "a red circle in the middle" --model dit -o dit.html
$ diffwidget run scene:50 --out scene-run  # a prompt set: maps and metrics per item
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffwidget._threads import HOW_TO_CHANGE, kernel_thread_env
from diffwidget.explain.protocol import SALIENCY_METHOD_NAMES
from diffwidget.tracing.noise import PREDICTION_SOURCES

if TYPE_CHECKING:
    from nbformat import NotebookNode

QUICKSTART = "01_quickstart.ipynb"
DEFAULT_STEPS = 20
MAX_STEPS = 1000  # the schedulers' training horizon: more steps than timesteps is impossible
NOTEBOOK_TIMEOUT_S = 600  # per cell; the slowest bundled cell takes about a minute on 2 cores
DEFAULT_PORT_LAB = 8888
DEFAULT_PORT_CLASSROOM = 8866
EXIT_OK = 0
EXIT_FAILED = 1  # the work itself failed (a notebook cell raised)
EXIT_USAGE = 2  # bad arguments; argparse uses the same code

#: Saliency overlays the export can precompute (the registered methods).
OVERLAYS: tuple[str, ...] = SALIENCY_METHOD_NAMES


class UsageError(Exception):
    """A problem with the command line that the user can fix; the message says how."""


# --------------------------------------------------------------------------------------
# Locating the bundled files, and saying how to install what is missing
# --------------------------------------------------------------------------------------
def source_checkout() -> Path | None:
    """The clone this diffwidget runs from, or ``None`` for an installed wheel."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "diffwidget"' in pyproject.read_text():
        return root
    return None


def extra_requirements(extra: str) -> list[str]:
    """The requirements of ``diffwidget[extra]`` from the installed metadata (may be empty)."""
    try:
        requires = importlib.metadata.requires("diffwidget") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    marker = re.compile(rf"""extra\s*==\s*["']{re.escape(extra)}["']""")
    return [req.split(";")[0].strip() for req in requires if marker.search(req)]


def install_hint(extra: str) -> str:
    """A pip command that installs ``diffwidget[extra]`` into the running interpreter.

    It works from what the user has before any release exists: in a clone, the clone's
    extra; in an environment installed from a wheel, the extra's own requirements. pip
    is run through this interpreter, so an environment that is not activated gets it.

    Examples
    --------
    >>> install_hint("classroom")  # doctest: +SKIP
    '/home/me/venv/bin/python -m pip install -e "/home/me/diffwidget[classroom]"'
    """
    pip = f"{sys.executable} -m pip install"
    root = source_checkout()
    if root is not None:
        return f'{pip} -e "{root}[{extra}]"'
    requirements = extra_requirements(extra)
    if requirements:
        return pip + " " + " ".join(f'"{req}"' for req in requirements)
    from diffwidget import __version__

    wheel = f"dist/diffwidget-{__version__}-py3-none-any.whl"
    return f'{pip} "{wheel}[{extra}]" (the wheel you installed diffwidget from)'


def _bundled_dir(name: str, marker: str) -> Path:
    """A folder shipped beside the package: the clone's ``name/`` or the wheel's copy."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / name, package / name):
        if (candidate / marker).exists():
            return candidate
    raise FileNotFoundError(
        f"cannot find {name}/{marker} next to the diffwidget package; reinstall it "
        "(`pip install -e .` from a clone, or `pip install dist/diffwidget-….whl` from a "
        "built wheel)"
    )


def notebooks_dir() -> Path:
    """The bundled notebooks: the repository's ``notebooks/`` or the copy inside the wheel."""
    return _bundled_dir("notebooks", QUICKSTART)


def jupyter_config_dir() -> Path:
    """The Jupyter configuration for classroom mode (``jupyter-config/`` with ``voila.json``)."""
    return _bundled_dir("jupyter-config", "voila.json")


def bundled_notebooks() -> list[Path]:
    """The numbered notebooks shipped with diffwidget, in order."""
    return sorted(notebooks_dir().glob("[0-9][0-9]_*.ipynb"))


def resolve_notebook(name: str | None) -> Path:
    """A bundled notebook by number or name (``"03"``, ``"03_saliency_over_time"``) or a path.

    Raises
    ------
    UsageError
        If nothing matches; the message lists the bundled notebooks.
    """
    if name is None:
        return notebooks_dir() / QUICKSTART
    path = Path(name).expanduser()
    if path.suffix == ".ipynb":
        if not path.is_file():
            raise UsageError(f"notebook {path} does not exist; pass an existing .ipynb file")
        return path.resolve()
    available = bundled_notebooks()
    matches = [nb for nb in available if nb.stem == name or nb.stem.split("_", 1)[0] == name]
    if len(matches) != 1:
        names = ", ".join(nb.stem for nb in available)
        raise UsageError(f"no bundled notebook {name!r}; choose one of: {names} (or a .ipynb path)")
    return matches[0]


# --------------------------------------------------------------------------------------
# diffwidget demo
# --------------------------------------------------------------------------------------
def _kernel_env(model: str = "unet") -> dict[str, str]:
    """Environment for notebook kernels: they must import this very diffwidget.

    From a clone that is not pip-installed, or with several environments on the machine,
    a kernel would otherwise import another copy (or none); offline flags keep hub
    libraries from reaching the network in a headless check. ``model`` is the embedded
    model the notebooks' ``load_demo_pipeline()`` loads.
    """
    from diffwidget.models.loader import DEMO_MODEL_ENV

    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
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


def python_module_command(module: str, extra: str) -> list[str]:
    """``[python, "-m", module]`` for this interpreter, so no PATH look-up is involved.

    A virtual environment's ``diffwidget`` run without activating the environment would
    otherwise find another installation's program on PATH, or none.

    Raises
    ------
    UsageError
        If ``module`` is not importable here; the message says what to install.
    """
    if importlib.util.find_spec(module) is None:
        raise UsageError(
            f"{module} is not installed for {sys.executable}: run `{install_hint(extra)}`"
        )
    return [sys.executable, "-m", module]


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


# --------------------------------------------------------------------------------------
# diffwidget export
# --------------------------------------------------------------------------------------
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


def load_pipeline(model: str | None) -> Any:
    """An embedded model ("unet", the default, or "dit"), or a pipeline in the folder ``model``."""
    from diffwidget.models.loader import DEMO_MODELS, load_demo_pipeline

    if model is None or model in DEMO_MODELS:
        return load_demo_pipeline(model or "unet")  # type: ignore[arg-type]
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(str(check_model(model)), local_files_only=True)


def check_model(model: str) -> Path:
    """Validate ``--model``: a local folder written by ``pipe.save_pretrained``."""
    folder = Path(model).expanduser()
    if not (folder / "model_index.json").is_file():
        raise UsageError(
            f"--model {folder} is not a diffusers pipeline folder (no model_index.json); "
            "save one with `pipe.save_pretrained(folder)`"
        )
    return folder


def _tqdm_progress(desc: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A ``progress(done, total)`` callback drawing a tqdm bar, and its closer."""
    from tqdm.auto import tqdm

    bar = tqdm(desc=desc, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return progress, bar.close


def export(args: argparse.Namespace) -> int:
    """Trace one prompt and write a standalone HTML explorer."""
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

    # Library chatter (optional torchvision, accelerate) is noise on a command line; errors
    # still show. Set before transformers is imported, which reads it once.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from diffwidget.tracing.context import trace
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
    for overlay in args.overlay:
        from diffwidget.explain.registry import saliency_method

        progress, close = _tqdm_progress(f"{overlay} at step {args.step}")
        try:
            result = saliency_method(overlay)().attribute(
                pipe, record, args.step, progress=progress
            )
        finally:
            close()
        explorer.add_overlay(overlay, args.step, result)
    path = Path(explorer.to_html(output, title=prompt))
    size_mb = path.stat().st_size / 1e6
    print(f"wrote {path} ({size_mb:.2f} MB): open it in any browser, no kernel needed")
    return EXIT_OK


# --------------------------------------------------------------------------------------
# diffwidget run
# --------------------------------------------------------------------------------------
def run_prompts(args: argparse.Namespace) -> int:
    """Run a prompt set (``diffwidget.runs.run``) and say where the results are."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from diffwidget.runs.prompts import PromptSourceError
    from diffwidget.runs.runner import run
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
    print(
        f"process {report.rank}/{report.processes}: {len(report.computed)} computed, "
        f"{len(report.failed)} failed, {len(report.skipped)} already done in {report.out}"
        + (f"; summary: {report.summary}" if report.summary else ""),
        file=sys.stderr,
    )
    return EXIT_OK


def _add_run_parser(sub: Any) -> None:
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


# --------------------------------------------------------------------------------------
# Parser and entry point
# --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser for ``diffwidget``."""
    parser = argparse.ArgumentParser(
        prog="diffwidget",
        description="Explain text-to-image diffusion step by step, in a notebook widget. "
        "Everything runs offline on the embedded model unless --model is given.",
        epilog="examples:\n  diffwidget demo\n  diffwidget demo --classroom\n"
        '  diffwidget export "a large red circle on the left" -o explorer.html\n'
        '  diffwidget export "a large red circle on the left" --model dit -o dit.html\n'
        "  diffwidget run scene:50 --out scene-run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,export,run}")

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

    p_export = sub.add_parser(
        "export",
        help="write a standalone HTML explorer for one prompt",
        description="Trace one prompt and write an explorer that works offline in any "
        "browser, without Jupyter.",
    )
    p_export.add_argument("prompt", help='a caption, e.g. "a large red circle on the left"')
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
        metavar="unet|dit|DIR",
        help="embedded model (unet, the default, or its DiT twin dit) or a local diffusers "
        "pipeline folder",
    )
    p_export.set_defaults(func=export)
    _add_run_parser(sub)
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


if __name__ == "__main__":
    raise SystemExit(main())
