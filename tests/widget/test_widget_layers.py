"""Layer, resolution and head filters on their own grid, sent once; the layer x step grid."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from diffwidget.explain.attention import AttentionMaps, upsample_maps
from diffwidget.explain.results import SaliencyMap
from diffwidget.testing.synthetic import LAYER_GRIDS, shaped_trace, synthetic_trace
from diffwidget.widget import layers, schema
from diffwidget.widget.codecs import payload_nbytes
from diffwidget.widget.explorer import Explorer
from diffwidget.widget.grid import attention_grid, block_of, row_label
from diffwidget.widget.payloads import AttentionSet, GridData

FULL = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"  # 16x16: same as the latent
MID = "mid_block.attentions.0.transformer_blocks.0.attn2"  # 8x8
WIDE = "up_blocks.1.attentions.0.transformer_blocks.0.attn2"  # 8x16
N_HEADS = 3


def with_heads(trace):
    """The trace plus per-head maps: head k = the recorded mean map scaled by (k + 1)."""
    heads = {
        name: np.stack([v.astype(np.float32) * (k + 1) for k in range(N_HEADS)], axis=1)
        for name, v in trace.attention.items()
    }
    trace.attention_heads = heads
    return trace


def shown_set(explorer) -> AttentionSet:
    """The attention set the view draws for the explorer's current filter."""
    widget = explorer.widget
    if (widget.attention_layer, widget.attention_head) == ("", -1):
        return AttentionSet.from_json(widget.attention)
    return AttentionSet.from_json(widget.attention_filtered)


def sent_during(explorer, action) -> dict[str, int]:
    """Binary bytes of each payload trait that changed while ``action()`` ran."""
    sent: dict[str, int] = {}

    def record(change):
        sent[change.name] = sent.get(change.name, 0) + payload_nbytes(change.new)

    explorer.widget.observe(record, names=list(schema.PAYLOAD_TRAITS))
    try:
        action()
    finally:
        explorer.widget.unobserve(record, names=list(schema.PAYLOAD_TRAITS))
    return sent


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
    # Labels are the diffusers module paths, whatever the transformer block index.
    assert f"{MID} (8×8)" in [o["label"] for o in options["attention"]]
    assert options["heads"] == N_HEADS
    with pytest.raises(ValueError, match="unknown attention_layer"):
        explorer.attention_layer = "up_blocks.9"


def test_layer_filter_shows_that_layer_alone_on_its_grid(explorer):
    trace = explorer.trace
    explorer.attention_layer = MID
    shown = shown_set(explorer)
    assert (shown.layer, shown.head, shown.grid) == (MID, -1, (8, 8))
    # The 8x8 layer stays 8x8: the recorded probability itself, never upsampled.
    expected = np.moveaxis(trace.attention[MID].astype(np.float32), -1, 1)
    np.testing.assert_allclose(shown.maps, expected, atol=expected.max() / 255)
    assert re.search(r"mean of 1 (attn2 )?layer \(grids 8×8\)", shown.description)
    # The attention-mass curves follow the filter too.
    from diffwidget.widget.codecs import decode_array

    curves = decode_array(explorer.widget.curves["values"])
    np.testing.assert_allclose(curves[2], expected[:, 2].mean(axis=(1, 2)), rtol=1e-4)


def test_non_square_layer_is_sent_on_its_own_grid(explorer):
    explorer.attention_layer = WIDE
    assert shown_set(explorer).codes.shape[-2:] == (8, 16)


@pytest.mark.parametrize("layer", ["8x8", "8x16", layers.ALL_LAYERS, FULL, MID])
def test_filtered_maps_upsampled_equal_the_latent_reference(explorer, layer):
    """The native-grid maps, upsampled as the view does, are the latent-grid aggregation."""
    explorer.attention_layer = layer
    shown = shown_set(explorer)
    config = layers.filter_config(explorer.trace, None, layer)
    reference = config.attribute(explorer.trace).maps  # every layer upsampled to the latent
    up = upsample_maps(shown.maps, explorer.trace.latent_shape)
    np.testing.assert_allclose(up, reference, atol=reference.max() / 255 + 1e-6)


