"""Who owns what in a run folder: exclusive files, item locks, and temporary-file owners.

Several processes may work on one run folder at once: the processes of one launch, the jobs
of an array, or two commands a user started on the same ``--out``. Three rules keep them
apart, on any file system that honours ``O_EXCL`` (local disks, NFS, Lustre):

* a file that must be created once (the manifest) is written whole under a private name and
  hard-linked to its final name, which fails when it exists: exactly one process creates it,
  and no reader ever sees half of it;
* an item is computed only under its lock, ``locks/<key>.lock``, created the same way and
  holding who took it (host, process id, the process's start time and a random token). A
  lock whose process is gone is taken over: on the same host at once (the process id is
  dead, or now names another process), from another host when it has not been refreshed for
  :data:`LOCK_STALE_SECONDS` (holders refresh it every :data:`LOCK_REFRESH_SECONDS`).
  A stale lock is removed only under a claim on that very file (``<key>.<digest>.break.lock``,
  an item lock itself, the digest of the file's content, inode and time): one process removes
  it, and only while it is still the same file unrefreshed, so a live lock made or refreshed
  meanwhile is never removed;
* temporary files carry their writer's process id and host, and are removed only when their
  writer is gone; another process's file in flight is never touched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import socket
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

#: Seconds between two refreshes of a held lock.
LOCK_REFRESH_SECONDS = 30.0
#: A lock (or a temporary file) left unrefreshed this long has no live owner.
LOCK_STALE_SECONDS = 600.0
#: Largest lock file read back (a lock is a one-line JSON object).
_MAX_LOCK_BYTES = 4096
#: Errors of ``os.link`` on file systems without hard links; creation then uses ``O_EXCL``.
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK})
_TEMP_OWNER = re.compile(r"\.tmp-(?P<pid>[0-9]+)-(?P<host>[0-9a-f]{8})-(?P<token>[0-9a-f]+)")
LockState = Literal["held", "stale"]


def _pid_namespace() -> str:
    """This process's pid namespace: containers sharing a host name may not share pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str:
    """When process ``pid`` started, as text that differs for a reused pid ("" if unknown).

    On Linux: the boot id and the start tick from ``/proc/<pid>/stat``; elsewhere unknown,
    and staleness falls back to the lock's age.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and parentheses: count from the last ")".
    fields = stat[stat.rfind(")") + 2 :].split()
    return f"{_boot_id()}:{fields[19]}" if len(fields) > 19 else ""


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OSError:
        return False
    return True


@dataclass(frozen=True)
class ProcessTag:
    """One process, told apart from every other one (also after its pid is reused).

    Examples
    --------
    >>> tag = ProcessTag.current()
    >>> tag.pid == os.getpid() and tag.alive()
    True
    """

    host: str
    pid: int
    started: str
    token: str

    @classmethod
    def current(cls) -> ProcessTag:
        """This process (a fork gets its own tag)."""
        pid = os.getpid()
        tag = _CURRENT.get(pid)
        if tag is None:
            tag = cls(_this_host(), pid, process_start(pid), secrets.token_hex(8))
            _CURRENT.clear()
            _CURRENT[pid] = tag
        return tag

    @property
    def host_hash(self) -> str:
        """A file-safe hash of the host (name and pid namespace)."""
        return f"{zlib.crc32(self.host.encode()):08x}"

    @property
    def temp_mark(self) -> str:
        """The part of a temporary file name that names its writer."""
        return f".tmp-{self.pid}-{self.host_hash}-{self.token}"

    def alive(self) -> bool | None:
        """Whether the process still runs; ``None`` when it ran on another host."""
        if self.host != _this_host():
            return None
        if not pid_alive(self.pid):
            return False
        now = process_start(self.pid)
        return not (self.started and now and now != self.started)

    def to_json(self) -> dict[str, str | int]:
        """The lock file's content."""
        return {"host": self.host, "pid": self.pid, "started": self.started, "token": self.token}


_CURRENT: dict[int, ProcessTag] = {}


def _this_host() -> str:
    """The host name, with the pid namespace where there is one (process ids are only
    comparable inside one namespace)."""
    space = _pid_namespace()
    return f"{socket.gethostname()} {space}" if space else socket.gethostname()


@dataclass(frozen=True)
class LockFile:
    """What one read of a lock file found: which file it was, and the owner it names.

    ``digest`` covers the file's bytes, its inode and its modification time: a lock made
    anew (a new file) or refreshed by its holder since it was read has another digest.
    """

    digest: str
    holder: ProcessTag | None


def _read_lock(path: Path) -> LockFile | None:
    """The lock file as it is now; ``None`` when there is none."""
    try:
        with open(path, "rb") as handle:
            stat = os.fstat(handle.fileno())
            raw = handle.read(_MAX_LOCK_BYTES)
    except FileNotFoundError:
        return None
    except OSError:  # there but unreadable: only where it sits and its age tell it apart
        try:
            stat = path.stat()
        except OSError:
            return None
        raw = b""
    identity = f"{stat.st_ino}:{stat.st_mtime_ns}:".encode() + raw
    return LockFile(hashlib.sha256(identity).hexdigest()[:16], _parse_tag(raw))


def _read_tag(path: Path) -> ProcessTag | None:
    """The owner written in a lock file; ``None`` when it cannot be read as one."""
    found = _read_lock(path)
    return found.holder if found is not None else None


