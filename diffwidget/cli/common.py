"""What the ``diffwidget`` commands share: exit codes, bundled files, install hints, models."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from diffwidget.models.loader import DemoModel

QUICKSTART = "01_quickstart.ipynb"
DEFAULT_STEPS = 20
MAX_STEPS = 1000  # the schedulers' training horizon: more steps than timesteps is impossible
EXIT_OK = 0
EXIT_FAILED = 1  # the work itself failed (a notebook cell raised)
EXIT_USAGE = 2  # bad arguments; argparse uses the same code
EXIT_STOPPED = 3  # an I/O error (a full disk) stopped the work before its end
#: The repository root of a clone, or the site-packages folder of an installed wheel.
_PACKAGE = Path(__file__).resolve().parents[1]


class UsageError(Exception):
    """A problem with the command line that the user can fix; the message says how."""


def source_checkout() -> Path | None:
    """The clone this diffwidget runs from, or ``None`` for an installed wheel."""
    root = _PACKAGE.parent
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
    package = _PACKAGE
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


def load_pipeline(model: str | None) -> Any:
    """An embedded model ("unet", the default, or "dit"), or a pipeline in the folder ``model``."""
    from diffwidget.models.loader import DEMO_MODELS, load_demo_pipeline

    if model is None:
        return load_demo_pipeline("unet")
    if model in DEMO_MODELS:
        return load_demo_pipeline(cast("DemoModel", model))
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


def tqdm_progress(desc: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A ``progress(done, total)`` callback drawing a tqdm bar, and its closer."""
    from tqdm.auto import tqdm

    bar = tqdm(desc=desc, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    return progress, bar.close
