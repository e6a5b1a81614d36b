"""The ``concepts`` metric of a run: per-item concept scores, their records, the summary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from diffwidget.records import RecordError
from diffwidget.runs import runner
from diffwidget.runs.aggregation import load_records
from diffwidget.runs.concept_metric import (
    MAP_KINDS,
    NOT_SCENE,
    SUMMARY_FILE,
    ConceptSummary,
    summarise_concepts,
    summary_lines,
)
from diffwidget.runs.item_records import ConceptEntry, ItemRecord
from diffwidget.runs.segmentation import DAAM_TAU, TAU_GRID, PairScore
from diffwidget.runs.store import RunStore

N_STEPS = 5
SEEDS = (0, 1)
SCENES = ["a small red square at the top", "a small yellow circle right of a small red circle"]
#: Words the embedded models know, but no scene caption: no object to score against.
NOT_A_SCENE = "a red circle"
AT = int(np.argmin(np.abs(TAU_GRID - DAAM_TAU)))


@pytest.fixture(scope="module", params=["dit", "unet"])
def model(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def pipe(model: str) -> Any:
    from diffwidget.models.loader import load_demo_pipeline

    return load_demo_pipeline(model)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def concept_run(pipe: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("concepts") / "run"
    report = runner.run(
        [*SCENES, NOT_A_SCENE],
        out,
        pipe=pipe,
        methods=["attention"],
        metrics=["concepts"],
        seeds=SEEDS,
        inference_steps=N_STEPS,
        steps=[2],
        save_traces=False,
        progress=False,
    )
    assert not report.failed, report.first_error
    return out


def _items(run: Path) -> list[dict[str, Any]]:
    """The item records as plain JSON, read without the record classes."""
    return [json.loads(p.read_text()) for p in sorted((run / "items").glob("*.json"))]


def test_scene_items_hold_their_words_maps_and_layers(concept_run: Path, pipe: Any) -> None:
    from diffwidget.tracing.families import denoiser_family

    _, records = load_records(RunStore(concept_run))
    layers = [layer.path for layer in denoiser_family(pipe).concept_layers()]
    assert len(records) == 3 * len(SEEDS)
    for item in records:
        record = item.ok
        assert record is not None
        if record.prompt == NOT_A_SCENE:
            assert record.concepts is None
            assert record.skipped == {"concepts": NOT_SCENE}
            assert not any(k.startswith("concepts.") for k in record.metrics)
            continue
        entry = record.concepts
        assert entry is not None
        assert record.skipped == {}
        truths = item.work.item.objects
        assert entry.present == list(dict.fromkeys(w for t in truths for w in (t.colour, t.shape)))
        assert len(entry.absent) == 2
        assert not set(entry.absent) & set(entry.present)
        assert entry.layers == layers
        assert list(entry.per_layer) == layers
        assert sorted(entry.maps) == sorted(MAP_KINDS)
        assert abs(sum(entry.shares) - 1) < 1e-3
        if any(entry.found):
            assert len(entry.maps["concept"]) == 2 * sum(entry.found)


def test_concept_pairs_match_a_replay_scored_from_scratch(concept_run: Path, pipe: Any) -> None:
    """The replay path (one denoiser call per step, not the tap during the trace), torch's
    bilinear resize, scikit-learn's AP and an IoU written out here give the stored scores."""
    import torch
    from sklearn.metrics import average_precision_score

    from diffwidget.explain.concept_maps import ConceptMaps
    from diffwidget.models.reader import SceneReader
    from diffwidget.runs.segmentation import match_objects
    from diffwidget.tracing.generate import trace

    _, records = load_records(RunStore(concept_run))
    item = next(r for r in records if r.ok is not None and r.ok.concepts)
    record, entry = item.ok, item.ok.concepts  # type: ignore[union-attr]
    assert record is not None
    assert entry is not None
    assert any(entry.found)
    tr = trace(pipe, record.prompt, num_inference_steps=N_STEPS, seed=record.seed)
    result = ConceptMaps(words=tuple(entry.words), progress_bar=False).attribute(pipe, tr)
    assert result.default_layers() == entry.default_layers
    assert result.window_steps() == entry.steps
    assert tr.image is not None
    size = tr.image.shape[:2]
    rows = [result.steps.index(s) for s in entry.steps]
    per_layer = [
        torch.nn.functional.interpolate(
            torch.from_numpy(result.maps[p][rows].mean(axis=0)[None]).double(),
            size=size,
            mode="bilinear",
            align_corners=False,
        )[0].numpy()
        for p in entry.default_layers
    ]
    mean = np.mean(per_layer, axis=0)
    low = mean.min(axis=(1, 2), keepdims=True)
    heat = (mean - low) / (mean.max(axis=(1, 2), keepdims=True) - low)
    found = match_objects(item.work.item.objects, SceneReader().read(tr.image))
    stored = {(p.object, p.role): p for p in entry.maps["concept"]}
    for number, (truth, read) in enumerate(zip(item.work.item.objects, found, strict=True)):
        assert (read is not None) == entry.found[number]
        if read is None:
            continue
        for role, word in (("colour", truth.colour), ("shape", truth.shape)):
            pair = stored[(number, role)]
            assert pair.word == word
            map_ = heat[entry.words.index(word)]
            mask = read.mask.astype(bool)
            binary = map_ > DAAM_TAU
            iou = (binary & mask).sum() / (binary | mask).sum()
            assert pair.iou[AT] == pytest.approx(iou, abs=0.02)
            assert pair.ap == pytest.approx(
                average_precision_score(mask.ravel(), map_.ravel()), abs=0.01
            )
    with np.load(RunStore(concept_run).arrays_path(item.key)) as arrays:
        np.testing.assert_allclose(arrays["concepts/map"], result.heat_map(), atol=1e-4)


