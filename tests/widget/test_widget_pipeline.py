"""The explorer on a traced run of the tiny pipeline, with the registry's real methods."""

from __future__ import annotations

import numpy as np
import pytest

from diffwidget.widget.codecs import decode_array
from diffwidget.widget.explorer import Explorer

pytestmark = pytest.mark.slow
#: Masks for DF-RISE in tests: enough to exercise batching and progress, fast on CPU.
TEST_MASKS = 8
WAIT_S = 300


def test_real_trace_and_methods(tiny_sd_pipe, tiny_trace):
    explorer = Explorer(
        tiny_trace,
        pipe=tiny_sd_pipe,
        method_options={"df_rise": {"n_masks": TEST_MASKS}},
        noisy_decoder="vae",
    )
    try:
        widget = explorer.widget
        assert widget.available == ["none", "attention", "df_rise", "df_cam"]
        h, w = tiny_trace.latent_shape
        n, t = tiny_trace.n_steps, len(tiny_trace.tokens)
        assert decode_array(widget.attention).shape == (n, t, h, w)
        assert widget.descriptions["noisy"].endswith("decoded by the VAE")
        progress = []
        widget.observe(lambda c: progress.append(c["new"]), names=["progress"])
        rise = explorer.compute("df_rise", step=2).result(WAIT_S)
        cam = explorer.compute("df_cam", step=2).result(WAIT_S)
        assert rise.meta["n_masks"] == TEST_MASKS
        assert progress[-1] == 1.0
        for kind, result in (("df_rise", rise), ("df_cam", cam)):
            stored = decode_array(widget.overlays[kind]["maps"])
            assert stored.shape == (1, h, w)
            np.testing.assert_allclose(stored[0], result.map, atol=1 / 255 + 1e-6)
        assert f"n_masks {TEST_MASKS}" in widget.overlays["df_rise"]["descriptions"][0]
        assert "layers" in widget.overlays["df_cam"]["descriptions"][0]
    finally:
        explorer.close()
