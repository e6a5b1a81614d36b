"""Real-browser fixtures: a private JupyterLab server on 127.0.0.1 and headless chromium.

The server gets temporary config/runtime/IPython directories (nothing of the user's
setup leaks in), a random token and port; it is stopped by its PID. Every test opens its
own page, so outputs of one test never leak into another.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.helpers import ConsoleLog, JupyterServer

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Seconds to wait for the server to answer /api/status.
SERVER_START_TIMEOUT_S = 90
#: Playwright timeouts (ms): the 2-core CI box is slow to start a kernel.
PAGE_TIMEOUT_MS = 90_000
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
    # Notebook 7 reads its own app settings from the config dir, not from `jupyter lab`'s argv.
    (config / "jupyter_server_config.json").write_text(
        json.dumps({"JupyterNotebookApp": {"expose_app_in_browser": True}})
    )


@pytest.fixture(scope="session")
def jupyter_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterServer]:
    """JupyterLab (which also serves Notebook 7 pages) on 127.0.0.1."""
    if shutil.which("jupyter") is None:
        pytest.skip("jupyter is not installed; install the [test] extra")
    base = tmp_path_factory.mktemp("jupyter")
    root, config, runtime, ipython = (base / n for n in ("root", "config", "runtime", "ipython"))
    for folder in (root, config, runtime, ipython):
        folder.mkdir()
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
        PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")]
        ),
    )
    log = base / "server.log"
    command = [
        sys.executable, "-m", "jupyterlab", "--allow-root", "--no-browser", "--ip=127.0.0.1",
        f"--port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]  # fmt: skip
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
                pytest.fail(f"JupyterLab did not start; log:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield JupyterServer(url, token, root, process, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    """Headless Debian chromium driven by playwright."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    executable = shutil.which("chromium")
    if executable is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(chromium: Any) -> Iterator[tuple[Any, ConsoleLog]]:
    """A fresh page plus the errors it logs."""
    context = chromium.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    new_page = context.new_page()
    new_page.set_default_timeout(PAGE_TIMEOUT_MS)
    console = ConsoleLog()
    new_page.on(
        "console", lambda msg: console.errors.append(msg.text) if msg.type == "error" else None
    )
    new_page.on("pageerror", lambda exc: console.errors.append(f"pageerror: {exc}"))
    yield new_page, console
    context.close()
