"""Layer, resolution and head filters, and the layer x step grid payload."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from diffwidget.explain.attention import AttentionMaps
from diffwidget.explain.results import SaliencyMap
from diffwidget.testing.synthetic import LAYER_GRIDS, synthetic_trace
from diffwidget.widget import layers, schema
from diffwidget.widget.codecs import decode_array, payload_nbytes
from diffwidget.widget.explorer import Explorer

FULL = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"  # 16x16: same as the latent
N_HEADS = 3


def with_heads(trace):
    """The trace plus per-head maps: head k = the recorded mean map scaled by (k + 1)."""
    heads = {
        name: np.stack([v.astype(np.float32) * (k + 1) for k in range(N_HEADS)], axis=1)
        for name, v in trace.attention.items()
    }
    trace.attention_heads = heads
    return trace


@pytest.fixture
def explorer():
    made = Explorer(with_heads(synthetic_trace()))
    yield made
    made.close()


def test_filter_options_list_every_layer_and_grid(explorer):
    options = explorer.widget.layer_options
    values = [o["value"] for o in options["attention"]]
    assert values[:2] == ["", layers.ALL_LAYERS]
    # The default's label names what the explorer's aggregation chose.
    chosen = explorer.attention_result.layers
    assert options["attention"][0]["label"].startswith(f"default: {len(chosen)} layer")
    assert {"16x16", "8x8", "8x16"} <= set(values)
    assert set(LAYER_GRIDS) <= set(values)
    assert options["heads"] == N_HEADS
    with pytest.raises(ValueError, match="unknown attention_layer"):
        explorer.attention_layer = "up_blocks.9"


def test_layer_filter_shows_that_layer_alone(explorer):
    trace = explorer.trace
    explorer.attention_layer = FULL
    shown = decode_array(explorer.widget.attention)
    # The layer's grid is the latent grid: the shown map is the recorded probability itself.
    expected = np.moveaxis(trace.attention[FULL].astype(np.float32), -1, 1)
    np.testing.assert_allclose(shown, expected, atol=expected.max() / 255)
    assert re.search(
        r"mean of 1 (attn2 )?layer \(grids 16×16\)", explorer.widget.descriptions["attention"]
    )
    # The attention-mass curves follow the filter too.
    curves = decode_array(explorer.widget.curves["values"])
    np.testing.assert_allclose(curves[2], expected[:, 2].mean(axis=(1, 2)), rtol=1e-4)


def test_resolution_filter_averages_layers_of_that_grid(explorer):
    explorer.attention_layer = "8x8"
    reference = AttentionMaps(resolution=(8, 8)).attribute(explorer.trace)
    np.testing.assert_allclose(
        decode_array(explorer.widget.attention), reference.maps, atol=reference.maps.max() / 255
    )
    assert "8×8" in explorer.widget.descriptions["attention"]


def test_all_layers_filter_averages_every_recorded_layer(explorer):
    explorer.attention_layer = layers.ALL_LAYERS
    reference = AttentionMaps(layers=list(explorer.trace.attention), resolution=None)
    expected = reference.attribute(explorer.trace).maps
    np.testing.assert_allclose(
        decode_array(explorer.widget.attention), expected, atol=expected.max() / 255
    )


def test_head_filter_uses_that_heads_probabilities(explorer):
    explorer.attention_layer = FULL
    explorer.widget.set_state({"attention_head": 2})
    assert explorer.error == ""
    head = decode_array(explorer.widget.attention)
    mean = np.moveaxis(explorer.trace.attention[FULL].astype(np.float32), -1, 1)
    np.testing.assert_allclose(head, 3 * mean, atol=3 * mean.max() / 255)
    assert "head 2" in explorer.widget.descriptions["attention"]
    explorer.widget.set_state({"attention_head": N_HEADS})
    assert "out of range" in explorer.error


def test_head_filter_needs_per_head_maps():
    plain = Explorer(synthetic_trace())
    try:
        assert plain.widget.layer_options["heads"] == 0
        plain.widget.set_state({"attention_head": 0})
        assert "not available" in plain.error
    finally:
        plain.close()


def test_attention_grid_cells_are_each_layers_maps(explorer):
    explorer.grid = "attention"
    grid = explorer.widget.grid_data
    assert grid["source"] == "attention"
    assert grid["layers"] == list(LAYER_GRIDS)
    assert grid["grids"] == [list(g) for g in LAYER_GRIDS.values()]
    maps = decode_array(grid["maps"])
    trace = explorer.trace
    assert maps.shape == (3, trace.n_steps, len(trace.tokens), 16, 16)
    row = grid["layers"].index(FULL)
    step, token = 7, 3
    expected = trace.attention[FULL][step, :, :, token].astype(np.float32)
    np.testing.assert_allclose(maps[row, step, token], expected, atol=expected.max() / 255)
    explorer.grid = "none"
    assert explorer.widget.grid_data is None


def _cam(step, latent):
    h, w = latent
    per_layer = {f"up_blocks.{k}": np.full((h, w), (k + 1) / 4, np.float32) for k in range(3)}
    for k, value in enumerate(per_layer.values()):
        value[k, k] = 1.0
    raw = sum(per_layer.values())
    return SaliencyMap(
        "df_cam", step, 0, raw / raw.max(), raw, per_layer, {"layers": list(per_layer)}
    )


def test_saliency_grid_and_layer_filter_from_computed_maps(explorer):
    latent = explorer.trace.latent_shape
    for step in (3, 9):
        explorer.add_overlay("df_cam", step, _cam(step, latent))
    explorer.overlay = "df_cam"
    explorer.grid = "df_cam"
    grid = explorer.widget.grid_data
    assert grid["steps"] == [3, 9]
    assert grid["layers"] == ["up_blocks.0", "up_blocks.1", "up_blocks.2"]
    maps = decode_array(grid["maps"])
    assert maps.shape == (3, 2, 1, 16, 16)
    np.testing.assert_allclose(maps[1, 0, 0], _cam(3, latent).layers["up_blocks.1"], atol=1 / 255)
    # The layer filter shows one layer's own map in the main view.
    explorer.widget.set_state({"saliency_layer": "up_blocks.2"})
    shown = decode_array(explorer.widget.overlays["df_cam"]["maps"])
    np.testing.assert_allclose(shown[0], _cam(3, latent).layers["up_blocks.2"], atol=1 / 255)
    assert "showing layer up_blocks.2 only" in explorer.widget.overlays["df_cam"]["descriptions"][0]
    # DF-RISE maps have no per-layer maps: asking for their grid says so.
    rise = _cam(3, latent)
    explorer.add_overlay("df_rise", 3, dataclasses.replace(rise, method="df_rise", layers={}))
    explorer.grid = "df_rise"
    assert "no per-layer maps" in explorer.error


def test_grid_of_a_method_not_computed_yet_says_how_to_compute_it(explorer):
    explorer.grid = "df_cam"
    error = explorer.error
    assert error.startswith("DF-CAM is not computed yet")
    assert "explorer.compute('df_cam', step)" in error
    assert "per-layer" not in error  # the maps exist once computed; nothing is missing
    assert explorer.widget.grid_data is None


def test_grid_payload_of_a_sd_sized_trace_stays_small():
    # 16 attn2 layers, 64x64 latent, 9 tokens, 20 steps: cells are shrunk to 16x16.
    trace = synthetic_trace(latent=64, image=64)
    grids = {f"l{k}.attn2": (64, 64) if k < 6 else (32, 32) for k in range(16)}
    rng = np.random.default_rng(0)
    trace = dataclasses.replace(
        trace,
        attention={
            k: rng.random((20, *g, len(trace.tokens))).astype(np.float16) for k, g in grids.items()
        },
    )
    data = layers.attention_grid(trace)
    assert decode_array(data["maps"]).shape[-2:] == (16, 16)
    assert payload_nbytes(data) < 1_000_000


def test_grid_is_a_writable_enumeration():
    assert schema.TRAITS_BY_NAME["grid"].enum == "OverlayKind"