def test_attention_is_never_sent_above_its_native_grid():
    # Flux: a 128x128 latent (16 channels) whose attention lives on the 64x64 patch grid.
    trace = shaped_trace("flux", n_steps=2)
    explorer = Explorer(trace)
    try:
        native = {tuple(v.shape[1:3]) for v in trace.attention.values()}
        assert native == {(64, 64)}
        assert trace.latent_shape == (128, 128)
        assert shown_set(explorer).codes.shape[-2:] == (64, 64)
        for layer in (layers.ALL_LAYERS, "64x64", "transformer_blocks.3.attn"):
            explorer.attention_layer = layer
            assert shown_set(explorer).codes.shape[-2:] == (64, 64)
        explorer.grid = "attention"
        grid = GridData.from_json(explorer.widget.grid_data)
        for group in grid.groups:
            assert group.codes.shape[-2] <= group.grid[0]
            assert group.codes.shape[-1] <= group.grid[1]
    finally:
        explorer.close()


def test_sd15_grid_cells_never_exceed_a_layers_grid():
    trace = shaped_trace("sd15", n_steps=2)
    grid = attention_grid(trace)
    for group in grid.groups:
        h, w = group.codes.shape[-2:]
        assert h <= group.grid[0]
        assert w <= group.grid[1]
        assert max(h, w) <= 16
    mid = next(g for g in grid.groups if g.name == "mid_block")
    assert mid.codes.shape[-2:] == (8, 8)  # the 8x8 mid block is not blown up to 16x16


def test_filter_change_sends_only_the_new_filters_maps(explorer):
    default = explorer.widget.attention
    sent = sent_during(explorer, lambda: setattr(explorer, "attention_layer", MID))
    # Only the new filter's maps (8x8: a quarter of the default's 16x16) and the curves.
    assert set(sent) == {"attention_filtered", "curves"}
    assert sent["attention_filtered"] < payload_nbytes(default) / 2
    assert explorer.widget.attention is default  # the default is never sent again
    # Back to the default: nothing but the curves and a null delta.
    sent = sent_during(explorer, lambda: setattr(explorer, "attention_layer", ""))
    assert sent == {"attention_filtered": 0, "curves": sent["curves"]}
    assert explorer.widget.attention is default


def test_filter_change_recomputes_nothing_already_computed(explorer, monkeypatch):
    calls = []
    real = layers.filtered_attention

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(layers, "filtered_attention", counting)
    explorer.attention_layer = "8x8"
    explorer.attention_layer = MID  # the only 8x8 layer: the same selection
    explorer.attention_layer = "8x8"
    assert calls == ["8x8"]
    # "all" selects what the default already averages on this trace? Not here (the default
    # keeps the 16x16 layer only), so it is computed once, then reused.
    explorer.attention_layer = layers.ALL_LAYERS
    explorer.attention_layer = ""
    explorer.attention_layer = layers.ALL_LAYERS
    assert calls == ["8x8", layers.ALL_LAYERS]


def test_resolution_filter_averages_layers_of_that_grid(explorer):
    explorer.attention_layer = "8x8"
    reference = AttentionMaps(resolution=(8, 8)).attribute(explorer.trace, grid="native")
    shown = shown_set(explorer)
    np.testing.assert_allclose(shown.maps, reference.maps, atol=reference.maps.max() / 255)
    assert "8×8" in shown.description


def test_head_filter_uses_that_heads_probabilities(explorer):
    explorer.attention_layer = FULL
    explorer.widget.set_state({"attention_head": 2})
    assert explorer.error == ""
    head = shown_set(explorer)
    assert head.head == 2
    mean = np.moveaxis(explorer.trace.attention[FULL].astype(np.float32), -1, 1)
    np.testing.assert_allclose(head.maps, 3 * mean, atol=3 * mean.max() / 255)
    assert "head 2" in head.description
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


