"""Images per step: shrinking large previews and the torch-free noisy-latent decoder."""

from __future__ import annotations

import numpy as np

from diffwidget.testing.synthetic import synthetic_trace
from diffwidget.widget.previews import fit_linear_decoder, noisy_previews, shrink_images


def test_shrink_averages_blocks_only_when_too_large():
    images = np.zeros((1, 512, 256, 3), dtype=np.uint8)
    images[0, :4, :4] = 200  # one 4x4 block -> one output pixel at value 200
    small = shrink_images(images, max_size=128)
    assert small.shape == (1, 128, 64, 3)
    assert small[0, 0, 0, 0] == 200
    assert small[0, 1, 1, 0] == 0
    assert shrink_images(images[:, :64, :64], max_size=128).shape == (1, 64, 64, 3)


def test_linear_decoder_recovers_a_linear_colour_map():
    trace = synthetic_trace(n_steps=4, latent=8, image=8)
    true = np.array([[0.1, 0.0, 0.05], [0.0, 0.1, 0.0], [0.05, 0.05, 0.1], [0.0, 0.0, 0.05]])
    bias = np.array([0.5, 0.45, 0.55])
    rgb = np.einsum("nchw,ck->nhwk", trace.pred_x0, true) + bias
    # No clipping, so the map is exactly linear.
    assert rgb.min() > 0
    assert rgb.max() < 1
    trace.previews = np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)
    weights = fit_linear_decoder(trace)
    np.testing.assert_allclose(weights[:4], true, atol=0.01)
    np.testing.assert_allclose(weights[4], bias, atol=0.01)
    images, text = noisy_previews(trace)
    assert images.shape == (4, 8, 8, 3)
    assert "linear latent→RGB map" in text


def test_noisy_previews_without_decoded_previews_fall_back_to_channels():
    trace = synthetic_trace(n_steps=3)
    trace.previews = None
    images, text = noisy_previews(trace)
    assert images.shape == (3, 64, 64, 3)
    assert "first three channels" in text
