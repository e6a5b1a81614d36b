"""Run records read through one schema: mutated files, paths outside the run, digests, old runs.

Items are computed by a stand-in for ``compute_item`` (a second per run); the records, the
manifest and the reading code are the real ones.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from run_support import computed_keys, fake_compute

from diffwidget.explain.faithfulness import InsertionDeletionConfig
from diffwidget.explain.rise import DFRise, DFRiseConfig
from diffwidget.records import RecordError
from diffwidget.runs import runner
from diffwidget.runs.open import load_run
from diffwidget.runs.settings import RunSettings, folder_fingerprint, pipeline_fingerprint
from diffwidget.runs.store import ManifestError, RunSetupError, RunStore

#: A run folder written by diffwidget before typed records (format 1): one item computed
#: with attention and DF-CAM at step 1 of 2, one failed on purpose.
FORMAT1_RUN = Path(__file__).parent / "data" / "format1_run"
OPTIONS: dict[str, Any] = {
    "inference_steps": 2,
    "steps": [1],
    "progress": False,
    "aggregate": False,
    "pipe": object(),
}
STATUSES = {"ok", "failed", "missing", "corrupt", "stale"}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    calls = tmp_path / "calls"
    monkeypatch.setattr(runner, "compute_item", fake_compute(calls))
    return calls


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-item run (read-only: tests copy it before changing it)."""
    out = tmp_path_factory.mktemp("runs") / "small"
    original = runner.compute_item
    runner.compute_item = fake_compute()  # type: ignore[assignment]
    try:
        runner.run("scene:2", out, **OPTIONS)
    finally:
        runner.compute_item = original  # type: ignore[assignment]
    return out


def _item_files(run: Path) -> list[Path]:
    return sorted((run / "items").glob("*.json"))


