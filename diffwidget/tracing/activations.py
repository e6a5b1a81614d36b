"""Pooled UNet block activations for a batch of prompts, at every denoising step.

Concept probes (:mod:`diffwidget.explain.probes`) need, for many prompts, a small feature
vector per UNet block and step. Storing raw activations would cost gigabytes, so each block
output is pooled inside the forward hook (spatial mean, or a small adaptive-average grid that
keeps coarse position) and only the pooled vectors of the chosen CFG halves are kept: by
default the *conditional* (prompt) half; optionally also the unconditional half, which never
sees the prompt and so tells what has already reached the latent.

The pipeline runs unchanged (its own scheduler, its own CFG); we only observe it through
forward hooks that are removed when recording ends, also when the pipeline raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import numpy as np

from diffwidget.records import JsonValue
from diffwidget.tracing.activation_record import HALVES, POOLINGS, ActivationRecord, Half, Pooling
from diffwidget.tracing.cfg import CfgLayout
from diffwidget.tracing.decode import decode_latents, to_uint8
from diffwidget.tracing.families.base import DenoiserFamily, LatentLayout
from diffwidget.tracing.noise import PREDICTION_SOURCES, PredictionSource

if TYPE_CHECKING:
    import torch
    from torch import nn

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


def _pooler(
    pooling: Pooling,
    grid_size: int,
    halves: Sequence[Half],
    cfg: CfgLayout,
    dtype: torch.dtype,
    to_map: Callable[[torch.Tensor], torch.Tensor],
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Reduce a block output to [len(halves), prompts, features] on the CPU.

    ``to_map`` lays a block's activation out as ``[batch, C, h, w]`` (the family's
    ``spatial``: transformer tokens on their patch grid).
    """
    import torch
    import torch.nn.functional as F

    def pool(tensor: torch.Tensor) -> torch.Tensor:
        if pooling == "mean":
            return tensor.float().mean(dim=(2, 3))
        return F.adaptive_avg_pool2d(tensor.float(), grid_size).flatten(1)

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        feature_map = to_map(tensor)
        uncond, cond = cfg.split(feature_map)
        parts = {"cond": cond} if uncond is None else {"uncond": uncond, "cond": cond}
        return torch.stack([pool(parts[h]) for h in halves]).to(device="cpu", dtype=dtype)

    return reduce


@contextmanager
def _denoiser_inputs(family: DenoiserFamily) -> Iterator[list[tuple[torch.Tensor, Any]]]:
    """Record ``(sample, timestep)`` of every denoiser call; the hook is removed on exit."""
    calls: list[tuple[torch.Tensor, Any]] = []

    def pre_hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        call = family.parse_call(args, kwargs)
        calls.append((call.sample.detach(), call))

    handle = family.denoiser.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


