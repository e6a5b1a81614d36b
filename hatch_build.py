"""Build hook: say plainly that a source build needs Node.js when the front-end is not built.

The widget's front-end (``diffwidget/widget/static/widget.js``) is compiled from ``js/`` by
hatch-jupyter-builder, which runs npm. A wheel or an sdist already contains the compiled
file, so installing either needs no Node.js; only a build from a clone without the file
does. Without this check that build fails deep inside npm's launcher with a traceback.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

WIDGET_JS = Path("diffwidget") / "widget" / "static" / "widget.js"
#: Everything the front-end build writes that the wheel needs (the live page's bundle and
#: onnxruntime-web's WebAssembly binary beside the widget's).
BUILT = (
    WIDGET_JS,
    WIDGET_JS.with_name("live.js"),
    WIDGET_JS.with_name("ort-wasm-simd-threaded.wasm"),
)
MIN_NODE = 18
NODE_URL = "https://nodejs.org"


def node_major(node: str) -> int | None:
    """The major version of the ``node`` executable, or ``None`` if it cannot say."""
    try:
        out = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except OSError:
        return None
    match = re.match(r"v?(\d+)\.", out.strip())
    return int(match.group(1)) if match else None


def node_problem(root: Path) -> str | None:
    """Why the front-end cannot be built here, or ``None`` if it is built or can be."""
    if all((root / path).is_file() for path in BUILT):
        return None  # already compiled (an sdist, or a clone that built it): npm is skipped
    node, npm = shutil.which("node"), shutil.which("npm")
    what = f"Node.js >= {MIN_NODE} with npm ({NODE_URL})"
    if node is None or npm is None:
        missing = " and ".join(name for name, path in (("node", node), ("npm", npm)) if not path)
        return f"{missing} not found on PATH"
    major = node_major(node)
    if major is None or major < MIN_NODE:
        found = "an unknown version" if major is None else f"version {major}"
        return f"{node} is {found}; {what} is needed"
    return None


def message(problem: str) -> str:
    return (
        f"diffwidget: cannot build the widget's front-end ({WIDGET_JS} is missing and "
        f"{problem}).\n"
        f"Building diffwidget from source compiles js/ and needs Node.js >= {MIN_NODE} with "
        f"npm on PATH ({NODE_URL}). A built wheel or sdist needs no Node.js: install one "
        "of those instead, e.g. `pip install dist/diffwidget-*.whl`, built with "
        "`python -m build` on a machine that has Node.js."
    )


class CustomBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    """Runs before hatch-jupyter-builder (hooks run in the order pyproject lists them)."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        problem = node_problem(Path(self.root))
        if problem is not None:
            # SystemExit prints the message alone: pip shows it without a traceback.
            raise SystemExit(message(problem))
