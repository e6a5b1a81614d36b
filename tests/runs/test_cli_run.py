"""``python -m diffwidget.cli run``: exit codes, a full disk, and no summary of nothing.

The command runs in a subprocess exactly as users start it. Faults are injected at start-up
by a ``sitecustomize`` module placed first on the path (Python imports it before anything
else): items are computed by the stand-in of ``run_support``, which fails chosen items, and
a full disk is simulated where the run's files are written.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from run_support import FAIL_MESSAGE, REPO, SUBPROCESS_TIMEOUT, env

from diffwidget.cli import EXIT_FAILED, EXIT_OK, EXIT_STOPPED, EXIT_USAGE

pytestmark = pytest.mark.slow

_SITECUSTOMIZE = """
import errno, os, sys
sys.path.insert(0, os.environ["FAULT_SUPPORT"])
from run_support import fake_compute
from diffwidget.runs import runner, store

fault, ids = os.environ["FAULT"], tuple(os.environ["FAULT_IDS"].split(","))
runner._load_pipeline = lambda *_args: object()
runner.compute_item = fake_compute(
    fail=ids if fault == "fail" else (), disk_full=ids if fault == "compute-disk-full" else ()
)
if fault == "write-disk-full":
    def full(_path):
        raise OSError(errno.ENOSPC, "No space left on device")
    store._fsync = full
"""
FAST = ["--inference-steps", "2", "--steps", "1", "--no-progress"]


def _run(tmp_path: Path, fault: str, ids: str, *args: str) -> subprocess.CompletedProcess:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    environment = env()
    environment["PYTHONPATH"] = os.pathsep.join([str(site), environment["PYTHONPATH"]])
    environment.update(FAULT=fault, FAULT_IDS=ids, FAULT_SUPPORT=str(Path(__file__).parent))
    return subprocess.run(
        [sys.executable, "-m", "diffwidget.cli", "run", *args],
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )


def test_exit_codes_of_success_failed_items_and_bad_input(tmp_path: Path):
    out = tmp_path / "run"
    done = _run(tmp_path, "none", "", "scene:2", "--out", str(out), *FAST)
    assert done.returncode == EXIT_OK, done.stderr
    assert (out / "summary" / "summary.md").is_file()

    failing = tmp_path / "failing"
    result = _run(tmp_path, "fail", "scene00001", "scene:3", "--out", str(failing), *FAST)
    assert result.returncode == EXIT_FAILED, result.stderr
    assert "1 items failed; the first: scene00001__seed" in result.stderr
    assert f"RuntimeError: {FAIL_MESSAGE}" in result.stderr
    # The other items are a result: the summary is written, listing the failure.
    assert "## Failed items" in (failing / "summary" / "summary.md").read_text()

    bad = ["--inference-steps", "2", "--steps", "5"]
    refused = _run(tmp_path, "none", "", "scene:2", "--out", str(tmp_path / "new"), *bad)
    assert refused.returncode == EXIT_USAGE, refused.stderr
    assert "loop indices" in refused.stderr
    assert EXIT_USAGE not in (EXIT_OK, EXIT_FAILED, EXIT_STOPPED)


def test_a_run_whose_items_all_failed_writes_no_summary(tmp_path: Path):
    out = tmp_path / "run"
    result = _run(tmp_path, "fail", "scene00000,scene00001", "scene:2", "--out", str(out), *FAST)
    assert result.returncode == EXIT_FAILED, result.stderr
    assert "no summary written: all 2 items failed" in result.stderr
    assert not (out / "summary").exists()


@pytest.mark.parametrize("fault", ["write-disk-full", "compute-disk-full"])
def test_a_full_disk_stops_the_run_at_once_and_says_so(tmp_path: Path, fault: str):
    out = tmp_path / "run"
    result = _run(tmp_path, fault, "scene00000,scene00001", "scene:2", "--out", str(out), *FAST)
    assert result.returncode == EXIT_STOPPED, result.stderr
    assert "the run stopped" in result.stderr
    assert "No space left on device" in result.stderr
    assert "0 computed, 0 failed" in result.stderr  # stopped at the first item
    assert not (out / "summary").exists()
    assert not list((out / "items").glob("*.json"))
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporary left behind
    # Once space is back, the same command resumes and finishes the run.
    resumed = _run(tmp_path, "none", "", "scene:2", "--out", str(out), *FAST)
    assert resumed.returncode == EXIT_OK, resumed.stderr
    assert "2 computed" in resumed.stderr
