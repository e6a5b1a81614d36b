"""Run folders (atomic writes, item validation, manifest checks) and item splitting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from diffwidget.runs import sharding
from diffwidget.runs.manifest import Work
from diffwidget.runs.prompts import PromptItem
from diffwidget.runs.settings import RunSettings
from diffwidget.runs.sharding import DuplicatedProcessError, Shard
from diffwidget.runs.store import RunSetupError, RunStore, atomic_write, write_json


def test_atomic_write_leaves_no_partial_file_when_the_writer_fails(tmp_path: Path):
    target = tmp_path / "x.json"
    write_json(target, {"a": 1})

    def broken(path: Path) -> None:
        path.write_text('{"a": 2, "half')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def _unit(store: RunStore) -> Work:
    manifest = store.open_manifest(RunSettings(methods=("df_cam",)), [PromptItem("k", "a dog")])
    return manifest.work()[0]


def _ok_record(store: RunStore, work: Work, **changes: object) -> dict:
    companion = store.arrays_path(work.key)
    companion.parent.mkdir(exist_ok=True)
    companion.write_bytes(b"12345")
    record = work.record(
        status="ok",
        files={"arrays": store.file_entry(companion)},
    ).to_json()
    return {**record, **changes}


def test_item_status_missing_ok_failed_corrupt(tmp_path: Path):
    store = RunStore(tmp_path)
    work = _unit(store)
    assert store.status(work) == "missing"
    record = _ok_record(store, work)
    write_json(store.item_path(work.key), record)
    assert store.status(work) == "ok"
    store.arrays_path(work.key).write_bytes(b"123")  # truncated companion
    assert store.status(work) == "corrupt"
    store.item_path(work.key).write_text('{"format_version": 1, "key": "k", "sta')
    assert store.status(work) == "corrupt"
    write_json(store.item_path(work.key), {**record, "key": "other"})
    assert store.status(work) == "corrupt"
    failed = {**record, "status": "failed", "files": {}}
    failed["error"] = {"type": "RuntimeError", "message": "no"}
    write_json(store.item_path(work.key), failed)
    assert store.status(work) == "failed"


def test_manifest_refuses_other_settings_or_prompts(tmp_path: Path):
    store = RunStore(tmp_path / "run")
    items = [PromptItem("a", "a red circle")]
    cam = RunSettings(methods=("df_cam",))
    store.open_manifest(cam, items)
    store.open_manifest(cam, items)  # same run: resumes
    with pytest.raises(RunSetupError, match="methods: \\['df_cam'\\] there, \\['df_rise'\\] now"):
        store.open_manifest(cam.replace(methods=("df_rise",)), items)
    with pytest.raises(RunSetupError, match="other prompts"):
        store.open_manifest(cam, [PromptItem("b", "x")])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(RunSetupError, match="not empty"):
        RunStore(tmp_path / "busy").open_manifest(cam, items)


def test_shards_partition_the_items():
    items = list(range(23))
    parts = [Shard(k, 4).select(items) for k in range(4)]
    assert sorted(x for part in parts for x in part) == items
    assert Shard.parse(" 2 / 4 ") == Shard(2, 4)
    for bad in ("4/4", "1-4", "-1/4", "0/0"):
        with pytest.raises(ValueError, match=r"k/N|0\.\.N-1"):
            Shard.parse(bad)


class _FakeState:
    def __init__(self, cpu: bool = False) -> None:
        self.cpu = cpu
        self.num_processes = 1
        self.process_index = 0
        self.device = "cpu"


def test_duplicated_processes_are_refused(monkeypatch: pytest.MonkeyPatch):
    import accelerate

    made: list[Any] = []

    def fake(cpu: bool = False) -> _FakeState:
        made.append(cpu)
        return _FakeState(cpu)

    monkeypatch.setattr(accelerate, "PartialState", fake)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DuplicatedProcessError, match="every process would compute every item"):
        sharding.processes()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(DuplicatedProcessError, match="'two' is not a number of processes"):
        sharding.processes()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert sharding.processes().count == 1
    # On a machine without CUDA the state is always made with cpu=True (the pitfall's fix).
    import torch

    if not torch.cuda.is_available():
        assert made == [True, True]
