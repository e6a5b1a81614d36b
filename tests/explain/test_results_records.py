"""Results on disk: every field of every result type comes back, DF-CAM's raw layers included."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffwidget.explain.results import (
    FaithfulnessCurves,
    FaithfulnessResult,
    SaliencyMap,
    TokenRelevanceResult,
)
from diffwidget.records import RecordError

finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)
names = st.text(min_size=1, max_size=12)


def grids(shape: tuple[int, int]) -> st.SearchStrategy[np.ndarray]:
    return st.lists(finite, min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]).map(
        lambda v: np.asarray(v, np.float32).reshape(shape)
    )


@st.composite
def saliency_maps(draw: Any) -> SaliencyMap:
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    layers = draw(st.lists(names, max_size=3, unique=True))
    meta_values = st.none() | st.booleans() | st.integers() | st.floats() | names
    return SaliencyMap(
        method=draw(st.sampled_from(["df_rise", "df_cam", "attention"])),
        step=draw(st.integers(0, 50)),
        timestep=draw(st.integers(0, 999)),
        map=draw(grids(shape)),
        raw=draw(grids(shape)),
        layers={name: draw(grids(shape)) for name in layers},
        meta=draw(st.dictionaries(names, meta_values | st.lists(meta_values, max_size=3))),
        layers_raw={name: draw(grids(shape)) for name in layers},
    )


def assert_same(a: Any, b: Any) -> None:
    """Every field equal: arrays bit for bit, dicts in order, NaN as NaN."""
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype, f.name
            assert x.tobytes() == y.tobytes(), f.name
        elif dataclasses.is_dataclass(x):
            assert_same(x, y)
        elif isinstance(x, dict) and x and isinstance(next(iter(x.values())), np.ndarray):
            assert list(x) == list(y), f.name
            for key in x:
                assert x[key].tobytes() == y[key].tobytes(), (f.name, key)
        else:
            assert repr(x) == repr(y), f.name


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(saliency_maps())
def test_saliency_map_round_trips_every_field(tmp_path: Path, result: SaliencyMap) -> None:
    assert_same(result, SaliencyMap.load(result.save(tmp_path / "map.npz")))


def test_several_maps_share_one_file(tmp_path: Path) -> None:
    """How a run stores an item's maps: JSON records beside prefixed arrays in one .npz."""
    a = SaliencyMap(
        "df_cam",
        1,
        900,
        np.eye(2, dtype=np.float32),
        np.eye(2, dtype=np.float32),
        {"up.0": np.ones((2, 2), np.float32)},
        {"n": 1},
        {"up.0": np.full((2, 2), 7.0, np.float32)},
    )
    b = dataclasses.replace(a, step=2, layers={}, layers_raw={})
    arrays = {**a.arrays("df_cam@1/"), **b.arrays("df_cam@2/")}
    np.savez(tmp_path / "item.npz", **arrays)
    with np.load(tmp_path / "item.npz") as stored:
        back = [
            SaliencyMap.from_json(r.to_json(), arrays=stored, prefix=p)
            for r, p in ((a, "df_cam@1/"), (b, "df_cam@2/"))
        ]
    assert_same(a, back[0])
    assert_same(b, back[1])
    assert back[0].layers_raw["up.0"][0, 0] == 7.0


def test_df_cam_keeps_its_raw_layer_maps(toy_pipe: Any, toy_trace: Any, tmp_path: Path) -> None:
    from diffwidget.explain.cam import DFCam

    cam = DFCam(blocks=["down_blocks.0", "up_blocks.0"]).attribute(toy_pipe, toy_trace, 0)
    assert cam.layers_raw
    assert_same(cam, SaliencyMap.load(cam.save(tmp_path / "cam.npz")))


