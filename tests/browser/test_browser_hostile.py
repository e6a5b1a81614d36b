"""Hostile runs and traces in a real browser: JupyterLab, Voila and the standalone export.

The run folder and the trace of ``tests/hostile.py`` carry script payloads in every string a
file can hold (prompt, item ids, stored error, folder name, metric and curve names, token
strings, layer names). Each payload calls ``alert`` and requests a URL with ``MARK`` (an
``/api/contents`` write in JupyterLab). The page is instrumented before any script of its
own runs (``alert``/``confirm``/``prompt`` and ``fetch`` record their calls, in every frame)
and every request and dialog is recorded. A view passes when nothing fired, no element
carries an event handler or a ``javascript:`` link, and the hostile text is shown literally.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bench.browserlib import JupyterServer, run_all_cells, write_notebook
from diffwidget import cli
from diffwidget.widget.explorer import Explorer
from tests import hostile

pytestmark = pytest.mark.browser

#: Milliseconds to wait for a kernel to run the cells (a loaded 2-core machine).
RENDER_TIMEOUT_MS = 300_000
#: Seconds given to anything injected to fire after the views are drawn (image errors,
#: iframe loads and timers are asynchronous).
SETTLE_S = 3.0
SERVER_START_S = 90
STOP_TIMEOUT_S = 15

#: Installed in every frame before the page's own scripts.
INSTRUMENT = """
(() => {
  window.__dwCalls = [];
  const record = (what) => (...args) => {
    window.__dwCalls.push(`${what}(${args.map(String).join(", ")})`);
  };
  window.alert = record("alert");
  window.confirm = record("confirm");
  window.prompt = record("prompt");
  const realFetch = window.fetch.bind(window);
  window.fetch = (input, init) => {
    const url = String((input && input.url) || input);
    if (url.includes("MARK")) window.__dwCalls.push(`fetch(${url})`);
    return realFetch(input, init);
  };
})();
""".replace("MARK", hostile.MARK)

#: Elements and attributes that only injected markup would bring.
INJECTED = """() => {
  const found = [];
  for (const el of document.querySelectorAll("*")) {
    for (const attr of el.attributes) {
      const name = attr.name.toLowerCase();
      const value = attr.value.trim().toLowerCase();
      if (name.startsWith("on")) found.push(`${el.tagName} ${name}`);
      if (["href", "src", "xlink:href", "action"].includes(name) && value.startsWith("javascript:"))
        found.push(`${el.tagName} ${name}=${value.slice(0, 40)}`);
      if (name === "srcdoc") found.push(`${el.tagName} srcdoc`);
    }
    const data = /json|octet-stream/.test(el.type);  // inert data blocks (the export's state)
    if (el.tagName === "SCRIPT" && !data && el.textContent.includes("MARK")) found.push("script");
  }
  return found;
}""".replace("MARK", hostile.MARK)


@dataclass
class Watch:
    """What a page did that only injected code would do."""

    page: Any
    dialogs: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, page: Any) -> Watch:
        watch = cls(page)
        page.add_init_script(INSTRUMENT)

        def on_dialog(dialog: Any) -> None:
            watch.dialogs.append(f"{dialog.type}: {dialog.message}")
            dialog.dismiss()

        page.on("dialog", on_dialog)
        page.on("request", lambda request: watch.requests.append(request.url))
        return watch

    def assert_nothing_ran(self) -> None:
        time.sleep(SETTLE_S)
        calls = [
            call
            for frame in self.page.frames
            for call in (frame.evaluate("() => window.__dwCalls || []") or [])
        ]
        assert calls == [], f"injected code ran: {calls}"
        assert self.dialogs == [], f"dialogs opened: {self.dialogs}"
        marked = [url for url in self.requests if hostile.MARK in url]
        assert marked == [], f"requests made by injected markup: {marked}"
        assert self.page.evaluate(INJECTED) == []


def flat(text: str) -> str:
    """Whitespace collapsed, as a page lays text out."""
    return " ".join(text.replace("\xa0", " ").split())


def shown(page: Any, selector: str) -> str:
    """The text of every element matching ``selector``, whitespace collapsed."""
    return flat(" ".join(page.locator(selector).all_inner_texts()))


def svg_text(page: Any) -> str:
    return flat(page.evaluate("() => [...document.querySelectorAll('svg text')]"
                              ".map((t) => t.textContent).join(' ')"))  # fmt: skip


#: The notebook: the run browser on each kind of item, the traced item's explorer with its
#: attention grid, curves and a bqplot figure. Nothing hostile is in the code itself.
CELLS = [
    textwrap.dedent(
        """
        from pathlib import Path
        import diffwidget
        run = diffwidget.open_run(next(p for p in Path(".").iterdir() if p.name.startswith("run-")))
        def browser_on(prefix):
            browser = run.browser()
            browser.select(next(k for k in browser.keys if k.startswith(prefix)))
            return browser
        """
    ),
    "failed = browser_on('failed'); failed",
    "missing = browser_on('missing'); missing",
    textwrap.dedent(
        """
        traced = browser_on('id')
        explorer = traced.explorer
        explorer.token = 2
        explorer.overlay = "attention"
        explorer.grid = "attention"
        explorer.widget.show_special = True
        traced
        """
    ),
    "explorer.figure('attention_mass')",
]


def check_run_views(watch: Watch) -> None:
    """Nothing injected ran; the hostile strings are text in the browser, explorer, figures."""
    page = watch.page
    # The last cells' outputs: the explorer, its grid and the bqplot figure.
    page.wait_for_selector(".dw-canvas[data-draws]", timeout=RENDER_TIMEOUT_MS)
    page.wait_for_selector(".dw-grid-label", timeout=RENDER_TIMEOUT_MS)
    page.wait_for_selector(".dw-figure svg text", timeout=RENDER_TIMEOUT_MS)
    watch.assert_nothing_ran()
    lines = shown(page, ".widget-html")
    for text in (
        hostile.RUN_FOLDER,
        hostile.OK_KEY,
        hostile.PROMPT,
        hostile.FAILED_KEY,
        hostile.ERROR,
        hostile.MISSING_KEY,
    ):
        assert flat(text) in lines
    assert "no trace was kept" not in lines
    assert shown(page, ".dw-prompt") == flat(hostile.PROMPT)
    chips = shown(page, ".dw-chip")
    assert flat(hostile.token_payload("token")) in chips
    assert flat(hostile.file_safe_payload("token2")) in chips
    assert flat(hostile.token_payload("token")) in shown(page, ".dw-caption")
    assert flat(hostile.token_payload("layer")) in shown(page, ".dw-grid-label")
    labels = svg_text(page)  # curves' direct labels, bqplot labels, legends and titles
    assert flat(hostile.token_payload("token")) in labels
    assert flat(hostile.CURVE) in labels


def test_lab_shows_a_hostile_run_and_its_explorer_as_text(jupyter_server: JupyterServer, page):
    browser_page, _console = page
    root = jupyter_server.root / "hostile"
    root.mkdir()
    hostile.write_hostile_run(root)
    write_notebook(root / "hostile.ipynb", CELLS)
    watch = Watch.start(browser_page)
    browser_page.goto(jupyter_server.page_url("lab/tree/hostile/hostile.ipynb"))
    run_all_cells(browser_page)
    check_run_views(watch)
    # No injected request wrote into the server.
    assert not [p for p in jupyter_server.root.rglob(f"*{hostile.MARK}*.txt")]


def test_exported_html_of_a_hostile_trace_shows_text_only(page, tmp_path: Path):
    browser_page, console = page
    explorer = Explorer(hostile.hostile_trace())
    explorer.token = 2
    explorer.overlay = "attention"
    path = explorer.to_html(tmp_path / "hostile.html")
    explorer.close()
    watch = Watch.start(browser_page)
    browser_page.goto(path.as_uri())
    browser_page.wait_for_selector(".dw-canvas[data-draws]")
    assert flat(browser_page.title()) == flat(f"diffwidget: {hostile.PROMPT}")
    assert shown(browser_page, ".dw-prompt") == flat(hostile.PROMPT)
    assert flat(hostile.token_payload("token")) in shown(browser_page, ".dw-chip")
    assert flat(hostile.token_payload("token")) in shown(browser_page, ".dw-caption")
    watch.assert_nothing_ran()
    assert console.widget_errors() == []


# ------------------------------------------------------------------------------- Voila
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def voila_hostile(tmp_path: Path) -> Iterator[str]:
    """The hostile notebook served as a classroom app (Voila) on 127.0.0.1."""
    pytest.importorskip("voila")
    if shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (make browser)")
    hostile.write_hostile_run(tmp_path)
    notebook = write_notebook(tmp_path / "hostile.ipynb", CELLS)
    port = _free_port()
    room = cli.classroom.Classroom(
        notebook=notebook,
        ip="127.0.0.1",
        port=port,
        token=None,
        max_students=2,
        open_browser=False,
    )
    command, env = cli.classroom.classroom_command(room, cli.demo._kernel_env())
    for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR"):
        folder = tmp_path / name.lower()
        folder.mkdir()
        env[name] = str(folder)
    repo = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH", "")) if p)
    log = tmp_path / "voila.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, env=env, cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            assert process.poll() is None, log.read_text()[-4000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-4000:]
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/"
    finally:
        process.terminate()  # Voila shuts its kernels down
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_voila_shows_a_hostile_run_and_its_explorer_as_text(voila_hostile: str, page):
    browser_page, _console = page
    watch = Watch.start(browser_page)
    # Voila streams the page while the kernel runs the cells.
    browser_page.goto(voila_hostile, wait_until="commit", timeout=RENDER_TIMEOUT_MS)
    check_run_views(watch)
