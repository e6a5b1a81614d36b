"""The linear latent→RGB previews: the fit, its accuracy against exact VAE decodes, per family."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from diffwidget.testing.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline
from diffwidget.tracing.decode import decode_latents
from diffwidget.tracing.generate import trace
from diffwidget.tracing.latent_rgb import (
    DecodeCapture,
    LatentRgbMap,
    cell_colours,
    fit_latent_rgb,
    psnr,
)
from diffwidget.tracing.preview_tap import image_colours

PROMPT = "a red circle on the left"
#: PSNR (dB) of the linear previews against exact decodes when the VAE's decoder is linear
#: per latent cell: only uint8 rounding separates them (a wrong latent scale or shift costs
#: tens of dB).
LINEAR_DECODER_PSNR = 40.0
#: The test VAEs' shift (SD3 and Flux VAEs have one; the real ones 0.0609 and 0.1159).
SHIFT = 40.0
#: The traced run of the per-family accuracy test.
RUN: dict[str, Any] = {"num_inference_steps": 4, "seed": 1}


def _block_means(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Mean colour of each latent cell's pixels, by an explicit loop (a reference)."""
    h, w = hw
    fy, fx = image.shape[0] // h, image.shape[1] // w
    out = np.zeros((h, w, 3))
    for i in range(h):
        for j in range(w):
            out[i, j] = image[i * fy : (i + 1) * fy, j * fx : (j + 1) * fx].reshape(-1, 3).mean(0)
    return out


# ============================================================ the fit
def test_the_fit_recovers_a_known_linear_map() -> None:
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(16, 12, 10)).astype(np.float32)
    weights = rng.normal(scale=0.01, size=(16, 3))
    bias = np.array([0.4, 0.5, 0.6])
    colours = np.moveaxis(latent, 0, -1) @ weights + bias
    assert colours.min() > 0
    assert colours.max() < 1
    fitted = fit_latent_rgb(latent, colours, source="exact decode")
    np.testing.assert_allclose(fitted.weights, weights, atol=1e-6)
    np.testing.assert_allclose(fitted.bias, bias, atol=1e-6)
    assert fitted.fit_psnr_db > 100
    assert fitted.channels == 16
    images = fitted.images(latent[None])
    np.testing.assert_array_equal(images[0], np.round(colours * 255))


def test_a_single_colour_decode_is_refused() -> None:
    latent = np.random.default_rng(1).normal(size=(4, 6, 6))
    with pytest.raises(ValueError, match="single colour"):
        fit_latent_rgb(latent, np.zeros((6, 6, 3)), source="pipeline decode")
    with pytest.raises(ValueError, match="colours of shape"):
        fit_latent_rgb(latent, np.zeros((3, 6, 3)), source="pipeline decode")
    fitted = fit_latent_rgb(
        latent, np.random.default_rng(2).random((6, 6, 3)), source="exact decode"
    )
    with pytest.raises(ValueError, match="this map takes latents"):
        fitted.images(np.zeros((1, 16, 6, 6), np.float32))


def test_psnr_agrees_with_scikit_image() -> None:
    from skimage.metrics import peak_signal_noise_ratio

    rng = np.random.default_rng(3)
    a, b = rng.random((8, 8, 3)), rng.random((8, 8, 3))
    assert psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0))


def test_cell_colours_are_the_clipped_block_means() -> None:
    decoded = torch.randn(1, 3, 24, 16) * 1.5  # some pixels beyond [-1, 1]
    expected = _block_means(np.clip(decoded[0].permute(1, 2, 0).numpy() / 2 + 0.5, 0, 1), (6, 4))
    np.testing.assert_allclose(cell_colours(decoded, (6, 4)), expected, atol=1e-6)
    pixels = np.random.default_rng(4).integers(0, 256, (24, 16, 3)).astype(np.uint8)
    np.testing.assert_allclose(image_colours(pixels, (6, 4)), _block_means(pixels, (6, 4)) / 255)
    with pytest.raises(ValueError, match="does not cover"):
        cell_colours(decoded, (5, 4))


def test_the_map_record_round_trips() -> None:
    record = LatentRgbMap([[0.1, 0.2, 0.3]] * 4, [0.5, 0.5, 0.5], "pipeline decode", 31.5)
    assert LatentRgbMap.from_json(record.to_json()) == record
    with pytest.raises(ValueError, match="3 bias values"):
        LatentRgbMap([[0.1, 0.2]] * 4, [0.5, 0.5, 0.5], "pipeline decode", 31.5)


