"""Teaching demos in a real browser: ``diffwidget demo`` and its classroom mode.

``diffwidget demo`` (the README's main command) is started as a user would, its
JupyterLab opened in headless chromium and the quickstart run there. Classroom mode serves
the quickstart with Voila and the bundled ``jupyter-config/voila.json``; the page must show
the explorer and no code. Servers get temporary Jupyter dirs and a free port on 127.0.0.1,
and are stopped by their PIDs.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from diffwidget import cli

pytestmark = pytest.mark.browser

sync_api = pytest.importorskip("playwright.sync_api")

SERVER_START_S = 60
#: Opening the page runs the notebook (import torch, load the model, trace 20 steps) on
#: a 2-core machine that may be busy with other work.
RENDER_TIMEOUT_MS = 300_000
STOP_TIMEOUT_S = 15
#: The explorer's image canvas; present only once the widget rendered in the page.
WIDGET_SELECTOR = ".dw-canvas"
#: The explorer's step slider; the canvas reports the step it drew in ``data-step``.
SLIDER_SELECTOR = ".dw-range"
MIN_CANVAS_PX = 100
STDERR_SELECTOR = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
PROGRESS_SELECTOR = ".widget-hprogress"
#: Anything that would show a code cell's source in Voila's lab template.
CODE_SELECTORS = (
    ".jp-CodeCell .jp-InputArea",
    ".jp-InputPrompt",
    ".cm-editor",
    ".CodeMirror",
    ".jp-CodeCell .highlight",
)
#: A phrase only the quickstart's code cells contain.
CODE_PHRASE = "load_demo_pipeline"
VOILA_ERROR = "There was an error when executing cell"


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def children_of(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (the kernels a server started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in parentheses may hold spaces: the fields follow its ")".
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (an exited child waiting to be reaped does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop_pid(pid: int) -> None:
    """Stop a server by its PID, then any kernel it left behind, by theirs."""
    kernels = children_of(pid)
    os.kill(pid, signal.SIGTERM)  # Jupyter servers and Voila shut their kernels down
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if alive(pid):
        os.kill(pid, signal.SIGKILL)
    for kernel in kernels:
        if alive(kernel):
            os.kill(kernel, signal.SIGKILL)


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a server started here and reap it."""
    if process.poll() is None:
        stop_pid(process.pid)
    process.wait(STOP_TIMEOUT_S)


