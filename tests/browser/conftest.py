"""Real-browser fixtures: a private JupyterLab server on 127.0.0.1 (chromium: tests/conftest.py).

The server gets temporary config/runtime/IPython directories (nothing of the user's
setup leaks in), a random token and port; it is stopped by its PID. Every test opens its
own page, so outputs of one test never leak into another.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from bench.browserlib import JupyterServer, serve
from tests.browser.helpers import ConsoleLog

#: Playwright timeouts (ms): the 2-core CI box is slow to start a kernel.
PAGE_TIMEOUT_MS = 90_000


@pytest.fixture(scope="session")
def jupyter_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterServer]:
    """JupyterLab on 127.0.0.1."""
    if shutil.which("jupyter") is None:
        pytest.skip("jupyter is not installed; install the [test] extra")
    with serve(tmp_path_factory.mktemp("jupyterlab"), "lab") as server:
        yield server


@pytest.fixture(scope="session")
def notebook_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JupyterServer]:
    """Notebook 7 (``jupyter notebook``) on 127.0.0.1."""
    pytest.importorskip("notebook")
    with serve(tmp_path_factory.mktemp("notebook"), "notebook") as server:
        yield server


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
