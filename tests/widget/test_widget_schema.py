"""The schema is the single source of truth: Python traits and TypeScript types agree."""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import numpy as np
import pytest

from diffwidget.widget import schema, schema_ts
from diffwidget.widget.codecs import (
    decode_array,
    describe_payloads,
    encode_array,
    payload_nbytes,
    quantise_uint8,
)
from diffwidget.widget.model import ExplorerWidget

TS_SCHEMA = Path(__file__).resolve().parents[2] / "js" / "src" / "schema.ts"


def test_generated_typescript_matches_the_python_schema():
    assert TS_SCHEMA.read_text() == schema_ts.typescript(), (
        "js/src/schema.ts drifted from diffwidget/widget/schema.py; "
        "run `python -m diffwidget.widget.schema_ts`"
    )


def test_drift_is_detected(tmp_path, monkeypatch):
    # The check must fail when a trait is added on one side only.
    extra = (*schema.TRAITS, schema.TraitSpec("zoom", "float", 1.0, True, "Zoom factor."))
    monkeypatch.setattr(schema, "TRAITS", extra)
    assert "zoom: number;" in schema_ts.typescript()
    assert schema_ts.typescript() != TS_SCHEMA.read_text()


def test_every_schema_trait_is_a_synced_trait_of_the_widget():
    synced = {name for name, trait in ExplorerWidget.class_traits(sync=True).items()}
    assert {spec.name for spec in schema.TRAITS} <= synced
    assert set(schema.FRONTEND_WRITABLE) == {
        "step", "token", "overlay", "opacity", "image_mode", "show_special",
        "attention_layer", "attention_head", "saliency_layer", "concept", "grid",
        "switch_word", "switch_replacement", "switch_seeds",
        "patch_word", "patch_replacement",
    }  # fmt: skip


def test_enums_come_from_the_literals_and_reach_typescript():
    assert get_args(schema.OverlayKind) == schema.OVERLAY_KINDS
    text = TS_SCHEMA.read_text()
    assert (
        'export type OverlayKind = "none" | "attention" | "df_rise" | "df_cam" | "occlusion" '
        '| "concept";' in text
    )
    assert 'export type Status = "idle" | "running" | "done" | "cancelled" | "error";' in text
    widget = ExplorerWidget()
    with pytest.raises(Exception, match="overlay"):
        widget.overlay = "bogus"


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.int32])
def test_codec_round_trip(dtype):
    array = (np.arange(24).reshape(2, 3, 4) * 3).astype(dtype)
    payload = encode_array(array)
    assert payload["shape"] == [2, 3, 4]
    assert isinstance(payload["data"], bytes)
    np.testing.assert_array_equal(decode_array(payload), array)


def test_codec_rejects_malformed_payloads():
    payload = encode_array(np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="needs 16"):
        decode_array({**payload, "data": payload["data"][:-1]})
    with pytest.raises(ValueError, match="unknown dtype"):
        decode_array({**payload, "dtype": "float64"})
    with pytest.raises(ValueError, match="'dtype', 'shape' and 'data'"):
        decode_array({"shape": [1]})


def test_quantisation_error_is_below_half_a_code_per_map():
    rng = np.random.default_rng(0)
    maps = rng.random((5, 3, 8, 8)).astype(np.float32) * rng.random((5, 3, 1, 1)).astype(np.float32)
    q, scale = quantise_uint8(maps)
    assert q.dtype == np.uint8
    assert scale.shape == (5, 3)
    assert (q.max(axis=(2, 3)) == 255).all()  # each map uses the full 8-bit range
    restored = decode_array(encode_array(q, scale=scale))
    assert np.abs(restored - maps).max() <= scale.max() / 510 + 1e-7
    with pytest.raises(ValueError, match="non-negative"):
        quantise_uint8(-maps)


def test_payload_helpers_count_and_hide_bytes():
    payload = {"a": encode_array(np.zeros(10, np.uint8)), "b": [encode_array(np.zeros(2, "f4"))]}
    assert payload_nbytes(payload) == 18
    assert describe_payloads(payload)["a"]["data"] == "<bytes 10>"


