"""Prompt-set runs: processes, restarts, corrupt files, failures and errors before work."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from run_support import (
    FAST,
    FAST_KWARGS,
    PROMPTS,
    REPO,
    SUBPROCESS_TIMEOUT,
    assert_same_results,
    cli,
    env,
    results,
)

from diffwidget.explain.faithfulness import InsertionDeletionConfig
from diffwidget.runs import runner
from diffwidget.runs.prompts import PromptSourceError
from diffwidget.runs.store import RunSetupError, RunStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_pipe() -> Any:
    from diffwidget.models.loader import load_demo_pipeline

    return load_demo_pipeline()


def _mtimes(run_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (run_dir / "items").glob("*.json")}


def test_reference_run_has_every_item_and_a_summary(reference_run: Path):
    records = results(reference_run)
    assert len(records) == 4
    assert all(r["status"] == "ok" for r in records.values())
    for record in records.values():
        assert {
            "df_rise@2.deletion_auc",
            "df_cam@2.deletion_auc_random",
            "seg.objects_found",
            "roles.subject.share",
        } <= set(record["metrics"])
    # Segmentation scores exist where the generated image shows the caption's objects (at
    # four sampling steps not every image does).
    found = [r for r in records.values() if all(r["segmentation"]["found"])]
    assert found
    for record in found:
        assert {"seg.ours.iou@0.4", "seg.daam.ap"} <= set(record["metrics"])
    names = [
        "summary.md",
        "items.csv",
        "items.parquet",
        "metrics.csv",
        "faithfulness.csv",
        "segmentation.csv",
        "faithfulness.png",
        "segmentation.png",
        "roles.png",
    ]
    for name in names:
        assert (reference_run / "summary" / name).is_file(), name


def test_two_processes_give_the_results_of_one(reference_run: Path, tmp_path: Path):
    out = tmp_path / "two"
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    cli(["run", PROMPTS, "--out", str(out), *FAST], launcher=launcher)
    ranks = [json.loads(p.read_text())["process"] for p in (out / "items").glob("*.json")]
    assert sorted(r["rank"] for r in ranks) == [0, 0, 1, 1]
    assert {r["count"] for r in ranks} == {2}
    assert_same_results(results(reference_run), results(out))


def test_shards_of_a_job_array_complete_the_run(reference_run: Path, tmp_path: Path):
    out = tmp_path / "sharded"
    for k in range(2):
        cli(["run", PROMPTS, "--out", str(out), "--shard", f"{k}/2", *FAST])
    assert_same_results(results(reference_run), results(out))
    assert (out / "summary" / "summary.md").is_file()


_KILLED_RUN = """
import os, signal, sys
from diffwidget.explain.faithfulness import InsertionDeletionConfig
from diffwidget.explain.rise import DFRiseConfig
from diffwidget.runs import run
done = []
def on_item(key, status):
    done.append(key)
    if len(done) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
