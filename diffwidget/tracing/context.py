"""Trace one text-to-image generation: install taps, record every step, restore.

:class:`TraceContext` is diffwidget's one observer of a pipeline's denoising loop. It holds
one :class:`~diffwidget.tracing.taps.TapRegistry` of named taps
(:mod:`diffwidget.tracing.taps`), and a trace installs three, for every denoiser family
(:mod:`diffwidget.tracing.families`):

* ``attention``: the text→image attention processors, wrapped (see
  :mod:`diffwidget.tracing.attention`), give the image→text probabilities;
* ``denoiser``: a diffusers ``ModelHook`` on the denoiser (:mod:`diffwidget.tracing.calls`)
  sees each call's exact arguments (for stateless replay) and its output (for the CFG check
  and conditional previews), and the ``cache_context`` of Flux's separate CFG calls;
* ``scheduler.step``: the only place that receives the guided model output, the timestep
  and ``x_t`` together, wrapped on the scheduler instance;
* ``vae.decode`` (with previews on): the pipeline's own decode of the final latent, which
  the per-step previews' latent→RGB map is fitted on (:mod:`diffwidget.tracing.preview_tap`).

Nothing the trace does after the loop can lose the recorded steps: a decode or a fit that
fails leaves the trace without its previews or image, and ``Trace.facts.missing`` says why.

A user adds taps (``taps=[...]``: block outputs, pooled block outputs, loop events) and
lists them (``ctx.taps.names()``); ``record="taps"`` observes batches of prompts through
the taps alone (concept probes). Every tap is removed in ``finally``, also when the
pipeline raises.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Literal, cast, get_args

import numpy as np
import torch

from diffwidget.tracing.attention import AttentionCapture, AttentionRecorder
from diffwidget.tracing.budget import DEFAULT_MEMORY_BUDGET_MB, check_budget
from diffwidget.tracing.calls import AttentionTap, CallTap, StepTap
from diffwidget.tracing.cfg import CFG_HALVES, CfgLayout
from diffwidget.tracing.decode import PreviewDecoder, to_uint8
from diffwidget.tracing.facts import (
    TEXT_ARGUMENT,
    CfgFacts,
    ConditioningEntry,
    FamilyName,
    LatentLayoutFacts,
    NoiseSchedule,
    TextCut,
    TimestepDtype,
    TraceFacts,
    TraceIncompleteWarning,
)
from diffwidget.tracing.families import DenoiserCall, denoiser_family
from diffwidget.tracing.lock import DEFAULT_WAIT_S, pipeline_lock, trace_task
from diffwidget.tracing.noise import (
    PREDICTION_SOURCES,
    PredictionSource,
    predict_x0,
    prediction_type,
    scheduler_family,
)
from diffwidget.tracing.pipeline_info import json_safe, versions
from diffwidget.tracing.preview_tap import PreviewOutcome, PreviewTap
from diffwidget.tracing.recording import StepRecords, conditioning_record
from diffwidget.tracing.taps import LoopState, StepEvent, Tap, TapRegistry
from diffwidget.tracing.tokens import PromptTokens, PromptTruncatedWarning, TokenSelection
from diffwidget.tracing.trace import Trace
from diffwidget.tracing.trace_budget import TraceBudget

#: Relative tolerance of the step-0 check that the pipeline combined the CFG halves as
#: ``u + w (c - u)`` (float16 models recombine in float16).
CFG_CHECK_RTOL = 1e-2
#: ``"trace"`` records a :class:`Trace` of one image; ``"taps"`` observes through the taps
#: alone (any batch, no attention capture, no :meth:`TraceContext.result`).
RecordMode = Literal["trace", "taps"]
RECORD_MODES: tuple[str, ...] = get_args(RecordMode)


class TraceContext(TraceBudget):
    """Record every denoising step of one pipeline call made inside the ``with`` block.

    Parameters
    ----------
    pipe : diffusers pipeline
        Stable Diffusion 1.x/2.x, SDXL, SD3/SD3.5, Flux or PixArt (see
        :data:`diffwidget.tracing.families.SUPPORTED`); its processors, hooks and scheduler
        are restored on exit.
    prompt : str, optional
        The prompt the pipeline will be called with; needed for token strings and for the
        default token selection.
    negative_prompt : str, optional
        Recorded in ``meta``.
    tokens : "default", "all" or list of int
        Token positions kept in the attention maps: ``"default"`` keeps, per text segment,
        every non-padding position and one padding position.
    decode_previews : bool
        Keep an RGB preview of ``pred_x0`` for every step (made after the loop).
    preview_decoder : {"auto", "linear", "vae", "tiny"}, folder or module
        What makes them: ``"auto"`` (default) a tiny ``AutoencoderTiny`` preview decoder
        when one matches the VAE (the embedded model ships one), else ``"linear"``: a
        latent→RGB map fitted on the pipeline's own decode of the final image, one pixel per
        latent cell, no VAE call (:mod:`diffwidget.tracing.latent_rgb`); ``"vae"`` decodes
        every step exactly, one at a time; a "taesd"-style folder for other checkpoints
        (:mod:`diffwidget.tracing.decode`). Recorded as ``facts.preview_decoder`` (and the
        map as ``facts.preview_map``).
    preview_from : {"guided", "cond"}
        Model output the previews are decoded from: the guided one the sampler steps with
        (default), or the conditional CFG half alone. Recorded as ``meta["preview_source"]``;
        ``pred_x0`` is always the guided one.
    memory_budget_mb : float
        Refuse (``MemoryBudgetError``) when all steps together would store more.
    seed : int, optional
        Recorded in ``meta``.
    guidance_scale : float, optional
        The CFG scale ``w`` the pipeline will use (Flux: ``true_cfg_scale``); by default the
        pipeline's ``guidance_scale`` attribute. Checked against the pipeline's own
        combination at step 0.
    call_kwargs : dict, optional
        The other arguments the pipeline will be called with (``max_sequence_length``,
        ``negative_prompt``, ``true_cfg_scale``...), for the text layout and CFG layout.
    attention_heads : bool
        Also keep every head's map (``Trace.attention_heads``; heads times more attention
        memory, counted in the budget).
    taps : sequence of Tap
        More taps to install (:mod:`diffwidget.tracing.taps`), e.g. a
        :class:`~diffwidget.tracing.hooks.BlockTap`; they see every call and step.
    record : {"trace", "taps"}
        ``"trace"`` (default) records a :class:`Trace` of one prompt and one image;
        ``"taps"`` observes the pipeline through the taps alone: any batch of prompts, no
        attention capture, the CFG layout predicted from ``guidance_scale`` and
        ``call_kwargs``, and no :meth:`result`.

    Attributes
    ----------
    taps : TapRegistry
        Every tap this context installs, by name: ``ctx.taps.names()`` lists them,
        ``ctx.taps.table()`` gives their kinds and module paths.
    loop : LoopState
        Where the loop is (step, running call, CFG layout), shared with the taps.

    Examples
    --------
    >>> from diffwidget.testing.tiny import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> with TraceContext(pipe, prompt="a red circle") as ctx:
    ...     out = pipe("a red circle", num_inference_steps=3, output_type="np")
    >>> ctx.result(image=out.images[0]).n_steps
    3
    >>> ctx.taps.names()
    ['denoiser', 'scheduler.step', 'attention', 'vae.decode']
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
        guidance_scale: float | None = None,
        call_kwargs: dict[str, Any] | None = None,
        attention_heads: bool = False,
        preview_decoder: PreviewDecoder = "auto",
        taps: Sequence[Tap] = (),
        record: RecordMode = "trace",
    ) -> None:
        _check_arguments(prompt, tokens, preview_from, decode_previews, record)
        self.pipe = pipe
        self.family = denoiser_family(pipe)
        self.noise_family = scheduler_family(pipe.scheduler)
        self.prediction_type = prediction_type(pipe.scheduler)
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.decode_previews = decode_previews
        self.preview_decoder = preview_decoder
        self.preview_from: PredictionSource = preview_from
        self.memory_budget_mb = memory_budget_mb
        self.seed = seed
        self.call_kwargs = dict(call_kwargs or {})
        self.claimed_guidance = guidance_scale
        self.record: RecordMode = record
        # The family's prediction; it also refuses arguments it cannot trace (SD3's
        # skip-layer guidance). A trace confirms the layout on the calls of step 0.
        w = 1.0 if guidance_scale is None else guidance_scale
        self.loop = LoopState(self.family, self.family.cfg_layout(w, self.call_kwargs))
        self.n_text = self.family.text_length(self.call_kwargs)
        self.prompt_tokens: PromptTokens | None = (
            self.family.prompt_tokens(prompt, self.call_kwargs) if prompt is not None else None
        )
        self.token_indices = self._token_indices(tokens)
        self.recorder = AttentionRecorder(
            None if len(self.token_indices) == self.n_text else self.token_indices,
            keep_heads=bool(attention_heads),
        )
        self.capture = AttentionCapture(
            self.family.denoiser, self.recorder, self.family.attention_sites()
        )
        self.records = StepRecords()
        self.previews = PreviewTap(pipe, preview_decoder)
        self._preview_name: str | None = None
        self._planned_steps = 0
        self._memory_checked = False
        self.taps = self._registry(taps)

    def _token_indices(self, tokens: TokenSelection) -> list[int]:
        if self.prompt_tokens is not None:
            return self.prompt_tokens.select(tokens)
        if tokens == "all" or self.record == "taps":
            return list(range(self.n_text))
        return sorted({int(i) for i in tokens})

    def _registry(self, taps: Sequence[Tap]) -> TapRegistry:
        """The observer's own taps (the call, the step, the attention sites) then ``taps``."""
        registry = TapRegistry(
            [
                CallTap(self._on_call, self._on_output),
                StepTap(self.pipe.scheduler, self._before_step, self._after_step),
            ]
        )
        if self.record == "trace":
            registry.add(AttentionTap(self.capture))
            if self.decode_previews:
                registry.add(self.previews)
        for tap in taps:
            registry.add(tap)
        return registry

    # ------------------------------------------------------------- install/restore
    #: Whether this context holds its pipeline's lock (``diffwidget.tracing.lock``).
    _holds_pipeline = False

    def __enter__(self) -> TraceContext:
        # Nothing else may drive the pipeline while its hooks are ours (an explorer's
        # DF-RISE would be recorded as steps of this trace): wait for it, or refuse.
        pipeline_lock(self.pipe).acquire(trace_task(self.prompt), DEFAULT_WAIT_S)
        self._holds_pipeline = True
        try:
            self.records = StepRecords()
            self.recorder.step = 0
            self.recorder.maps = {}
            self.recorder.head_maps = {}
            self.loop.step, self.loop.call, self.loop.n_calls = 0, None, 0
            self._planned_steps = 0
            self.taps.install(self.loop)
        except BaseException:
            self._close()  # the registry removed its taps; the lock must go too
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._close()

    def _close(self) -> None:
        try:
            self.taps.remove()
        finally:
            if self._holds_pipeline:
                self._holds_pipeline = False
                pipeline_lock(self.pipe).release()

    # --------------------------------------------------------------- recording
    def _on_call(self, call: DenoiserCall) -> None:
        loop = self.loop
        loop.call = call
        loop.n_calls += 1
        if self.record == "trace":
            self._record_call(call)
        self.taps.on_call(call)

    def _record_call(self, call: DenoiserCall) -> None:
        records, recorder = self.records, self.recorder
        if call.sample.shape[0] > len(CFG_HALVES):
            raise RuntimeError(
                f"the denoiser ran on a batch of {call.sample.shape[0]}; trace one prompt and "
                "one image at a time (num_images_per_prompt=1)"
            )
        if records.n_steps == 0 and not records.step_calls:
            # Attention runs inside this first call: tell the recorder where the prompt's
            # rows are before the layout is confirmed at the end of step 0.
            batch = int(call.sample.shape[0])
            self.loop.cfg = CfgLayout.observe([(call.label, batch)], 1.0, complete=False)
            recorder.cfg = self.loop.cfg
        records.add_call(call)
        recorder.label = call.label
        # Separate-call CFG: only the prompt's call feeds the attention maps.
        recorder.active = "cond" in self.loop.cfg.halves_in_call(call.label)
        text = call.conditioning.get(TEXT_ARGUMENT)
        recorder.text_length = int(text.shape[1]) if isinstance(text, torch.Tensor) else None

    def _on_output(self, call: DenoiserCall, output: torch.Tensor) -> None:
        if self.record == "trace":
            self.records.add_output(call, output)
        self.taps.on_output(call, output)

    def _before_step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor) -> None:
        if self.record != "trace":
            return
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
        records = self.records
        step = records.n_steps
        if not records.step_calls:
            raise RuntimeError(
                f"the denoiser was not called before scheduler step {step}; diffwidget traces "
                "the pipeline's own denoising loop"
            )
        if step == 0:
            records.layout = self.family.layout(records.step_calls[0])
        guided = self.family.to_latents(model_output, records.layout)[0]
        if step == 0:
            self._first_step(guided)
        elif len(records.step_calls) != records.cfg.calls_per_step:
            raise RuntimeError(
                f"the denoiser ran {len(records.step_calls)} times in step {step} (expected "
                f"{records.cfg.calls_per_step}); use a scheduler that evaluates the model "
                "once per step (not Heun or KDPM2)"
            )
        first_layer = self.capture.layers[0]
        if len(self.recorder.maps.get(first_layer, ())) != step + 1:
            raise RuntimeError(
                f"no text→image attention was captured at step {step}; the denoiser's "
                "attention processors were bypassed. Trace without custom attention hooks."
            )
        latent = self.family.to_latents(sample, records.layout)[0]
        records.add_step(self.family, timestep, latent, guided)

    def _first_step(self, guided: torch.Tensor) -> None:
        records = self.records
        records.cfg = records.observed_cfg(self.family, guided, self.claimed_guidance, self.pipe)
        self.loop.cfg = self.recorder.cfg = records.cfg
        records.conditioning = conditioning_record(self.family, records.step_calls, records.cfg)
        if self.recorder.n_tokens_total not in (None, self.n_text):
            raise RuntimeError(
                f"the text sequence has {self.recorder.n_tokens_total} positions, but "
                f"{self.n_text} were expected from the pipeline's tokenizers; pass the "
                "pipeline's arguments (e.g. max_sequence_length) as TraceContext(call_kwargs=...)"
            )
        n_steps = self._planned_steps = len(self.pipe.scheduler.timesteps)
        factor = self.family.vae_scale_factor()
        h, w = records.layout.latent_hw
        step_bytes = self._step_bytes(records.layout, (h * factor, w * factor))
        check_budget(step_bytes, n_steps, self.memory_budget_mb, n_tokens=len(self.token_indices))
        if not self._memory_checked:  # a with block: the first moment the size is known
            self.check_memory(n_steps, h * factor, w * factor)

    def _after_step(self, event: StepEvent) -> None:
        if self.record == "trace":
            records = self.records
            prev = self.family.to_latents(event.prev, records.layout)[0]
            records.finish_step(event.sigma_index, prev)
            self.recorder.step = records.n_steps
            if records.n_steps == 1:
                records.check_guidance(self.family, CFG_CHECK_RTOL)
        self.loop.step += 1
        self.taps.on_step(event)

    # ----------------------------------------------------------------- result
    def result(self, image: np.ndarray | None = None, *, failure: str | None = None) -> Trace:
        """Build the :class:`Trace` after the ``with`` block.

        Parameters
        ----------
        image : ndarray, optional
            The pipeline's output image (float in [0, 1] or uint8, ``[H, W, 3]``).
        failure : str, optional
            Why there is no image: the pipeline raised after its loop (e.g. its VAE decode ran
            out of memory). With previews on, the final latent is decoded once more here.

        Raises
        ------
        RuntimeError
            When nothing was recorded, or when a latent or model output became NaN/inf
            (the message names the first such step).

        Warns
        -----
        TraceIncompleteWarning
            When the trace is kept without its previews or image (``facts.missing``).
        """
        if self.record != "trace":
            raise RuntimeError("record='taps' keeps no Trace: read the taps you passed instead")
        records = self.records
        if not records.n_steps:
            raise RuntimeError(
                "nothing was recorded: call the pipeline inside `with TraceContext(pipe) as ctx:`"
            )
        n = records.n_steps
        latents, noise_pred = records.arrays()
        timesteps_exact = torch.stack(records.timesteps).double().cpu().numpy()
        alpha, sigma, scale = records.coefficients(self.pipe.scheduler, self.noise_family)
        kind = self.prediction_type
        pred_x0 = predict_x0(latents, noise_pred, alpha, sigma, scale, kind).astype(np.float32)
        attention, attention_heads, grids = self._attention_arrays(n)
        shown_x0 = pred_x0 if self.decode_previews else None
        if self.preview_from == "cond":
            cond = torch.stack([t.cpu() for t in records.cond_outputs[:n]]).float().numpy()
            shown_x0 = predict_x0(latents, cond, alpha, sigma, scale, kind).astype(np.float32)
        final_latent = records.final_latent.float().cpu().numpy()  # type: ignore[union-attr]
        made = self.previews.outcome(shown_x0, final_latent, records.layout, image_failed=failure)
        if image is None:
            image = made.image
        if image is not None and image.dtype != np.uint8:
            image = to_uint8(image)
        tokens, keep = self.prompt_tokens, self.token_indices
        conditioning = records.conditioning
        assert conditioning is not None
        schedule = NoiseSchedule(
            self.noise_family,
            alpha.ravel().tolist(),
            sigma.ravel().tolist(),
            scale.ravel().tolist(),
        )
        facts = self._facts(schedule, timesteps_exact.tolist(), grids, made)
        return Trace(
            prompt=self.prompt if self.prompt is not None else "",
            tokens=[tokens.strings[i] for i in keep] if tokens else [str(i) for i in keep],
            token_kinds=[tokens.kinds[i] for i in keep] if tokens else ["word"] * len(keep),
            timesteps=np.round(timesteps_exact).astype(np.int64),
            latents=latents,
            noise_pred=noise_pred,
            pred_x0=pred_x0,
            final_latent=final_latent,
            prompt_embeds=conditioning.prompt_embeds,
            attention=attention,
            attention_heads=attention_heads,
            guidance_scale=records.cfg.guidance_scale,
            previews=made.previews,
            image=image,
            extra=conditioning.extra,
            facts=facts,
        )

    def _attention_arrays(
        self, n: int
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, tuple[int, int]]]:
        """Each layer's maps on its own grid (mean over heads, and per head), and the grids."""
        layout = self.records.layout
        attention, grids = {}, {}
        for layer in self.capture.layers:
            maps = torch.stack(self.recorder.maps[layer][:n]).cpu().numpy()
            grid = self.family.site_grid(layer, maps.shape[1], layout)
            attention[layer] = maps.reshape(n, *grid, maps.shape[-1])
            grids[layer] = (int(grid[0]), int(grid[1]))
        heads = {}
        for layer, per_step in self.recorder.head_maps.items():
            maps = torch.stack(per_step[:n]).cpu().numpy()
            heads[layer] = maps.reshape(n, maps.shape[1], *grids[layer], maps.shape[-1])
        return attention, heads, grids

    def _facts(
        self,
        schedule: NoiseSchedule,
        timesteps_exact: list[float],
        grids: dict[str, tuple[int, int]],
        made: PreviewOutcome,
    ) -> TraceFacts:
        """The trace's facts (:class:`~diffwidget.tracing.facts.TraceFacts`)."""
        records, tokens, keep = self.records, self.prompt_tokens, self.token_indices
        scheduler, layout = self.pipe.scheduler, records.layout
        factor = self.family.vae_scale_factor()
        height, width = layout.latent_hw[0] * factor, layout.latent_hw[1] * factor
        assert records.conditioning is not None
        if made.missing:
            # Warned here, when the trace is made: the steps are kept, a part is not.
            warnings.warn(
                TraceFacts(missing=made.missing).missing_note()
                + f" The {records.n_steps} recorded steps are complete.",
                TraceIncompleteWarning,
                stacklevel=4,  # _facts < result < the caller of result (trace())
            )
        return TraceFacts(
            family=cast(FamilyName, self.family.name),
            pipeline=type(self.pipe).__name__,
            denoiser=type(self.family.denoiser).__name__,
            scheduler=type(scheduler).__name__,
            scheduler_config=json_safe(dict(scheduler.config)),
            prediction_type=self.prediction_type,
            seed=self.seed,
            height=int(height),
            width=int(width),
            negative_prompt=self.negative_prompt,
            cfg_layout=CfgFacts(records.cfg.kind, list(records.cfg.halves)),
            preview_source=self.preview_from if made.previews is not None else None,
            preview_decoder=made.decoder,
            preview_map=made.preview_map,
            token_indices=list(keep),
            token_segments=[tokens.segments[i] for i in keep] if tokens else None,
            token_words=[tokens.words[i] for i in keep] if tokens else None,
            n_text_tokens=self.recorder.n_tokens_total,
            text_cut=_text_cut(tokens),
            attention_grids=grids,
            attention_normalisation=self.family.normalisation,
            latent_layout=LatentLayoutFacts(
                (int(layout.latent_hw[0]), int(layout.latent_hw[1])), int(layout.patch)
            ),
            conditioning=[ConditioningEntry.from_json(e) for e in records.conditioning.layout],
            model_timesteps=list(records.model_timesteps),
            model_timestep_dtype=cast(TimestepDtype, records.model_timestep_dtype),
            noise_schedule=schedule,
            timesteps_exact=timesteps_exact,
            unet_dtype=str(self.family.denoiser.dtype).replace("torch.", ""),
            versions=versions(),
            missing=made.missing,
        )