def _ts_fields(interface: str) -> set[str]:
    """Field names of one interface in the generated TypeScript."""
    from diffwidget.widget.payload_types import TS_PAYLOADS

    body = TS_PAYLOADS.split(f"export interface {interface} {{", 1)[1].split("\n}", 1)[0]
    return {
        line.strip().split(":")[0].rstrip("?")
        for line in body.splitlines()
        if ":" in line and not line.strip().startswith(("/", "*"))
    }


def test_payload_records_write_exactly_the_typescript_fields():
    from diffwidget.widget.payloads import (
        AttentionSet,
        CellScale,
        GridData,
        GridGroup,
        OverlaySet,
        PayloadError,
    )

    codes = np.zeros((2, 3, 4, 4), np.uint8)
    attention = AttentionSet("", -1, (4, 4), [0, 1], codes, np.ones((2, 3), np.float32), "d")
    group = GridGroup(
        "b", ["b.x"], ["x"], (4, 4), np.zeros((1, 2, 1, 4, 4), np.uint8), np.ones((1, 2, 1))
    )
    grid = GridData("attention", [group], [0, 1], [2], "d")
    assert set(attention.to_json()) == _ts_fields("AttentionSet")
    assert set(group.to_json()) == _ts_fields("GridGroup")
    assert set(grid.to_json()) == _ts_fields("GridData")
    assert set(CellScale(0.0, 1.0, "m").to_json()) == _ts_fields("CellScale")
    # And each record reads back what it wrote.
    again = AttentionSet.from_json(attention.to_json())
    assert (again.layer, again.grid, again.steps) == ("", (4, 4), [0, 1])
    assert GridData.from_json(grid.to_json()).tokens == [2]
    overlay = OverlaySet([3], np.full((1, 4, 4), 0.5, np.float32), [(0.0, 1.0)], "", ["c"])
    assert set(overlay.to_json()) == _ts_fields("OverlaySet")
    again_overlay = OverlaySet.from_json(overlay.to_json())
    assert again_overlay.steps == [3]
    np.testing.assert_allclose(again_overlay.maps, 0.5, atol=0.5 / 255)
    with pytest.raises(PayloadError, match="one range and one caption per step"):
        OverlaySet([3], np.zeros((1, 4, 4), np.float32), [], "", ["c"])


def test_the_concept_word_is_checked_when_the_view_sends_it():
    bounds = schema.Bounds(n_steps=3, n_tokens=2)
    assert schema.validate_incoming("concept", "  red \n circle ", bounds) == "red circle"
    assert schema.validate_incoming("concept", "", bounds) == ""
    with pytest.raises(schema.InvalidInput, match="at most 100 characters"):
        schema.validate_incoming("concept", "w" * 101, bounds)
    with pytest.raises(schema.InvalidInput, match="must be text"):
        schema.validate_incoming("concept", 3, bounds)
    with pytest.raises(schema.InvalidInput, match="control characters"):
        schema.validate_incoming("concept", "a\x1bb", bounds)


def test_payload_records_refuse_malformed_values():
    from diffwidget.widget.payloads import AttentionSet, PayloadError

    codes = np.zeros((2, 3, 4, 4), np.uint8)
    good = AttentionSet("", -1, (4, 4), [0, 1], codes, np.ones((2, 3), np.float32), "d")
    value = good.to_json()
    with pytest.raises(PayloadError, match="do not match grid"):
        AttentionSet.from_json({**value, "grid": [8, 8]})
    with pytest.raises(PayloadError, match="'steps' must be a list of integers"):
        AttentionSet.from_json({**value, "steps": ["0", 1]})
    with pytest.raises(PayloadError, match="'layer' is missing"):
        AttentionSet.from_json({k: v for k, v in value.items() if k != "layer"})
    with pytest.raises(PayloadError, match="quantised uint8"):
        AttentionSet.from_json({**value, "maps": encode_array(codes)})
