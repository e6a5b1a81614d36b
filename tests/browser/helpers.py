"""What only the real-browser tests need: the page's console errors and the kernel's state file.

The server, the notebooks and the chromium flags live in ``bench/browserlib.py`` (shared with
the browser benchmark and the screenshots).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Console messages that come from JupyterLab itself, not from the widget.
BENIGN_CONSOLE = ("favicon", "Failed to load resource: the server responded with a status of 404")


@dataclass
class ConsoleLog:
    """Errors the page reported (console.error and uncaught exceptions)."""

    errors: list[str] = field(default_factory=list)

    def widget_errors(self) -> list[str]:
        """Errors that are not JupyterLab's own benign noise."""
        return [e for e in self.errors if not any(b in e for b in BENIGN_CONSOLE)]


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


#: Moves the grid's scroll box so a cell is in view; returns the cell's centre in the page.
_GRID_CELL_JS = """([row, column]) => {
    const box = document.querySelector('figure.dw-grid');
    const scroll = box.querySelector('.dw-grid-scroll');
    const label = Number(box.dataset.labelPx), header = Number(box.dataset.headerPx);
    const pitch = Number(box.dataset.pitchPx);
    const top = Number(box.dataset.rowTops.split(',')[row]);
    scroll.scrollLeft = Math.max(0, column * pitch - (scroll.clientWidth - label) / 2);
    scroll.scrollTop = Math.max(0, top - (scroll.clientHeight - header) / 2);
    const rect = scroll.getBoundingClientRect();
    return {
        x: rect.left + label + column * pitch - scroll.scrollLeft + pitch / 2 - 1,
        y: rect.top + header + top - scroll.scrollTop + pitch / 2 - 1,
    };
}"""


def click_grid_cell(page: Any, row: int, column: int) -> None:
    """Click the grid cell of layer row ``row`` (over all blocks) and step column ``column``."""
    page.locator("figure.dw-grid").scroll_into_view_if_needed()
    point = page.evaluate(_GRID_CELL_JS, [row, column])
    page.wait_for_timeout(50)  # the scroll redraw runs on the next animation frame
    page.mouse.click(point["x"], point["y"])
