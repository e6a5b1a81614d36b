"""The front-end's own checks (vitest unit tests, strict TypeScript) as part of the Python suite."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

JS = Path(__file__).resolve().parents[2] / "js"
NPM_TIMEOUT_S = 600

pytestmark = pytest.mark.skipif(shutil.which("npm") is None, reason="needs Node.js and npm")


def _npm(*args: str) -> subprocess.CompletedProcess[str]:
    if not (JS / "node_modules").exists():
        # The package build installs these; a bare checkout gets them from the lock file.
        subprocess.run(["npm", "ci"], cwd=JS, check=True, timeout=NPM_TIMEOUT_S)
    return subprocess.run(
        ["npm", *args], cwd=JS, capture_output=True, text=True, timeout=NPM_TIMEOUT_S, check=False
    )


def test_vitest_unit_tests_pass() -> None:
    result = _npm("test")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "passed" in result.stdout


def test_typescript_is_strict_clean() -> None:
    result = _npm("run", "typecheck")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
