"""Classroom mode: the quickstart served by Voila shows the explorer and no code.

A real Voila server (temporary Jupyter dirs, a free port on 127.0.0.1, stopped by its PID)
runs the bundled quickstart with the bundled ``jupyter-config/voila.json``; headless
chromium opens it like a student would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from diffwidget import cli

pytestmark = pytest.mark.browser

pytest.importorskip("voila")
sync_api = pytest.importorskip("playwright.sync_api")

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
SERVER_START_S = 60
#: Opening the page runs the notebook (import torch, load the model, trace 20 steps) on
#: a 2-core machine that may be busy with other work.
RENDER_TIMEOUT_MS = 180_000
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


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop the server by its PID, then any kernel it left behind, by theirs."""
    kernels = children_of(process.pid)
    process.send_signal(signal.SIGINT)  # Jupyter servers shut their kernels down on SIGINT
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(STOP_TIMEOUT_S)
    for pid in kernels:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def classroom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("classroom")
    notebook = root / cli.QUICKSTART
    shutil.copy(cli.notebooks_dir() / cli.QUICKSTART, notebook)
    port = free_port()
    command, env = cli.classroom_command(notebook, port=port, ip="127.0.0.1", open_browser=False)
    for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR"):
        folder = root / name.lower()
        folder.mkdir()
        env[name] = str(folder)
    log = root / "voila.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, env=env, cwd=root, stdout=sink, stderr=subprocess.STDOUT
        )
    server = Server(f"http://127.0.0.1:{port}/", process, log)
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"voila exited with {process.returncode}:\n{server.log_text()}")
            try:
                # A connection, not a page request: requesting the app would start a kernel.
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"voila did not start in {SERVER_START_S} s:\n{server.log_text()}")
                time.sleep(0.5)
        yield server
    finally:
        stop(process)


@pytest.fixture(scope="module")
def page(classroom: Server) -> Iterator[Any]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (make browser)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            tab = browser.new_page(viewport={"width": 1200, "height": 900})
            tab.goto(classroom.url, wait_until="domcontentloaded")
            try:
                tab.wait_for_selector(WIDGET_SELECTOR, timeout=RENDER_TIMEOUT_MS)
            except sync_api.TimeoutError:
                body = tab.locator("body").inner_text()[:2000]
                pytest.fail(
                    f"no explorer in the page:\n{body}\nserver log:\n{classroom.log_text()}"
                )
            yield tab
        finally:
            browser.close()


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
