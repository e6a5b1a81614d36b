"""Step index vs scheduler timestep, and x0 computed without touching the scheduler."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from diffwidget.tracing.generate import trace
from diffwidget.tracing.noise import predict_x0, scheduler_family

PROMPT = "a red circle on the left"
STEPS = 6


def fresh_scheduler(pipe: Any, steps: int) -> Any:
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("name", ["ddim", "dpm++", "euler", "pndm"])
def test_steps_timesteps_and_x0_match_the_scheduler(
    tiny_sd_pipe_factory: Callable[..., Any], name: str
) -> None:
    pipe = tiny_sd_pipe_factory(scheduler=name)
    traced = trace(pipe, PROMPT, num_inference_steps=STEPS, decode_previews=False)
    expected = fresh_scheduler(pipe, STEPS).timesteps.numpy()
    assert traced.n_steps == len(expected)
    np.testing.assert_array_equal(traced.facts.timesteps_exact, expected.astype(np.float64))
    np.testing.assert_array_equal(traced.timesteps, np.round(expected).astype(np.int64))
    assert traced.timesteps.dtype == np.int64
    assert traced.timesteps[0] > traced.timesteps[-1]

    # Replaying the recorded (noise_pred[i], t_i, latents[i]) through a fresh scheduler
    # must reproduce latents[i + 1]: the three arrays are aligned on the loop index.
    replay = fresh_scheduler(pipe, STEPS)
    for i, t in enumerate(replay.timesteps):
        out = replay.step(
            torch.from_numpy(traced.noise_pred[i][None]),
            t,
            torch.from_numpy(traced.latents[i][None]),
        )
        following = traced.latents[i + 1] if i + 1 < traced.n_steps else traced.final_latent
        np.testing.assert_allclose(out.prev_sample[0].numpy(), following, atol=1e-5, rtol=1e-5)
        scheduler_x0 = (
            replay.model_outputs[-1]
            if name == "dpm++"
            else getattr(out, "pred_original_sample", None)
        )
        if scheduler_x0 is not None:
            np.testing.assert_allclose(
                traced.pred_x0[i], scheduler_x0[0].numpy(), atol=1e-4, rtol=1e-4
            )


def _solver_state(scheduler: Any) -> tuple[Any, list[np.ndarray]]:
    return scheduler.step_index, [
        m.numpy().copy() for m in scheduler.model_outputs if m is not None
    ]


def test_pred_x0_and_previews_never_touch_the_scheduler(tiny_sd_pipe: Any) -> None:
    generator = torch.Generator("cpu").manual_seed(0)
    tiny_sd_pipe(PROMPT, num_inference_steps=3, generator=generator, output_type="latent")
    plain_index, plain_outputs = _solver_state(tiny_sd_pipe.scheduler)
    trace(tiny_sd_pipe, PROMPT, num_inference_steps=3, seed=0, decode_previews=True)
    traced_index, traced_outputs = _solver_state(tiny_sd_pipe.scheduler)
    assert traced_index == plain_index == 3
    assert len(traced_outputs) == len(plain_outputs) > 0
    for plain, traced in zip(plain_outputs, traced_outputs, strict=True):
        np.testing.assert_array_equal(plain, traced)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("family", ["vp", "ve"])
def test_predict_x0_inverts_the_forward_process(prediction_type: str, family: str) -> None:
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((2, 4, 3, 3))
    if family == "vp":
        alpha, sigma, scale = 0.6, 0.8, 1.0
    else:
        alpha, sigma = 1.0, 3.0
        scale = 1 / np.sqrt(sigma**2 + 1)
    x_t = alpha * x0 + sigma * eps
    # The UNet sees scale * x_t = a * x0 + b * eps with a^2 + b^2 = 1; v = a * eps - b * x0.
    a, b = alpha * scale, sigma * scale
    output = {"epsilon": eps, "v_prediction": a * eps - b * x0, "sample": x0}[prediction_type]
    np.testing.assert_allclose(
        predict_x0(x_t, output, alpha, sigma, scale, prediction_type), x0, atol=1e-12
    )


def test_v_prediction_pipeline(tiny_sd_pipe_factory: Callable[..., Any]) -> None:
    from diffusers import DDIMScheduler

    pipe = tiny_sd_pipe_factory()
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, prediction_type="v_prediction", clip_sample=False
    )
    traced = trace(pipe, PROMPT, num_inference_steps=3, decode_previews=False)
    assert traced.facts.prediction_type == "v_prediction"
    replay = fresh_scheduler(pipe, 3)
    out = replay.step(
        torch.from_numpy(traced.noise_pred[1][None]),
        replay.timesteps[1],
        torch.from_numpy(traced.latents[1][None]),
    )
    np.testing.assert_allclose(traced.pred_x0[1], out.pred_original_sample[0].numpy(), atol=1e-4)


def test_scheduler_families() -> None:
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        LCMScheduler,
    )

    assert scheduler_family(DDIMScheduler()) == "vp_alphas"
    assert scheduler_family(DPMSolverMultistepScheduler()) == "vp_sigmas"
    assert scheduler_family(EulerDiscreteScheduler()) == "ve_sigmas"
    with pytest.raises(ValueError, match="supported: DDIMScheduler"):
        scheduler_family(LCMScheduler())
