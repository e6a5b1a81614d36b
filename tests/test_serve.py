"""Stopping ``diffwidget demo`` stops its server and everything the server started.

The server is a stand-in: a Python process that starts a "kernel" in a session of its own
(as jupyter_client starts kernels) and either exits on SIGTERM, as Voila and JupyterLab
do, or ignores it. The command under test is :func:`diffwidget.cli.serve.serve`, run in a
process of its own so that it can receive real signals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from diffwidget.cli.serve import process_tree

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc (Linux)")

ROOT = Path(__file__).resolve().parents[1]
START_S = 60
#: The grace period given to ``serve`` here, and how long a stop may take beyond it on a
#: busy machine.
GRACE_S = 2.0
SLACK_S = 20.0

SERVER = """
import json, os, signal, subprocess, sys, time
if sys.argv[1] == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
kernel = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True
)
with open(sys.argv[2] + ".tmp", "w") as f:
    json.dump({"server": os.getpid(), "kernel": kernel.pid}, f)
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
if sys.argv[1] == "exits":
    kernel.kill()
    sys.exit(3)
try:
    time.sleep(600)
finally:
    kernel.kill()  # a server that stops shuts its kernels down
"""

SUPERVISOR = """
import sys
from diffwidget.cli.serve import serve
sys.exit(serve([sys.executable, sys.argv[1], *sys.argv[2:4]], {}, grace_s=float(sys.argv[4])))
"""


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start(tmp_path: Path, behaviour: str) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    """``serve`` running the stand-in server; the PIDs of the server and its kernel."""
    script = tmp_path / "server.py"
    script.write_text(SERVER)
    record = tmp_path / "pids.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-c", SUPERVISOR, str(script), behaviour, str(record), str(GRACE_S)]
    process = subprocess.Popen(argv, env=env)
    deadline = time.monotonic() + START_S
    while not record.exists():
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            pytest.fail(f"the stand-in server did not start (exit {process.poll()})")
        time.sleep(0.1)
    pids = json.loads(record.read_text())
    return process, pids


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The PIDs of ``pids`` still running after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(running(pid) for pid in pids):
        time.sleep(0.1)
    return [pid for pid in pids if running(pid)]


def cleanup(process: subprocess.Popen[bytes], pids: dict[str, int]) -> None:
    for pid in (process.pid, *pids.values()):
        if running(pid):
            os.kill(pid, signal.SIGKILL)
    process.wait(10)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_stop_signal_stops_the_server_and_its_kernels(
    signum: signal.Signals, tmp_path: Path
) -> None:
    process, pids = start(tmp_path, "cooperative")
    try:
        time.sleep(2.5)  # past one refresh of the process tree
        assert set(pids.values()) <= set(process_tree(process.pid))
        os.kill(process.pid, signum)
        assert process.wait(GRACE_S + SLACK_S) == 0  # stopped on request: not a failure
        assert wait_gone(list(pids.values()), SLACK_S) == []
    finally:
        cleanup(process, pids)


def test_a_server_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    process, pids = start(tmp_path, "stubborn")
    try:
        time.sleep(2.5)
        started = time.monotonic()
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(GRACE_S + SLACK_S) == 0
        assert time.monotonic() - started >= GRACE_S  # SIGTERM first, then the grace period
        # The kernel lives in a session of its own: a process group kill would miss it.
        assert wait_gone(list(pids.values()), SLACK_S) == []
    finally:
        cleanup(process, pids)


def test_a_server_that_exits_ends_the_command_with_its_status(tmp_path: Path) -> None:
    process, pids = start(tmp_path, "exits")
    try:
        assert process.wait(START_S) == 3
        assert wait_gone(list(pids.values()), SLACK_S) == []
    finally:
        cleanup(process, pids)


def test_process_tree_follows_parent_links_across_sessions() -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
            "start_new_session=True); time.sleep(60)",
        ]
    )
    try:
        deadline = time.monotonic() + START_S
        while len(process_tree(child.pid)) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        (grandchild,) = process_tree(child.pid)
        assert os.getsid(grandchild) != os.getsid(child.pid)
        assert child.pid in process_tree(os.getpid())
        assert grandchild in process_tree(os.getpid())
    finally:
        for pid in process_tree(child.pid):
            os.kill(pid, signal.SIGKILL)
        child.kill()
        child.wait(10)