def _unit_means(items: list[dict[str, Any]], row: str) -> tuple[list[list[float]], list[float]]:
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        entry = item.get("concepts")
        if entry and entry["maps"]["concept"]:
            pairs = entry["maps"].get(row) or entry["per_layer"].get(row)
            by_prompt.setdefault(item["id"], []).extend(pairs)
    curves = [list(np.mean([p["iou"] for p in pairs], axis=0)) for pairs in by_prompt.values()]
    aps = [float(np.mean([p["ap"] for p in pairs])) for pairs in by_prompt.values()]
    return curves, aps


def _percentile_band(values: np.ndarray, resamples: int = 2000) -> tuple[float, float]:
    picks = np.random.default_rng(0).integers(0, len(values), size=(resamples, len(values)))
    means = values[picks].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def test_summary_numbers_follow_from_the_saved_item_records(concept_run: Path) -> None:
    items = _items(concept_run)
    summary = ConceptSummary.load(concept_run / "summary" / SUMMARY_FILE)
    assert summary.rows[:3] == list(MAP_KINDS)
    assert summary.n_prompts == len(SCENES)
    assert summary.skipped == {NOT_SCENE: len(SEEDS)}
    for k, row in enumerate(summary.rows):
        curves, aps = _unit_means(items, row)
        mean_curve = np.mean(curves, axis=0)
        assert summary.miou_tau[k] == pytest.approx(mean_curve[AT])
        assert summary.ap[k] == pytest.approx(np.mean(aps))
        assert summary.best_tau[k] == pytest.approx(TAU_GRID[np.argmax(mean_curve)])
        assert summary.miou_tau_low[k] <= summary.miou_tau[k] <= summary.miou_tau_high[k]
    concept_curves, concept_aps = _unit_means(items, "concept")
    for g, base in enumerate(["attention", "daam"]):
        base_curves, base_aps = _unit_means(items, base)
        gaps = np.array(concept_curves)[:, AT] - np.array(base_curves)[:, AT]
        assert summary.gap_miou_tau[g] == pytest.approx(gaps.mean())
        # Paired: the band of the per-prompt differences, not of two separate means.
        low, high = _percentile_band(gaps)
        assert (summary.gap_miou_tau_low[g], summary.gap_miou_tau_high[g]) == pytest.approx(
            (low, high)
        )
        ap_gaps = np.array(concept_aps) - np.array(base_aps)
        assert summary.gap_ap[g] == pytest.approx(ap_gaps.mean())
    ratios = []
    for prompt in SCENES:
        entries = [i["concepts"] for i in items if i["prompt"] == prompt]
        present = np.mean([np.mean(e["shares"][: len(e["present"])]) for e in entries])
        absent = np.mean([np.mean(e["shares"][len(e["present"]) :]) for e in entries])
        ratios.append(absent / present)
    assert summary.absent_over_present == pytest.approx(np.mean(ratios))
    text = (concept_run / "summary" / "summary.md").read_text()
    assert "## Concept maps of the caption's words" in text
    assert f"Skipped {len(SEEDS)} items: not a scene-world caption" in text


def test_item_metrics_are_the_means_of_their_pairs(concept_run: Path) -> None:
    for item in _items(concept_run):
        entry = item.get("concepts")
        if not entry or not entry["maps"]["concept"]:
            continue
        for kind in MAP_KINDS:
            pairs = entry["maps"][kind]
            assert item["metrics"][f"concepts.{kind}.iou@{DAAM_TAU}"] == pytest.approx(
                np.mean([p["iou"][AT] for p in pairs])
            )
        n = len(entry["present"])
        ratio = np.mean(entry["shares"][n:]) / np.mean(entry["shares"][:n])
        assert item["metrics"]["concepts.absent_over_present"] == pytest.approx(ratio)


