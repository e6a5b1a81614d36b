"""A small reference run of the embedded model, shared by the run tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from run_support import FAST, PROMPTS, cli


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``diffwidget run scene:4`` with every method and metric, one process (read-only)."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    cli(["run", PROMPTS, "--out", str(out), *FAST])
    return out
