"""Aggregated tables against independent recomputation, and opening a run without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from run_support import REPO, SUBPROCESS_TIMEOUT, env

from diffwidget.runs import runner
from diffwidget.runs.aggregation import bootstrap_ci
from diffwidget.runs.item_records import ItemResult
from diffwidget.runs.metrics import ItemOutput
from diffwidget.runs.segmentation import DAAM_TAU, TAU_GRID, PairScore, SegmentationScores


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run_dir / "items").glob("*.json"))]


def test_metric_table_is_the_mean_and_sd_of_the_items(reference_run: Path):
    records = _records(reference_run)
    metrics = pd.read_csv(reference_run / "summary" / "metrics.csv").set_index("metric")
    for name in ("df_rise@2.deletion_auc", "attention@2.insertion_gain", "seg.daam.ap"):
        # Items without the metric (no object found for segmentation) are left out.
        values = np.array([r["metrics"][name] for r in records if name in r["metrics"]])
        assert len(values) >= 2
        assert metrics.loc[name, "mean"] == pytest.approx(values.mean())
        assert metrics.loc[name, "sd"] == pytest.approx(values.std(ddof=1))
        assert metrics.loc[name, "ci_low"] <= values.mean() <= metrics.loc[name, "ci_high"]
    items = pd.read_parquet(reference_run / "summary" / "items.parquet")
    assert list(items["key"]) == [r["key"] for r in records]


def test_faithfulness_table_puts_the_random_baseline_beside_each_auc(reference_run: Path):
    records = _records(reference_run)
    table = pd.read_csv(reference_run / "summary" / "faithfulness.csv").set_index("map")
    assert set(table.index) == {"attention@2", "df_rise@2", "df_cam@2"}
    for name in table.index:
        curves = [r["curves"][name] for r in records]
        x = np.asarray(curves[0]["fractions"])
        for who, key in (("saliency", "deletion"), ("random", "random_deletion")):
            per_item = [np.trapezoid(c[key], x) for c in curves]
            assert table.loc[name, f"{who}_deletion_mean"] == pytest.approx(np.mean(per_item))
            # The paper's aggregation: mean curve, min-max normalised, then the area.
            mean = np.mean([c[key] for c in curves], axis=0)
            paper = np.trapezoid((mean - mean.min()) / (mean.max() - mean.min()), x)
            assert table.loc[name, f"paper_{who}_deletion_auc"] == pytest.approx(paper, abs=1e-6)


def test_segmentation_table_pools_the_pairs_of_all_items(reference_run: Path):
    records = _records(reference_run)
    table = pd.read_csv(reference_run / "summary" / "segmentation.csv").set_index("aggregation")
    at = int(np.argmin(np.abs(TAU_GRID - DAAM_TAU)))
    for name in ("ours", "daam"):
        pairs = [p for r in records for p in r["segmentation"]["pairs"][name]]
        assert table.loc[name, "n_pairs"] == len(pairs)
        assert table.loc[name, "miou_tau"] == pytest.approx(np.mean([p["iou"][at] for p in pairs]))
        assert table.loc[name, "map"] == pytest.approx(np.mean([p["ap"] for p in pairs]))
        curve = np.mean([p["iou"] for p in pairs], axis=0)
        assert table.loc[name, "best_tau"] == pytest.approx(TAU_GRID[np.argmax(curve)])
    summary = (reference_run / "summary" / "summary.md").read_text()
    assert "random_deletion_mean" in summary
    assert "## Worst items by seg.ours.iou@0.4" in summary


def test_bootstrap_interval_of_a_mean_matches_the_normal_approximation():
    values = np.random.default_rng(0).normal(3.0, 2.0, size=400)
    low, high = bootstrap_ci(values)
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert low == pytest.approx(values.mean() - half, abs=0.25 * half)
    assert high == pytest.approx(values.mean() + half, abs=0.25 * half)
    assert bootstrap_ci(np.full(10, 2.5)) == (2.5, 2.5)


_NO_TORCH = """
import sys
for name in ("torch", "diffusers", "transformers", "accelerate"):
    sys.modules[name] = None
import diffwidget
run = diffwidget.open_run(sys.argv[1])
assert len(run.table) == 4, run.table
first = run.table["id"].iloc[0]
explorer = run.explorer(first)
available = explorer.widget.available
assert available == ["none", "attention", "df_rise", "df_cam"], available
browser = run.browser()
column = "seg.ours.iou@0.4"
values = [run.table.set_index("key").loc[k, column] for k in browser.keys]
assert values == sorted(values), values  # worst first
assert browser.select(browser.keys[0]) is not None
assert browser.explorer.trace.prompt == run.record(browser.keys[0]).prompt
expected = {"df_rise@2 deletion", "segmentation mIoU by threshold", "token roles"}
assert expected <= set(browser._curves)
browser.sort("df_cam@2.deletion_gain", worst_first=False)
gains = [run.table.set_index("key").loc[k, "df_cam@2.deletion_gain"] for k in browser.keys]
assert gains == sorted(gains, reverse=True)
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
print("ok")
"""


def test_open_run_and_its_browser_work_without_torch(reference_run: Path):
    result = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, str(reference_run)],
        capture_output=True,
        text=True,
        env=env(),
        cwd=REPO,
        timeout=SUBPROCESS_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


@pytest.mark.parametrize("found", [False, True])
def test_a_one_item_scene_run_aggregates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, found: bool
):
    iou = [0.0] * len(TAU_GRID)
    iou[int(np.argmin(np.abs(TAU_GRID - DAAM_TAU)))] = 0.5
    pairs = [PairScore(0, "colour", "red", iou, 0.75)] if found else []
    scores = SegmentationScores(found=[found], pairs={"ours": pairs, "daam": pairs})
    output = ItemOutput(ItemResult(segmentation=scores, timesteps=[999, 499]), None, {})
    monkeypatch.setattr(runner, "compute_item", lambda *_args, **_kwargs: output)
    report = runner.run(
        "scene:1", tmp_path / "run", inference_steps=2, steps=[1], pipe=object(), progress=False
    )
    assert report.summary is not None
    assert report.summary.is_file()
    table = pd.read_csv(report.summary.parent / "segmentation.csv").set_index("aggregation")
    for name in ("ours", "daam"):
        row = table.loc[name]
        assert row["n_items"] == 1
        assert row["n_pairs"] == len(pairs)
        if found:  # every resample of one item is that item: the interval is its value
            assert row["miou_tau"] == row["miou_tau_ci_low"] == row["miou_tau_ci_high"] == 0.5
            assert row["map"] == row["map_ci_low"] == row["map_ci_high"] == 0.75
        else:
            assert (
                row[["miou_tau", "miou_tau_ci_low", "miou_tau_ci_high", "map_ci_low"]].isna().all()
            )
    assert "## Segmentation" in report.summary.read_text()
