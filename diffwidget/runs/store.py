"""The files of a run: manifest, one result file per item, atomic writes (NumPy only).

Layout of a run folder::

    run.json                        settings and items (the manifest)
    items/<id>__seed<seed>.json     one result per (prompt id, seed): metrics or the error
    traces/<id>__seed<seed>.safetensors   the item's Trace (diffwidget.Trace.load)
    arrays/<id>__seed<seed>.npz     saliency maps and probe features of the item
    locks/<id>__seed<seed>.lock     held while a process computes the item
    summary/                        tables, plots and summary.md (written by aggregation)

Every file is written to a temporary name in the same folder and renamed into place, so a
killed process leaves either the old file or the new one, never half of one. The result
file is written last and records the size of its companions: an item counts as finished
only when its result file reads through the schema (:class:`~diffwidget.runs.item_records.
ItemRecord`), carries the digest of this run's work for it, and names companions that lie
at their own place inside the run folder with those sizes. Anything else is ``"corrupt"``
(or ``"stale"``, made by other settings) and is computed again on resume.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from diffwidget.records import MAX_JSON_CHARS, RecordError, parse_json
from diffwidget.runs.item_records import Companion, FileEntry, ItemError, ItemRecord
from diffwidget.runs.locks import ItemLock, ProcessTag, create_exclusive, temp_owner_gone
from diffwidget.runs.manifest import RunManifest, Work
from diffwidget.runs.prompts import PromptItem
from diffwidget.runs.settings import RunSettings

MANIFEST = "run.json"
ITEMS_DIR = "items"
TRACES_DIR = "traces"
ARRAYS_DIR = "arrays"
SUMMARY_DIR = "summary"
LOCKS_DIR = "locks"
#: Seconds a reader waits for a manifest another process is creating in place.
MANIFEST_SETTLE_SECONDS = 5.0
#: Largest manifest and item record read or written, in bytes: both are read whole, so a
#: file from someone else is refused by its size before anything is allocated from it (a
#: record of hundreds of maps is far smaller; a manifest holds ~300 bytes per prompt).
MAX_MANIFEST_BYTES = 64 * 2**20
MAX_ITEM_BYTES = MAX_JSON_CHARS
_TEMP_MARK = ".tmp"
_COMPANIONS: dict[Companion, tuple[str, str]] = {
    "arrays": (ARRAYS_DIR, ".npz"),
    "trace": (TRACES_DIR, ".safetensors"),
}
ItemStatus = Literal["ok", "failed", "missing", "corrupt", "stale"]


class RunSetupError(ValueError):
    """A run that cannot start as asked (bad folder, other settings); the message says why."""


class ManifestError(RecordError, RunSetupError):
    """A ``run.json`` that does not read as a run manifest; the message names the field."""

    def message(self) -> str:
        """The problem and what to do."""
        return (
            f"{self.path} is not a readable run manifest: {self.detail()}; restore it, or "
            "start the run again in a new --out"
        )


@dataclass(frozen=True)
class ItemState:
    """What a run folder holds for one item.

    Attributes
    ----------
    status : {"ok", "failed", "missing", "corrupt", "stale"}
        ``"stale"``: a valid record made by other settings or for another prompt.
    record : ItemRecord, optional
        The record, for ``"ok"`` and ``"failed"``.
    problem : str
        Why the item is corrupt or stale.
    """

    status: ItemStatus
    record: ItemRecord | None = None
    problem: str = ""


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(temporary_path)`` and rename the result to ``path``.

    The temporary name sits in the same folder (so the rename is atomic), names its writer
    (so no other process removes it while it is written, see
    :func:`~diffwidget.runs.locks.temp_owner_gone`) and keeps the suffix, since some writers
    append one (``Trace.save``, ``numpy.savez``).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.stem}{ProcessTag.current().temp_mark}{path.suffix}")
    try:
        write(temp)
        _fsync(temp)
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()
    return path


def write_json(path: Path, data: Any) -> Path:
    """Write a JSON value atomically (``allow_nan=False``: standard JSON only)."""
    text = json.dumps(data, indent=1, allow_nan=False)
    return atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"))


@dataclass(frozen=True)
class RunItem:
    """One unit of work of a run with what the folder holds for it.

    Attributes
    ----------
    work : Work
        The prompt item, seed offset, seed, key and digest.
    status : {"ok", "failed", "missing", "corrupt", "stale"}
        What the folder holds (:class:`ItemState`).
    record : ItemRecord, optional
        The result record (``"ok"`` and ``"failed"`` items).
    problem : str
        Why the item is corrupt or stale.
    """

    work: Work
    status: ItemStatus
    record: ItemRecord | None = None
    problem: str = ""

    @property
    def key(self) -> str:
        """``<id>__seed<seed>``."""
        return self.work.key

    @property
    def id(self) -> str:
        """The prompt id."""
        return self.work.item.id

    @property
    def seed(self) -> int:
        """The generator seed."""
        return self.work.seed

    @property
    def offset(self) -> int:
        """The seed offset."""
        return self.work.offset

    @property
    def prompt(self) -> str:
        """The caption."""
        return self.work.item.prompt

    @property
    def error(self) -> ItemError | None:
        """Why a failed item failed."""
        return self.record.error if self.record is not None else None

    @property
    def ok(self) -> ItemRecord | None:
        """The record of a successful item (``None`` otherwise)."""
        return self.record if self.status == "ok" else None


@dataclass
class RunStore:
    """Paths and validated reads of one run folder.

    Examples
    --------
    >>> store = RunStore("my-run")  # doctest: +SKIP
    >>> store.status(item_key("scene00000", 42))  # doctest: +SKIP
    'ok'
    """

    root: Path

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    # ---------------------------------------------------------------- paths
    @property
    def manifest_path(self) -> Path:
        """``run.json``."""
        return self.root / MANIFEST

    @property
    def summary_dir(self) -> Path:
        """Folder of the aggregated tables, plots and summary.md."""
        return self.root / SUMMARY_DIR

    def item_path(self, key: str) -> Path:
        """Result file of one item."""
        return self.root / ITEMS_DIR / f"{key}.json"

    def trace_path(self, key: str) -> Path:
        """Saved Trace of one item."""
        return self.companion_path(key, "trace")

    def arrays_path(self, key: str) -> Path:
        """Saliency maps and features of one item."""
        return self.companion_path(key, "arrays")

    @property
    def locks_dir(self) -> Path:
        """Folder of the item locks."""
        return self.root / LOCKS_DIR

    def lock(self, key: str) -> ItemLock:
        """The lock of one item (``with store.lock(key) as lock: if lock.taken: ...``)."""
        return ItemLock(self.locks_dir, key)

    def remove_stale_temporaries(self, key: str) -> None:
        """Delete temporary files that killed processes left for this item.

        Only files whose writer is gone are removed; a file another process is writing is
        left alone.
        """
        for folder, stem in ((ITEMS_DIR, key), (TRACES_DIR, key), (ARRAYS_DIR, key)):
            for stale in (self.root / folder).glob(f".{stem}{_TEMP_MARK}*"):
                if temp_owner_gone(stale):
                    stale.unlink(missing_ok=True)
        for stale in self.locks_dir.glob(f".{key}.lock{_TEMP_MARK}*"):
            if temp_owner_gone(stale):
                stale.unlink(missing_ok=True)

    # ------------------------------------------------------------- manifest
    def read_manifest(self, *, settle: bool = False) -> RunManifest | None:
        """The manifest, or ``None`` when the folder holds no run yet.

        ``settle``: a manifest being created in place (file systems without hard links) may
        be read half-written; wait for it briefly instead of calling it unreadable.

        Raises
        ------
        ManifestError
            For a ``run.json`` that does not read as a manifest, naming the field.
        """
        path = self.manifest_path
        if not path.exists():
            return None
        deadline = time.monotonic() + (MANIFEST_SETTLE_SECONDS if settle else 0.0)
        while True:
            try:
                return self._parse_manifest()
            except ManifestError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def _parse_manifest(self) -> RunManifest:
        path = self.manifest_path
        if not self._inside(path) or not path.is_file():
            raise ManifestError(path, "is not a file inside the run folder")
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise ManifestError(path, f"is larger than {MAX_MANIFEST_BYTES} bytes")
        data = parse_json(
            path.read_bytes(), path, max_chars=MAX_MANIFEST_BYTES, error=ManifestError
        )
        return RunManifest.from_json(data, where=path, error=ManifestError)

    def _holds_other_files(self) -> bool:
        """Whether the folder holds anything but hidden files (so it is not a new run's)."""
        if not self.root.exists():
            return False
        return any(not entry.name.startswith(".") for entry in self.root.iterdir())

    def open_manifest(self, settings: RunSettings, items: list[PromptItem]) -> RunManifest:
        """Create the manifest, or check that an existing one asks for the same run.

        Two processes started together on an empty folder agree on one manifest: it is
        created exclusively, and the process that did not create it compares.

        Raises
        ------
        RunSetupError
            When the folder holds a run with other settings or other prompts, a run written
            by an earlier version, or files that are not a run.
        """
        if self.root.exists() and not self.root.is_dir():
            raise RunSetupError(f"{self.root} is a file; --out must be a folder")
        try:
            wanted = RunManifest.create(settings, items)
        except ValueError as error:
            raise RunSetupError(str(error)) from None
        existing = self.read_manifest()
        if existing is None:
            if self._holds_other_files():
                # Another process may have started this run since the manifest was looked for.
                existing = self.read_manifest(settle=True)
                if existing is None:
                    raise RunSetupError(
                        f"{self.root} is not empty and holds no run; choose an empty or new --out"
                    )
            else:
                text = json.dumps(wanted.to_json(), indent=1, allow_nan=False)
                if len(text) > MAX_MANIFEST_BYTES:
                    raise RunSetupError(
                        f"the prompt set makes a manifest of {len(text) // 2**20} MiB (at most "
                        f"{MAX_MANIFEST_BYTES // 2**20} MiB); split it into several runs"
                    )
                if create_exclusive(self.manifest_path, text.encode("utf-8")):
                    return wanted
                existing = self.read_manifest(settle=True)
                assert existing is not None  # another process created it first
        self._check_same_run(existing, wanted)
        return existing

    def _check_same_run(self, existing: RunManifest, wanted: RunManifest) -> None:
        if existing.legacy:
            raise RunSetupError(
                f"{self.root} holds a run written by an earlier diffwidget (format "
                f"{existing.format_version}, without settings digests); it opens with "
                "diffwidget.open_run, but cannot be resumed: start the run in a new --out"
            )
        differs = existing.settings.differences(wanted.settings)
        if differs:
            raise RunSetupError(
                f"{self.root} holds a run with other settings ({', '.join(differs)}); rerun "
                "with the same settings to resume it, or choose another --out"
            )
        if existing.items != wanted.items:
            first = next(
                (f"{a.id!r}" for a, b in zip(existing.items, wanted.items, strict=False) if a != b),
                f"{len(existing.items)} items there, {len(wanted.items)} now",
            )
            raise RunSetupError(
                f"{self.root} holds a run of other prompts (first difference: {first}); rerun "
                "with the same prompt source to resume it, or choose another --out"
            )

    # ---------------------------------------------------------------- items
    def _inside(self, path: Path) -> bool:
        """Whether ``path`` resolves (symbolic links followed) inside the run folder."""
        try:
            return path.resolve().is_relative_to(self.root.resolve())
        except (OSError, RuntimeError):  # a symbolic-link loop
            return False

    def read_item(self, work: Work) -> ItemState:
        """What the folder holds for one unit of work, every field and file checked."""
        path = self.item_path(work.key)
        if not path.exists() and not path.is_symlink():
            return ItemState("missing")
        try:
            record = self._parse_item(path)
        except RecordError as error:
            return ItemState("corrupt", problem=error.detail())
        problem = self._identity_problem(record, work) or self._companion_problem(record)
        if problem:
            return ItemState("corrupt", problem=problem)
        if work.digest and record.digest != work.digest:
            settings = "other settings" if record.settings_digest != work.settings_digest else ""
            return ItemState(
                "stale",
                record,
                f"made with {settings or 'another prompt item'} (settings digest "
                f"{record.settings_digest[:12] or 'none'}, this run's {work.settings_digest[:12]})",
            )
        return ItemState(record.status, record)

    def _parse_item(self, path: Path) -> ItemRecord:
        if not self._inside(path) or not path.is_file():
            raise RecordError(path, "is not a file inside the run folder")
        if path.stat().st_size > MAX_ITEM_BYTES:
            raise RecordError(path, f"is larger than {MAX_ITEM_BYTES} bytes")
        data = parse_json(path.read_bytes(), path, max_chars=MAX_ITEM_BYTES)
        return ItemRecord.from_json(data, where=path)

    @staticmethod
    def _identity_problem(record: ItemRecord, work: Work) -> str:
        expected = (work.key, work.item.id, work.seed, work.offset, work.item.prompt)
        found = (record.key, record.id, record.seed, record.offset, record.prompt)
        names = ("key", "id", "seed", "offset", "prompt")
        wrong = [n for n, a, b in zip(names, found, expected, strict=True) if a != b]
        return f"its {', '.join(wrong)} differ from the manifest's" if wrong else ""

    def _companion_problem(self, record: ItemRecord) -> str:
        """Why a companion file named by the record cannot be trusted ("" when all can)."""
        if record.status == "ok" and "arrays" not in record.files:
            return "it names no arrays file"
        for name, entry in record.files.items():
            expected = self.companion_path(record.key, name)
            if entry.path != expected.relative_to(self.root).as_posix():
                return f"files.{name} names {entry.path!r}, not its own place"
            if not self._inside(expected):
                return f"files.{name} resolves outside the run folder"
            if not expected.is_file() or expected.stat().st_size != entry.bytes:
                return f"files.{name} is missing or not {entry.bytes} bytes"
        return ""

    def companion_path(self, key: str, name: Companion) -> Path:
        """Where an item's ``"arrays"`` or ``"trace"`` file lies."""
        folder, suffix = _COMPANIONS[name]
        return self.root / folder / f"{key}{suffix}"

    def items(self, manifest: RunManifest) -> list[RunItem]:
        """Every unit of work of the run with what the folder holds for it, in order."""
        items = []
        for work in manifest.work():
            state = self.read_item(work)
            items.append(RunItem(work, state.status, state.record, state.problem))
        return items

    def status(self, work: Work) -> ItemStatus:
        """``"ok"``, ``"failed"``, ``"missing"``, ``"corrupt"`` or ``"stale"``."""
        return self.read_item(work).status

    def file_entry(self, path: Path) -> FileEntry:
        """The ``files`` entry of a companion written for an item."""
        return FileEntry(path.relative_to(self.root).as_posix(), path.stat().st_size)
