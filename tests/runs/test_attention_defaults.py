"""AttentionMaps' step window, normalisations and the 16×16 default, by hand."""

from __future__ import annotations

import numpy as np
import pytest

from diffwidget.explain.attention import (
    DEFAULT_WINDOW,
    PREFERRED_RESOLUTION,
    AttentionMaps,
    window_steps,
)
from diffwidget.tracing.trace import Trace


def _trace(attention: dict[str, np.ndarray], kinds: list[str], n_steps: int = 4) -> Trace:
    zeros = np.zeros((n_steps, 4, 16, 16), dtype=np.float32)
    return Trace(
        prompt="p",
        tokens=[f"t{i}" for i in range(len(kinds))],
        token_kinds=kinds,  # type: ignore[arg-type]
        timesteps=np.arange(n_steps, 0, -1, dtype=np.int64),
        latents=zeros,
        noise_pred=zeros,
        pred_x0=zeros,
        final_latent=zeros[0],
        prompt_embeds=np.zeros((2, len(kinds), 2), dtype=np.float32),
        attention=attention,
        guidance_scale=3.0,
    )


def test_window_steps_by_hand():
    assert window_steps(20, (0.0, 1.0)) == list(range(20))
    assert window_steps(20, (0.75, 1.0)) == [15, 16, 17, 18, 19]
    assert window_steps(20, (0.95, 1.0)) == [19]
    assert window_steps(4, (0.0, 0.1)) == [0]  # never empty
    with pytest.raises(ValueError, match="0 <= start < end <= 1"):
        window_steps(20, (0.5, 0.5))


def test_heat_map_is_the_mean_over_the_window():
    rng = np.random.default_rng(0)
    probs = rng.random((4, 16, 16, 3)).astype(np.float16)
    trace = _trace({"a": probs}, ["start", "word", "word"])
    heat = AttentionMaps(resolution=None, window=(0.5, 1.0)).attribute(trace).heat_map()
    expected = np.moveaxis(probs.astype(np.float32)[2:].mean(axis=0), -1, 0)
    np.testing.assert_allclose(heat, expected, rtol=1e-6)


def test_words_normalisation_gives_each_words_share():
    probs = np.zeros((1, 16, 16, 3), dtype=np.float16)
    probs[..., 0], probs[..., 1], probs[..., 2] = 0.5, 0.3, 0.1  # start, word, word
    maps = (
        AttentionMaps(resolution=None, normalize="words")
        .attribute(_trace({"a": probs}, ["start", "word", "word"], n_steps=1))
        .maps[0]
    )
    np.testing.assert_allclose(maps[:, 0, 0], [0.0, 0.75, 0.25], rtol=1e-3)


def test_layer_normalisation_weighs_layers_equally():
    weak = np.zeros((1, 16, 16, 1), dtype=np.float16)
    weak[0, :8, :, 0] = 0.01  # top half, faint
    strong = np.zeros((1, 16, 16, 1), dtype=np.float16)
    strong[0, :, :8, 0] = 0.9  # left half, strong
    trace = _trace({"weak": weak, "strong": strong}, ["word"], n_steps=1)
    plain = AttentionMaps(resolution=None).attribute(trace).maps[0, 0]
    equal = AttentionMaps(resolution=None, normalize="layer").attribute(trace).maps[0, 0]
    # Min-max per layer: each layer is 0/1, so the top-left cell is 1, bottom-right 0,
    # top-right and bottom-left 0.5 (away from the half-pixel blend at the borders).
    assert equal[2, 12] == pytest.approx(0.5)
    assert equal[12, 2] == pytest.approx(0.5)
    assert equal[2, 2] == pytest.approx(1.0)
    assert equal[12, 12] == pytest.approx(0.0)
    assert plain[2, 12] == pytest.approx(0.005, abs=1e-4)  # the faint layer barely counts


def test_default_keeps_the_preferred_grid_and_falls_back_to_every_layer():
    fine = np.full((4, PREFERRED_RESOLUTION, PREFERRED_RESOLUTION, 1), 0.2, dtype=np.float16)
    coarse = np.full((4, 8, 8, 1), 0.6, dtype=np.float16)
    both = AttentionMaps().attribute(_trace({"fine": fine, "coarse": coarse}, ["word"]))
    assert both.layers == ["fine"]
    assert both.window_steps == window_steps(4, DEFAULT_WINDOW)
    only_coarse = AttentionMaps().attribute(_trace({"coarse": coarse}, ["word"]))
    assert only_coarse.layers == ["coarse"]
    with pytest.raises(ValueError, match="grids present"):
        AttentionMaps(resolution=PREFERRED_RESOLUTION).attribute(
            _trace({"coarse": coarse}, ["word"])
        )