# ---------------------------------------------------------------------------- hostile records
def _entry_json(concept_run: Path) -> tuple[Path, dict[str, Any]]:
    for path in sorted((concept_run / "items").glob("*.json")):
        data = json.loads(path.read_text())
        if data.get("concepts") and data["concepts"]["maps"]["concept"]:
            return path, data
    raise AssertionError("no scored concept entry in the run")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda e: e["shares"].append(0.1), "shares"),
        (lambda e: e["shares"].__setitem__(0, 1.5), "shares"),
        (lambda e: e.__setitem__("absent", [e["present"][0]]), "present"),
        (lambda e: e["per_layer"].pop(next(iter(e["per_layer"]))), "per_layer"),
        (lambda e: e["maps"]["daam"].pop(), "pairs"),
        (lambda e: e["maps"]["concept"][0].__setitem__("word", "sky"), "caption word"),
        (lambda e: e.__setitem__("found", [False] * len(e["found"])), "not found"),
        (lambda e: e["maps"]["concept"][0].__setitem__("ap", "high"), "ap"),
    ],
)
def test_a_tampered_concept_entry_is_refused_on_load(
    concept_run: Path, change: Any, field: str
) -> None:
    path, data = _entry_json(concept_run)
    change(data["concepts"])
    with pytest.raises(RecordError, match=field):
        ItemRecord.from_json(data, where=path)


def test_a_run_refuses_an_item_whose_concepts_were_edited(
    concept_run: Path, tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(concept_run, copy)
    path, data = _entry_json(copy)
    data["concepts"]["shares"] = [1.0] * len(data["concepts"]["shares"])
    path.write_text(json.dumps(data))
    _, records = load_records(RunStore(copy))
    assert {r.key: r.status for r in records}[path.stem] == "corrupt"


def test_a_summary_with_rows_of_the_wrong_shape_is_refused(
    concept_run: Path, tmp_path: Path
) -> None:
    summary = ConceptSummary.load(concept_run / "summary" / SUMMARY_FILE)
    arrays = summary.arrays()
    arrays["ap"] = arrays["ap"][:-1]
    with pytest.raises(RecordError, match="ap"):
        ConceptSummary.from_json(summary.to_json(), arrays=arrays)


# ---------------------------------------------------------------------------- edge cases
def _entry(layers: list[str], absent: list[str], iou: float = 0.5) -> ConceptEntry:
    pair = PairScore(0, "colour", "red", [iou] * len(TAU_GRID), iou)
    shape = PairScore(0, "shape", "circle", [iou] * len(TAU_GRID), iou)
    pairs = [pair, shape]
    n = 2 + len(absent)
    return ConceptEntry(
        present=["red", "circle"],
        absent=absent,
        layers=layers,
        default_layers=layers[:1],
        steps=[3],
        found=[True],
        maps={kind: pairs for kind in MAP_KINDS},
        per_layer={layer: pairs for layer in layers},
        shares=[1.0 / n] * n,
    )


class _Item:
    def __init__(self, key: str, entry: ConceptEntry | None, skipped: dict[str, str]) -> None:
        from diffwidget.runs.item_records import ITEM_FORMAT

        self.key = key
        self.ok = ItemRecord(
            format_version=ITEM_FORMAT,
            key=key,
            id=key,
            seed=0,
            offset=0,
            prompt="a red circle on the left",
            status="ok",
            digest="d",
            concepts=entry,
            skipped=skipped,
        )


def test_a_run_without_the_metric_has_no_summary_and_one_without_pairs_says_so() -> None:
    assert summarise_concepts([]) is None
    skipped_only = summarise_concepts([_Item("a", None, {"concepts": NOT_SCENE})])  # type: ignore[list-item]
    assert skipped_only is not None
    assert skipped_only.rows == []
    assert skipped_only.n_prompts == 0
    assert skipped_only.skipped == {NOT_SCENE: 1}
    text = "\n".join(summary_lines(skipped_only))
    assert "Skipped 1 item: not a scene-world caption" in text
    ConceptSummary.from_json(skipped_only.to_json(), arrays=skipped_only.arrays())


def test_controls_that_are_all_caption_words_leave_no_ratio() -> None:
    from diffwidget.runs.concept_metric import entry_metrics

    entry = _entry(["l0", "l1"], absent=[])
    assert entry.mass()[1] is None
    metrics = entry_metrics(entry)
    assert "concepts.absent_over_present" not in metrics
    summary = summarise_concepts([_Item("a", entry, {})])  # type: ignore[list-item]
    assert summary is not None
    assert summary.absent_over_present is None
    assert summary.miou_tau[summary.row("l1")] == pytest.approx(0.5)


def test_items_of_different_models_are_not_summarised_together() -> None:
    items = [_Item("a", _entry(["l0"], ["sky"]), {}), _Item("b", _entry(["m0"], ["sky"]), {})]
    with pytest.raises(ValueError, match="different layers"):
        summarise_concepts(items)  # type: ignore[arg-type]


def test_a_prompt_set_of_no_scene_captions_skips_every_item(tmp_path: Path) -> None:
    from diffwidget.models.loader import load_demo_pipeline

    report = runner.run(
        [NOT_A_SCENE],
        tmp_path / "run",
        pipe=load_demo_pipeline(),
        methods=["attention"],
        metrics=["concepts"],
        inference_steps=2,
        steps=[1],
        save_traces=False,
        progress=False,
    )
    assert not report.failed
    assert report.summary is not None
    assert "Skipped 1 item" in report.summary.read_text()