def test_faithfulness_and_relevance_results_round_trip(tmp_path: Path) -> None:
    frac = np.linspace(0, 1, 5, dtype=np.float32)
    curve = FaithfulnessCurves(frac, frac[::-1].copy(), frac.copy(), 0.5, 0.5)
    result = FaithfulnessResult(3, curve, dataclasses.replace(curve, deletion_auc=0.4), {"n": 2})
    assert_same(result, FaithfulnessResult.load(result.save(tmp_path / "f.npz")))
    rng = np.random.default_rng(0)
    relevance = TokenRelevanceResult(
        tokens=["<s>", "red"],
        token_kinds=["start", "word"],
        steps=np.array([0, 2]),
        timesteps=np.array([999, 500]),
        relevance=rng.random((2, 2), dtype=np.float32),
        normalized=rng.random((2, 2), dtype=np.float32),
        maps=rng.random((2, 2, 3, 3), dtype=np.float32),
        meta={"rule": "chefer"},
    )
    assert_same(relevance, TokenRelevanceResult.load(relevance.save(tmp_path / "r.npz")))


def test_a_damaged_result_file_names_the_field(tmp_path: Path) -> None:
    good = SaliencyMap("df_rise", 0, 999, np.zeros((2, 2), np.float32), np.zeros((2, 2)))
    path = good.save(tmp_path / "m.npz")
    with np.load(path) as stored:
        arrays = dict(stored)
    arrays["raw"] = np.zeros((2, 2, 2))
    np.savez(path, **arrays)
    with pytest.raises(RecordError, match="field 'raw' has shape") as info:
        SaliencyMap.load(path)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------ files of earlier versions
DATA = Path(__file__).parent / "data"
TRACING_DATA = Path(__file__).parents[1] / "tracing" / "data"


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_concept_curves_written_before_still_open(suffix: str, tmp_path: Path) -> None:
    from diffwidget.explain.probes import ConceptCurves

    curves = ConceptCurves.load(DATA / f"concepts_format1{suffix}")
    assert curves.concepts == ["colour", "shape"]
    assert curves.classes["shape"] == ["circle", "square"]
    assert curves.fold_scores is not None
    assert curves.fold_scores.shape == (2, 2, 3)
    assert curves.first_step_above(0.8) == {"colour": 1, "shape": None}
    assert_same(curves, ConceptCurves.load(curves.save(tmp_path / f"again{suffix}")))


def test_activation_record_written_before_still_opens(tmp_path: Path) -> None:
    from diffwidget.tracing.activation_record import ActivationRecord

    record = ActivationRecord.load(TRACING_DATA / "activations_format1.npz")
    assert record.halves == ["cond", "uncond"]
    assert record.features().shape == (2, 2, 3)
    assert record.meta == {"pipeline": "StableDiffusionPipeline", "guidance_scale": 7.5}
    again = ActivationRecord.load(record.save(tmp_path / "again.npz"))
    assert again.features(half="uncond").tobytes() == record.features(half="uncond").tobytes()


def test_hostile_result_files_name_the_field(tmp_path: Path) -> None:
    import json

    from diffwidget.explain.probes import ConceptCurves
    from diffwidget.tracing.activation_record import ActivationRecord

    data = json.loads((DATA / "concepts_format1.json").read_text())
    for key, value, field in (
        ("curves", [["a", 1]], "curves"),
        ("n_examples", {"colour": True}, "n_examples"),
        ("kind", "vibes", "kind"),
    ):
        bad = tmp_path / f"{key}.json"
        bad.write_text(json.dumps({**data, key: value}))
        with pytest.raises(RecordError) as info:
            ConceptCurves.load(bad)
        assert info.value.field == field
        assert str(bad) in str(info.value)
    with np.load(TRACING_DATA / "activations_format1.npz") as stored:
        arrays = dict(stored)
    header = json.loads(str(arrays["header"]))
    arrays["header"] = np.array(json.dumps({**header, "seeds": [1, "2"]}))
    np.savez(tmp_path / "acts.npz", **arrays)
    with pytest.raises(RecordError, match="'seeds' should be a list of integers"):
        ActivationRecord.load(tmp_path / "acts.npz")
