"""Headless JupyterLab and chromium, shared by the browser benchmark, the screenshots and the
real-browser tests: a private server, notebooks written and run through the app's commands.

Nothing here imports torch or diffwidget: the server's kernels import this checkout through
``PYTHONPATH``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Seconds to wait for the server to answer /api/status.
SERVER_START_TIMEOUT_S = 90
#: Flags for headless Debian chromium in containers (no sandbox, no network chatter).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


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


def run_code(page: Any, code: str, *, wait: bool = True) -> None:
    """Append a cell with ``code`` to the open notebook and run it.

    With ``wait=False`` this returns as soon as execution has been requested (the
    command's promise resolves only when the cell has finished).
    """
    page.evaluate(
        """async ([code, wait]) => {
            const app = window.jupyterapp;
            const notebook = app.shell.currentWidget.content;
            notebook.activeCellIndex = notebook.widgets.length - 1;
            await app.commands.execute('notebook:insert-cell-below');
            notebook.activeCell.model.sharedModel.setSource(code);
            const done = app.commands.execute('notebook:run-cell');
            if (wait) await done;
        }""",
        [code, wait],
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _write_settings(config: Path) -> None:
    settings = config / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True, exist_ok=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )


@contextlib.contextmanager
def serve(base: Path, app: str) -> Iterator[JupyterServer]:
    """Start ``jupyter lab`` or ``jupyter notebook`` in private directories; stop it by PID."""
    root, config, runtime, ipython = (base / n for n in ("root", "config", "runtime", "ipython"))
    for folder in (root, config, runtime, ipython):
        folder.mkdir()
    if app == "lab":
        _write_settings(config)
    token, port = secrets.token_hex(16), _free_port()
    env = dict(os.environ)
    env.update(
        JUPYTER_CONFIG_DIR=str(config),
        JUPYTER_RUNTIME_DIR=str(runtime),
        IPYTHONDIR=str(ipython),
        JUPYTERLAB_SETTINGS_DIR=str(config / "lab" / "user-settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(config / "lab" / "workspaces"),
        # The kernel must import this checkout even when it is not pip-installed.
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]),
    )
    log = base / "server.log"
    app_class = "LabApp" if app == "lab" else "JupyterNotebookApp"
    command = [
        sys.executable, "-m", "jupyterlab" if app == "lab" else "notebook", "--allow-root",
        "--no-browser", "--ip=127.0.0.1", f"--port={port}", f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}", f"--{app_class}.expose_app_in_browser=True",
    ]  # fmt: skip
    if app == "lab":
        command += [
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]
    with log.open("wb") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"jupyter {app} did not start; log:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield JupyterServer(url, token, root, process, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
