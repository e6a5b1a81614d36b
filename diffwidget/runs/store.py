"""The files of a run: manifest, one result file per item, atomic writes (NumPy only).

Layout of a run folder::

    run.json                        settings and items (the manifest)
    items/<id>__seed<seed>.json     one result per (prompt id, seed): metrics or the error
    traces/<id>__seed<seed>.safetensors   the item's Trace (diffwidget.Trace.load)
    arrays/<id>__seed<seed>.npz     saliency maps and probe features of the item
    summary/                        tables, plots and summary.md (written by aggregation)

Every file is written to a temporary name in the same folder and renamed into place, so a
killed process leaves either the old file or the new one, never half of one. The result
file is written last and records the size of its companions: an item counts as finished
only when its result file parses and its companions exist with those sizes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from diffwidget.runs.locks import ItemLock, ProcessTag, create_exclusive, temp_owner_gone
from diffwidget.runs.prompts import PromptItem

FORMAT_VERSION = 1
MANIFEST = "run.json"
ITEMS_DIR = "items"
TRACES_DIR = "traces"
ARRAYS_DIR = "arrays"
SUMMARY_DIR = "summary"
LOCKS_DIR = "locks"
#: Seconds a reader waits for a manifest another process is creating in place.
MANIFEST_SETTLE_SECONDS = 5.0
_TEMP_MARK = ".tmp"
ItemStatus = Literal["ok", "failed", "missing", "corrupt"]


class RunSetupError(ValueError):
    """A run that cannot start as asked (bad folder, other settings); the message says why."""


def item_key(item_id: str, seed: int) -> str:
    """File stem of one (prompt id, seed) result.

    Examples
    --------
    >>> item_key("scene00003", 42)
    'scene00003__seed42'
    """
    return f"{item_id}__seed{seed}"


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


def _json_safe(value: Any) -> Any:
    """NaN and infinities become ``None`` so the JSON is standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> Path:
    """Write ``data`` as JSON, atomically."""
    text = json.dumps(_json_safe(data), indent=1, allow_nan=False)
    return atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"))


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
        return self.root / TRACES_DIR / f"{key}.safetensors"

    def arrays_path(self, key: str) -> Path:
        """Saliency maps and features of one item."""
        return self.root / ARRAYS_DIR / f"{key}.npz"

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
        for folder in (ITEMS_DIR, TRACES_DIR, ARRAYS_DIR):
            for stale in (self.root / folder).glob(f".{key}{_TEMP_MARK}*"):
                if temp_owner_gone(stale):
                    stale.unlink(missing_ok=True)

    # ------------------------------------------------------------- manifest
    def read_manifest(self, *, settle: bool = False) -> dict[str, Any] | None:
        """The manifest, or ``None`` when the folder holds no run yet.

        ``settle``: a manifest being created in place (file systems without hard links) may
        be read half-written; wait for it briefly instead of calling it unreadable.
        """
        if not self.manifest_path.exists():
            return None
        deadline = time.monotonic() + (MANIFEST_SETTLE_SECONDS if settle else 0.0)
        while True:
            try:
                data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
                break
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise RunSetupError(
                    f"{self.manifest_path} is not a readable run manifest ({error}); delete "
                    "the folder or choose another --out"
                ) from None
        if not isinstance(data, dict) or "settings" not in data or "items" not in data:
            raise RunSetupError(f"{self.manifest_path} is not a diffwidget run manifest")
        return data

    def _holds_other_files(self) -> bool:
        """Whether the folder holds anything but hidden files (so it is not a new run's)."""
        if not self.root.exists():
            return False
        return any(not entry.name.startswith(".") for entry in self.root.iterdir())

    def open_manifest(self, settings: dict[str, Any], items: list[PromptItem]) -> None:
        """Write the manifest, or check that an existing one asks for the same run.

        Raises
        ------
        RunSetupError
            When the folder holds a run with other settings or other prompts.
        """
        if self.root.exists() and not self.root.is_dir():
            raise RunSetupError(f"{self.root} is a file; --out must be a folder")
        record = {
            "format_version": FORMAT_VERSION,
            "settings": _json_safe(settings),
            "items": [item.to_json() for item in items],
        }
        text = json.dumps(record, indent=1, allow_nan=False)
        record = json.loads(text)
        existing = self.read_manifest()
        if existing is None:
            if self._holds_other_files():
                # Another process may have started this run since the manifest was looked for.
                existing = self.read_manifest()
                if existing is None:
                    raise RunSetupError(
                        f"{self.root} is not empty and holds no run; choose an empty or new --out"
                    )
            elif create_exclusive(self.manifest_path, text.encode("utf-8")):
                return
            else:  # another process created it first: same run, or refuse
                existing = self.read_manifest(settle=True)
                assert existing is not None
        differs = sorted(
            k
            for k in set(existing["settings"]) | set(record["settings"])
            if existing["settings"].get(k) != record["settings"].get(k)
        )
        if differs:
            detail = ", ".join(
                f"{k}: {existing['settings'].get(k)!r} there, {record['settings'].get(k)!r} now"
                for k in differs
            )
            raise RunSetupError(
                f"{self.root} holds a run with other settings ({detail}); rerun with the same "
                "settings to resume it, or choose another --out"
            )
        if existing["items"] != record["items"]:
            raise RunSetupError(
                f"{self.root} holds a run of other prompts; rerun with the same prompt source "
                "to resume it, or choose another --out"
            )

    # ---------------------------------------------------------------- items
    def read_item(self, key: str) -> tuple[ItemStatus, dict[str, Any] | None]:
        """The status of one item and its record (``None`` when missing or corrupt)."""
        path = self.item_path(key)
        if not path.exists():
            return "missing", None
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "corrupt", None
        if (
            not isinstance(record, dict)
            or record.get("key") != key
            or record.get("format_version") != FORMAT_VERSION
            or record.get("status") not in ("ok", "failed")
        ):
            return "corrupt", None
        for entry in record.get("files", {}).values():
            companion = self.root / entry["path"]
            if not companion.exists() or companion.stat().st_size != entry["bytes"]:
                return "corrupt", None
        return record["status"], record

    def status(self, key: str) -> ItemStatus:
        """``"ok"``, ``"failed"``, ``"missing"`` or ``"corrupt"``."""
        return self.read_item(key)[0]

    def records(self, keys: list[str]) -> Iterator[tuple[str, ItemStatus, dict[str, Any] | None]]:
        """``(key, status, record)`` for each key, in order."""
        for key in keys:
            status, record = self.read_item(key)
            yield key, status, record

    def file_entry(self, path: Path) -> dict[str, Any]:
        """The ``files`` entry of a companion written for an item."""
        return {"path": path.relative_to(self.root).as_posix(), "bytes": path.stat().st_size}