def _text_cut(tokens: PromptTokens | None) -> list[TextCut]:
    """The prompt's words each text encoder cut, warned about once per trace."""
    if tokens is None or not tokens.dropped:
        return []
    cuts = [
        TextCut(segment, tokens.segments.count(segment), words)
        for segment, words in tokens.dropped.items()
    ]
    # Warned here, when the trace is made, so that one traced prompt warns once.
    warnings.warn(
        TraceFacts(text_cut=cuts).cut_note()
        + " Shorten the prompt, or read the trace knowing those words had no effect there.",
        PromptTruncatedWarning,
        stacklevel=4,  # _text_cut < _facts < result < the caller of result (trace())
    )
    return cuts


def _check_arguments(
    prompt: str | None,
    tokens: TokenSelection,
    preview_from: str,
    decode_previews: bool,
    record: str,
) -> None:
    """Refuse, with the fix, arguments a :class:`TraceContext` cannot work with."""
    if record not in RECORD_MODES:
        raise ValueError(f"unknown record {record!r}; use one of {RECORD_MODES}")
    if preview_from not in PREDICTION_SOURCES:
        raise ValueError(f"unknown preview_from {preview_from!r}; use one of {PREDICTION_SOURCES}")
    if preview_from == "cond" and not decode_previews:
        raise ValueError("preview_from='cond' needs decode_previews=True")
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(
            f"trace one prompt at a time (a str), got {type(prompt).__name__}; loop over "
            "prompts and make one trace each"
        )
    if prompt is None and tokens == "default" and record == "trace":
        raise ValueError(
            "tokens='default' needs the prompt to find its words: pass prompt=..., or "
            "tokens='all' / a list of token positions"
        )


__all__ = ["RECORD_MODES", "RecordMode", "TraceContext"]
