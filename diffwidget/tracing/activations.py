"""Pooled denoiser block activations for a batch of prompts, at every denoising step.

Concept probes (:mod:`diffwidget.explain.probes`) need, for many prompts, a small feature
vector per block and step. Storing raw activations would cost gigabytes, so each block
output is pooled as it is produced (spatial mean, or a small adaptive-average grid that
keeps coarse position) and only the pooled vectors of the chosen CFG halves are kept: by
default the *conditional* (prompt) half; optionally also the unconditional half, which never
sees the prompt and so tells what has already reached the latent.

The pipeline runs unchanged (its own scheduler, its own CFG); it is observed by a
:class:`~diffwidget.tracing.context.TraceContext` in ``record="taps"`` mode through one
:class:`~diffwidget.tracing.hooks.PooledBlockTap` per block and a loop tap for the
timesteps and x̂0, all removed when recording ends, also when the pipeline raises.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import numpy as np

from diffwidget.records import JsonValue
from diffwidget.tracing.activation_record import HALVES, POOLINGS, ActivationRecord, Half, Pooling
from diffwidget.tracing.cfg import CfgLayout
from diffwidget.tracing.decode import decode_latents, to_uint8
from diffwidget.tracing.families.base import DenoiserCall, DenoiserFamily, LatentLayout
from diffwidget.tracing.model_hooks import resolve_module
from diffwidget.tracing.noise import PREDICTION_SOURCES, PredictionSource
from diffwidget.tracing.taps import StepEvent, Tap

if TYPE_CHECKING:
    import torch

    from diffwidget.tracing.hooks import PooledBlockTap

StoreDtype = Literal["float16", "float32"]
STORE_DTYPES: tuple[str, ...] = get_args(StoreDtype)

#: Side of the adaptive-average grid for ``pooling="grid"``: 2x2 cells keep left/right and
#: top/bottom apart while multiplying the feature count by only four.
DEFAULT_GRID_SIZE = 2
DEFAULT_BATCH_SIZE = 8
#: Predicted clean latents decoded per VAE call (bounds the decoder's peak memory).
DECODE_CHUNK = 32
#: Pipeline arguments the recorder sets itself.
_RESERVED_KWARGS = frozenset(
    {"callback_on_step_end", "generator", "num_images_per_prompt", "output_type"}
)


def default_blocks(pipe: Any) -> list[str]:
    """Blocks recorded when none are chosen: the family's early, middle and late blocks.

    For UNets a middle down block, the mid block and a middle up block: the coarsest, most
    semantic resolution and one resolution on each side of it, where concept information is
    expected to appear first; for transformers the blocks at 1/4, 1/2 and 3/4 depth.
    """
    from diffwidget.tracing.families import denoiser_family

    return denoiser_family(pipe).probe_blocks()


class _Prediction(Tap):
    """Loop tap: each step's timestep and, for x̂0, ``x_t`` and the model output used.

    ``source`` ``"guided"`` keeps the output the scheduler stepped with; ``"cond"`` the
    conditional half of the step's denoiser calls.
    """

    def __init__(self, layout: LatentLayout, source: PredictionSource | None) -> None:
        super().__init__("activations.prediction")
        self.layout = layout
        self.source = source
        self.timesteps: list[float] = []
        self.sigma_indices: list[int | None] = []
        self.latents: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self._cond: torch.Tensor | None = None

    def on_output(self, call: DenoiserCall, output: torch.Tensor) -> None:
        loop = self.loop
        if self.source == "cond" and loop is not None:
            rows = loop.cfg.rows("cond", output, call.label)
            if rows is not None:
                self._cond = loop.family.from_model_output(rows.detach(), self.layout)

    def on_step(self, event: StepEvent) -> None:
        import torch

        assert self.loop is not None
        family = self.loop.family
        self.timesteps.append(float(torch.as_tensor(event.timestep).double()))
        self.sigma_indices.append(event.sigma_index)
        if self.source is None:
            return
        self.latents.append(family.to_latents(event.sample.detach(), self.layout).float())
        guided = family.to_latents(event.model_output.detach(), self.layout)
        output = guided if self.source == "guided" else self._cond
        assert output is not None
        self.outputs.append(output.float())

    def x0(self, scheduler: Any) -> torch.Tensor:
        """x̂0 of every recorded step, ``[n_steps * B, C, h, w]`` step-major.

        Uses the same coefficients as :class:`~diffwidget.tracing.context.TraceContext`
        (:mod:`diffwidget.tracing.noise`), read from the scheduler's tables, never stepping it.
        """
        import torch

        from diffwidget.tracing.noise import (
            predict_x0,
            prediction_type,
            scheduler_family,
            step_coefficients,
        )

        noise, kind = scheduler_family(scheduler), prediction_type(scheduler)
        steps = zip(self.timesteps, self.sigma_indices, self.latents, self.outputs, strict=True)
        x0: list[torch.Tensor] = []
        for t, index, x_t, output in steps:
            c = step_coefficients(scheduler, noise, t, index)
            # predict_x0 is array-generic: it works on tensors unchanged.
            x = predict_x0(cast(Any, x_t), cast(Any, output), c.alpha, c.sigma, c.input_scale, kind)
            x0.append(cast("torch.Tensor", x))
        return torch.cat(x0)


@dataclass
class _Plan:
    """What every prompt batch of one recording shares."""

    family: DenoiserFamily
    blocks: list[str]
    cfg: CfgLayout
    layout: LatentLayout
    call: dict[str, object]
    store: Any
    n_steps: int
    out: dict[Half, dict[str, np.ndarray]] = field(default_factory=dict)
    timesteps: np.ndarray | None = None
    images: np.ndarray | None = None
    x0_images: np.ndarray | None = None


#: One batch's results: half -> block -> [B, n_steps, F], timesteps, uint8 images
#: [B, H, W, 3] and the decoded x̂0 [B, n_steps, H, W, 3] (or None).
_Batch = tuple[dict[Half, dict[str, np.ndarray]], np.ndarray, np.ndarray, np.ndarray | None]


@contextmanager
def _quiet_pipeline(pipe: Any) -> Iterator[None]:
    """The pipeline's own progress bar off inside the block, its configuration put back."""
    previous = getattr(pipe, "_progress_bar_config", None)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        if previous is not None:
            pipe._progress_bar_config = previous
        elif hasattr(pipe, "_progress_bar_config"):
            del pipe._progress_bar_config