def jupyter_env(env: dict[str, str], root: Path) -> dict[str, str]:
    """``env`` with private Jupyter dirs under ``root``: no user config, no stray files.

    PATH holds only an empty folder, as for a virtual environment that is not activated:
    the servers and their kernels must start through the interpreter, not a PATH look-up.
    """
    for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR"):
        folder = root / name.lower()
        folder.mkdir(exist_ok=True)
        env[name] = str(folder)
    empty_bin = root / "empty-bin"
    empty_bin.mkdir(exist_ok=True)
    env["PATH"] = str(empty_bin)
    return env


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until something listens on ``port`` (not a page request: that could start a kernel)."""
    deadline = time.monotonic() + SERVER_START_S
    while True:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"no server after {SERVER_START_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def classroom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    pytest.importorskip("voila")
    root = tmp_path_factory.mktemp("classroom")
    notebook = root / cli.common.QUICKSTART
    shutil.copy(cli.common.notebooks_dir() / cli.common.QUICKSTART, notebook)
    port = free_port()
    command, env = cli.demo.classroom_command(
        notebook, port=port, ip="127.0.0.1", open_browser=False
    )
    log = root / "voila.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, env=jupyter_env(env, root), cwd=root, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        wait_for_port(port, process, log)
        yield Server(f"http://127.0.0.1:{port}/", process, log)
    finally:
        stop(process)


@pytest.fixture(scope="module")
def page(classroom: Server, chromium: Any) -> Iterator[Any]:
    tab = chromium.new_page(viewport={"width": 1200, "height": 900})
    try:
        # Voila streams the page while the kernel runs the cells: wait for the widget,
        # not for the document, which completes only after the last cell.
        tab.goto(classroom.url, wait_until="commit", timeout=RENDER_TIMEOUT_MS)
        try:
            tab.wait_for_selector(WIDGET_SELECTOR, timeout=RENDER_TIMEOUT_MS)
        except sync_api.TimeoutError:
            body = tab.locator("body").inner_text()[:2000]
            pytest.fail(f"no explorer in the page:\n{body}\nserver log:\n{classroom.log_text()}")
        yield tab
    finally:
        tab.close()


def test_classroom_app_shows_the_explorer(page: Any) -> None:
    canvas = page.locator(WIDGET_SELECTOR).first
    box = canvas.bounding_box()
    assert box is not None
    assert box["width"] > MIN_CANVAS_PX
    assert box["height"] > MIN_CANVAS_PX
    text = page.locator("body").inner_text()
    assert VOILA_ERROR not in text
    assert "Quickstart" in text  # the notebook's markdown explains the view


def test_classroom_app_hides_all_code(page: Any) -> None:
    for selector in CODE_SELECTORS:
        assert page.locator(selector).count() == 0, selector
    assert CODE_PHRASE not in page.content()


def test_classroom_app_shows_no_logs_or_progress_bars(page: Any) -> None:
    # Loading messages and progress bars are for the notebook author, not for students.
    for selector in (STDERR_SELECTOR, PROGRESS_SELECTOR):
        assert page.locator(selector).count() == 0, selector


def test_classroom_app_is_live(page: Any) -> None:
    """Scrubbing the slider redraws the image at the chosen step."""
    target = "12"
    page.locator(SLIDER_SELECTOR).first.fill(target)
    page.wait_for_selector(f"{WIDGET_SELECTOR}[data-step='{target}']", timeout=10_000)


# --------------------------------------------------------------------------- diffwidget demo
LAB_SETTINGS = "lab/user-settings/@jupyterlab/apputils-extension/notification.jupyterlab-settings"


def test_demo_command_opens_the_quickstart_in_jupyterlab(tmp_path: Path, chromium: Any) -> None:
    """``diffwidget demo`` serves the quickstart; run in JupyterLab, it shows the explorer."""
    port, token = free_port(), secrets.token_hex(16)
    env = jupyter_env(dict(os.environ, JUPYTER_TOKEN=token), tmp_path)
    config = Path(env["JUPYTER_CONFIG_DIR"])
    # Test-only server settings: reach the app from the page, no news or update checks.
    (config / "jupyter_server_config.json").write_text(
        json.dumps(
            {
                "LabApp": {
                    "expose_app_in_browser": True,
                    "news_url": None,
                    "check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
                }
            }
        )
    )
    settings = config / LAB_SETTINGS
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    command = [sys.executable, "-m", "diffwidget.cli", "demo", "--no-browser"]
    command += ["--port", str(port), "--dir", str(tmp_path / "work")]
    log = tmp_path / "demo.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    tab = None
    try:
        wait_for_port(port, process, log)
        tab = chromium.new_page(viewport={"width": 1200, "height": 900})
        url = f"http://127.0.0.1:{port}/lab/tree/{cli.common.QUICKSTART}?reset&token={token}"
        tab.goto(url, timeout=RENDER_TIMEOUT_MS)
        tab.wait_for_function(
            "() => window.jupyterapp?.shell?.currentWidget?.sessionContext?.session?.kernel"
            "?.status === 'idle'",
            timeout=RENDER_TIMEOUT_MS,
        )
        tab.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
        tab.wait_for_selector(WIDGET_SELECTOR, timeout=RENDER_TIMEOUT_MS)
        assert (
            tab.locator(
                ".jp-OutputArea-output .jp-RenderedText[data-mime-type="
                "'application/vnd.jupyter.error']"
            ).count()
            == 0
        )
        assert (tmp_path / "work" / cli.common.QUICKSTART).is_file()  # the user's own copy
    finally:
        if tab is not None:
            tab.close()
        # The command waits on JupyterLab: stop that server (and its kernels) first.
        for pid in children_of(process.pid):
            stop_pid(pid)
        stop(process)
