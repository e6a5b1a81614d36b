"""Helpers for the real-browser tests: notebooks, running cells, reading kernel state."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Console messages that come from JupyterLab itself, not from the widget.
BENIGN_CONSOLE = ("favicon", "Failed to load resource: the server responded with a status of 404")


@dataclass
class JupyterServer:
    """A running server: where it lives and how to reach it."""

    url: str
    token: str
    root: Path
    process: subprocess.Popen[bytes]
    log: Path

    def page_url(self, path: str) -> str:
        """URL of ``path`` (e.g. ``lab/tree/x.ipynb``) with the token.

        In JupyterLab, ``reset`` drops the saved workspace, so notebooks opened by earlier
        tests are not restored into (hidden) tabs of this page; Notebook 7 has no workspace
        and fails on that parameter.
        """
        reset = "reset&" if path.startswith("lab") else ""
        return f"{self.url}/{path}?{reset}token={self.token}"


@dataclass
class ConsoleLog:
    """Errors the page reported (console.error and uncaught exceptions)."""

    errors: list[str] = field(default_factory=list)

    def widget_errors(self) -> list[str]:
        """Errors that are not JupyterLab's own benign noise."""
        return [e for e in self.errors if not any(b in e for b in BENIGN_CONSOLE)]


def write_notebook(path: Path, cells: list[str]) -> Path:
    """Write a notebook of code cells."""
    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(notebook, str(path))
    return path


def run_all_cells(page: Any) -> None:
    """Wait for the kernel, then run every cell through the app's command registry."""
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget")
    page.wait_for_function(
        """() => {
            const w = window.jupyterapp.shell.currentWidget;
            const k = w && w.sessionContext && w.sessionContext.session
                && w.sessionContext.session.kernel;
            return k && k.status === 'idle';
        }"""
    )
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")


def run_code(page: Any, code: str) -> None:
    """Append a cell with ``code`` to the open notebook and run it."""
    page.evaluate(
        """async (code) => {
            const app = window.jupyterapp;
            const panel = app.shell.currentWidget;
            const notebook = panel.content;
            notebook.activeCellIndex = notebook.widgets.length - 1;
            await app.commands.execute('notebook:insert-cell-below');
            notebook.activeCell.model.sharedModel.setSource(code);
            await app.commands.execute('notebook:run-cell');
        }""",
        code,
    )


def wait_for_json(path: Path, predicate: Any, timeout_s: float = 30.0) -> dict[str, Any]:
    """Poll a JSON file the kernel writes until ``predicate(data)`` holds."""
    deadline = time.monotonic() + timeout_s
    data: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        if data and predicate(data):
            return data
        time.sleep(0.1)
    raise AssertionError(f"{path.name} never satisfied the condition; last content: {data}")