def test_the_decode_capture_puts_the_vae_back() -> None:
    pipe = tiny_sd_pipeline()
    vae = pipe.vae
    capture = DecodeCapture(vae)
    capture.install()
    z = torch.randn(1, 4, 16, 16)
    decoded = vae.decode(z, return_dict=False)[0]
    capture.remove()
    capture.remove()
    assert "decode" not in vars(vae)
    scaling = vae.config.scaling_factor
    np.testing.assert_allclose(capture.latent, z[0].numpy() * scaling, rtol=1e-6)
    np.testing.assert_allclose(capture.colours, cell_colours(decoded, (16, 16)), atol=1e-6)

    def own(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("not called")

    vae.decode = own  # an instance attribute set before (another library's wrapper)
    capture.install()
    capture.remove()
    assert vars(vae)["decode"] is own


# ============================================================ accuracy, per family
class CellLinearDecoder(nn.Module):
    """A VAE decoder that is linear per latent cell: a 1x1 convolution, upsampled by copying."""

    def __init__(self, channels: int, factor: int, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.mix = nn.Conv2d(channels, 3, 1)
        with torch.no_grad():
            self.mix.weight.copy_(torch.randn(3, channels, 1, 1, generator=generator))
            self.mix.bias.zero_()
        self.factor = factor

    def forward(self, z: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return nn.functional.interpolate(self.mix(z), scale_factor=self.factor, mode="nearest")


def _linear_vae(pipe: Any, kwargs: dict[str, Any]) -> Any:
    """``pipe`` with a per-cell linear decoder whose outputs span [-0.8, 0.8] around 0 over the
    run's x̂0 latents (so no decode clips and the map's errors show over the whole range)."""
    vae = pipe.vae
    if vae.config.get("shift_factor"):
        # A shift far from 0, so a latent→RGB map that got it wrong would show.
        vae.register_to_config(shift_factor=SHIFT)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    decoder = CellLinearDecoder(vae.config.latent_channels, factor)
    vae.decoder = decoder
    x0 = trace(pipe, PROMPT, decode_previews=False, **kwargs).pred_x0
    z = torch.as_tensor(x0) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    with torch.no_grad():
        z = vae.post_quant_conv(z) if vae.post_quant_conv is not None else z
        colours = decoder.mix(z)
        centre = colours.mean(dim=(0, 2, 3))
        scale = 0.8 / float((colours - centre[:, None, None]).abs().max())
        decoder.mix.weight.mul_(scale)
        decoder.mix.bias.copy_(-centre * scale)
    return pipe


def _pipelines() -> dict[str, tuple[Any, dict[str, Any]]]:
    from tests.family_cases import build_family_case

    cases: dict[str, tuple[Any, dict[str, Any]]] = {
        "sd": (tiny_sd_pipeline(), {}),
        "sdxl": (tiny_sdxl_pipeline(), {}),
    }
    for name in ("sd3", "flux", "pixart"):
        cases[name] = build_family_case(name)
    return cases


@pytest.fixture(scope="module")
def linear_vae_pipelines() -> dict[str, tuple[Any, dict[str, Any]]]:
    return {
        name: (_linear_vae(pipe, {**kw, **RUN}), kw) for name, (pipe, kw) in _pipelines().items()
    }


@pytest.mark.parametrize("name", ["sd", "sdxl", "sd3", "flux", "pixart"])
def test_linear_previews_match_exact_decodes_per_family(
    name: str, linear_vae_pipelines: dict[str, tuple[Any, dict[str, Any]]]
) -> None:
    """With a decoder that is linear per cell, the map fitted on the pipeline's own decode
    reproduces the exact decode of every step's x̂0 — through each family's latent scale,
    shift and packing, and the exact path's own (independent) handling of them."""
    pipe, kwargs = linear_vae_pipelines[name]
    traced = trace(pipe, PROMPT, **RUN, **kwargs)
    n, channels, h, w = traced.pred_x0.shape
    assert traced.facts.preview_decoder == "linear"
    assert traced.facts.preview_map is not None
    assert traced.facts.preview_map.source == "pipeline decode"
    assert traced.facts.preview_map.channels == channels
    assert traced.previews is not None
    assert traced.previews.shape == (n, h, w, 3)
    exact = decode_latents(pipe, traced.pred_x0)
    for step in range(n):
        reference = image_colours(exact[step], (h, w))
        value = psnr(traced.previews[step] / 255.0, reference)
        assert value >= LINEAR_DECODER_PSNR, (name, step, value)
    # The final image is what the map was fitted on.
    assert traced.facts.preview_map.fit_psnr_db >= LINEAR_DECODER_PSNR


# ============================================================ accuracy on a trained VAE
@pytest.fixture(scope="module")
def demo_pipe() -> Any:
    from diffwidget.models.loader import load_demo_pipeline

    torch.set_num_threads(1)
    return load_demo_pipeline()


def test_on_a_trained_vae_linear_previews_are_close_and_the_tiny_decoder_closer(
    demo_pipe: Any,
) -> None:
    """The embedded model's trained VAE: the linear map against the exact decode of every
    step (on the latent grid), beside a flat colour (what an uninformative map would give)
    and the shipped tiny decoder (which therefore stays the embedded model's default)."""
    common = {"num_inference_steps": 20, "seed": 11}
    exact = trace(demo_pipe, PROMPT, preview_decoder="vae", **common)
    linear = trace(demo_pipe, PROMPT, preview_decoder="linear", **common)
    tiny = trace(demo_pipe, PROMPT, **common)  # "auto": the shipped decoder
    assert tiny.facts.preview_decoder == "shipped demo decoder"
    assert exact.previews is not None
    assert linear.previews is not None
    assert tiny.previews is not None
    hw = linear.latent_shape
    scores: dict[str, list[float]] = {"linear": [], "flat": [], "tiny": []}
    for step in range(exact.n_steps):
        reference = image_colours(exact.previews[step], hw)
        flat = np.broadcast_to(reference.mean(axis=(0, 1)), reference.shape)
        scores["linear"].append(psnr(linear.previews[step] / 255.0, reference))
        scores["flat"].append(psnr(flat, reference))
        scores["tiny"].append(psnr(image_colours(tiny.previews[step], hw), reference))
    median = {k: float(np.median(v)) for k, v in scores.items()}
    assert median["linear"] >= 20.0, median
    assert median["linear"] >= median["flat"] + 3.0, median
    assert median["tiny"] > median["linear"], median