class ActivationRecorder:
    """Record pooled block activations at every step for a batch of prompts.

    Parameters
    ----------
    blocks : sequence of str, optional
        Diffusers module paths of the blocks to record; default :func:`default_blocks`.
    pooling : {"mean", "grid"}
        ``"mean"``: spatial mean (one value per channel). ``"grid"``: adaptive average
        pooling to ``grid_size x grid_size`` cells, which keeps coarse position.
    grid_size : int
        Side of the pooling grid for ``pooling="grid"``.
    halves : sequence of {"cond", "uncond"}
        CFG halves to keep. ``"cond"`` (default) is the prompt's half; ``"uncond"`` never
        sees the prompt, so what it carries about the prompt must have come through the
        latent. Without CFG only ``"cond"`` exists.
    dtype : {"float16", "float32"}
        Storage dtype of the pooled activations; float16 halves memory.
    batch_size : int
        Prompts generated together in one pipeline call.
    decode_x0 : bool
        Also decode the predicted clean image x̂0 at every step (one VAE decode per prompt
        and step). x̂0 is computed from the model output and ``x_t`` the scheduler stepped
        with, with the scheduler's tables (:mod:`diffwidget.tracing.noise`, as in a
        :class:`~diffwidget.tracing.trace.Trace`); the scheduler itself is never called.
    x0_from : {"guided", "cond"}
        Model output that x̂0 is computed from: the guided one the sampler uses
        (default), or the conditional half alone. Early in sampling, CFG's extrapolation
        can give x̂0 colours that the final image does not have; ``"cond"`` shows what the
        model itself predicts.
    progress : bool
        Show a ``tqdm`` progress bar over prompts x steps.

    Examples
    --------
    >>> import diffwidget
    >>> pipe = diffwidget.load_demo_pipeline()  # doctest: +SKIP
    >>> record = ActivationRecorder(pooling="grid").record(
    ...     pipe, ["a large red circle on the left", "a small blue square at the top"]
    ... )  # doctest: +SKIP
    >>> record.activations["mid_block"].shape  # doctest: +SKIP
    (2, 20, 512)
    """

    def __init__(
        self,
        blocks: Sequence[str] | None = None,
        *,
        pooling: Pooling = "mean",
        grid_size: int = DEFAULT_GRID_SIZE,
        halves: Sequence[Half] = ("cond",),
        dtype: StoreDtype = "float16",
        batch_size: int = DEFAULT_BATCH_SIZE,
        decode_x0: bool = False,
        x0_from: PredictionSource = "guided",
        progress: bool = True,
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; use one of {POOLINGS}")
        if dtype not in STORE_DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {STORE_DTYPES}")
        bad = [h for h in halves if h not in HALVES]
        if bad or not halves or len(set(halves)) != len(halves):
            raise ValueError(f"halves must be distinct values from {HALVES}, got {list(halves)}")
        if x0_from not in PREDICTION_SOURCES:
            raise ValueError(f"unknown x0_from {x0_from!r}; use one of {PREDICTION_SOURCES}")
        if grid_size < 1 or batch_size < 1:
            raise ValueError("grid_size and batch_size must be at least 1")
        self.blocks = list(blocks) if blocks is not None else None
        self.pooling: Pooling = pooling
        self.grid_size = grid_size if pooling == "grid" else 1
        self.halves: list[Half] = list(halves)
        self.dtype: StoreDtype = dtype
        self.batch_size = batch_size
        self.decode_x0 = decode_x0
        self.x0_from: PredictionSource = x0_from
        self.progress = progress

    def record(
        self,
        pipe: Any,
        prompts: Sequence[str],
        *,
        seeds: Sequence[int] | None = None,
        seed: int = 0,
        num_inference_steps: int = 20,
        guidance_scale: float = 7.5,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        **pipeline_kwargs: Any,
    ) -> ActivationRecord:
        """Run ``pipe`` on ``prompts`` (one image each) and return the pooled activations.

        Parameters
        ----------
        pipe : diffusers pipeline
            A pipeline of a supported family (:mod:`diffwidget.tracing.families`).
        prompts : sequence of str
            One image is generated per prompt.
        seeds : sequence of int, optional
            One generator seed per prompt; default ``seed + index``. A prompt gives the
            same image as a single-prompt run with that seed.
        seed : int
            First seed when ``seeds`` is not given.
        num_inference_steps, guidance_scale, negative_prompt, height, width
            Passed to the pipeline.
        **pipeline_kwargs
            Further pipeline arguments (not ``callback_on_step_end``, ``generator``,
            ``num_images_per_prompt`` or ``output_type``, which the recorder sets).

        Returns
        -------
        ActivationRecord
        """
        from tqdm.auto import tqdm

        prompts = list(prompts)
        seeds = _check_request(prompts, seeds, seed, pipeline_kwargs)
        call = {"num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale}
        plan = self._plan(
            pipe, negative_prompt, {**call, "height": height, "width": width}, pipeline_kwargs
        )
        n = len(prompts)
        progress = {"disable": not self.progress, "desc": "recording activations", "unit": "step"}
        with _quiet_pipeline(pipe), tqdm(total=n * num_inference_steps, **progress) as bar:
            for start in range(0, n, self.batch_size):
                batch = prompts[start : start + self.batch_size]
                rows = slice(start, start + len(batch))
                if negative_prompt is not None:
                    plan.call["negative_prompt"] = [negative_prompt] * len(batch)
                self._store(plan, self._run_batch(pipe, plan, batch, seeds[rows], bar), rows, n)
        return self._result(pipe, plan, prompts, seeds, negative_prompt)

    def _plan(
        self,
        pipe: Any,
        negative_prompt: str | None,
        call: Mapping[str, Any],
        pipeline_kwargs: Mapping[str, object],
    ) -> _Plan:
        """Check the blocks and the CFG halves before anything is generated."""
        import torch

        from diffwidget.tracing.families import denoiser_family

        family = denoiser_family(pipe)
        blocks = self.blocks if self.blocks is not None else family.probe_blocks()
        for path in blocks:
            resolve_module(family.denoiser, path)  # fail before generating anything
        cfg = family.cfg_layout(
            call["guidance_scale"], {"negative_prompt": negative_prompt, **pipeline_kwargs}
        )
        if not cfg.guided and "uncond" in self.halves:
            raise ValueError(
                "without classifier-free guidance (guidance_scale <= 1) there is no "
                "unconditional half; record halves=['cond'] or raise guidance_scale"
            )
        size = family.default_image_size()
        call = {**call, "output_type": "np", **pipeline_kwargs}
        store = torch.float16 if self.dtype == "float16" else torch.float32
        layout = family.layout_for(call["height"] or size, call["width"] or size)
        return _Plan(family, list(blocks), cfg, layout, call, store, call["num_inference_steps"])

    def _run_batch(
        self, pipe: Any, plan: _Plan, batch: list[str], seeds: list[int], bar: Any
    ) -> _Batch:
        """One pipeline call observed by the taps.

        Returns half -> block -> [B, n_steps, F], timesteps, uint8 images [B, H, W, 3] and
        the decoded x̂0 [B, n_steps, H, W, 3] (or None).
        """
        import torch

        from diffwidget.tracing.context import TraceContext
        from diffwidget.tracing.hooks import PooledBlockTap

        def on_step_end(
            _pipe: Any, _step: int, _timestep: Any, callback_kwargs: dict[str, Any]
        ) -> dict[str, Any]:
            bar.update(len(batch))
            return callback_kwargs

        pooled = [
            PooledBlockTap(
                p,
                plan.layout,
                self.halves,
                pooling=self.pooling,
                grid_size=self.grid_size,
                dtype=plan.store,
            )
            for p in plan.blocks
        ]
        prediction = _Prediction(plan.layout, self.x0_from if self.decode_x0 else None)
        ctx = TraceContext(
            pipe,
            record="taps",
            taps=[*pooled, prediction],
            guidance_scale=plan.cfg.guidance_scale,
            call_kwargs={k: v for k, v in plan.call.items() if k != "guidance_scale"},
        )
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        with ctx:
            result = pipe(
                prompt=batch, generator=generators, callback_on_step_end=on_step_end, **plan.call
            )
        acts = {
            h: {tap.path: _per_step(tap, h, ctx.loop.n_calls) for tap in pooled}
            for h in self.halves
        }
        timesteps = np.round(np.asarray(prediction.timesteps, dtype=np.float64))
        images = to_uint8(np.asarray(result.images))
        decoded = None
        if self.decode_x0:
            flat = decode_latents(pipe, prediction.x0(pipe.scheduler), batch=DECODE_CHUNK)
            # step-major [n_steps * B, H, W, 3] -> [B, n_steps, H, W, 3]
            decoded = flat.reshape(len(timesteps), len(batch), *flat.shape[1:]).swapaxes(0, 1)
        return acts, timesteps, images, decoded

    def _store(self, plan: _Plan, batch: _Batch, rows: slice, n: int) -> None:
        """Copy one batch's results into the record's arrays (allocated on first use)."""
        acts, timesteps, images, decoded = batch
        if plan.timesteps is None:
            plan.timesteps = timesteps
            plan.images = np.empty((n, *images.shape[1:]), dtype=np.uint8)
            if decoded is not None:
                plan.x0_images = np.empty((n, *decoded.shape[1:]), dtype=np.uint8)
        elif not np.array_equal(timesteps, plan.timesteps):
            raise RuntimeError("timesteps differ between prompt batches; fix the scheduler")
        assert plan.images is not None
        plan.images[rows] = images
        if plan.x0_images is not None and decoded is not None:
            plan.x0_images[rows] = decoded
        for half, per_block in acts.items():
            out = plan.out.setdefault(half, {})
            for path, values in per_block.items():
                if path not in out:
                    out[path] = np.empty((n, *values.shape[1:]), dtype=self.dtype)
                out[path][rows] = values

    def _result(
        self,
        pipe: Any,
        plan: _Plan,
        prompts: list[str],
        seeds: list[int],
        negative_prompt: str | None,
    ) -> ActivationRecord:
        assert plan.timesteps is not None
        assert plan.images is not None
        meta: dict[str, JsonValue] = {
            "pipeline": type(pipe).__name__,
            "scheduler": type(pipe.scheduler).__name__,
            "num_inference_steps": plan.n_steps,
            "guidance_scale": cast(float, plan.call["guidance_scale"]),
            "cfg": plan.cfg.guided,
            "family": plan.family.name,
            "halves": self.halves,
            "negative_prompt": negative_prompt,
            "dtype": self.dtype,
            "height": int(plan.images.shape[1]),
            "width": int(plan.images.shape[2]),
        }
        return ActivationRecord(
            prompts=prompts,
            seeds=[int(s) for s in seeds],
            timesteps=plan.timesteps.astype(np.int64),
            activations=plan.out.get("cond", {}),
            uncond_activations=plan.out.get("uncond", {}),
            pooling=self.pooling,
            grid_size=self.grid_size,
            images=plan.images,
            x0_images=plan.x0_images,
            meta=meta,
        )


def _check_request(
    prompts: list[str],
    seeds: Sequence[int] | None,
    seed: int,
    pipeline_kwargs: Mapping[str, object],
) -> list[int]:
    """The seeds, one per prompt; clear errors for an empty or clashing request."""
    if not prompts:
        raise ValueError("pass at least one prompt")
    chosen = [seed + i for i in range(len(prompts))] if seeds is None else list(seeds)
    if len(chosen) != len(prompts):
        raise ValueError(f"{len(chosen)} seeds for {len(prompts)} prompts; pass one per prompt")
    clash = _RESERVED_KWARGS & set(pipeline_kwargs)
    if clash:
        raise ValueError(f"the recorder sets {sorted(clash)} itself; leave them out")
    return chosen


def _per_step(tap: PooledBlockTap, half: Half, n_calls: int) -> np.ndarray:
    """A pooled tap's ``half`` as ``[B, n_steps, F]`` (the step's calls merged).

    Raises
    ------
    RuntimeError
        When the block ran a different number of times than the denoiser.
    """
    import torch

    if len(tap.values) != n_calls:
        raise RuntimeError(
            "blocks were called a different number of times than the denoiser; "
            "record top-level blocks that run once per denoiser call"
        )
    per_step: dict[int, torch.Tensor] = {}
    for step, pooled in tap.values:
        if half in pooled:
            per_step[step] = pooled[half]
    stacked = torch.stack([per_step[s] for s in sorted(per_step)])  # [n_steps, B, F]
    return stacked.transpose(0, 1).numpy()
