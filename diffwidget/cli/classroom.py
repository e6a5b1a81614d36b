"""Classroom mode: a bundled notebook served to a room as an app without code.

``diffwidget demo --classroom`` serves the notebook with Voila: each page load starts a
kernel that runs the notebook and keeps the explorer live. What makes that safe on a
network, and where each part lives:

- **Token.** Off loopback (``--ip 0.0.0.0`` or a LAN address) the app needs a token, made
  with :mod:`secrets` (or taken from ``JUPYTER_TOKEN``) and printed in the URL; anyone else
  on the network gets Voila's login page and starts nothing. ``--no-token`` turns it off,
  with a warning; ``--token`` turns it on for loopback too.
- **Cap.** At most ``--max-students`` kernels run at once (default: what the available
  memory holds at :data:`KERNEL_MEMORY_MB` each); one more page load gets HTTP 503.
- **Reclaim.** A kernel whose page never connected is shut down after a minute idle; one
  whose page connected and then dropped keeps 15 minutes (a sleeping laptop comes back).
  Both are :class:`~diffwidget.cli.classroom_kernels.ClassroomKernelManager` settings in
  ``jupyter-config/voila.json``, which a teacher's own ``voila.json`` overrides.
- **Stop.** The server runs under :func:`~diffwidget.cli.serve.serve`, so stopping the
  command in any way stops Voila and its kernels too.

``diffwidget demo --classroom live`` serves the live page instead
(:func:`~diffwidget.widget.live.write_live_folder` into a temporary folder, served read-only
by :mod:`~diffwidget.cli.static_site`): the embedded UNet runs in each student's browser and
nothing runs on this machine but a file server, so there is no kernel to cap and no token
(a token guards code execution; the page holds nothing private and is the same for anyone
who installs diffwidget).

Modes are listed in :data:`CLASSROOM_MODES` (``--classroom [MODE]``); Voila is the default.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from diffwidget.cli.common import UsageError, jupyter_config_dir, python_module_command
from diffwidget.cli.serve import serve

ClassroomMode = Literal["voila", "live"]
#: The mode that serves the live page (no notebook, no kernel, no token).
LIVE_MODE: ClassroomMode = "live"
DEFAULT_PORT = 8866
#: Resident memory of one student's kernel running the quickstart (embedded UNet, a 20-step
#: trace, the explorer): 549–555 MB once the page has loaded, 697 MB after the student
#: computed DF-RISE and DF-CAM (Linux, torch 2.13 CPU; bench/RESULTS_classroom.md).
#: ``tests/test_classroom.py`` fails if a freshly loaded kernel exceeds it.
KERNEL_MEMORY_MB = 700
#: Memory kept for the Voila server, the system and the teacher's own browser.
RESERVED_MEMORY_MB = 1500
#: The cap when the machine's memory cannot be read (neither Linux nor POSIX sysconf).
FALLBACK_MAX_STUDENTS = 8
#: Where the token goes: Voila's ``--token`` flag reads it from here, so it stays off the
#: command line (which other users of the machine can read in the process list).
TOKEN_ENV = "JUPYTER_TOKEN"
TOKEN_BYTES = 24
#: Loaded by the Voila process only (it imports jupyter_server).
KERNEL_MANAGER = "diffwidget.cli.classroom_kernels.ClassroomKernelManager"
#: Addresses that mean "every interface of this machine".
_WILDCARDS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class Classroom:
    """What one classroom server is: where it listens, who may enter, how many at once."""

    notebook: Path
    ip: str
    port: int
    token: str | None
    max_students: int
    open_browser: bool
    #: ``live`` only: the embedded models the page runs, side by side in this order.
    models: tuple[str, ...] = ("unet",)

    def urls(self) -> list[str]:
        """The URLs to give the students, token included."""
        query = f"?token={self.token}" if self.token else ""
        return [f"http://{host}:{self.port}/{query}" for host in reachable_hosts(self.ip)]


def is_loopback(ip: str) -> bool:
    """Whether ``ip`` is reachable from this machine only.

    Examples
    --------
    >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("::1")
    (True, True, True)
    >>> is_loopback("0.0.0.0"), is_loopback("192.168.1.20"), is_loopback("myhost")
    (False, False, False)
    """
    if ip == "localhost":
        return True
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to a network interface


def lan_address() -> str | None:
    """This machine's address on its default route, or ``None`` (no packet is sent).

    Examples
    --------
    >>> address = lan_address()
    >>> address is None or not is_loopback(address)
    True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.254.254.254", 1))  # UDP connect only picks a route
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if is_loopback(address) else address