def _parse_tag(raw: bytes) -> ProcessTag | None:
    try:
        data = json.loads(raw)
        tag = ProcessTag(data["host"], data["pid"], data["started"], data["token"])
    except (ValueError, RecursionError, KeyError, TypeError):
        return None
    fields = (tag.host, tag.started, tag.token)
    if not all(isinstance(v, str) for v in fields) or type(tag.pid) is not int:
        return None
    return tag


def _age(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return None


def create_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` unless it exists; whether this call created it.

    The file is written whole under a private name and hard-linked into place, so exactly
    one of several concurrent callers succeeds and no reader sees a partial file. On a file
    system without hard links it is created with ``O_EXCL`` and written in place.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "run.json"
    >>> create_exclusive(path, b"{}"), create_exclusive(path, b"[]"), path.read_text()
    (True, False, '{}')
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}{ProcessTag.current().temp_mark}")
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
        except OSError as error:
            if error.errno not in _NO_HARD_LINKS:
                raise
            return _create_in_place(path, data)
        return True
    finally:
        temp.unlink(missing_ok=True)


def _create_in_place(path: Path, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return True


class ItemLock:
    """The lock of one item: ``with ItemLock(folder, key) as lock: if lock.taken: ...``.

    Parameters
    ----------
    folder : Path
        The run's ``locks/`` folder.
    key : str
        The item key (file-safe).

    Attributes
    ----------
    taken : bool
        Whether this process holds the lock.
    holder : ProcessTag or None
        Who holds it when this process could not take it (``None`` if unreadable).

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> with ItemLock(folder, "a") as lock, ItemLock(folder, "a") as other:
    ...     lock.taken, other.taken
    (True, False)
    """

    def __init__(self, folder: Path, key: str, *, refresh: bool = True) -> None:
        self.path = folder / f"{key}.lock"
        self.key = key
        self.refresh = refresh
        self.me = ProcessTag.current()
        self.taken = False
        self.holder: ProcessTag | None = None
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def acquire(self) -> bool:
        """Take the lock, taking over a stale one; whether this process holds it now."""
        payload = json.dumps(self.me.to_json()).encode()
        for _attempt in range(3):
            if create_exclusive(self.path, payload):
                self.taken = True
                if self.refresh:
                    self._start_refreshing()
                return True
            found = _read_lock(self.path)
            if found is None:  # released meanwhile: try again
                continue
            if self.state(found.holder) == "held":
                self.holder = found.holder
                return False
            self._break(found)
        self.holder = _read_tag(self.path)
        return False

    def state(self, holder: ProcessTag | None) -> LockState:
        """Whether the lock file (owned by ``holder``, ``None`` if unreadable) is held."""
        age = _age(self.path)
        if age is None:  # released meanwhile: try again
            return "stale"
        alive = holder.alive() if holder is not None else None
        if alive is False or age > LOCK_STALE_SECONDS:
            return "stale"
        return "held"

    def _break(self, stale: LockFile) -> None:
        """Remove the stale lock file ``stale``, unless it has changed since it was read.

        Every process that found it stale races for one claim named by ``stale.digest``; the
        winner removes the file only if it still has that digest. A file is replaced only
        after it is removed, and only the claim's holder removes it, so a live lock made
        meanwhile (another file, with its holder's own token) or refreshed meanwhile (another
        time) is never removed. A claimant that dies leaves a stale claim, broken the same
        way one level down.
        """
        claim = ItemLock(self.path.parent, f"{self.key}.{stale.digest}.break", refresh=False)
        if not claim.acquire():
            return  # another process is removing it
        try:
            now = _read_lock(self.path)
            if now is not None and now.digest == stale.digest:
                self.path.unlink(missing_ok=True)
        finally:
            claim.release()

    def owned(self) -> bool:
        """Whether the lock file still names this process (a stale-judged lock may not)."""
        if not self.taken:
            return False
        holder = _read_tag(self.path)
        return holder is not None and holder.token == self.me.token

    def _start_refreshing(self) -> None:
        def refresh() -> None:
            while not self._stop.wait(LOCK_REFRESH_SECONDS):
                if not self.owned():
                    return
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        self._refresher = threading.Thread(target=refresh, name=f"lock {self.path}", daemon=True)
        self._refresher.start()

    def release(self) -> None:
        """Give the lock back (only if this process still holds it)."""
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join()
            self._refresher = None
        if self.owned():
            self.path.unlink(missing_ok=True)
        self.taken = False

    def __enter__(self) -> ItemLock:
        self.acquire()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()


def temp_owner_gone(path: Path) -> bool:
    """Whether the writer of a temporary file is gone, so the file may be removed.

    A file named by this host's process is its writer's while that process runs; a file from
    another host, or one without a writer in its name, only once it has not changed for
    :data:`LOCK_STALE_SECONDS`.
    """
    me = ProcessTag.current()
    match = _TEMP_OWNER.search(path.name)
    if match and match["host"] == me.host_hash:
        if match["token"] == me.token:
            return False
        pid = int(match["pid"])
        if pid == me.pid or not pid_alive(pid):  # this pid's earlier process, or a dead one
            return True
    # Another host's, an unnamed writer's, or a pid now reused: only an old file is gone.
    age = _age(path)
    return age is not None and age > LOCK_STALE_SECONDS