def test_rows_are_grouped_by_block_and_labelled_by_module_path():
    assert block_of("down_blocks.2.attentions.1.transformer_blocks.9.attn2") == "down_blocks.2"
    assert block_of("single_transformer_blocks.12.attn") == "single_transformer_blocks"
    assert row_label(MID, "mid_block") == "attentions.0.transformer_blocks.0.attn2"
    grid = attention_grid(shaped_trace("sdxl", n_steps=1))
    names = [g.name for g in grid.groups]
    assert names == ["down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.0", "up_blocks.1"]
    assert sum(len(g.layers) for g in grid.groups) == 70
    for group in grid.groups:
        # Every label is the path after the block: the same rule for block 0 and block 9.
        assert [f"{group.name}.{label}" for label in group.labels] == group.layers


def test_attention_grid_cells_are_each_layers_maps_one_token_at_a_time(explorer):
    explorer.token = 3
    explorer.grid = "attention"
    grid = GridData.from_json(explorer.widget.grid_data)
    assert grid.source == "attention"
    assert grid.layers == list(LAYER_GRIDS)
    assert grid.tokens == [3]  # the live view gets the selected token's cells only
    trace = explorer.trace
    group = next(g for g in grid.groups if FULL in g.layers)
    assert group.codes.shape == (1, trace.n_steps, 1, 16, 16)
    step = 7
    expected = trace.attention[FULL][step, :, :, 3].astype(np.float32)
    got = group.codes[0, step, 0] / 255 * group.scale[0, step, 0]
    np.testing.assert_allclose(got, expected, atol=expected.max() / 255)
    # A token click sends that token's cells, nothing else.
    sent = sent_during(explorer, lambda: setattr(explorer, "token", 2))
    assert set(sent) == {"grid_data"}
    assert GridData.from_json(explorer.widget.grid_data).tokens == [2]
    # A layer filter does not touch the grid (it shows every layer already).
    sent = sent_during(explorer, lambda: setattr(explorer, "attention_layer", MID))
    assert "grid_data" not in sent
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
    grid = GridData.from_json(explorer.widget.grid_data)
    assert grid.steps == [3, 9]
    assert grid.layers == ["up_blocks.0", "up_blocks.1", "up_blocks.2"]
    assert not grid.per_token
    codes = grid.groups[0].codes
    assert codes.shape == (3, 2, 1, 16, 16)
    np.testing.assert_allclose(
        codes[1, 0, 0] / 255, _cam(3, latent).layers["up_blocks.1"], atol=1 / 255
    )
    # The layer filter shows one layer's own map in the main view.
    explorer.widget.set_state({"saliency_layer": "up_blocks.2"})
    from diffwidget.widget.codecs import decode_array

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


def test_grid_payload_of_an_sdxl_sized_trace_stays_small():
    # 70 layers x 15 tokens: one token's cells (area-averaged to 16x16) are sent, so 10
    # steps take under 200 kB and 50 steps under 1 MB (13 MB with every token at once).
    trace = shaped_trace("sdxl", n_steps=10)
    explorer = Explorer(trace)
    try:
        explorer.grid = "attention"
        assert payload_nbytes(explorer.widget.grid_data) < 200_000
        assert len(GridData.from_json(explorer.widget.grid_data).layers) == 70
    finally:
        explorer.close()


def test_grid_is_a_writable_enumeration():
    assert schema.TRAITS_BY_NAME["grid"].enum == "GridSource"
    assert schema.TRAITS_BY_NAME["grid"].writable
    # Every overlay with per-layer maps, the concept grid and the causal grid.
    assert set(schema.GRID_SOURCES) == {*schema.OVERLAY_KINDS, "patching"}