def reachable_hosts(ip: str) -> list[str]:
    """Host names or addresses under which students reach a server bound to ``ip``."""
    if ip not in _WILDCARDS:
        return [f"[{ip}]" if ":" in ip else ip]
    hosts = [socket.gethostname()]
    address = lan_address()
    if address is not None:
        hosts.append(address)
    return hosts


def available_memory_mb() -> float | None:
    """Memory available to new processes, in MB (``MemAvailable`` on Linux), or ``None``."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (AttributeError, ValueError, OSError):
        return None


def default_max_students(available_mb: float | None) -> int:
    """How many students' kernels ``available_mb`` of memory holds (at least one).

    Examples
    --------
    >>> default_max_students(16_000)  # a 16 GB laptop with nothing else running
    20
    >>> default_max_students(1_000), default_max_students(None)
    (1, 8)
    """
    if available_mb is None:
        return FALLBACK_MAX_STUDENTS
    return max(1, int((available_mb - RESERVED_MEMORY_MB) // KERNEL_MEMORY_MB))


def choose_token(ip: str, wanted: bool | None) -> str | None:
    """The token to require: off loopback unless ``wanted`` is False, always if True.

    ``JUPYTER_TOKEN`` is used when set, so a teacher can keep one URL across restarts.
    """
    if wanted is False or (wanted is None and is_loopback(ip)):
        return None
    return os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(TOKEN_BYTES)


def classroom_command(
    classroom: Classroom, kernel_env: dict[str, str]
) -> tuple[list[str], dict[str, str]]:
    """The Voila command line and environment that serve ``classroom.notebook``.

    What keeps the room safe is on the command line, where no config file can undo it:
    the kernel manager :class:`~diffwidget.cli.classroom_kernels.ClassroomKernelManager`
    with its cap, the token, the port (no retries: students must find the server at the
    URL printed). Settings a teacher may tune are in ``jupyter-config/voila.json``, which
    comes last in Voila's config search path, so the teacher's own ``voila.json`` (in the
    working folder or the Jupyter config dirs) wins:

    - a kernel whose page never connected goes after 60 s idle; one whose page connected
      and dropped goes after 15 minutes idle (laptops sleep and leave the network without
      closing their tab; Voila shuts a closed tab's kernel down itself); a kernel whose
      page is still open is never culled;
    - ``@jupyter-notebook/lab-extension`` is not loaded: Voila 0.5 ships an older
      JupyterLab core that this Notebook 7 extension fails against, on every page load.

    Voila's defaults already strip code cells, stderr and tracebacks from the page and
    refuse code execution from it.
    """
    voila = python_module_command("voila", "classroom")
    from jupyter_core.paths import jupyter_config_path  # installed with voila

    # Voila's own search path (working folder, then Jupyter's), then the bundled file.
    config_paths = [os.getcwd(), *jupyter_config_path(), str(jupyter_config_dir())]
    env = dict(kernel_env)
    env.pop(TOKEN_ENV, None)  # only the token chosen here may reach Voila's --token
    command = [
        *voila,
        str(classroom.notebook),
        f"--port={classroom.port}",
        f"--Voila.ip={classroom.ip}",
        "--Voila.port_retries=0",
        *(f"--Voila.config_file_paths={path}" for path in config_paths),
        f"--VoilaConfiguration.multi_kernel_manager_class={KERNEL_MANAGER}",
        f"--ClassroomKernelManager.max_kernels={classroom.max_students}",
    ]
    if classroom.token is not None:
        command.append("--token")
        env[TOKEN_ENV] = classroom.token
    # Voila opens its URL without the token; serve() opens the one with it instead.
    if not classroom.open_browser or classroom.token is not None:
        command.append("--no-browser")
    return command, env


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _announce(classroom: Classroom, available_mb: float | None) -> None:
    """Print the URLs, the cap and the memory it needs; warn about an open server."""
    say = _say
    say(f"serving {classroom.notebook.name} as a classroom app (Ctrl+C to stop); students open:")
    for url in classroom.urls():
        say(f"    {url}")
    need_gb = classroom.max_students * KERNEL_MEMORY_MB / 1024
    have = f"{available_mb / 1024:.1f} GB available" if available_mb else "memory unknown"
    say(
        f"at most {classroom.max_students} students at once (about {KERNEL_MEMORY_MB} MB each, "
        f"{need_gb:.1f} GB in all; {have}); change it with --max-students"
    )
    if available_mb is not None and need_gb * 1024 > available_mb:
        say(f"warning: {classroom.max_students} students need more memory than is available")
    if classroom.token is None and not is_loopback(classroom.ip):
        say(
            f"warning: serving on {classroom.ip} without a token (--no-token): anyone who can "
            "reach this machine can open the app and start kernels"
        )


def _local_url(classroom: Classroom) -> tuple[str, str, int]:
    """(url, host, port) for this machine's browser: the first page the server answers."""
    host = "127.0.0.1" if classroom.ip in _WILDCARDS else reachable_hosts(classroom.ip)[0]
    query = f"?token={classroom.token}" if classroom.token else ""
    return f"http://{host}:{classroom.port}/{query}", host.strip("[]"), classroom.port


def serve_voila(classroom: Classroom, kernel_env: dict[str, str]) -> int:
    """Serve ``classroom`` with Voila until the command is stopped."""
    command, env = classroom_command(classroom, kernel_env)
    _announce(classroom, available_memory_mb())
    open_url = None
    if classroom.open_browser and classroom.token is not None:
        open_url = _local_url(classroom)
    return serve(command, env, open_url=open_url)


def serve_live(classroom: Classroom, kernel_env: dict[str, str]) -> int:
    """Serve the live page as static files until the command is stopped.

    The page is written into a temporary folder (removed when the command stops) and
    served read-only by :mod:`~diffwidget.cli.static_site` in a child process, stopped as
    Voila is. ``classroom.notebook``, ``token`` and ``max_students`` are not used: the
    page is the live page, and each student's browser runs its model.
    """
    from diffwidget.widget.live import write_live_folder

    room = replace(classroom, token=None)
    with tempfile.TemporaryDirectory(prefix="diffwidget-live-") as folder:
        _say(f"writing the live page ({' and '.join(room.models)}) …")
        write_live_folder(folder, models=room.models)
        size_mb = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 1e6
        command = [sys.executable, "-m", "diffwidget.cli.static_site", folder]
        command += ["--ip", room.ip, "--port", str(room.port)]
        _say("serving the live page as static files (Ctrl+C to stop); students open:")
        for url in room.urls():
            _say(f"    {url}")
        _say(
            f"each browser downloads {size_mb:.0f} MB once and runs the model itself: no kernel "
            "runs here, so there is no cap on students and no token (nothing runs on request)"
        )
        return serve(command, kernel_env, open_url=_local_url(room) if room.open_browser else None)


#: ``--classroom [MODE]``: how the notebook (or, for ``live``, the live page) reaches the
#: students.
CLASSROOM_MODES: dict[ClassroomMode, Callable[[Classroom, dict[str, str]], int]] = {
    "voila": serve_voila,
    LIVE_MODE: serve_live,
}


def make_classroom(
    notebook: Path,
    *,
    ip: str,
    port: int | None,
    token: bool | None,
    max_students: int | None,
    open_browser: bool,
) -> Classroom:
    """Check the classroom options and fill in the defaults (port, token, cap).

    Raises
    ------
    UsageError
        If ``max_students`` is below one.
    """
    if max_students is not None and max_students < 1:
        raise UsageError(f"--max-students must be at least 1, not {max_students}")
    return Classroom(
        notebook=notebook,
        ip=ip,
        port=port or DEFAULT_PORT,
        token=choose_token(ip, token),
        max_students=max_students or default_max_students(available_memory_mb()),
        open_browser=open_browser,
    )
