"""Trace one Stable Diffusion (XL) generation: install hooks, record every step, restore.

Two extension points see everything a trace needs:

* the ``attn2`` attention processors (wrapped, see :mod:`diffwidget.tracing.attention`)
  give the cross-attention probabilities and the text embeddings the UNet reads;
* ``scheduler.step`` is the only place that receives the CFG-combined noise prediction,
  the timestep and ``x_t`` together (step-end callbacks never see the noise prediction),
  so it is wrapped on the scheduler instance for the duration of the context.

SDXL's added conditioning (``text_embeds``, ``time_ids``) is read through
``callback_on_step_end`` by :func:`trace`. Everything is restored in ``finally``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import numpy as np
import torch

from diffwidget.tracing.attention import AttentionCapture, AttentionRecorder
from diffwidget.tracing.budget import (
    DEFAULT_MEMORY_BUDGET_MB,
    StepBytes,
    check_budget,
    estimate_step_bytes,
    layer_grid,
)
from diffwidget.tracing.decode import PreviewDecoder, decode_previews, to_uint8
from diffwidget.tracing.hooks import capture_outputs
from diffwidget.tracing.noise import (
    PREDICTION_SOURCES,
    PredictionSource,
    predict_x0,
    scheduler_family,
    step_coefficients,
)
from diffwidget.tracing.pipeline_info import json_safe, pipeline_kind, versions
from diffwidget.tracing.tokens import PromptTokens, TokenSelection, prompt_tokens
from diffwidget.tracing.trace import Trace

#: SDXL's added conditioning as named in its ``callback_on_step_end`` tensor inputs,
#: mapped to the names the UNet's ``added_cond_kwargs`` use (and ``Trace.extra`` keeps).
SDXL_ADDED_COND = {"add_text_embeds": "text_embeds", "add_time_ids": "time_ids"}
#: Latents decoded per VAE call when making previews (bounds peak memory).
PREVIEW_BATCH = 4
#: Pipeline arguments that :func:`trace` sets itself.
_RESERVED = ("output_type", "return_dict", "generator", "prompt_embeds", "negative_prompt_embeds")


class TraceContext:
    """Record every denoising step of one pipeline call made inside the ``with`` block.

    Parameters
    ----------
    pipe : StableDiffusionPipeline or StableDiffusionXLPipeline
        The pipeline to observe; its processors and scheduler are restored on exit.
    prompt : str, optional
        The prompt the pipeline will be called with; needed for token strings and for the
        default token selection.
    negative_prompt : str, optional
        Recorded in ``meta``.
    tokens : "default", "all" or list of int
        Token positions kept in the attention maps: ``"default"`` keeps start, words, end
        and one padding position.
    decode_previews : bool
        Decode ``pred_x0`` of every step (batched, after the loop).
    preview_decoder : {"auto", "vae", "tiny"}, folder or module
        What decodes them: ``"auto"`` (default) a tiny ``AutoencoderTiny`` preview decoder
        when one matches the VAE (the embedded model ships one), else the full VAE; a
        "taesd"-style folder for other checkpoints (:mod:`diffwidget.tracing.decode`).
        Recorded as ``meta["preview_decoder"]``.
    preview_from : {"guided", "cond"}
        Noise prediction the previews are decoded from: the guided one the sampler steps
        with (default), or the conditional CFG half alone, the model's own prediction for
        the prompt. Early guided previews can show colours the final image does not have.
        Recorded as ``meta["preview_source"]``; ``pred_x0`` is always the guided one.
    memory_budget_mb : float
        Refuse (``MemoryBudgetError``) when all steps together would store more.
    seed : int, optional
        Recorded in ``meta``.

    Notes
    -----
    SDXL's added conditioning (``Trace.extra``) reaches us through the step-end callback:
    call the pipeline with ``**ctx.pipeline_kwargs()`` (as :func:`trace` does), otherwise
    ``extra`` stays empty. Supported schedulers: see :mod:`diffwidget.tracing.noise`
    (DDIM, DDPM, PNDM, DPM-Solver++, UniPC, DEIS, Euler, Euler ancestral, LMS).

    Examples
    --------
    >>> from diffwidget.tracing.tiny import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> with TraceContext(pipe, prompt="a red circle") as ctx:
    ...     out = pipe("a red circle", num_inference_steps=3, output_type="np")
    >>> ctx.result(image=out.images[0]).n_steps
    3
    """

    def __init__(
        self,
        pipe: Any,
        *,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        tokens: TokenSelection = "default",
        decode_previews: bool = True,
        preview_from: PredictionSource = "guided",
        memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
        seed: int | None = None,
        preview_decoder: PreviewDecoder = "auto",
    ) -> None:
        if preview_from not in PREDICTION_SOURCES:
            raise ValueError(
                f"unknown preview_from {preview_from!r}; use one of {PREDICTION_SOURCES}"
            )
        if preview_from == "cond" and not decode_previews:
            raise ValueError("preview_from='cond' needs decode_previews=True")
        self.pipe = pipe
        self.pipeline_kind = pipeline_kind(pipe)
        self.family = scheduler_family(pipe.scheduler)
        if prompt is not None and not isinstance(prompt, str):
            raise TypeError(
                f"trace one prompt at a time (a str), got {type(prompt).__name__}; loop over "
                "prompts and make one trace each"
            )
        if prompt is None and tokens == "default":
            raise ValueError(
                "tokens='default' needs the prompt to find its words: pass prompt=..., or "
                "tokens='all' / a list of token positions"
            )
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.decode_previews = decode_previews
        self.preview_decoder = preview_decoder
        self.preview_from: PredictionSource = preview_from
        self._hooks = contextlib.ExitStack()
        #: With ``preview_from="cond"``: the prompt's half of every UNet output, per call.
        self.cond_pred: list[torch.Tensor] = []
        self.memory_budget_mb = memory_budget_mb
        self.seed = seed
        self.prompt_tokens: PromptTokens | None = (
            prompt_tokens(pipe.tokenizer, prompt) if prompt is not None else None
        )
        max_length = int(pipe.tokenizer.model_max_length)
        if self.prompt_tokens is not None:
            self.token_indices = self.prompt_tokens.select(tokens)
        elif tokens == "all":
            self.token_indices = list(range(max_length))
        else:
            self.token_indices = sorted({int(i) for i in tokens})
        self.recorder = AttentionRecorder(
            None if len(self.token_indices) == max_length else self.token_indices
        )
        self.capture = AttentionCapture(pipe.unet, self.recorder)
        self._scheduler: Any = None
        self._had_instance_step = False
        self._reset_records()

    # ------------------------------------------------------------------ budget
    def step_bytes(self, height: int, width: int) -> StepBytes:
        """Bytes one step will store for an image of ``height`` x ``width`` pixels."""
        factor = self.pipe.vae_scale_factor
        latent = (int(self.pipe.unet.config.in_channels), height // factor, width // factor)
        return estimate_step_bytes(
            self.capture.layers,
            len(self.pipe.unet.config.block_out_channels),
            latent,
            len(self.token_indices),
            (height, width) if self.decode_previews else None,
        )

    def check_budget(self, n_steps: int, height: int, width: int) -> StepBytes:
        """Raise ``MemoryBudgetError`` (with the fix) if ``n_steps`` would exceed the budget."""
        step_bytes = self.step_bytes(height, width)
        check_budget(step_bytes, n_steps, self.memory_budget_mb, n_tokens=len(self.token_indices))
        return step_bytes

    # ------------------------------------------------------------- install/restore
    def _reset_records(self) -> None:
        self.timesteps: list[torch.Tensor] = []
        self.latents: list[torch.Tensor] = []
        self.noise_pred: list[torch.Tensor] = []
        self.step_indices: list[int | None] = []
        self.final_latent: torch.Tensor | None = None
        self.added_cond: dict[str, torch.Tensor] = {}
        self.guidance_scale: float | None = None
        self.recorder.step = 0
        self.recorder.maps = {}
        self.recorder.encoder_hidden_states = None

    def __enter__(self) -> TraceContext:
        self._reset_records()
        self.capture.install()
        try:
            self._wrap_scheduler()
            if self.preview_from == "cond":
                outputs = capture_outputs(self.pipe.unet, [""], reduce=_prompt_half)
                self.cond_pred = self._hooks.enter_context(outputs)[""]
        except BaseException:
            self._hooks.close()
            self._unwrap_scheduler()
            self.capture.restore()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._hooks.close()
            self._unwrap_scheduler()
        finally:
            self.capture.restore()

    def _wrap_scheduler(self) -> None:
        scheduler = self.pipe.scheduler
        self._scheduler = scheduler
        self._had_instance_step = "step" in vars(scheduler)
        original = scheduler.step

        def step(
            model_output: torch.Tensor,
            timestep: Any,
            sample: torch.Tensor,
            *args: Any,
            **kwargs: Any,
        ) -> Any:
            self._before_step(model_output, timestep, sample)
            out = original(model_output, timestep, sample, *args, **kwargs)
            self._after_step(out)
            return out

        self._original_step = original
        # An instance attribute shadows the class method for this scheduler object only.
        scheduler.step = step

    def _unwrap_scheduler(self) -> None:
        scheduler = self._scheduler
        if scheduler is None:
            return
        if self._had_instance_step:
            scheduler.step = self._original_step
        else:
            vars(scheduler).pop("step", None)
        self._scheduler = None

    # --------------------------------------------------------------- recording
    def _before_step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor) -> None:
        replaced = self.capture.replaced_layers()
        if replaced:
            raise RuntimeError(
                f"the capture processors of {len(replaced)} attention layers were replaced "
                f"while tracing (e.g. {replaced[0]}); pipe.enable_attention_slicing() or "
                "set_attn_processor() inside a TraceContext does this. Call it before "
                "entering the context (sliced processors are then wrapped and traced)."
            )
        if sample.shape[0] != 1:
            raise RuntimeError(
                f"the pipeline stepped a batch of {sample.shape[0]} latents; trace one prompt "
                "and one image at a time (num_images_per_prompt=1)"
            )
        step = len(self.timesteps)
        if step == 0:
            self.guidance_scale = float(getattr(self.pipe, "guidance_scale", float("nan")))
            n_steps = len(self._scheduler.timesteps)
            h, w = sample.shape[-2:]
            factor = self.pipe.vae_scale_factor
            self.check_budget(n_steps, int(h) * factor, int(w) * factor)
        if len(self.recorder.maps.get(self.capture.layers[0], ())) != step + 1:
            raise RuntimeError(
                f"no cross-attention was captured at step {step}; the UNet's attention "
                "processors were bypassed. Trace a StableDiffusionPipeline or "
                "StableDiffusionXLPipeline without custom attention hooks."
            )
        self.timesteps.append(torch.as_tensor(timestep).detach().reshape(()).clone())
        self.latents.append(sample[0].detach().clone())
        self.noise_pred.append(model_output[0].detach().clone())
        if self.preview_from == "cond" and len(self.cond_pred) != step + 1:
            raise RuntimeError(
                f"the UNet ran {len(self.cond_pred)} times by step {step}; preview_from='cond' "
                "needs one UNet call per step"
            )

    def _after_step(self, out: Any) -> None:
        self.step_indices.append(getattr(self._scheduler, "step_index", None))
        prev = out[0] if isinstance(out, tuple) else out.prev_sample
        self.final_latent = prev[0].detach().clone()
        self.recorder.step = len(self.timesteps)

    def callback_on_step_end(
        self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """A ``callback_on_step_end`` that records SDXL's added conditioning at step 0."""
        if step == 0:
            for name, key in SDXL_ADDED_COND.items():
                if name in callback_kwargs:
                    self.added_cond[key] = callback_kwargs[name].detach().clone()
        return {}

    def callback_tensor_inputs(self) -> list[str]:
        """The tensor inputs :meth:`callback_on_step_end` needs from this pipeline."""
        available = getattr(self.pipe, "_callback_tensor_inputs", [])
        return [name for name in SDXL_ADDED_COND if name in available]

    def pipeline_kwargs(
        self,
        callback: Callable[..., Any] | None = None,
        tensor_inputs: Sequence[str] = ("latents",),
    ) -> dict[str, Any]:
        """Pipeline arguments that record SDXL's added conditioning, chaining ``callback``.

        Parameters
        ----------
        callback : callable, optional
            Your own ``callback_on_step_end``; called after ours, its return value is
            what the pipeline gets.
        tensor_inputs : sequence of str
            Your ``callback_on_step_end_tensor_inputs``.
        """

        def chained(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> Any:
            self.callback_on_step_end(pipe, step, timestep, kwargs)
            return callback(pipe, step, timestep, kwargs) if callback else {}

        return {
            "callback_on_step_end": chained,
            "callback_on_step_end_tensor_inputs": sorted(
                {*tensor_inputs, *self.callback_tensor_inputs()}
            ),
        }

    # ----------------------------------------------------------------- result
    def result(self, image: np.ndarray | None = None) -> Trace:
        """Build the :class:`Trace` after the ``with`` block.

        Parameters
        ----------
        image : ndarray, optional
            The pipeline's output image (float in [0, 1] or uint8, ``[H, W, 3]``).
        """
        if not self.timesteps:
            raise RuntimeError(
                "nothing was recorded: call the pipeline inside `with TraceContext(pipe) as ctx:`"
            )
        n = len(self.timesteps)
        scheduler = self.pipe.scheduler
        prediction_type = scheduler.config.get("prediction_type", "epsilon")
        timesteps_exact = torch.stack(self.timesteps).double().cpu().numpy()
        latents = torch.stack(self.latents).float().cpu().numpy()
        noise_pred = torch.stack(self.noise_pred).float().cpu().numpy()
        coefficients = [
            step_coefficients(scheduler, self.family, float(t), self._sigma_index(i))
            for i, t in enumerate(timesteps_exact)
        ]
        alpha, sigma, scale = (
            np.array([getattr(c, name) for c in coefficients]).reshape(n, 1, 1, 1)
            for name in ("alpha", "sigma", "input_scale")
        )
        pred_x0 = predict_x0(latents, noise_pred, alpha, sigma, scale, prediction_type)
        pred_x0 = pred_x0.astype(np.float32)
        latent_hw = (int(latents.shape[-2]), int(latents.shape[-1]))
        n_levels = len(self.pipe.unet.config.block_out_channels)
        attention, grids = {}, {}
        for layer in self.capture.layers:
            maps = torch.stack(self.recorder.maps[layer][:n]).cpu().numpy()
            grid = layer_grid(layer, n_levels, latent_hw, maps.shape[1])
            attention[layer] = maps.reshape(n, *grid, maps.shape[-1])
            grids[layer] = list(grid)
        shown_x0 = pred_x0
        if self.preview_from == "cond":
            cond_pred = torch.stack(self.cond_pred[:n]).float().cpu().numpy()
            shown_x0 = predict_x0(latents, cond_pred, alpha, sigma, scale, prediction_type)
        previews, preview_decoder = (
            decode_previews(
                self.pipe, shown_x0.astype(np.float32), self.preview_decoder, batch=PREVIEW_BATCH
            )
            if self.decode_previews
            else (None, None)
        )
        if image is not None and image.dtype != np.uint8:
            image = to_uint8(image)
        tokens = self.prompt_tokens
        strings = [tokens.strings[i] for i in self.token_indices] if tokens else None
        kinds = [tokens.kinds[i] for i in self.token_indices] if tokens else None
        cfg = self.recorder.encoder_hidden_states.shape[0] == 2  # type: ignore[union-attr]
        meta = {
            "pipeline": type(self.pipe).__name__,
            "scheduler": type(scheduler).__name__,
            "scheduler_config": dict(scheduler.config),
            "prediction_type": prediction_type,
            "seed": self.seed,
            "height": int(previews.shape[1])
            if previews is not None
            else latent_hw[0] * self.pipe.vae_scale_factor,
            "width": int(previews.shape[2])
            if previews is not None
            else latent_hw[1] * self.pipe.vae_scale_factor,
            "negative_prompt": self.negative_prompt,
            "cfg": cfg,
            "preview_source": self.preview_from if previews is not None else None,
            "preview_decoder": preview_decoder,
            "token_indices": self.token_indices,
            "n_text_tokens": self.recorder.n_tokens_total,
            "attention_grids": grids,
            "noise_schedule": {
                "family": self.family,
                "alpha": alpha.ravel().tolist(),
                "sigma": sigma.ravel().tolist(),
                "model_input_scale": scale.ravel().tolist(),
            },
            "timesteps_exact": timesteps_exact.tolist(),
            "unet_dtype": str(self.pipe.unet.dtype).replace("torch.", ""),
            "versions": versions(),
        }
        return Trace(
            prompt=self.prompt if self.prompt is not None else "",
            tokens=strings if strings is not None else [str(i) for i in self.token_indices],
            token_kinds=kinds if kinds is not None else ["word"] * len(self.token_indices),
            timesteps=np.round(timesteps_exact).astype(np.int64),
            latents=latents,
            noise_pred=noise_pred,
            pred_x0=pred_x0,
            final_latent=self.final_latent.float().cpu().numpy(),  # type: ignore[union-attr]
            prompt_embeds=self._prompt_embeds(cfg),
            attention=attention,
            guidance_scale=float(self.guidance_scale or 1.0),
            previews=previews,
            image=image,
            extra={k: v.float().cpu().numpy() for k, v in self.added_cond.items()},
            meta=json_safe(meta),
        )

    def _sigma_index(self, step: int) -> int | None:
        # The scheduler's step_index was incremented by the step it just made.
        index = self.step_indices[step]
        return None if index is None else index - 1

    def _prompt_embeds(self, cfg: bool) -> np.ndarray:
        embeds = self.recorder.encoder_hidden_states
        assert embeds is not None
        if not cfg:
            # Without CFG the UNet never saw an unconditional embedding: encode one so the
            # record keeps its ("uncond", "cond") layout for replays that want CFG.
            embeds = torch.cat([self._encode_uncond().to(embeds), embeds])
        return embeds.float().cpu().numpy()

    @torch.no_grad()
    def _encode_uncond(self) -> torch.Tensor:
        pipe = self.pipe
        kwargs = {
            "prompt": self.prompt or "",
            "device": pipe.unet.device,
            "num_images_per_prompt": 1,
            "do_classifier_free_guidance": True,
            "negative_prompt": self.negative_prompt,
        }
        encoded = pipe.encode_prompt(**kwargs)
        return encoded[1]


def _prompt_half(output: torch.Tensor) -> torch.Tensor:
    """The prompt's noise prediction: CFG batches hold (uncond, cond); without CFG, the one."""
    return output[-1].clone()


#: diffusers' own default for Stable Diffusion pipelines.
DEFAULT_GUIDANCE_SCALE = 7.5


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
    preview_decoder: PreviewDecoder = "auto",
    **pipeline_kwargs: Any,
) -> Trace:
    """Generate one image with ``pipe`` and record every denoising step.

    Parameters
    ----------
    pipe : StableDiffusionPipeline or StableDiffusionXLPipeline
        Any checkpoint; its processors and scheduler are left as they were.
    prompt : str
        One prompt (lists are refused: trace prompts one by one).
    num_inference_steps, height, width, negative_prompt
        As for the pipeline.
    guidance_scale : float, optional
        CFG scale; by default the pipeline's ``recommended_guidance_scale`` when it has one
        (the embedded model does), else diffusers' usual 7.5.
    seed : int
        Seeds a CPU ``torch.Generator``, so a seed gives the same image on any device.
    decode_previews : bool
        Decode the predicted clean latent of every step (``Trace.previews``).
    preview_from : {"guided", "cond"}
        Decode the previews from the guided noise prediction (default) or from the
        conditional CFG half alone (see :class:`TraceContext`).
    preview_decoder : {"auto", "vae", "tiny"}, folder or module
        What decodes the previews (see :class:`TraceContext`).
    memory_budget_mb : float
        Refuse before running when the trace would store more than this.
    tokens : "default", "all" or list of int
        Token positions kept in the attention maps.
    **pipeline_kwargs
        Passed to the pipeline (``callback_on_step_end`` is chained, not replaced).

    Returns
    -------
    Trace

    Examples
    --------
    >>> from diffwidget.tracing.tiny import tiny_sd_pipeline
    >>> t = trace(tiny_sd_pipeline(), "a red circle", num_inference_steps=4)
    >>> t.n_steps, t.tokens[:4]
    (4, ['<|startoftext|>', 'a', 'red', 'circle'])
    """
    if guidance_scale is None:
        guidance_scale = float(getattr(pipe, "recommended_guidance_scale", DEFAULT_GUIDANCE_SCALE))
    if not isinstance(prompt, str):
        raise TypeError(
            f"trace() takes one prompt (a str), got {type(prompt).__name__}; call it once per "
            "prompt"
        )
    if pipeline_kwargs.get("num_images_per_prompt", 1) != 1:
        raise ValueError("trace() makes one image; drop num_images_per_prompt (or set it to 1)")
    reserved = [k for k in _RESERVED if k in pipeline_kwargs]
    if reserved:
        raise ValueError(
            f"trace() sets {reserved} itself; pass seed= instead of a generator and the prompt "
            "as text"
        )
    ctx = TraceContext(
        pipe,
        prompt=prompt,
        negative_prompt=negative_prompt,
        tokens=tokens,
        decode_previews=decode_previews,
        preview_from=preview_from,
        memory_budget_mb=memory_budget_mb,
        seed=seed,
        preview_decoder=preview_decoder,
    )
    default_size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height, width = height or default_size, width or default_size
    ctx.check_budget(num_inference_steps, height, width)
    callbacks = ctx.pipeline_kwargs(
        pipeline_kwargs.pop("callback_on_step_end", None),
        pipeline_kwargs.pop("callback_on_step_end_tensor_inputs", ("latents",)),
    )
    generator = torch.Generator("cpu").manual_seed(seed)
    with ctx:
        output = pipe(
            prompt,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            negative_prompt=negative_prompt,
            generator=generator,
            output_type="np",
            **callbacks,
            **pipeline_kwargs,
        )
    return ctx.result(image=output.images[0])
