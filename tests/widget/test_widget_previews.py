"""Images per step at display size: area resizing and the torch-free noisy-latent decoder."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffwidget.testing.synthetic import shaped_trace, synthetic_trace
from diffwidget.widget.previews import (
    display_size,
    fit_linear_decoder,
    noisy_previews,
    resize_images,
    shrink_images,
    x0_previews,
)


def area_reference(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Box-filter resize from the definition: each output pixel is the mean of the source
    area it covers, fractional pixels weighted by their overlap (float64, then rounded)."""

    def weights(n_in: int, n_out: int) -> np.ndarray:
        matrix = np.zeros((n_out, n_in))
        step = n_in / n_out
        for i in range(n_out):
            lo, hi = i * step, (i + 1) * step
            for j in range(int(np.floor(lo)), int(np.ceil(hi))):
                matrix[i, j] = min(hi, j + 1) - max(lo, j)
        return matrix / step

    rows, cols = weights(image.shape[0], size[0]), weights(image.shape[1], size[1])
    tall = np.tensordot(rows, image.astype(np.float64), axes=(1, 0))  # [h, W, 3]
    return np.moveaxis(np.tensordot(cols, tall, axes=(1, 1)), 0, 1)  # [h, w, 3]


def test_shrink_averages_blocks_only_when_too_large():
    images = np.zeros((1, 512, 256, 3), dtype=np.uint8)
    images[0, :4, :4] = 200  # one 4x4 block -> one output pixel at value 200
    small = shrink_images(images, max_size=128)
    assert small.shape == (1, 128, 64, 3)
    assert small[0, 0, 0, 0] == 200
    assert small[0, 1, 1, 0] == 0
    assert shrink_images(images[:, :64, :64], max_size=128).shape == (1, 64, 64, 3)


def smooth_image(shape: tuple[int, int]) -> np.ndarray:
    """A picture-like uint8 image: colour ramps and a disc with a sharp edge."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]] / max(shape)
    disc = ((yy - 0.4) ** 2 + (xx - 0.5) ** 2 < 0.05).astype(float)
    rgb = np.stack([200 * xx + 40, 150 * yy + 50, 100 + 100 * disc], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    ("source", "target"), [((1024, 1024), (128, 128)), ((512, 1024), (64, 128))]
)
def test_integer_factor_previews_are_exact_block_means(source, target):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (2, *source, 3), dtype=np.uint8)
    assert display_size(source) == target
    out = resize_images(images, target)
    assert (out.dtype, out.shape) == (np.uint8, (2, *target, 3))
    for k in range(2):
        reference = area_reference(images[k], target)
        assert np.abs(out[k].astype(np.float64) - reference).max() <= 0.5 + 1e-9


@pytest.mark.parametrize(("source", "target"), [((512, 768), (85, 128)), ((300, 180), (128, 77))])
def test_other_ratios_match_the_area_reference_on_pictures(source, target):
    # A box filter whose support is whole source pixels: on picture-like content it stays
    # within a code or two of the exact area means (on pixel noise it would not).
    assert display_size(source) == target
    image = smooth_image(source)
    out = resize_images(image[None], target)[0]
    difference = np.abs(out.astype(np.float64) - area_reference(image, target))
    assert difference.mean() < 0.5
    assert np.percentile(difference, 99) <= 2.0


def test_resize_agrees_with_pil_box_filter():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (1, 300, 200, 3), dtype=np.uint8)
    ours = resize_images(image, (128, 85))[0]
    pil = np.asarray(Image.fromarray(image[0]).resize((85, 128), Image.Resampling.BOX))
    assert np.abs(ours.astype(int) - pil.astype(int)).max() <= 1


def test_sdxl_previews_are_built_at_display_size():
    trace = shaped_trace("sdxl", n_steps=3)
    images = x0_previews(trace)
    assert images.shape == (3, 128, 128, 3)
    reference = area_reference(trace.previews[2], (128, 128))
    assert np.abs(images[2] - reference).max() <= 0.5 + 1e-9
    noisy, _ = noisy_previews(trace)
    assert noisy.shape == images.shape


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


def test_linear_decoder_equals_least_squares_on_the_whole_run():
    # Normal equations accumulated a few steps at a time = one lstsq over every cell.
    trace = synthetic_trace(n_steps=7, latent=8, image=32)
    n, c, h, w = trace.pred_x0.shape
    design = np.concatenate(
        [np.moveaxis(trace.pred_x0, 1, -1).reshape(-1, c), np.ones((n * h * w, 1))], axis=1
    )
    # Each cell's colour: the mean of the 4x4 preview pixels it covers (kept as uint8, so
    # within half a code of the exact mean: the fitted weights move by far less than 1e-3).
    blocks = trace.previews.reshape(n, h, 4, w, 4, 3).astype(np.float64).mean(axis=(2, 4))
    expected, *_ = np.linalg.lstsq(design, blocks.reshape(-1, 3) / 255, rcond=None)
    np.testing.assert_allclose(fit_linear_decoder(trace), expected, atol=1e-3)


def test_noisy_view_is_upsampled_from_the_latent_when_smaller():
    trace = synthetic_trace(n_steps=3, latent=8, image=32)
    images, _ = noisy_previews(trace)
    assert images.shape == (3, 32, 32, 3)  # the size of the x0 previews


def test_noisy_previews_without_decoded_previews_fall_back_to_channels():
    trace = synthetic_trace(n_steps=3)
    trace.previews = None
    images, text = noisy_previews(trace)
    assert images.shape == (3, 64, 64, 3)
    assert "first three channels" in text
