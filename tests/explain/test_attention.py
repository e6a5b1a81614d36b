"""Attention aggregation checked against hand-computed answers."""

from __future__ import annotations

import numpy as np
import pytest

from diffwidget.explain.attention import AttentionMaps, upsample_maps
from diffwidget.tracing.trace import Trace


def _trace(attention: dict[str, np.ndarray], n_steps: int = 3, latent: tuple[int, int] = (4, 4)):
    n_tokens = next(iter(attention.values())).shape[-1]
    zeros = np.zeros((n_steps, 4, *latent), dtype=np.float32)
    return Trace(
        prompt="p",
        tokens=[f"t{i}" for i in range(n_tokens)],
        token_kinds=["word"] * n_tokens,
        timesteps=np.arange(n_steps, 0, -1, dtype=np.int64),
        latents=zeros,
        noise_pred=zeros,
        pred_x0=zeros,
        final_latent=zeros[0],
        prompt_embeds=np.zeros((2, n_tokens, 2), dtype=np.float32),
        attention=attention,
        guidance_scale=7.5,
    )


def test_same_grid_layer_is_returned_unchanged_with_tokens_first():
    rng = np.random.default_rng(0)
    probs = rng.random((3, 4, 4, 2)).astype(np.float16)
    result = AttentionMaps().attribute(_trace({"a.attn2": probs}))
    np.testing.assert_allclose(result.maps, np.moveaxis(probs.astype(np.float32), -1, 1))
    np.testing.assert_allclose(result.mass, probs.astype(np.float32).mean(axis=(1, 2)), rtol=1e-5)


def test_layers_are_upsampled_spatially_then_averaged():
    coarse = np.zeros((1, 2, 2, 1), dtype=np.float16)
    coarse[0, 0, 0, 0] = 1.0  # top-left cell only
    fine = np.full((1, 4, 4, 1), 0.5, dtype=np.float16)
    result = AttentionMaps().attribute(_trace({"c": coarse, "f": fine}, n_steps=1))
    up = upsample_maps(coarse[..., 0].astype(np.float32), (4, 4))[0]
    np.testing.assert_allclose(result.maps[0, 0], (up + 0.5) / 2, rtol=1e-6)
    # The top-left latent cell lies inside the hot coarse cell, the bottom-right far from it.
    assert result.maps[0, 0, 0, 0] == pytest.approx(0.75)
    assert result.maps[0, 0, 3, 3] == pytest.approx(0.25)


def test_non_square_grid_upsamples_each_axis_on_its_own():
    # 2 x 4 grid with a vertical stripe in column 0: must stay a vertical stripe.
    probs = np.zeros((1, 2, 4, 1), dtype=np.float16)
    probs[0, :, 0, 0] = 1.0
    maps = AttentionMaps().attribute(_trace({"r": probs}, n_steps=1, latent=(4, 8))).maps[0, 0]
    assert maps.shape == (4, 8)
    np.testing.assert_allclose(maps[:, 0], 1.0)  # every row identical: no flattening mix-up
    np.testing.assert_allclose(maps, maps[:1].repeat(4, axis=0))
    assert maps[0, 7] == 0.0


def test_upsampling_keeps_constants_and_matches_half_pixel_bilinear():
    np.testing.assert_allclose(upsample_maps(np.full((3, 5), 0.2), (7, 11)), 0.2, rtol=1e-6)
    # 1-D check against the align_corners=False formula: [0, 1] -> [0, .25, .75, 1]
    row = upsample_maps(np.array([[0.0, 1.0]]), (1, 4))[0]
    np.testing.assert_allclose(row, [0.0, 0.25, 0.75, 1.0], atol=1e-6)


