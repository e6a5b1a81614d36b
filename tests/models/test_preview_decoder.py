"""The tiny preview decoder: used for its own VAE only, close to that VAE, loadable from folders."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffwidget.models.preview_decoder import (
    PROVENANCE_FILE,
    SHIPPED,
    WEIGHTS_FILE,
    provenance,
    shipped_preview_decoder,
    vae_fingerprint,
)
from diffwidget.tracing.decode import decode_latents, decode_previews, resolve_preview_decoder
from diffwidget.tracing.generate import trace

#: Mean PSNR (dB) of the shipped decoder against the full VAE on a held-out trace's x̂0
#: (measured 32-34 dB from step 2 on, 23 dB on the two noisiest steps).
MIN_MEAN_PSNR_DB = 28.0
MIN_STEP_PSNR_DB = 20.0
PROMPT = "a blue square above a yellow triangle"


@pytest.fixture(scope="module")
def demo_pipe() -> Any:
    from diffwidget.models.loader import load_demo_pipeline

    return load_demo_pipeline()


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR per image of two uint8 batches [N, H, W, 3]."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12))


def test_shipped_folder_is_complete_and_records_its_vae(demo_pipe: Any) -> None:
    folder = SHIPPED["demo"]
    assert (folder / "config.json").is_file()
    assert (folder / WEIGHTS_FILE).is_file()
    record = provenance("demo")
    assert record["vae_fingerprint"] == vae_fingerprint(demo_pipe.vae)
    assert record["held_out_psnr_db"] > MIN_MEAN_PSNR_DB
    assert (folder / PROVENANCE_FILE).is_file()


def test_default_trace_of_the_demo_model_uses_it_and_stays_close_to_the_vae(
    demo_pipe: Any,
) -> None:
    traced = trace(demo_pipe, PROMPT, num_inference_steps=20, seed=11)
    assert traced.facts.preview_decoder == "shipped demo decoder"
    reference = decode_latents(demo_pipe, traced.pred_x0)  # the full VAE, independently
    assert traced.previews.shape == reference.shape
    values = psnr(traced.previews, reference)
    assert values.mean() > MIN_MEAN_PSNR_DB, values.round(1)
    assert values.min() > MIN_STEP_PSNR_DB, values.round(1)
    exact = trace(demo_pipe, PROMPT, num_inference_steps=20, seed=11, preview_decoder="vae")
    assert exact.facts.preview_decoder == "vae"
    np.testing.assert_array_equal(exact.previews, reference)


def test_fingerprint_ignores_dtype_and_sees_other_weights(demo_pipe: Any) -> None:
    vae = demo_pipe.vae
    half = copy.deepcopy(vae).to(torch.float16)
    assert vae_fingerprint(half) == vae_fingerprint(vae)
    changed = copy.deepcopy(vae)
    with torch.no_grad():
        changed.decoder.conv_out.weight.add_(0.5)
    assert vae_fingerprint(changed) != vae_fingerprint(vae)
    assert shipped_preview_decoder(changed) is None


def test_other_vaes_fall_back_to_the_vae_or_say_what_to_pass(tiny_sd_pipe: Any) -> None:
    latents = np.random.default_rng(0).standard_normal((2, 4, 16, 16)).astype(np.float32)
    images, name = decode_previews(tiny_sd_pipe, latents)
    assert name == "vae"
    np.testing.assert_array_equal(images, decode_latents(tiny_sd_pipe, latents))
    with pytest.raises(ValueError, match="taesd"):
        resolve_preview_decoder(tiny_sd_pipe, "tiny")


def _taesd_folder(tmp_path: Path, latent_channels: int = 4) -> Path:
    """A "taesd"-style folder: an AutoencoderTiny for the tiny pipeline (factor 2)."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    model = AutoencoderTiny(
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        num_encoder_blocks=(1, 1),
        num_decoder_blocks=(1, 1),
        latent_channels=latent_channels,
    )
    folder = tmp_path / f"taesd-{latent_channels}"
    model.save_pretrained(str(folder))
    return folder


def test_a_taesd_folder_decodes_the_previews(tiny_sd_pipe: Any, tmp_path: Path) -> None:
    from diffusers import AutoencoderTiny

    folder = _taesd_folder(tmp_path)
    traced = trace(tiny_sd_pipe, "a red circle", num_inference_steps=3, preview_decoder=folder)
    assert traced.facts.preview_decoder == folder.name
    # By hand: the decoder's output in [-1, 1], mapped to [0, 1] and rounded as diffusers does.
    model = AutoencoderTiny.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        out = model.decode(torch.as_tensor(traced.pred_x0)).sample
    expected = ((out / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round()
    assert np.abs(traced.previews.astype(int) - expected.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="takes 3-channel latents"):
        trace(
            tiny_sd_pipe, "a red circle", num_inference_steps=2,
            preview_decoder=_taesd_folder(tmp_path, latent_channels=3),
        )  # fmt: skip
    with pytest.raises(FileNotFoundError, match="AutoencoderTiny folder"):
        resolve_preview_decoder(tiny_sd_pipe, str(tmp_path / "nowhere"))
