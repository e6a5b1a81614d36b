"""Hostile and unusual input: clear errors that say how to fix it, and nothing half done."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from diffwidget.explain.cam import DFCam
from diffwidget.explain.faithfulness import InsertionDeletion
from diffwidget.explain.relevance import TokenRelevance
from diffwidget.explain.rise import DFRise
from diffwidget.tracing.generate import trace
from diffwidget.tracing.replay import StepReplay
from diffwidget.tracing.trace import Trace

PROMPT = "a red circle on the left"


class WrappedUNet(nn.Module):
    """A module with the UNet call signature that is not diffusers' UNet2DConditionModel."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        config = inner.config  # type: ignore[union-attr]
        # Only what the pipeline itself reads: no block_out_channels, no block layout.
        self.config = SimpleNamespace(
            in_channels=config.in_channels,
            sample_size=config.sample_size,
            time_cond_proj_dim=None,
        )
        self.dtype, self.device = inner.dtype, inner.device

    def forward(self, sample: Any, timestep: Any, encoder_hidden_states: Any, **kw: Any) -> Any:
        return self.inner(sample, timestep, encoder_hidden_states, **kw)


def test_a_custom_unet_is_traced_and_replayed(tiny_sd_pipe_factory: Any) -> None:
    pipe = tiny_sd_pipe_factory()
    reference = trace(pipe, PROMPT, num_inference_steps=3, seed=2)
    pipe.unet = WrappedUNet(pipe.unet)
    traced = trace(pipe, PROMPT, num_inference_steps=3, seed=2)
    # The same run, with the wrapper's module paths, in data-flow order.
    assert list(traced.attention) == [f"inner.{k}" for k in reference.attention]
    for layer, maps in reference.attention.items():
        np.testing.assert_array_equal(traced.attention[f"inner.{layer}"], maps)
    np.testing.assert_array_equal(traced.image, reference.image)
    replay = StepReplay(pipe, traced)
    out = replay.model_output(replay.latent(1), 1)[0].numpy()
    np.testing.assert_allclose(out, traced.noise_pred[1], atol=1e-5)
    # DF-CAM's default layers follow diffusers' block layout: refused clearly, and it works
    # once given paths.
    with pytest.raises(ValueError, match="blocks="):
        DFCam().attribute(pipe, traced, 1)
    cam = DFCam(blocks=["inner.mid_block"]).attribute(pipe, traced, 1)
    assert cam.map.shape == traced.latent_shape


def test_non_finite_latents_are_refused_with_the_step(tiny_sd_pipe: Any) -> None:
    latents = torch.full((1, 4, 16, 16), float("nan"))
    with pytest.raises(RuntimeError, match="NaN or infinite from step 0"):
        trace(tiny_sd_pipe, PROMPT, num_inference_steps=2, latents=latents)
    assert "step" not in vars(tiny_sd_pipe.scheduler)


def test_a_non_finite_trace_is_not_replayed(tiny_sd_pipe: Any, tiny_trace: Trace) -> None:
    latents = tiny_trace.latents.copy()
    latents[2] = np.inf
    broken = Trace(**{**vars(tiny_trace), "latents": latents})
    with pytest.raises(ValueError, match="step 2 is NaN or infinite"):
        DFRise(n_masks=2, progress_bar=False).attribute(tiny_sd_pipe, broken, 2)
    with pytest.raises(ValueError, match="step 2 is NaN or infinite"):
        DFCam().attribute(tiny_sd_pipe, broken, 2)


@pytest.mark.parametrize(
    ("steps", "error", "match"),
    [
        (0, ValueError, "between 1 and 1000"),
        (-1, ValueError, "between 1 and 1000"),
        (2.5, TypeError, "positive integer"),
        (True, TypeError, "positive integer"),
    ],
)
def test_bad_step_counts(tiny_sd_pipe: Any, steps: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        trace(tiny_sd_pipe, PROMPT, num_inference_steps=steps)


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_low_guidance_is_recorded_as_given(tiny_sd_pipe: Any, scale: float) -> None:
    traced = trace(tiny_sd_pipe, PROMPT, num_inference_steps=2, guidance_scale=scale)
    assert traced.guidance_scale == scale
    assert traced.facts.cfg_layout.layout == "none"
    # diffusers runs the prompt alone at w <= 1; the replay does the same.
    replay = StepReplay(tiny_sd_pipe, traced)
    np.testing.assert_allclose(
        replay.model_output(replay.latent(0), 0)[0].numpy(), traced.noise_pred[0], atol=1e-5
    )


def test_bad_guidance_scale(tiny_sd_pipe: Any) -> None:
    with pytest.raises(TypeError, match="finite number"):
        trace(tiny_sd_pipe, PROMPT, num_inference_steps=2, guidance_scale=float("nan"))
    with pytest.raises(TypeError, match="finite number"):
        trace(tiny_sd_pipe, PROMPT, num_inference_steps=2, guidance_scale="7")  # type: ignore[arg-type]


def test_pipelines_without_a_denoiser(tiny_sd_pipe_factory: Any) -> None:
    pipe = tiny_sd_pipe_factory()
    pipe.unet = None
    with pytest.raises(TypeError, match="no `unet`"):
        trace(pipe, PROMPT)
    with pytest.raises(TypeError, match="supported pipelines"):
        trace(None, PROMPT)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: DFRise(n_masks=2.5), "n_masks must be an integer"),  # type: ignore[arg-type]
        (lambda: DFRise(n_masks="500"), "n_masks must be an integer"),  # type: ignore[arg-type]
        (lambda: DFRise(batch_size=1.5), "batch_size must be an integer"),  # type: ignore[arg-type]
        (lambda: DFRise(p="0.5"), "p must be a number"),  # type: ignore[arg-type]
        (lambda: DFCam(blocks="mid_block"), "wrap one in a list"),  # type: ignore[arg-type]
        (lambda: DFCam(blocks=[3]), "module paths"),  # type: ignore[list-item]
        (lambda: InsertionDeletion(n_random=1.5), "n_random must be an integer"),  # type: ignore[arg-type]
        (lambda: InsertionDeletion(cells_per_stage=2.0), "cells_per_stage"),  # type: ignore[arg-type]
    ],
)
def test_method_settings_are_type_checked(make: Any, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        make()


def test_relevance_steps_are_type_checked(tiny_sd_pipe: Any, tiny_trace: Trace) -> None:
    with pytest.raises(TypeError, match="list of integers"):
        TokenRelevance(progress_bar=False).attribute(tiny_sd_pipe, tiny_trace, steps=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="steps must be an integer"):
        TokenRelevance(progress_bar=False).attribute(tiny_sd_pipe, tiny_trace, steps=[1.5])  # type: ignore[list-item]