class ActivationRecorder:
    """Record pooled UNet block activations at every step for a batch of prompts.

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
        and step). x̂0 is computed from the guided noise prediction and the UNet input with
        the scheduler's tables (:mod:`diffwidget.tracing.noise`, as in a
        :class:`~diffwidget.tracing.trace.Trace`); the scheduler itself is never called.
    x0_from : {"guided", "cond"}
        Noise prediction that x̂0 is computed from: the guided one the sampler uses
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
            A Stable Diffusion-style pipeline with a ``unet`` and ``callback_on_step_end``.
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
        import torch
        from tqdm.auto import tqdm

        from diffwidget.tracing.hooks import resolve_module

        prompts = list(prompts)
        if not prompts:
            raise ValueError("pass at least one prompt")
        seeds = [seed + i for i in range(len(prompts))] if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts; pass one per prompt")
        clash = _RESERVED_KWARGS & set(pipeline_kwargs)
        if clash:
            raise ValueError(f"the recorder sets {sorted(clash)} itself; leave them out")
        from diffwidget.tracing.families import denoiser_family

        family = denoiser_family(pipe)
        unet = family.denoiser
        blocks = self.blocks if self.blocks is not None else family.probe_blocks()
        for path in blocks:
            resolve_module(unet, path)  # fail before generating anything
        cfg = family.cfg_layout(
            guidance_scale, {"negative_prompt": negative_prompt, **pipeline_kwargs}
        )
        if getattr(unet.config, "time_cond_proj_dim", None) is not None:
            cfg = CfgLayout("none", guidance_scale)  # guidance-embedded UNets (LCM) run one half
        if cfg.kind == "separate":
            raise ValueError(
                "recording activations with separate CFG calls (Flux's true_cfg_scale) is not "
                "supported; record without true_cfg_scale"
            )
        if not cfg.guided and "uncond" in self.halves:
            raise ValueError(
                "without classifier-free guidance (guidance_scale <= 1) there is no "
                "unconditional half; record halves=['cond'] or raise guidance_scale"
            )
        size = family.default_image_size()
        layout = family.layout_for(height or size, width or size)
        store = torch.float16 if self.dtype == "float16" else torch.float32
        reduce = _pooler(
            self.pooling,
            self.grid_size,
            self.halves,
            cfg,
            store,
            lambda tensor: family.spatial(tensor, layout),
        )
        call = {
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "height": height,
            "width": width,
            "output_type": "np",
            **pipeline_kwargs,
        }

        n = len(prompts)
        out: dict[Half, dict[str, np.ndarray]] = {h: {} for h in self.halves}
        images: np.ndarray | None = None
        x0_images: np.ndarray | None = None
        timesteps: np.ndarray | None = None
        previous_bar = getattr(pipe, "_progress_bar_config", None)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        bar = tqdm(
            total=n * num_inference_steps,
            disable=not self.progress,
            desc="recording activations",
            unit="step",
        )
        try:
            for start in range(0, n, self.batch_size):
                batch = prompts[start : start + self.batch_size]
                rows = slice(start, start + len(batch))
                if negative_prompt is not None:
                    call["negative_prompt"] = [negative_prompt] * len(batch)
                acts, batch_t, batch_images, decoded = self._run_batch(
                    pipe, family, layout, blocks, reduce, batch, seeds[rows], cfg, call, bar
                )
                if timesteps is None:
                    timesteps = batch_t
                    images = np.empty((n, *batch_images.shape[1:]), dtype=np.uint8)
                    for half, path in ((h, p) for h in self.halves for p in blocks):
                        features = acts[path].shape[-1]
                        shape = (n, len(batch_t), features)
                        out[half][path] = np.empty(shape, dtype=self.dtype)
                    if decoded is not None:
                        x0_images = np.empty((n, *decoded.shape[1:]), dtype=np.uint8)
                elif not np.array_equal(batch_t, timesteps):
                    raise RuntimeError("timesteps differ between prompt batches; fix the scheduler")
                for path in blocks:
                    for k, half in enumerate(self.halves):
                        out[half][path][rows] = acts[path][k]
                assert images is not None
                images[rows] = batch_images
                if x0_images is not None and decoded is not None:
                    x0_images[rows] = decoded
        finally:
            bar.close()
            if previous_bar is not None:
                pipe._progress_bar_config = previous_bar
            elif hasattr(pipe, "_progress_bar_config"):
                del pipe._progress_bar_config

        assert timesteps is not None
        assert images is not None
        meta: dict[str, JsonValue] = {
            "pipeline": type(pipe).__name__,
            "scheduler": type(pipe.scheduler).__name__,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "cfg": cfg.guided,
            "family": family.name,
            "halves": self.halves,
            "negative_prompt": negative_prompt,
            "dtype": self.dtype,
            "height": int(images.shape[1]),
            "width": int(images.shape[2]),
        }
        return ActivationRecord(
            prompts=prompts,
            seeds=[int(s) for s in seeds],
            timesteps=timesteps.astype(np.int64),
            activations=out.get("cond", {}),
            uncond_activations=out.get("uncond", {}),
            pooling=self.pooling,
            grid_size=self.grid_size,
            images=images,
            x0_images=x0_images,
            meta=meta,
        )

    def _run_batch(
        self,
        pipe: Any,
        family: DenoiserFamily,
        layout: LatentLayout,
        blocks: list[str],
        reduce: Callable[[torch.Tensor], torch.Tensor],
        batch: list[str],
        seeds: list[int],
        cfg: CfgLayout,
        call: dict[str, Any],
        bar: Any,
    ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray | None]:
        """One pipeline call under hooks.

        Returns block -> [n_halves, B, n_steps, F], timesteps, uint8 images [B, H, W, 3]
        and the decoded x̂0 [B, n_steps, H, W, 3] (or None).
        """
        import torch

        from diffwidget.tracing.hooks import capture_outputs

        unet = family.denoiser

        def on_step_end(
            _pipe: Any, _step: int, _timestep: Any, callback_kwargs: dict[str, Any]
        ) -> dict[str, Any]:
            bar.update(len(batch))
            return callback_kwargs

        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        # The denoiser's own output ("" is the root module) is needed only for x̂0.
        root = [""] if self.decode_x0 else []
        with (
            capture_outputs(unet, blocks, reduce=reduce, select=family.block_tensor) as acts,
            _denoiser_inputs(family) as inputs,
            capture_outputs(unet, root) as unet_out,
        ):
            result = pipe(
                prompt=batch, generator=generators, callback_on_step_end=on_step_end, **call
            )
        n_calls = len(inputs)
        if any(len(acts[p]) != n_calls for p in blocks):
            raise RuntimeError(
                "blocks were called a different number of times than the denoiser; "
                "record top-level blocks that run once per denoiser call"
            )
        scheduler = pipe.scheduler
        begin = getattr(scheduler, "begin_index", None) or 0
        timesteps = np.round(scheduler.timesteps[begin : begin + n_calls].double().cpu().numpy())
        # [n_steps, n_halves, B, F] -> [n_halves, B, n_steps, F]
        stacked = {p: torch.stack(acts[p]).permute(1, 2, 0, 3).numpy() for p in blocks}
        images = to_uint8(np.asarray(result.images))
        decoded = None
        if self.decode_x0:
            # A guidance scale of 1 leaves the conditional half alone.
            w = cfg.guidance_scale if self.x0_from == "guided" else 1.0
            flat = _decode_x0(pipe, family, layout, inputs, unet_out[""], CfgLayout(cfg.kind, w))
            # step-major [n_steps * B, H, W, 3] -> [B, n_steps, H, W, 3]
            decoded = flat.reshape(n_calls, len(batch), *flat.shape[1:]).swapaxes(0, 1)
        return stacked, timesteps, images, decoded


def _decode_x0(
    pipe: Any,
    family: DenoiserFamily,
    layout: LatentLayout,
    inputs: list[tuple[torch.Tensor, Any]],
    outputs: list[torch.Tensor],
    cfg: CfgLayout,
) -> np.ndarray:
    """Decode x̂0 for every recorded denoiser call: [n_steps * B, H, W, 3], step-major.

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

    scheduler = pipe.scheduler
    noise = scheduler_family(scheduler)
    kind = prediction_type(scheduler)
    begin = getattr(scheduler, "begin_index", None) or 0
    latents: list[torch.Tensor] = []
    for i, ((sample, _call), output) in enumerate(zip(inputs, outputs, strict=True)):
        uncond, cond = cfg.split(family.from_model_output(output.float(), layout))
        # The pipeline's own CFG combination (guidance_rescale is not applied).
        guided = cfg.combine(uncond, cond)
        x_in = family.to_latents(cfg.cond_rows(sample).float(), layout)
        # One denoiser call per step, so call i ran at step index begin + i.
        t = float(scheduler.timesteps[begin + i])
        c = step_coefficients(scheduler, noise, t, begin + i)
        x_t = x_in / c.input_scale  # the denoiser saw input_scale * x_t
        # predict_x0 is array-generic: it works on tensors unchanged.
        x0 = predict_x0(cast(Any, x_t), cast(Any, guided), c.alpha, c.sigma, c.input_scale, kind)
        latents.append(cast("torch.Tensor", x0))
    return decode_latents(pipe, torch.cat(latents), batch=DECODE_CHUNK)
