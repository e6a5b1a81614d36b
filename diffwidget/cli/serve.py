"""Run a notebook server (JupyterLab, Voila) as a child that stops when this command stops.

``diffwidget demo`` waits on its server. Stopped by a process manager (SIGTERM), a closed
terminal (SIGHUP) or Ctrl+C (SIGINT), it must not leave the server and its kernels running,
each kernel holding a model. The server therefore runs in its own session, so that only
this process decides how it stops: on any of those signals it sends the server one SIGTERM
(Voila and JupyterLab then shut their kernels down), waits, and kills whatever is left of
the server's process tree after a grace period. A server that exits on its own ends the
command with its exit status.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import webbrowser
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from diffwidget.cli.common import EXIT_OK

#: Signals that stop the command (SIGHUP does not exist on Windows).
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)
#: Seconds the server gets to shut its kernels down after SIGTERM before it is killed; a
#: Voila with 30 kernels of the quickstart took a few seconds here.
STOP_GRACE_S = 20.0
POLL_S = 0.2
#: How often the server's process tree is read while it serves (kernels start in seconds).
TREE_REFRESH_S = 2.0
#: How long to wait for the server's port before giving up on opening a browser.
BROWSER_WAIT_S = 120.0
_PROC = Path("/proc")


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` from ``/proc`` (Linux), to tell it from a reused PID."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name in parentheses may hold spaces: the fields follow its last ")".
    return stat.rsplit(")", 1)[1].split()[19]


def process_tree(pid: int) -> dict[int, str]:
    """``pid``'s descendants with their start times (Linux; empty elsewhere).

    Kernels run in sessions of their own, so a process group would miss them; their
    parent links in ``/proc`` do not.

    Examples
    --------
    >>> import os
    >>> os.getpid() in process_tree(os.getppid()) or not _PROC.is_dir()
    True
    """
    if not _PROC.is_dir():
        return {}
    children: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: dict[int, str] = {}
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        start = _process_start(child)
        if start is not None and child not in found:
            found[child] = start
            todo.extend(children.get(child, []))
    return found


def _kill_leftovers(tree: dict[int, str]) -> None:
    """SIGKILL every process of ``tree`` that still runs (and is the same process)."""
    for pid, start in tree.items():
        if _process_start(pid) == start:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _open_browser_when_listening(url: str, host: str, port: int) -> None:
    """Open ``url`` once something accepts connections on ``host:port``."""
    deadline = time.monotonic() + BROWSER_WAIT_S
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=2).close()
        except OSError:
            time.sleep(0.5)
            continue
        webbrowser.open(url)
        return


@contextlib.contextmanager
def _stop_signals(process: subprocess.Popen[bytes], received: list[int]) -> Iterator[None]:
    """While inside, a stop signal is recorded and sent on to ``process`` as SIGTERM."""

    def forward(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        if process.poll() is None:
            process.terminate()  # SIGTERM on POSIX

    previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve(
    command: list[str],
    env: dict[str, str],
    *,
    open_url: tuple[str, str, int] | None = None,
    grace_s: float = STOP_GRACE_S,
) -> int:
    """Run the server ``command`` until it exits or this process is asked to stop.

    Parameters
    ----------
    command, env
        The server's command line and environment.
    open_url : (url, host, port), optional
        Open ``url`` in a browser once ``host:port`` accepts connections (for a URL the
        server cannot open itself, such as one that carries a token).
    grace_s : float
        Seconds between SIGTERM and SIGKILL when stopping the server.

    Returns
    -------
    int
        The server's exit status, or 0 when a signal stopped it.

    Examples
    --------
    >>> import sys
    >>> serve([sys.executable, "-c", "print('serving')"], {})  # doctest: +SKIP
    0
    """
    # Own session: the terminal's Ctrl+C and hangup reach only this process, which stops
    # the server once, with SIGTERM (JupyterLab would answer SIGINT with a y/n prompt).
    process = subprocess.Popen(command, env=env, start_new_session=sys.platform != "win32")
    received: list[int] = []
    tree: dict[int, str] = {}
    with _stop_signals(process, received):
        if open_url is not None:
            threading.Thread(
                target=_open_browser_when_listening, args=open_url, daemon=True
            ).start()
        deadline: float | None = None
        next_refresh = 0.0
        while True:
            try:
                status = process.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if deadline is None and (received or now > next_refresh):
                # Kept fresh while serving: once the server exits, its kernels lose their
                # parent link and could no longer be found. Read once more on a signal,
                # while the server shuts down.
                tree.update(process_tree(process.pid))
                next_refresh = now + TREE_REFRESH_S
            if received and deadline is None:
                deadline = now + grace_s
            elif deadline is not None and now > deadline:
                tree.update(process_tree(process.pid))
                process.kill()
    # Whatever the server did not shut down in time (or at all), go now.
    _kill_leftovers(tree)
    return EXIT_OK if received else status
