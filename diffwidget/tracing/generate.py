"""``trace()``: generate one image with a pipeline and record every denoising step.

The convenience entry point around :class:`~diffwidget.tracing.context.TraceContext`: it
validates the arguments, fills in the pipeline's defaults (guidance, image size), checks
the memory budget before anything runs and calls the pipeline inside the context.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from diffwidget.tracing.budget import DEFAULT_MEMORY_BUDGET_MB
from diffwidget.tracing.decode import PreviewDecoder
from diffwidget.tracing.families import denoiser_family
from diffwidget.tracing.lock import hold_pipeline, trace_task
from diffwidget.tracing.noise import PredictionSource
from diffwidget.tracing.preview_tap import reason
from diffwidget.tracing.tokens import TokenSelection

if TYPE_CHECKING:
    from collections.abc import Sequence

    from diffwidget.tracing.context import TraceContext
    from diffwidget.tracing.families import DenoiserFamily
    from diffwidget.tracing.taps import Tap
    from diffwidget.tracing.trace import Trace

#: diffusers' own default for Stable Diffusion pipelines.
DEFAULT_GUIDANCE_SCALE = 7.5
#: Upper bound on steps: the schedulers' training horizon.
MAX_STEPS = 1000
#: Pipeline arguments that :func:`trace` sets itself.
_RESERVED = ("output_type", "return_dict", "generator", "prompt_embeds", "negative_prompt_embeds")


def _check_steps(num_inference_steps: Any) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise TypeError(
            f"num_inference_steps must be a positive integer, got {num_inference_steps!r}"
        )
    if not 1 <= num_inference_steps <= MAX_STEPS:
        raise ValueError(
            f"num_inference_steps must be between 1 and {MAX_STEPS}, got {num_inference_steps}; "
            "about 20 steps is usual"
        )
    return num_inference_steps


def trace(
    pipe: Any,
    prompt: str,
    *,
    num_inference_steps: int = 20,
    guidance_scale: float | None = None,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
    decode_previews: bool = True,
    preview_from: PredictionSource = "guided",
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    tokens: TokenSelection = "default",
    attention_heads: bool = False,
    preview_decoder: PreviewDecoder = "auto",
    taps: Sequence[Tap] = (),
    **pipeline_kwargs: Any,
) -> Trace:
    """Generate one image with ``pipe`` and record every denoising step.

    Parameters
    ----------
    pipe : diffusers pipeline
        Stable Diffusion 1.x/2.x, SDXL, SD3/SD3.5, Flux or PixArt, any checkpoint; its
        processors, hooks and scheduler are left as they were.
    prompt : str
        One prompt (lists are refused: trace prompts one by one).
    num_inference_steps, height, width, negative_prompt
        As for the pipeline.
    guidance_scale : float, optional
        As for the pipeline (for Flux the distilled guidance; its CFG is
        ``true_cfg_scale``); by default the pipeline's ``recommended_guidance_scale`` when
        it has one (the embedded models do), else diffusers' usual 7.5 (Flux: the
        pipeline's own default).
    seed : int
        Seeds a CPU ``torch.Generator``, so a seed gives the same image on any device.
    decode_previews : bool
        Keep an RGB preview of the predicted clean latent of every step (``Trace.previews``;
        by default from a linear latent→RGB map, no VAE call per step).
    preview_from : {"guided", "cond"}
        Decode the previews from the guided model output (default) or from the
        conditional CFG half alone (see :class:`TraceContext`).
    memory_budget_mb : float
        Refuse before running when the trace would store more than this. It also refuses
        (``InsufficientMemoryError``) when the pipeline's device or the host has less free
        memory than the trace will allocate there (:meth:`TraceContext.memory_plan`).
    tokens : "default", "all" or list of int
        Token positions kept in the attention maps.
    attention_heads : bool
        Also keep every head's map (``Trace.attention_heads``), for the explorer's head
        filter; costs heads times more attention memory.
    preview_decoder : {"auto", "linear", "vae", "tiny"}, folder or module
        What makes the previews (see :class:`~diffwidget.tracing.context.TraceContext`).
    taps : sequence of Tap
        More taps to install for the run (:mod:`diffwidget.tracing.taps`), e.g. a
        :class:`~diffwidget.tracing.concepts.ConceptTap`; read them afterwards.
    **pipeline_kwargs
        Passed to the pipeline (``callback_on_step_end`` is passed through).

    Returns
    -------
    Trace
        When something fails after the denoising loop (the pipeline's VAE decode out of
        memory, say), the trace keeps every recorded step; ``facts.missing`` names what it
        lacks and why, and a ``TraceIncompleteWarning`` says so.

    Examples
    --------
    >>> from diffwidget.testing.tiny import tiny_sd_pipeline
    >>> t = trace(tiny_sd_pipeline(), "a red circle", num_inference_steps=4)
    >>> t.n_steps, t.tokens[:4]
    (4, ['<|startoftext|>', 'a', 'red', 'circle'])
    """
    family = denoiser_family(pipe)
    _check_request(pipe, prompt, num_inference_steps, pipeline_kwargs)
    call = _pipeline_call(pipe, family, guidance_scale, negative_prompt, pipeline_kwargs)
    w = call.get(family.guidance_argument())
    size = family.default_image_size()
    height, width = height or size, width or size

    # Imported here: context.py re-exports trace() from this module.
    from diffwidget.tracing.context import TraceContext

    ctx = TraceContext(
        pipe,
        prompt=prompt,
        negative_prompt=negative_prompt,
        tokens=tokens,
        decode_previews=decode_previews,
        preview_from=preview_from,
        memory_budget_mb=memory_budget_mb,
        seed=seed,
        guidance_scale=None if w is None else float(w),
        call_kwargs=call,
        attention_heads=attention_heads,
        preview_decoder=preview_decoder,
        taps=taps,
    )
    ctx.check_budget(num_inference_steps, height, width)
    ctx.check_memory(num_inference_steps, height, width)
    return _run(pipe, ctx, prompt, num_inference_steps, height, width, seed, call)


def _check_request(
    pipe: Any, prompt: Any, num_inference_steps: Any, pipeline_kwargs: dict[str, Any]
) -> None:
    """Refuse what :func:`trace` cannot do, before anything is allocated."""
    if not isinstance(prompt, str):
        raise TypeError(
            f"trace() takes one prompt (a str), got {type(prompt).__name__}; call it once per "
            "prompt"
        )
    _check_steps(num_inference_steps)
    if pipeline_kwargs.get("num_images_per_prompt", 1) != 1:
        raise ValueError("trace() makes one image; drop num_images_per_prompt (or set it to 1)")
    reserved = [k for k in _RESERVED if k in pipeline_kwargs]
    if reserved:
        raise ValueError(
            f"trace() sets {reserved} itself; pass seed= instead of a generator and the prompt "
            "as text"
        )
    check = getattr(pipe, "check_prompt", None)
    if callable(check):
        check(prompt)


def _pipeline_call(
    pipe: Any,
    family: DenoiserFamily,
    guidance_scale: float | None,
    negative_prompt: str | None,
    pipeline_kwargs: dict[str, Any],
) -> dict[str, Any]:
    """The pipeline's keyword arguments: the caller's, the guidance and the negative prompt."""
    call: dict[str, Any] = dict(pipeline_kwargs)
    if guidance_scale is None:
        guidance_scale = getattr(pipe, "recommended_guidance_scale", None)
    if guidance_scale is None and family.guidance_argument() == "guidance_scale":
        guidance_scale = DEFAULT_GUIDANCE_SCALE
    if guidance_scale is not None:
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
            raise TypeError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        call["guidance_scale"] = float(guidance_scale)
    if negative_prompt is not None:
        call["negative_prompt"] = negative_prompt
    return call


def _run(
    pipe: Any,
    ctx: TraceContext,
    prompt: str,
    num_inference_steps: int,
    height: int,
    width: int,
    seed: int,
    call: dict[str, Any],
) -> Trace:
    """Call the pipeline inside ``ctx`` (which restores every hook) and build the trace."""
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    failure: str | None = None
    # Held across the call and the previews; the context takes it again (reentrant).
    with hold_pipeline(pipe, trace_task(prompt)):
        with ctx:
            try:
                output = pipe(
                    prompt,
                    num_inference_steps=num_inference_steps,
                    height=height,
                    width=width,
                    generator=generator,
                    output_type="np",
                    **call,
                )
            except Exception as error:
                if not ctx.loop_done:
                    raise
                # After the loop (the VAE decode, a safety checker): the steps are kept.
                # Only the text is kept, so the error's frames (and tensors) are freed.
                failure = reason(error)
        image = None if failure is not None else np.asarray(output.images[0])
        return ctx.result(image=image, failure=failure)
