"""TraceContext and trace(): identical images, nothing left behind, clear errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from diffwidget.tracing.attention import CaptureAttnProcessor
from diffwidget.tracing.context import TraceContext
from diffwidget.tracing.decode import to_uint8
from diffwidget.tracing.generate import trace

PROMPT = "a red circle on the left"
STEPS = 4


class CallbackError(RuntimeError):
    """Raised from inside the pipeline by a step-end callback."""


def plain_run(pipe: Any, output_type: str = "np", **kwargs: Any) -> np.ndarray:
    kwargs = {"num_inference_steps": STEPS, "guidance_scale": 7.5, **kwargs}
    generator = torch.Generator("cpu").manual_seed(kwargs.pop("seed", 0))
    return pipe(PROMPT, generator=generator, output_type=output_type, **kwargs).images[0]


def snapshot(pipe: Any) -> tuple[dict[str, Any], bool]:
    return dict(pipe.unet.attn_processors), "step" in vars(pipe.scheduler)


def assert_restored(pipe: Any, before: tuple[dict[str, Any], bool]) -> None:
    processors, had_step = snapshot(pipe)
    assert processors.keys() == before[0].keys()
    assert all(processors[k] is before[0][k] for k in processors)
    assert not any(isinstance(p, CaptureAttnProcessor) for p in processors.values())
    assert had_step == before[1] is False
    assert not pipe.unet._forward_hooks, "a hook was left on the UNet"
    modules = list(pipe.unet.modules())
    assert not any(hasattr(m, "_diffusers_hook") for m in modules), "a tap was left on the UNet"
    assert not any("forward" in vars(m) for m in modules), "a forward was left patched"


def test_traced_image_and_latent_equal_untraced(tiny_sd_pipe: Any) -> None:
    traced = trace(tiny_sd_pipe, PROMPT, num_inference_steps=STEPS, seed=3, tokens="all")
    image = plain_run(tiny_sd_pipe, seed=3)
    latent = plain_run(tiny_sd_pipe, output_type="latent", seed=3)
    np.testing.assert_array_equal(traced.image, to_uint8(image))
    np.testing.assert_array_equal(traced.final_latent, latent.numpy())
    other_seed = trace(tiny_sd_pipe, PROMPT, num_inference_steps=STEPS, seed=4)
    assert not np.array_equal(other_seed.final_latent, traced.final_latent)


def test_trace_records_every_step(tiny_trace: Any) -> None:
    n = tiny_trace.n_steps
    assert n == 5
    assert tiny_trace.latents.shape == tiny_trace.noise_pred.shape == (n, 4, 16, 16)
    assert tiny_trace.pred_x0.shape == (n, 4, 16, 16)
    assert tiny_trace.previews.shape == (n, 16, 16, 3)  # one pixel per latent cell
    assert tiny_trace.previews.dtype == tiny_trace.image.dtype == np.uint8
    assert tiny_trace.prompt_embeds.shape == (2, 77, 32)
    assert tiny_trace.guidance_scale == 7.5
    assert tiny_trace.facts.guided is True
    assert tiny_trace.facts.seed == 0
    assert tiny_trace.facts.pipeline == "StableDiffusionPipeline"
    assert tiny_trace.facts.scheduler == "DPMSolverMultistepScheduler"
    assert tiny_trace.facts.versions["diffusers"]
    # The latent entering step i+1 is the one step i produced, never the same tensor twice.
    assert all(
        not np.array_equal(a, b)
        for a, b in zip(tiny_trace.latents[:-1], tiny_trace.latents[1:], strict=True)
    )


def test_prompt_embeds_are_in_cfg_order(tiny_sd_pipe: Any, tiny_trace: Any) -> None:
    with torch.no_grad():
        cond, uncond = tiny_sd_pipe.encode_prompt(PROMPT, torch.device("cpu"), 1, True)
    np.testing.assert_array_equal(tiny_trace.prompt_embeds[0], uncond[0].numpy())
    np.testing.assert_array_equal(tiny_trace.prompt_embeds[1], cond[0].numpy())


def test_last_pred_x0_is_the_final_latent_for_dpm_solver(tiny_trace: Any) -> None:
    # DPM-Solver++ ends with a first-order step to sigma = 0, which lands exactly on x0.
    np.testing.assert_allclose(tiny_trace.pred_x0[-1], tiny_trace.final_latent, atol=1e-4)


@pytest.mark.parametrize("interrupt", [CallbackError, KeyboardInterrupt])
def test_restored_after_error_inside_pipeline(
    tiny_sd_pipe_factory: Callable[..., Any], interrupt: type[BaseException]
) -> None:
    pipe = tiny_sd_pipe_factory()
    before = snapshot(pipe)
    reference = plain_run(pipe)

    def explode(_pipe: Any, step: int, _t: Any, _kwargs: dict[str, Any]) -> dict[str, Any]:
        if step == 1:
            raise interrupt("stop")
        return {}

    with pytest.raises(interrupt):
        trace(pipe, PROMPT, num_inference_steps=STEPS, callback_on_step_end=explode)
    assert_restored(pipe, before)
    np.testing.assert_array_equal(plain_run(pipe), reference)


def test_restored_after_normal_exit(tiny_sd_pipe_factory: Callable[..., Any]) -> None:
    pipe = tiny_sd_pipe_factory()
    before = snapshot(pipe)
    with TraceContext(pipe, prompt=PROMPT) as ctx:
        assert isinstance(
            pipe.unet.attn_processors[ctx.capture.layers[0] + ".processor"], CaptureAttnProcessor
        )
        assert "step" in vars(pipe.scheduler)
        plain_run(pipe)
    assert_restored(pipe, before)
    assert ctx.result().n_steps == STEPS


def test_user_callback_is_chained(tiny_sd_pipe: Any) -> None:
    seen: list[int] = []

    def record(_pipe: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        seen.append(step)
        assert "latents" in kwargs
        return {}

    trace(tiny_sd_pipe, PROMPT, num_inference_steps=3, callback_on_step_end=record)
    assert seen == [0, 1, 2]


def test_no_cfg_traces_the_whole_batch(tiny_sd_pipe: Any) -> None:
    traced = trace(tiny_sd_pipe, PROMPT, num_inference_steps=3, guidance_scale=1.0)
    assert traced.facts.guided is False
    assert traced.facts.cfg_layout.halves == ["cond"]
    assert traced.guidance_scale == 1.0
    # Without CFG the UNet sees only the prompt's embedding, and that is what is kept.
    assert traced.prompt_embeds.shape == (1, 77, 32)
    with torch.no_grad():
        cond, _ = tiny_sd_pipe.encode_prompt(PROMPT, torch.device("cpu"), 1, True)
    np.testing.assert_array_equal(traced.prompt_embeds[0], cond[0].numpy())
    plain = plain_run(tiny_sd_pipe, output_type="latent", num_inference_steps=3, guidance_scale=1.0)
    np.testing.assert_array_equal(traced.final_latent, plain.numpy())


def test_unsupported_pipeline_names_the_supported_ones(tiny_sd_pipe: Any) -> None:
    from diffusers import StableDiffusionImg2ImgPipeline

    img2img = StableDiffusionImg2ImgPipeline(**tiny_sd_pipe.components)
    with pytest.raises(TypeError, match="StableDiffusionPipeline, StableDiffusionXLPipeline"):
        trace(img2img, PROMPT)
    with pytest.raises(TypeError, match="supported pipelines"):
        TraceContext(object(), prompt=PROMPT)


def test_unsupported_scheduler_is_refused(tiny_sd_pipe_factory: Callable[..., Any]) -> None:
    from diffusers import HeunDiscreteScheduler

    pipe = tiny_sd_pipe_factory()
    pipe.scheduler = HeunDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match=r"DPMSolverMultistepScheduler\.from_config"):
        trace(pipe, PROMPT)


def test_previews_from_the_conditional_half(tiny_sd_pipe: Any) -> None:
    # Exact decodes: the linear map of each run is fitted on that run's own final image.
    common = {"num_inference_steps": STEPS, "seed": 2, "preview_decoder": "vae"}
    guided = trace(tiny_sd_pipe, PROMPT, **common)
    cond = trace(tiny_sd_pipe, PROMPT, preview_from="cond", **common)
    no_cfg = trace(tiny_sd_pipe, PROMPT, guidance_scale=1.0, **common)
    assert cond.previews is not None
    assert guided.previews is not None
    assert no_cfg.previews is not None
    assert (cond.facts.preview_source, guided.facts.preview_source) == ("cond", "guided")
    # Only the previews change: the run, its guided prediction and its image do not.
    np.testing.assert_array_equal(cond.pred_x0, guided.pred_x0)
    np.testing.assert_array_equal(cond.image, guided.image)
    # Step 0 starts from the same noise: the conditional half predicts what a run without
    # CFG predicts there, and the guided preview differs from both.
    first = cond.previews[0].astype(int)
    assert np.abs(first - no_cfg.previews[0].astype(int)).max() <= 1
    assert np.abs(first - guided.previews[0].astype(int)).max() > 1
    assert not tiny_sd_pipe.unet._forward_hooks


def test_conditional_previews_restore_after_an_error(
    tiny_sd_pipe_factory: Callable[..., Any],
) -> None:
    pipe = tiny_sd_pipe_factory()
    before = snapshot(pipe)

    def explode(_pipe: Any, step: int, _t: Any, _kwargs: dict[str, Any]) -> dict[str, Any]:
        raise CallbackError("stop")

    with pytest.raises(CallbackError):
        trace(
            pipe,
            PROMPT,
            num_inference_steps=STEPS,
            preview_from="cond",
            callback_on_step_end=explode,
        )
    assert_restored(pipe, before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"preview_from": "uncond"}, "preview_from"),
        ({"preview_from": "cond", "decode_previews": False}, "decode_previews=True"),
        ({"prompt": ["a", "b"]}, "one prompt"),
        ({"num_images_per_prompt": 2}, "num_images_per_prompt"),
        ({"generator": torch.Generator()}, "seed="),
        ({"output_type": "pil"}, "output_type"),
    ],
)
def test_bad_requests_are_refused(tiny_sd_pipe: Any, kwargs: dict[str, Any], match: str) -> None:
    prompt = kwargs.pop("prompt", PROMPT)
    with pytest.raises((TypeError, ValueError), match=match):
        trace(tiny_sd_pipe, prompt, num_inference_steps=2, **kwargs)


def test_context_refuses_batches_and_nesting(tiny_sd_pipe_factory: Callable[..., Any]) -> None:
    pipe = tiny_sd_pipe_factory()
    before = snapshot(pipe)
    with (
        pytest.raises(RuntimeError, match="one image at a time"),
        TraceContext(pipe, prompt=PROMPT),
    ):
        plain_run(pipe, num_images_per_prompt=2)
    assert_restored(pipe, before)
    with (
        pytest.raises(RuntimeError, match="already being traced"),
        TraceContext(pipe, prompt=PROMPT),
    ):
        TraceContext(pipe, prompt=PROMPT).__enter__()
    assert_restored(pipe, before)
    with pytest.raises(ValueError, match="prompt="):
        TraceContext(pipe)


def test_attention_slicing_inside_the_context_is_an_error(
    tiny_sd_pipe_factory: Callable[..., Any],
) -> None:
    pipe = tiny_sd_pipe_factory()
    before = snapshot(pipe)
    with TraceContext(pipe, prompt=PROMPT):
        pipe.enable_attention_slicing()
        with pytest.raises(RuntimeError, match="enable_attention_slicing"):
            plain_run(pipe)
    assert_restored(pipe, before)


def test_attention_slicing_before_the_context_is_traced(
    tiny_sd_pipe_factory: Callable[..., Any],
) -> None:
    pipe = tiny_sd_pipe_factory()
    pipe.enable_attention_slicing(1)
    reference = plain_run(pipe, output_type="latent")
    traced = trace(pipe, PROMPT, num_inference_steps=STEPS)
    np.testing.assert_array_equal(traced.final_latent, reference.numpy())
    assert len(traced.attention) == 7
