"""The training objective: zero terminal SNR, the v target and the Min-SNR weights."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from diffwidget.models.architecture import SCHEDULER_CONFIG, make_scheduler
from diffwidget.models.objectives import MIN_SNR_GAMMA, min_snr_weights, training_target


def _ddpm(**overrides: object) -> DDPMScheduler:
    return DDPMScheduler.from_config({**SCHEDULER_CONFIG, **overrides})


def test_no_signal_is_left_at_the_last_timestep() -> None:
    alphas = _ddpm().alphas_cumprod
    assert float(alphas[-1]) == 0.0
    assert float(alphas[0]) > 0.99
    # Every inference scheduler keeps the rescaled schedule (DPM++ clips 0 to 2**-24).
    for name in ("dpm++", "ddim", "euler", "ddpm"):
        scheduler = make_scheduler(name)
        assert float(scheduler.alphas_cumprod[-1]) < 1e-6, name
        assert scheduler.config.prediction_type == "v_prediction", name


def test_v_target_gives_back_the_clean_latent_and_the_noise() -> None:
    scheduler = _ddpm()
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 300, 998, 999])
    noisy = scheduler.add_noise(latents, noise, t)
    v = training_target(scheduler, latents, noise, t)
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * noisy - (1 - a).sqrt() * v, latents, atol=1e-5, rtol=0)
    torch.testing.assert_close(a.sqrt() * v + (1 - a).sqrt() * noisy, noise, atol=1e-5, rtol=0)
    # At t = 999 the noisy input holds nothing of the latent: v is minus the latent itself.
    torch.testing.assert_close(v[3], -latents[3])


def test_epsilon_target_is_the_noise() -> None:
    scheduler = _ddpm(prediction_type="epsilon", rescale_betas_zero_snr=False)
    latents, noise = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2)
    assert torch.equal(training_target(scheduler, latents, noise, torch.tensor([5])), noise)


def test_min_snr_weights() -> None:
    v_weights = min_snr_weights(_ddpm())
    assert v_weights.shape == (1000,)
    assert torch.isfinite(v_weights).all()
    # The noisiest steps, where the prompt alone sets the layout, keep full weight ...
    assert v_weights[-100:].min() == 1.0
    # ... and nearly clean steps are clamped: weight gamma / (SNR + 1) < 1.
    alphas = _ddpm().alphas_cumprod.double()
    snr0 = float(alphas[0] / (1 - alphas[0]))
    assert v_weights[0] == pytest.approx(MIN_SNR_GAMMA / (snr0 + 1), rel=1e-5)
    eps_scheduler = _ddpm(prediction_type="epsilon", rescale_betas_zero_snr=False)
    eps_weights = min_snr_weights(eps_scheduler)
    assert eps_weights[-1] == 1.0  # SNR < gamma: no clamp
    assert eps_weights[0] < 0.01
    with pytest.raises(ValueError, match="epsilon and v_prediction"):
        min_snr_weights(_ddpm(prediction_type="sample"))
