"""Classroom mode as a teacher runs it: ``diffwidget demo --classroom`` on a network.

Every server here is the real command (``python -m diffwidget.cli demo --classroom``) with
private Jupyter dirs and a free port; its Voila and kernels are found through ``/proc``.
Short timeouts for the tests go in the private ``JUPYTER_CONFIG_DIR``'s ``voila.json``, the
way a teacher overrides the bundled one. A tiny notebook keeps the server tests fast; the
browser tests serve the quickstart with the token on and open it in headless chromium: the
page must show the explorer, live, and no code.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pytest

from bench.bench_classroom import kernels, memory_mb
from diffwidget import cli
from diffwidget.cli.serve import process_tree

pytestmark = [
    pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds kernels through /proc (Linux)"),
]

SERVER_START_S = 90
#: Opening the page runs the notebook (import torch, load the model, trace 20 steps) on
#: a 2-core machine that may be busy with other work.
RENDER_TIMEOUT_MS = 300_000
STOP_TIMEOUT_S = 30
#: A page load of the tiny notebook: a kernel start, on a busy machine.
LOAD_TIMEOUT_S = 240
#: Test settings of the kernel manager: pages that never connect go after this many
#: seconds idle, checked every second (the bundled voila.json says 60 and 10).
UNCONNECTED_S = 5
CULL_INTERVAL_S = 1
#: How much later than its timeout a kernel may go on a busy machine.
CULL_SLACK_S = 60
LOADS = 20
CAP = 4
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
#: The student URLs the command prints (Voila's own log line hides the token).
PRINTED_URL = re.compile(r"^    (http://\S+)$", re.MULTILINE)
KERNEL_ID = re.compile(r"kernelId[\"']?\s*[:=]\s*[\"']([0-9a-f-]{36})")
#: What the tiny notebook prints: whether the server's token leaked into the kernel.
TOKEN_PROBE = "token in kernel env:"


@dataclass
class Demo:
    """A running ``diffwidget demo --classroom`` command."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def kernels(self) -> list[int]:
        return kernels(self.process.pid)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (an exited child waiting to be reaped does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(condition: Any, timeout: float, what: str, demo: Demo | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            log = f"\nserver log:\n{demo.log_text()}" if demo else ""
            pytest.fail(f"{what} not within {timeout} s{log}")
        time.sleep(0.2)


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


def tiny_notebook(path: Path) -> Path:
    notebook = nbformat.v4.new_notebook()
    source = f"import os\nprint({TOKEN_PROBE!r}, 'JUPYTER_TOKEN' in os.environ)"
    notebook.cells = [nbformat.v4.new_code_cell(source)]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    nbformat.write(notebook, path)
    return path


def start_demo(
    root: Path, *options: str, notebook: Path | None = None, voila_config: Any = None
) -> Demo:
    """Start the command as a teacher would; wait until it listens and printed its URL."""
    pytest.importorskip("voila")
    root.mkdir(parents=True, exist_ok=True)
    notebook = notebook or tiny_notebook(root / "tiny.ipynb")
    env = jupyter_env({k: v for k, v in os.environ.items() if k != "JUPYTER_TOKEN"}, root)
    if voila_config is not None:
        (Path(env["JUPYTER_CONFIG_DIR"]) / "voila.json").write_text(json.dumps(voila_config))
    port = free_port()
    command = [sys.executable, "-m", "diffwidget.cli", "demo", "--classroom", "--no-browser"]
    command += ["--notebook", str(notebook), "--dir", str(root / "room"), "--port", str(port)]
    log = root / "demo.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [*command, *options], env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    demo = Demo(process, "", log)

    def ready() -> bool:
        if process.poll() is not None:
            pytest.fail(f"the command exited with {process.returncode}:\n{demo.log_text()}")
        urls = PRINTED_URL.findall(log.read_text())
        if not urls:
            return False
        host = urllib.parse.urlsplit(urls[-1]).hostname
        try:
            socket.create_connection((host, port), timeout=2).close()
        except OSError:
            return False
        demo.url = urls[-1]
        return True

    wait_until(ready, SERVER_START_S, "a listening server", demo)
    return demo


def listening(port: int, demo: Demo) -> bool:
    if demo.process.poll() is not None:
        pytest.fail(f"the command exited with {demo.process.returncode}:\n{demo.log_text()}")
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


def stop_demo(demo: Demo, signum: int = signal.SIGTERM) -> list[int]:
    """Stop the command with ``signum``; the processes of its tree still running after."""
    if demo.process.poll() is not None:
        return []
    tree = process_tree(demo.process.pid)
    demo.process.send_signal(signum)
    try:
        demo.process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        demo.process.kill()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while time.monotonic() < deadline and any(alive(pid) for pid in tree):
        time.sleep(0.2)
    left = [pid for pid in tree if alive(pid)]
    for pid in left:  # never leave a test's processes behind, whatever the assertion says
        os.kill(pid, signal.SIGKILL)
    return left


@pytest.fixture
def demos() -> Iterator[list[Demo]]:
    """Commands a test started; stopped after it, whatever happened."""
    started: list[Demo] = []
    yield started
    for demo in started:
        stop_demo(demo)


def get(url: str, timeout: float = LOAD_TIMEOUT_S) -> tuple[int, str, dict[str, str]]:
    """One GET without following redirects: status, body, headers."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.netloc, timeout=timeout)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        connection.request("GET", target)
        reply = connection.getresponse()
        return reply.status, reply.read().decode(errors="replace"), dict(reply.getheaders())
    finally:
        connection.close()


def kernel_pid(demo: Demo, kernel_id: str) -> int | None:
    """The process of the kernel ``kernel_id`` (its connection file is named after it)."""
    for pid in demo.kernels():
        try:
            if f"kernel-{kernel_id}.json" in Path(f"/proc/{pid}/cmdline").read_text():
                return pid
        except OSError:
            continue
    return None


def websocket_url(page_url: str, kernel_id: str) -> str:
    parts = urllib.parse.urlsplit(page_url)
    query = f"?{parts.query}" if parts.query else ""
    return f"ws://{parts.netloc}/api/kernels/{kernel_id}/channels{query}"


# ------------------------------------------------------------------------- cap and reclaim
@pytest.mark.slow
def test_page_loads_beyond_the_cap_are_refused_and_unopened_kernels_go(
    tmp_path: Path, demos: list[Demo]
) -> None:
    """20 loads at once: CAP kernels, never more; pages that never connect lose theirs."""
    websocket = pytest.importorskip("websocket")  # websocket-client, a jupyter_server need
    config = {
        "ClassroomKernelManager": {"unconnected_timeout": UNCONNECTED_S},
        "MappingKernelManager": {"cull_interval": CULL_INTERVAL_S},
    }
    demo = start_demo(tmp_path, "--max-students", str(CAP), voila_config=config)
    demos.append(demo)
    counts: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            counts.append(len(demo.kernels()))
            time.sleep(0.1)

    held: list[Any] = []
    lock = threading.Lock()

    def load(_: int) -> tuple[int, str]:
        status, body, _headers = get(demo.url)
        match = KERNEL_ID.search(body)
        with lock:
            if status == 200 and match and not held:
                # One student's page opens its kernel connection at once, as a browser does.
                held.append(
                    (match[1], websocket.create_connection(websocket_url(demo.url, match[1])))
                )
        return status, body

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with ThreadPoolExecutor(LOADS) as pool:
        results = list(pool.map(load, range(LOADS)))
    try:
        codes = Counter(status for status, _ in results)
        assert codes == {200: CAP, 503: LOADS - CAP}, demo.log_text()
        refused = [body for status, body in results if status == 503]
        assert all(f"Classroom full ({CAP} students)" in body for body in refused)
        assert max(counts) <= CAP  # never more kernels than the cap, even while starting
        assert max(counts) == CAP

        # Pages that never connected lose their kernels; the connected one stays.
        ((connected_id, _socket),) = held
        connected = kernel_pid(demo, connected_id)
        assert connected is not None
        wait_until(
            lambda: demo.kernels() == [connected],
            UNCONNECTED_S + CULL_SLACK_S,
            "only the connected kernel left",
            demo,
        )
        time.sleep(UNCONNECTED_S + 2 * CULL_INTERVAL_S)
        assert demo.kernels() == [connected]
        assert "its page never connected" in demo.log_text()

        status, _, _ = get(demo.url)  # a freed slot takes a new student
        assert status == 200
    finally:
        done.set()
        for _, sock in held:
            sock.close()


# ------------------------------------------------------------------------- token
def network_address() -> str | None:
    """A non-loopback address of this machine that a server can bind to, or ``None``."""
    address = cli.classroom.lan_address()
    if address is None:
        return None
    try:
        with socket.socket() as probe:
            probe.bind((address, 0))
    except OSError:
        return None
    return address


@pytest.mark.slow
def test_off_loopback_a_request_without_the_token_is_refused(
    tmp_path: Path, demos: list[Demo]
) -> None:
    address = network_address()
    # Without a network interface, the same check with the token forced on at loopback.
    options = ["--ip", address] if address else ["--token"]
    demo = start_demo(tmp_path, *options, "--max-students", "2")
    demos.append(demo)
    parts = urllib.parse.urlsplit(demo.url)
    token = urllib.parse.parse_qs(parts.query)["token"][0]
    assert len(token) >= 32
    if address:
        assert parts.hostname == address
    base = f"http://{parts.netloc}/"
    for url in (base, f"{base}?token=wrong{token}", f"{base}api/kernels/{uuid.uuid4()}"):
        status, body, headers = get(url)
        assert status in (302, 403), (url, status)  # Voila's login page or a refusal
        assert status == 403 or "/login" in headers.get("Location", "")
        assert TOKEN_PROBE not in body
    assert demo.kernels() == []  # nothing was started for them

    status, body, _ = get(demo.url)
    assert status == 200
    assert f"{TOKEN_PROBE} False" in body  # the token is not in the kernels' environment
    assert len(demo.kernels()) == 1
    assert stop_demo(demo) == []


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_stopping_the_command_stops_voila_and_its_kernels(
    signum: int, tmp_path: Path, demos: list[Demo]
) -> None:
    demo = start_demo(tmp_path)
    demos.append(demo)
    status, _, _ = get(demo.url)
    assert status == 200
    wait_until(lambda: len(demo.kernels()) == 1, 30, "a kernel", demo)
    time.sleep(2.5)  # past one refresh of the command's view of its process tree
    voila, *_ = (pid for pid in process_tree(demo.process.pid) if pid not in demo.kernels())
    assert alive(voila)
    assert stop_demo(demo, signum) == []
    assert demo.process.returncode == 0


# ------------------------------------------------------------------------- real browser
@pytest.fixture(scope="module")
def classroom(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """The quickstart served by the command, token on: the browser must get through it."""
    root = tmp_path_factory.mktemp("classroom")
    notebook = root / cli.common.QUICKSTART
    shutil.copy(cli.common.notebooks_dir() / cli.common.QUICKSTART, notebook)
    demo = start_demo(root, "--token", "--max-students", "2", notebook=notebook)
    try:
        yield demo
    finally:
        stop_demo(demo)


@pytest.fixture(scope="module")
def page(classroom: Demo, chromium: Any) -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
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


@pytest.mark.browser
def test_classroom_app_shows_the_explorer(page: Any) -> None:
    canvas = page.locator(WIDGET_SELECTOR).first
    box = canvas.bounding_box()
    assert box is not None
    assert box["width"] > MIN_CANVAS_PX
    assert box["height"] > MIN_CANVAS_PX
    text = page.locator("body").inner_text()
    assert VOILA_ERROR not in text
    assert "Quickstart" in text  # the notebook's markdown explains the view


@pytest.mark.browser
def test_classroom_app_hides_all_code(page: Any) -> None:
    for selector in CODE_SELECTORS:
        assert page.locator(selector).count() == 0, selector
    assert CODE_PHRASE not in page.content()


@pytest.mark.browser
def test_classroom_app_shows_no_logs_or_progress_bars(page: Any) -> None:
    # Loading messages and progress bars are for the notebook author, not for students.
    for selector in (STDERR_SELECTOR, PROGRESS_SELECTOR):
        assert page.locator(selector).count() == 0, selector


@pytest.mark.browser
def test_classroom_app_is_live(page: Any) -> None:
    """Scrubbing the slider redraws the image at the chosen step."""
    target = "12"
    page.locator(SLIDER_SELECTOR).first.fill(target)
    page.wait_for_selector(f"{WIDGET_SELECTOR}[data-step='{target}']", timeout=10_000)


@pytest.mark.browser
def test_a_students_kernel_fits_the_memory_per_student(classroom: Demo, page: Any) -> None:
    """The default cap assumes KERNEL_MEMORY_MB per kernel: it must not be an underestimate."""
    (kernel,) = classroom.kernels()  # the page's connection keeps it
    memory = memory_mb(kernel)
    assert memory is not None
    assert memory["rss"] <= cli.classroom.KERNEL_MEMORY_MB


# --------------------------------------------------------------------------- diffwidget demo
LAB_SETTINGS = "lab/user-settings/@jupyterlab/apputils-extension/notification.jupyterlab-settings"


@pytest.mark.browser
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
    demo = Demo(process, f"http://127.0.0.1:{port}/", log)
    tab = None
    try:
        wait_until(lambda: listening(port, demo), SERVER_START_S, "JupyterLab", demo)
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
        left = stop_demo(demo)
    assert left == []  # SIGTERM to the command stopped JupyterLab and the kernel