# ------------------------------------------------------------------ mutated records
def _paths(data: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside a JSON value."""
    found = [at]
    if isinstance(data, dict):
        for key, value in data.items():
            found += _paths(value, (*at, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found += _paths(value, (*at, index))
    return found


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)


def _mutate(data: Any, path: tuple[Any, ...], how: str, value: Any) -> Any:
    if not path:
        return value
    data = copy.deepcopy(data)
    parent = data
    for step in path[:-1]:
        parent = parent[step]
    if how == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return data


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(choice=st.integers(0, 10**6), how=st.sampled_from(["set", "delete"]), value=json_values)
def test_a_mutated_item_record_reads_as_valid_or_corrupt(
    small_run: Path, tmp_path: Path, choice: int, how: str, value: Any
):
    run = tmp_path / "run"
    if not run.exists():
        shutil.copytree(small_run, run)
    target = _item_files(run)[0]
    original = json.loads((small_run / "items" / target.name).read_text())
    paths = _paths(original)
    mutated = _mutate(original, paths[choice % len(paths)], how, value)
    target.write_text(json.dumps(mutated))
    store = RunStore(run)
    manifest = store.read_manifest()
    assert manifest is not None
    states = {item.key: item for item in store.items(manifest)}
    state = states[target.stem]
    assert state.status in STATUSES
    if mutated != original:
        assert state.status in ("corrupt", "ok", "stale")
    if state.status == "corrupt":
        assert state.problem
    table = load_run(run).table  # never a KeyError, AttributeError or TypeError
    assert set(table["status"]) <= STATUSES


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(choice=st.integers(0, 10**6), how=st.sampled_from(["set", "delete"]), value=json_values)
def test_a_mutated_manifest_opens_or_names_the_file_and_field(
    small_run: Path, tmp_path: Path, choice: int, how: str, value: Any
):
    run = tmp_path / "run"
    if not run.exists():
        shutil.copytree(small_run, run)
    original = json.loads((small_run / "run.json").read_text())
    paths = _paths(original)
    mutated = _mutate(original, paths[choice % len(paths)], how, value)
    (run / "run.json").write_text(json.dumps(mutated))
    try:
        result = load_run(run)
    except ManifestError as error:
        refusal = str(error)
    else:
        refusal = ""
        assert len(result.table) == len(result.records)
    assert not refusal or str(run / "run.json") in refusal


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda m: m["items"][0].pop("prompt"), "items[0]"),
        (lambda m: m["items"][0].update(id=None), "items[0].id"),
        (lambda m: m["settings"].update(seeds=[True]), "settings.seeds"),
        (lambda m: m.update(items={"a": 1}), "items"),
        # edited: the digest disagrees
        (lambda m: m["settings"]["configs"]["df_rise"].update(n_masks=7), ""),
        (lambda m: m["settings"]["faithfulness"].update(n_random=7), ""),
        (lambda m: m["settings"].update(rise_masks=7), "settings"),  # a key of format 1
        (lambda m: m["settings"].update(seeds=list(range(60_000))), ""),  # 120,000 units
    ],
)
def test_a_bad_manifest_is_an_error_naming_the_file_and_field(
    small_run: Path, tmp_path: Path, change: Any, field: str
):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    manifest = json.loads((run / "run.json").read_text())
    change(manifest)
    (run / "run.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError) as error:
        load_run(run)
    assert error.value.field == field
    assert str(run / "run.json") in str(error.value)
    with pytest.raises(RunSetupError):  # resuming it is refused before any work
        runner.run("scene:2", run, **OPTIONS)


@pytest.mark.parametrize(
    "files",
    [
        [],  # a list
        {"arrays": {"path": "arrays/x.npz"}},  # no bytes
        {"arrays": {"path": 3, "bytes": 5}},
        {"arrays": {"path": "arrays/x.npz", "bytes": True}},
        {"traces": {"path": "arrays/x.npz", "bytes": 5}},
    ],
)
def test_records_of_the_wrong_shape_are_corrupt_and_redone(
    small_run: Path, tmp_path: Path, fake: Path, files: Any
):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    target = _item_files(run)[0]
    record = json.loads(target.read_text())
    target.write_text(json.dumps({**record, "files": files}))
    opened = load_run(run)
    assert opened.record(target.stem).status == "corrupt"
    report = runner.run("scene:2", run, **OPTIONS)
    assert report.computed == [target.stem]
    assert computed_keys(fake) == [target.stem]


# ------------------------------------------------------------------ paths inside the run
def test_companions_outside_the_run_are_never_followed(small_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    target = _item_files(run)[0]
    record = json.loads(target.read_text())
    arrays = run / record["files"]["arrays"]["path"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    outside = elsewhere / "x.npz"
    shutil.copy(arrays, outside)
    size = outside.stat().st_size
    for path in ("../elsewhere/x.npz", str(outside), "arrays/../../elsewhere/x.npz"):
        target.write_text(
            json.dumps({**record, "files": {"arrays": {"path": path, "bytes": size}}})
        )
        assert load_run(run).record(target.stem).status == "corrupt", path
    # The record's own place, but a symbolic link out of the run (the file, then its folder).
    target.write_text(json.dumps(record))
    assert load_run(run).record(target.stem).status == "ok"
    arrays.unlink()
    arrays.symlink_to(outside)
    assert load_run(run).record(target.stem).status == "corrupt"
    arrays.unlink()
    shutil.move(run / "arrays", tmp_path / "arrays-elsewhere")
    (run / "arrays").symlink_to(tmp_path / "arrays-elsewhere")
    assert load_run(run).record(target.stem).status == "corrupt"
    # An item record that is itself a link out of the run is not read either, nor a loop.
    shutil.move(target, elsewhere / target.name)
    target.symlink_to(elsewhere / target.name)
    assert load_run(run).record(target.stem).status == "corrupt"
    target.unlink()
    target.symlink_to(target)
    assert load_run(run).record(target.stem).status == "corrupt"


# ------------------------------------------------------------------ digests
def test_an_item_copied_from_a_run_with_other_methods_is_recomputed(tmp_path: Path, fake: Path):
    first = tmp_path / "cam"
    second = tmp_path / "attention"
    runner.run("scene:2", first, methods=["df_cam"], **OPTIONS)
    copied = _item_files(first)[0]
    calls_before = len(computed_keys(fake))
    report = runner.run("scene:2", second, methods=["attention"], **OPTIONS)
    assert len(report.computed) == 2
    shutil.copy(copied, second / "items" / copied.name)
    arrays = first / "arrays" / f"{copied.stem}.npz"
    shutil.copy(arrays, second / "arrays" / arrays.name)
    opened = load_run(second)
    state = opened.record(copied.stem)
    assert state.status == "stale"
    assert "other settings" in state.problem
    again = runner.run("scene:2", second, methods=["attention"], **OPTIONS)
    assert again.computed == [copied.stem]
    assert len(computed_keys(fake)) == calls_before + 3  # two first, the copied one again
    assert load_run(second).record(copied.stem).status == "ok"


def test_a_changed_method_setting_is_named_and_its_items_are_recomputed(tmp_path: Path, fake: Path):
    eight, nine = tmp_path / "eight", tmp_path / "nine"
    runner.run("scene:2", eight, methods=[DFRiseConfig(n_masks=8)], **OPTIONS)
    runner.run("scene:2", nine, methods=[DFRise(n_masks=9, progress_bar=False)], **OPTIONS)
    with pytest.raises(RunSetupError, match=r"\(df_rise\.n_masks: 8 there, 9 now\)"):
        runner.run("scene:2", eight, methods=[DFRiseConfig(n_masks=9)], **OPTIONS)
    evaluator = InsertionDeletionConfig(seed=1)
    with pytest.raises(RunSetupError, match=r"\(faithfulness\.seed: 0 there, 1 now\)"):
        runner.run(
            "scene:2", eight, methods=[DFRiseConfig(n_masks=8)], faithfulness=evaluator, **OPTIONS
        )
    copied = _item_files(eight)[0]
    shutil.copy(copied, nine / "items" / copied.name)
    state = load_run(nine).record(copied.stem)
    assert state.status == "stale"
    assert "other settings" in state.problem
    calls_before = len(computed_keys(fake))
    again = runner.run("scene:2", nine, methods=[DFRiseConfig(n_masks=9)], **OPTIONS)
    assert again.computed == [copied.stem]
    assert len(computed_keys(fake)) == calls_before + 1


def test_an_item_of_another_prompt_under_the_same_id_is_recomputed(
    small_run: Path, tmp_path: Path, fake: Path
):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    target = _item_files(run)[0]
    record = json.loads(target.read_text())
    target.write_text(json.dumps({**record, "prompt": "a large blue square at the top"}))
    assert load_run(run).record(target.stem).status == "corrupt"
    target.write_text(json.dumps({**record, "digest": "0" * 64}))
    assert load_run(run).record(target.stem).status == "stale"
    assert runner.run("scene:2", run, **OPTIONS).computed == [target.stem]


class _Pipe:
    def __init__(self, seed: int) -> None:
        import torch

        torch.manual_seed(seed)
        self.components = {"unet": torch.nn.Linear(3, 2), "scheduler": object()}


def test_the_digest_follows_the_weights(tmp_path: Path, fake: Path):
    assert pipeline_fingerprint(_Pipe(0)) == pipeline_fingerprint(_Pipe(0))
    assert pipeline_fingerprint(_Pipe(0)) != pipeline_fingerprint(_Pipe(1))
    options = {**OPTIONS, "pipe": _Pipe(0)}
    runner.run("scene:1", tmp_path / "run", **options)
    with pytest.raises(RunSetupError, match=r"model_fingerprint: '[0-9a-f]{64}' there"):
        runner.run("scene:1", tmp_path / "run", **{**options, "pipe": _Pipe(1)})
    from diffwidget.models.loader import DEMO_DIR

    copy_dir = tmp_path / "model"
    shutil.copytree(DEMO_DIR, copy_dir)
    assert folder_fingerprint([copy_dir]) == folder_fingerprint([DEMO_DIR])
    weights = copy_dir / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert folder_fingerprint([copy_dir]) != folder_fingerprint([DEMO_DIR])


def test_settings_digest_covers_every_result_field_but_the_seed_offsets():
    base = RunSettings().checked()
    changes = {
        "methods": ("df_cam",),
        "steps": (2,),
        "inference_steps": 10,
        "guidance": 4.0,
        "model": "dit",
        "configs": {**base.configs, "df_rise": DFRiseConfig(n_masks=8).to_json()},
        "faithfulness": InsertionDeletionConfig(n_random=1).to_json(),
        "metrics": ("roles",),
        "save_traces": False,
        "scene_metrics": False,
        "model_fingerprint": "f",
    }
    for name, value in changes.items():
        assert base.replace(**{name: value}).digest() != base.digest(), name
    for method, config in [*base.configs.items(), ("faithfulness", base.faithfulness)]:
        for setting, value in config.items():
            other = {**config, setting: [value]}  # any other value changes the digest
            if method == "faithfulness":
                changed = base.replace(faithfulness=other)
            else:
                changed = base.replace(configs={**base.configs, method: other})
            assert changed.digest() != base.digest(), f"{method}.{setting}"
            assert changed.differences(base) == [
                f"{method}.{setting}: {[value]!r} there, {value!r} now"
            ]
    assert base.replace(seeds=(0, 1)).digest() == base.digest()
    defaults = base.attention_defaults
    other = RunSettings(attention_defaults=type(defaults)(None, None, (0.0, 1.0), "layer"))
    assert other.digest() != RunSettings().digest()


def test_checked_settings_hold_every_config_default_and_refuse_bad_settings():
    settings = RunSettings.of(["attention", DFRiseConfig(n_masks=8)], steps=(3,)).checked()
    assert settings.configs == {"df_rise": DFRiseConfig(n_masks=8).to_json()}
    assert settings.faithfulness == InsertionDeletionConfig().to_json()
    assert settings.config("df_rise") == DFRiseConfig(n_masks=8)
    assert RunSettings.from_json(settings.to_json()) == settings
    bad = settings.replace(configs={"df_rise": {"n_masks": "many"}})
    with pytest.raises(RecordError, match="n_masks"):
        bad.checked()
    with pytest.raises(RunSetupError, match="n_masks"):
        runner.check_settings(bad)


# ------------------------------------------------------------------ runs of earlier versions
def test_a_run_written_before_typed_records_still_opens(tmp_path: Path):
    import diffwidget

    run = tmp_path / "format1"
    shutil.copytree(FORMAT1_RUN, run)
    opened = diffwidget.open_run(run)
    assert opened.manifest.legacy
    assert list(opened.table["status"]) == ["ok", "failed"]
    assert opened.table["error"].iloc[1] == "RuntimeError: failed on purpose"
    first = opened.table["id"].iloc[0]
    assert [m.method for m in opened.saliency_maps(first)] == ["attention", "df_cam"]
    assert opened.trace(first).prompt == opened.record(first).prompt
    assert opened.explorer(first).widget.available == ["none", "attention", "df_cam"]
    assert opened.browser().keys == list(opened.table["key"])
    cam = opened.saliency_maps(first)[1]
    with np.load(run / "arrays" / f"{opened.table['key'].iloc[0]}.npz") as arrays:
        np.testing.assert_array_equal(cam.map, arrays["df_cam@1/map"])
    # Its plain method settings are read into the evaluator's config.
    assert opened.manifest.settings.faithfulness == {"n_random": 1, "cells_per_stage": 64}
    assert opened.manifest.settings.configs == {}  # no DF-RISE: its mask count is dropped
    assert opened.manifest.settings.named()["faithfulness.cells_per_stage"] == 64
    with pytest.raises(RunSetupError, match=r"earlier diffwidget .* cannot be resumed"):
        runner.run(
            "scene:2",
            run,
            methods=["attention", "df_cam"],
            faithfulness=InsertionDeletionConfig(n_random=1, cells_per_stage=64),
            **OPTIONS,
        )
    assert sorted(os.listdir(run)) == sorted(os.listdir(FORMAT1_RUN))


def test_reading_never_raises_a_bare_error_on_a_record_that_is_not_an_object(
    small_run: Path, tmp_path: Path
):
    run = tmp_path / "run"
    shutil.copytree(small_run, run)
    target = _item_files(run)[0]
    for text in ("[]", "null", "1e999", "{" * 100 + "}" * 100, '"x"', "\udcff", ""):
        target.write_text(text, errors="surrogateescape")
        state = load_run(run).record(target.stem)
        assert state.status == "corrupt"
        assert state.problem
    with pytest.raises(RecordError):
        raise RecordError(target, "stand-in")  # the type every problem above derives from