def test_layer_step_and_resolution_selection():
    rng = np.random.default_rng(1)
    layers = {
        "big": rng.random((4, 4, 4, 2)).astype(np.float16),
        "small": rng.random((4, 2, 2, 2)).astype(np.float16),
    }
    trace = _trace(layers, n_steps=4)
    only_big = AttentionMaps(resolution=4).attribute(trace)
    assert only_big.layers == ["big"]
    np.testing.assert_allclose(only_big.maps, np.moveaxis(layers["big"].astype(np.float32), -1, 1))
    some = AttentionMaps(layers=["small"], steps=[1, 3]).attribute(trace)
    assert some.steps == [1, 3]
    assert some.maps.shape == (2, 2, 4, 4)
    assert "1 layer " in some.description
    assert "steps 1–3 (2)" in some.description
    assert "conditional" in some.description


def test_helpful_errors():
    trace = _trace({"a": np.zeros((3, 4, 4, 2), dtype=np.float16)})
    with pytest.raises(KeyError, match="recorded layers"):
        AttentionMaps(layers=["nope"]).attribute(trace)
    with pytest.raises(IndexError, match="loop indices"):
        AttentionMaps(steps=[999]).attribute(trace)
    with pytest.raises(ValueError, match="grids present"):
        AttentionMaps(resolution=16).attribute(trace)


def test_attention_module_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys; import diffwidget.explain.attention; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_native_grid_maps_upsampled_are_the_latent_maps():
    """Layers averaged on the finest layer's grid, then upsampled, equal the latent-grid
    aggregation: exactly when that grid is the latent's, closely when it is coarser."""
    from diffwidget.explain.attention import upsample_maps
    from diffwidget.testing.synthetic import shaped_trace, synthetic_trace

    same = synthetic_trace()  # 16x16 latent, layers on 16x16, 8x8 and 8x16
    for normalize in ("none", "words", "layer"):
        config = AttentionMaps(resolution=None, normalize=normalize)
        native = config.attribute(same, grid="native")
        assert native.maps.shape[-2:] == (16, 16)
        latent = config.attribute(same)
        np.testing.assert_allclose(native.maps, latent.maps, atol=1e-6)
        np.testing.assert_allclose(native.mass, latent.mass, atol=1e-7)
    sdxl = shaped_trace("sdxl", n_steps=2)  # 32x32 and 64x64 layers, 128x128 latent
    native = AttentionMaps().attribute(sdxl, grid="native")
    assert native.maps.shape[-2:] == (64, 64)
    assert "64×64 grid of the finest layer" in native.description
    latent = AttentionMaps().attribute(sdxl).maps
    # Two bilinear steps (32 -> 64 -> 128) instead of one (32 -> 128) for 60 of 70 layers:
    # on these maps (cell-to-cell noise on 32x32) within 6 % of the maximum at worst, 0.12 %
    # on average.
    difference = np.abs(upsample_maps(native.maps, (128, 128)) - latent)
    assert difference.max() <= 0.07 * latent.max()
    assert difference.mean() <= 0.002 * latent.max()


def test_native_grid_reuses_the_sums_it_is_given():
    from diffwidget.testing.synthetic import synthetic_trace

    trace = synthetic_trace()
    config = AttentionMaps(resolution=None)
    plain = config.attribute(trace, grid="native")
    sums: dict = {}
    first = config.attribute(trace, grid="native", sums=sums)
    np.testing.assert_array_equal(first.maps, plain.maps)
    assert {len(names) for names in sums} == {1}  # one layer per grid in this trace
    # A second call reads the stored sums instead of the trace: altering one shows it.
    key = next(k for k in sums if "mid_block" in k[0])
    sums[key] = sums[key] * 2
    second = config.attribute(trace, grid="native", sums=sums)
    assert not np.allclose(second.maps, plain.maps)
    # A subset of the steps never uses or fills them.
    partial = AttentionMaps(resolution=None, steps=[0, 3]).attribute(trace, grid="native", sums={})
    np.testing.assert_allclose(partial.maps, plain.maps[[0, 3]], atol=1e-6)