run({prompts!r}, sys.argv[1], on_item=on_item, **{kwargs!r})
"""


def test_a_killed_run_resumes_without_losing_or_redoing_items(reference_run: Path, tmp_path: Path):
    import torch

    out = tmp_path / "killed"
    script = _KILLED_RUN.format(prompts=PROMPTS, kwargs=FAST_KWARGS)
    killed = subprocess.run(
        [sys.executable, "-c", script, str(out)],
        env=env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    before = _mtimes(out)
    assert len(before) == 2
    torch.set_num_threads(1)
    report = runner.run(PROMPTS, out, **FAST_KWARGS)
    assert sorted(report.skipped) == sorted(Path(k).stem for k in before)
    assert len(report.computed) == 2
    after = _mtimes(out)
    assert {k: after[k] for k in before} == before  # finished items untouched
    assert_same_results(results(reference_run), results(out))
    assert report.summary is not None


def test_corrupt_item_files_are_redone(reference_run: Path, tmp_path: Path):
    out = tmp_path / "corrupt"
    shutil.copytree(reference_run, out)
    items = sorted((out / "items").glob("*.json"))
    items[0].write_text(items[0].read_text()[:100])  # a truncated result file
    trace = out / "traces" / f"{items[1].stem}.safetensors"
    trace.write_bytes(trace.read_bytes()[:1000])  # a truncated companion
    before = _mtimes(out)
    report = runner.run(PROMPTS, out, **FAST_KWARGS)
    assert sorted(report.computed) == sorted([items[0].stem, items[1].stem])
    after = _mtimes(out)
    assert [after[p.name] == before[p.name] for p in items] == [False, False, True, True]
    assert_same_results(results(reference_run), results(out))


def test_a_failing_item_is_recorded_and_the_run_goes_on(
    demo_pipe: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    original = runner.compute_item

    def flaky(pipe: Any, item: Any, *args: Any, **kwargs: Any) -> Any:
        if item.id == "scene00001":
            raise RuntimeError("out of memory on purpose")
        return original(pipe, item, *args, **kwargs)

    monkeypatch.setattr(runner, "compute_item", flaky)
    kwargs = {**FAST_KWARGS, "methods": ["attention"], "metrics": ["segmentation"]}
    report = runner.run("scene:3", tmp_path / "run", pipe=demo_pipe, **kwargs)
    assert len(report.failed) == 1
    assert len(report.computed) == 2
    record = json.loads((tmp_path / "run" / "items" / f"{report.failed[0]}.json").read_text())
    assert record["status"] == "failed"
    assert record["error"]["type"] == "RuntimeError"
    assert "on purpose" in record["error"]["message"]
    summary = (tmp_path / "run" / "summary" / "summary.md").read_text()
    assert "## Failed items" in summary
    assert "out of memory on purpose" in summary
    # A rerun retries the failed item (it was not finished) and skips the others.
    monkeypatch.setattr(runner, "compute_item", original)
    again = runner.run("scene:3", tmp_path / "run", pipe=demo_pipe, **kwargs)
    assert (again.computed, len(again.skipped)) == (report.failed, 2)


@pytest.mark.parametrize(
    ("prompts", "options", "error", "message"),
    [
        ("missing.txt", {}, PromptSourceError, "no prompt file"),
        ("scene:2", {"methods": ["df_rice"]}, RunSetupError, "Did you mean 'df_rise'"),
        ("scene:2", {"metrics": ["segmentaton"]}, RunSetupError, "unknown metric"),
        ("scene:2", {"steps": [20]}, RunSetupError, "loop indices in 0..19"),
        ("scene:2", {"seeds": [-1]}, RunSetupError, "non-negative"),
        ("scene:2", {"shard": "2/2"}, RunSetupError, "0..N-1"),
        ("scene:2", {"model": "nowhere"}, RunSetupError, "model_index.json"),
    ],
)
def test_bad_input_is_refused_before_any_work(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    prompts: str,
    options: dict,
    error: type,
    message: str,
):
    def no_work(*_args: Any) -> Any:
        raise AssertionError("a pipeline was loaded before the input was checked")

    monkeypatch.setattr(runner, "_load_pipeline", no_work)
    source = str(tmp_path / prompts) if prompts.endswith(".txt") else prompts
    with pytest.raises(error, match=message):
        runner.run(source, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("model", ["unet", "dit"])
def test_embedded_models_are_named_like_on_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str
):
    import diffwidget.models.loader as loader

    loaded = []

    def fake_load(name: str, device: str = "cpu") -> Any:
        loaded.append(name)
        raise RuntimeError("stop here")

    monkeypatch.setattr(loader, "load_demo_pipeline", fake_load)
    with pytest.raises(RuntimeError, match="stop here"):
        runner.run("scene:1", tmp_path / "out", model=model)
    assert loaded == [model]
    # Both embedded models draw the scene world: their runs score scene captions.
    manifest = RunStore(tmp_path / "out").read_manifest()
    assert manifest is not None
    assert manifest.settings.scene_metrics is True


def test_a_folder_with_another_run_is_refused(reference_run: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(runner, "_load_pipeline", lambda *_: pytest.fail("work started"))
    faithfulness = InsertionDeletionConfig(n_random=2, cells_per_stage=64)
    with pytest.raises(RunSetupError, match="n_random: 1 there, 2 now"):
        runner.run(PROMPTS, reference_run, **{**FAST_KWARGS, "faithfulness": faithfulness})


def test_cli_reports_bad_input_as_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    from diffwidget import cli as command

    status = command.main(["run", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o")])
    assert status == command.EXIT_USAGE
    assert "no prompt file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        command.main(["run", "scene:2", "--out", str(tmp_path / "o"), "--methods", "rise"])
    assert exit_info.value.code == command.EXIT_USAGE
    assert "invalid choice: 'rise'" in capsys.readouterr().err


def test_items_match_the_methods_called_directly(reference_run: Path, demo_pipe: Any):
    """The runner's numbers are those of trace + DFCam + InsertionDeletion called by hand."""
    import torch

    from diffwidget.explain.cam import DFCam
    from diffwidget.explain.faithfulness import InsertionDeletion
    from diffwidget.tracing.generate import trace

    torch.set_num_threads(1)
    record = results(reference_run)[sorted(results(reference_run))[0]]
    tr = trace(
        demo_pipe, record["prompt"], num_inference_steps=4, guidance_scale=3.0, seed=record["seed"]
    )
    cam = DFCam().attribute(demo_pipe, tr, 2)
    np.testing.assert_allclose(record["arrays"]["df_cam@2/map"], cam.map, atol=1e-6)
    result = InsertionDeletion(n_random=1, cells_per_stage=64).evaluate(demo_pipe, tr, 2, cam)
    assert record["metrics"]["df_cam@2.deletion_auc"] == pytest.approx(
        result.saliency.deletion_auc, abs=1e-6
    )
    assert record["metrics"]["df_cam@2.deletion_auc_random"] == pytest.approx(
        result.random.deletion_auc, abs=1e-6
    )


def test_probe_features_give_concept_curves_across_the_set(demo_pipe: Any, tmp_path: Path):
    lines = [
        {
            "id": f"{colour}-{k}",
            "prompt": f"a large {colour} circle on the left",
            "labels": {"colour": colour},
        }
        for colour in ("red", "blue")
        for k in range(5)
    ]
    source = tmp_path / "prompts.jsonl"
    source.write_text("\n".join(json.dumps(line) for line in lines))
    kwargs = {"inference_steps": 3, "methods": ["attention"], "metrics": ["probes"]}
    report = runner.run(source, tmp_path / "run", pipe=demo_pipe, progress=False, **kwargs)
    assert len(report.computed) == 10
    with np.load(tmp_path / "run" / "arrays" / f"{report.computed[0]}.npz") as arrays:
        uncond = [k for k in arrays.files if k.startswith("probe/uncond/")]
        assert uncond
        assert arrays[uncond[0]].shape[0] == 3  # one pooled vector per step
    from diffwidget.explain.probes import ConceptCurves

    curves = ConceptCurves.load(tmp_path / "run" / "summary" / "concept_curves.json")
    assert curves.concepts == ["colour"]
    assert curves.curves.shape == (1, 3)
    assert curves.n_examples == {"colour": 10}
    assert "## Concept probes" in (tmp_path / "run" / "summary" / "summary.md").read_text()
