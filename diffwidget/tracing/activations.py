"""Pooled UNet block activations for a batch of prompts, at every denoising step.

Concept probes (:mod:`diffwidget.explain.probes`) need, for many prompts, a small feature
vector per UNet block and step. Storing raw activations would cost gigabytes, so each block
output is pooled inside the forward hook (spatial mean, or a small adaptive-average grid that
keeps coarse position) and only the pooled vector of the *conditional* CFG half is kept.

The pipeline runs unchanged (its own scheduler, its own CFG); we only observe it through
forward hooks that are removed when recording ends, also when the pipeline raises.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn

Pooling = Literal["mean", "grid"]
POOLINGS: tuple[str, ...] = get_args(Pooling)
StoreDtype = Literal["float16", "float32"]
STORE_DTYPES: tuple[str, ...] = get_args(StoreDtype)

#: Side of the adaptive-average grid for ``pooling="grid"``: 2x2 cells keep left/right and
#: top/bottom apart while multiplying the feature count by only four.
DEFAULT_GRID_SIZE = 2
DEFAULT_BATCH_SIZE = 8
#: Predicted clean latents decoded per VAE call (bounds the decoder's peak memory).
DECODE_CHUNK = 32
FORMAT_VERSION = 1
_ACT_PREFIX = "act/"


def default_blocks(unet: nn.Module) -> list[str]:
    """Blocks recorded when none are chosen: a middle down block, the mid block, a middle up block.

    These span the UNet's coarsest, most semantic resolution and one resolution on each side
    of it, which is where concept information is expected to appear first.
    """
    from diffwidget.tracing.hooks import block_paths

    paths = block_paths(unet)
    downs = [p for p in paths if p.startswith("down_blocks.")]
    ups = [p for p in paths if p.startswith("up_blocks.")]
    chosen = []
    if downs:
        chosen.append(downs[len(downs) // 2])
    if "mid_block" in paths:
        chosen.append("mid_block")
    if ups:
        chosen.append(ups[len(ups) // 2])
    if not chosen:
        raise ValueError(
            "the UNet has no down_blocks, mid_block or up_blocks; pass blocks=[...] with "
            "module paths from [name for name, _ in unet.named_modules()]"
        )
    return chosen


@dataclass
class ActivationRecord:
    """Pooled activations of UNet blocks for a batch of prompts, one row per step.

    Attributes
    ----------
    prompts : list of str
        The prompts, one generated image each.
    seeds : list of int
        The generator seed of each prompt (``torch.Generator().manual_seed(seed)``).
    timesteps : ndarray of int64, shape (n_steps,)
        Scheduler timestep ``t_i`` of each loop index ``i`` (``step``).
    activations : dict of str to ndarray, shape (n_prompts, n_steps, n_features)
        Diffusers module path -> pooled output of the conditional CFG half. With
        ``pooling="grid"`` the features are ordered channel-major
        (``channel * grid_size**2 + row * grid_size + col``).
    pooling : {"mean", "grid"}
        How each block output was pooled over space.
    grid_size : int
        Side of the pooling grid (1 for ``"mean"``).
    images : ndarray of uint8, shape (n_prompts, H, W, 3), optional
        The final images.
    x0_images : ndarray of uint8, shape (n_prompts, n_steps, H, W, 3), optional
        The decoded predicted clean image x̂0 at every step (``decode_x0=True``).
    meta : dict
        JSON-serialisable facts: pipeline and scheduler class, guidance scale, steps, size.
    """

    prompts: list[str]
    seeds: list[int]
    timesteps: np.ndarray
    activations: dict[str, np.ndarray]
    pooling: Pooling = "mean"
    grid_size: int = 1
    images: np.ndarray | None = None
    x0_images: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n, steps = len(self.prompts), len(self.timesteps)
        if len(self.seeds) != n:
            raise ValueError(f"{len(self.seeds)} seeds for {n} prompts; pass one seed per prompt")
        for path, array in self.activations.items():
            if array.ndim != 3 or array.shape[:2] != (n, steps):
                raise ValueError(
                    f"activations[{path!r}] has shape {array.shape}, expected "
                    f"({n}, {steps}, n_features)"
                )

    @property
    def n_prompts(self) -> int:
        """Number of prompts recorded."""
        return len(self.prompts)

    @property
    def n_steps(self) -> int:
        """Number of denoising steps recorded."""
        return len(self.timesteps)

    @property
    def blocks(self) -> list[str]:
        """Recorded module paths, in recording order."""
        return list(self.activations)

    def features(self, blocks: Sequence[str] | None = None) -> np.ndarray:
        """Activations of ``blocks`` (default: all) concatenated along the feature axis.

        Returns
        -------
        ndarray of float32, shape (n_prompts, n_steps, n_features)
        """
        chosen = list(blocks) if blocks is not None else self.blocks
        missing = [b for b in chosen if b not in self.activations]
        if missing:
            raise KeyError(f"blocks {missing} were not recorded; recorded: {self.blocks}")
        return np.concatenate([self.activations[b].astype(np.float32) for b in chosen], axis=-1)

    def nbytes(self) -> int:
        """Bytes held by all arrays of the record."""
        arrays = [self.timesteps, *self.activations.values()]
        arrays += [a for a in (self.images, self.x0_images) if a is not None]
        return sum(int(a.nbytes) for a in arrays)

    def save(self, path: str | Path) -> Path:
        """Write the record to one ``.npz`` file (arrays keep their dtype).

        Examples
        --------
        >>> path = record.save("acts.npz")  # doctest: +SKIP
        >>> ActivationRecord.load(path).n_steps  # doctest: +SKIP
        20
        """
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_suffix(path.suffix + ".npz")
        header = {
            "format_version": FORMAT_VERSION,
            "prompts": self.prompts,
            "seeds": self.seeds,
            "blocks": self.blocks,
            "pooling": self.pooling,
            "grid_size": self.grid_size,
            "meta": self.meta,
        }
        arrays = {_ACT_PREFIX + str(i): a for i, a in enumerate(self.activations.values())}
        if self.images is not None:
            arrays["images"] = self.images
        if self.x0_images is not None:
            arrays["x0_images"] = self.x0_images
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, header=np.array(json.dumps(header)), timesteps=self.timesteps, **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> ActivationRecord:
        """Read a record written by :meth:`save`."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no activation record at {path}; write one with .save(path)")
        with np.load(path, allow_pickle=False) as data:
            if "header" not in data:
                raise ValueError(f"{path} is an .npz file but not a diffwidget activation record")
            header = json.loads(str(data["header"]))
            if header["format_version"] > FORMAT_VERSION:
                raise ValueError(
                    f"{path} was written by a newer diffwidget; upgrade with "
                    "`pip install -U diffwidget`"
                )
            activations = {b: data[_ACT_PREFIX + str(i)] for i, b in enumerate(header["blocks"])}
            return cls(
                prompts=list(header["prompts"]),
                seeds=[int(s) for s in header["seeds"]],
                timesteps=data["timesteps"],
                activations=activations,
                pooling=header["pooling"],
                grid_size=int(header["grid_size"]),
                images=data.get("images"),
                x0_images=data.get("x0_images"),
                meta=header["meta"],
            )


def _pooler(
    pooling: Pooling, grid_size: int, cfg: bool, dtype: torch.dtype
) -> Callable[[torch.Tensor], torch.Tensor]:
    import torch.nn.functional as F

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        if cfg:
            if tensor.shape[0] % 2:
                raise RuntimeError(
                    f"a block output has batch {tensor.shape[0]} under classifier-free "
                    "guidance; expected [uncond, cond] halves of equal size"
                )
            # diffusers concatenates [negative, positive]: the second half is the prompt's.
            tensor = tensor[tensor.shape[0] // 2 :]
        if tensor.ndim != 4:
            raise RuntimeError(
                f"expected a [batch, channels, h, w] block output, got shape "
                f"{tuple(tensor.shape)}; choose convolutional UNet blocks"
            )
        if pooling == "mean":
            pooled = tensor.float().mean(dim=(2, 3))
        else:
            pooled = F.adaptive_avg_pool2d(tensor.float(), grid_size).flatten(1)
        return pooled.to(device="cpu", dtype=dtype)

    return reduce


@contextmanager
def _unet_inputs(unet: nn.Module) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Record ``(sample, timestep)`` of every UNet call; the hook is removed on exit."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def pre_hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        calls.append((sample.detach(), timestep))

    handle = unet.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def predicted_x0(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    alpha_cumprod: torch.Tensor,
    prediction_type: str,
) -> torch.Tensor:
    """x̂0 from the UNet's input and output, without touching the scheduler.

    ``sample`` is the UNet's input (``scheduler.scale_model_input`` already applied, which
    puts sigma-parametrised schedulers such as Euler on the variance-preserving scale).
    """
    alpha = alpha_cumprod.to(sample.dtype).reshape(-1, *([1] * (sample.ndim - 1)))
    sigma = (1 - alpha).sqrt()
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha.sqrt()
    if prediction_type == "v_prediction":
        return alpha.sqrt() * sample - sigma * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(
        f"unknown prediction_type {prediction_type!r}; expected 'epsilon', "
        "'v_prediction' or 'sample' (see pipe.scheduler.config.prediction_type)"
    )


def _to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _decode(pipe: Any, latents: torch.Tensor) -> np.ndarray:
    """Decode latents [n, C, h, w] to uint8 images with the pipeline's own VAE."""
    import torch

    vae = pipe.vae
    scaling = float(vae.config.scaling_factor)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    with torch.no_grad():
        for start in range(0, len(latents), DECODE_CHUNK):
            chunk = latents[start : start + DECODE_CHUNK].to(vae.device, vae.dtype)
            decoded = vae.decode(chunk / scaling + shift, return_dict=False)[0]
            out.append(pipe.image_processor.postprocess(decoded, output_type="np"))
    return _to_uint8(np.concatenate(out, axis=0))


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
    dtype : {"float16", "float32"}
        Storage dtype of the pooled activations; float16 halves memory.
    batch_size : int
        Prompts generated together in one pipeline call.
    decode_x0 : bool
        Also decode the predicted clean image x̂0 at every step (one VAE decode per prompt
        and step). x̂0 is computed from the guided noise prediction and the UNet input with
        the scheduler's ``alphas_cumprod``; the scheduler itself is never called.
    progress : bool
        Show a ``tqdm`` progress bar over prompts x steps.

    Examples
    --------
    >>> import diffwidget
    >>> pipe = diffwidget.load_demo_pipeline()  # doctest: +SKIP
    >>> record = ActivationRecorder(pooling="grid").record(
    ...     pipe, ["a red circle", "a blue square"], num_inference_steps=20
    ... )  # doctest: +SKIP
    >>> record.activations["mid_block"].shape  # doctest: +SKIP
    (2, 20, 256)
    """

    def __init__(
        self,
        blocks: Sequence[str] | None = None,
        *,
        pooling: Pooling = "mean",
        grid_size: int = DEFAULT_GRID_SIZE,
        dtype: StoreDtype = "float16",
        batch_size: int = DEFAULT_BATCH_SIZE,
        decode_x0: bool = False,
        progress: bool = True,
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; use one of {POOLINGS}")
        if dtype not in STORE_DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {STORE_DTYPES}")
        if grid_size < 1 or batch_size < 1:
            raise ValueError("grid_size and batch_size must be at least 1")
        self.blocks = list(blocks) if blocks is not None else None
        self.pooling: Pooling = pooling
        self.grid_size = grid_size if pooling == "grid" else 1
        self.dtype: StoreDtype = dtype
        self.batch_size = batch_size
        self.decode_x0 = decode_x0
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

        from diffwidget.tracing.hooks import capture_outputs, resolve_module

        prompts = list(prompts)
        if not prompts:
            raise ValueError("pass at least one prompt")
        seeds = [seed + i for i in range(len(prompts))] if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts; pass one per prompt")
        reserved = {"callback_on_step_end", "generator", "num_images_per_prompt", "output_type"}
        clash = reserved & set(pipeline_kwargs)
        if clash:
            raise ValueError(f"the recorder sets {sorted(clash)} itself; leave them out")
        unet = getattr(pipe, "unet", None)
        if unet is None:
            raise TypeError(
                "pass a diffusers pipeline with a UNet (e.g. StableDiffusionPipeline); "
                f"{type(pipe).__name__} has no .unet"
            )
        blocks = self.blocks if self.blocks is not None else default_blocks(unet)
        for path in blocks:
            resolve_module(unet, path)  # fail before generating anything
        time_cond = getattr(unet.config, "time_cond_proj_dim", None)
        cfg = guidance_scale > 1.0 and time_cond is None
        store = torch.float16 if self.dtype == "float16" else torch.float32
        reduce = _pooler(self.pooling, self.grid_size, cfg, store)

        from tqdm.auto import tqdm

        n = len(prompts)
        bar = tqdm(
            total=n * num_inference_steps,
            disable=not self.progress,
            desc="recording activations",
            unit="step",
        )
        out: dict[str, np.ndarray] = {}
        images: np.ndarray | None = None
        x0_images: np.ndarray | None = None
        timesteps: np.ndarray | None = None
        previous_bar = getattr(pipe, "_progress_bar_config", None)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)

        def on_step_end(
            _pipe: Any, _step: int, _timestep: Any, callback_kwargs: dict[str, Any]
        ) -> dict[str, Any]:
            bar.update(len(batch))
            return callback_kwargs

        try:
            for start in range(0, n, self.batch_size):
                batch = prompts[start : start + self.batch_size]
                batch_seeds = seeds[start : start + len(batch)]
                generators = [torch.Generator("cpu").manual_seed(s) for s in batch_seeds]
                # The UNet's own output ("" is the root module) is needed only for x̂0.
                root = [""] if self.decode_x0 else []
                with (
                    capture_outputs(unet, blocks, reduce=reduce) as acts,
                    _unet_inputs(unet) as inputs,
                    capture_outputs(unet, root) as unet_out,
                ):
                    result = pipe(
                        prompt=batch,
                        negative_prompt=[negative_prompt] * len(batch) if negative_prompt else None,
                        num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale,
                        height=height,
                        width=width,
                        generator=generators,
                        output_type="np",
                        callback_on_step_end=on_step_end,
                        **pipeline_kwargs,
                    )
                steps_seen = len(inputs)
                if any(len(acts[p]) != steps_seen for p in blocks):
                    raise RuntimeError(
                        "blocks were called a different number of times than the UNet; "
                        "record top-level blocks that run once per UNet call"
                    )
                batch_t = np.array([int(torch.as_tensor(t).flatten()[0]) for _, t in inputs])
                if timesteps is None:
                    timesteps = batch_t
                    for path in blocks:
                        features = acts[path][0].shape[-1]
                        out[path] = np.empty((n, steps_seen, features), dtype=self.dtype)
                elif len(batch_t) != len(timesteps) or (batch_t != timesteps).any():
                    raise RuntimeError("timesteps differ between prompt batches; fix the scheduler")
                for path in blocks:
                    # [n_steps, B, F] -> [B, n_steps, F]
                    out[path][start : start + len(batch)] = (
                        torch.stack(acts[path]).transpose(0, 1).numpy()
                    )
                batch_images = _to_uint8(np.asarray(result.images))
                if images is None:
                    images = np.empty((n, *batch_images.shape[1:]), dtype=np.uint8)
                images[start : start + len(batch)] = batch_images
                if self.decode_x0:
                    decoded = self._decode_x0(pipe, inputs, unet_out[""], cfg, guidance_scale)
                    decoded = decoded.reshape(steps_seen, len(batch), *decoded.shape[1:])
                    if x0_images is None:
                        x0_images = np.empty((n, steps_seen, *decoded.shape[2:]), dtype=np.uint8)
                    x0_images[start : start + len(batch)] = decoded.transpose(1, 0, 2, 3, 4)
                del acts, inputs, unet_out
        finally:
            bar.close()
            if previous_bar is not None:
                pipe._progress_bar_config = previous_bar
            elif hasattr(pipe, "_progress_bar_config"):
                del pipe._progress_bar_config

        assert timesteps is not None
        meta = {
            "pipeline": type(pipe).__name__,
            "scheduler": type(pipe.scheduler).__name__,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "cfg_half": "cond" if cfg else "all (no classifier-free guidance)",
            "negative_prompt": negative_prompt,
            "dtype": self.dtype,
            "height": None if images is None else int(images.shape[1]),
            "width": None if images is None else int(images.shape[2]),
        }
        return ActivationRecord(
            prompts=prompts,
            seeds=[int(s) for s in seeds],
            timesteps=timesteps.astype(np.int64),
            activations=out,
            pooling=self.pooling,
            grid_size=self.grid_size,
            images=images,
            x0_images=x0_images,
            meta=meta,
        )

    @staticmethod
    def _decode_x0(
        pipe: Any,
        inputs: list[tuple[torch.Tensor, torch.Tensor]],
        outputs: list[torch.Tensor],
        cfg: bool,
        guidance_scale: float,
    ) -> np.ndarray:
        """Decode x̂0 for every recorded UNet call: [n_steps * B, H, W, 3], step-major."""
        import torch

        scheduler = pipe.scheduler
        alphas = scheduler.alphas_cumprod
        prediction_type = scheduler.config.prediction_type
        latents = []
        for (sample, t), output in zip(inputs, outputs, strict=True):
            if cfg:
                uncond, cond = output.float().chunk(2)
                guided = uncond + guidance_scale * (cond - uncond)
                sample = sample.chunk(2)[1]
            else:
                guided = output.float()
            index = torch.as_tensor(t).flatten()[0].round().long().clamp(0, len(alphas) - 1)
            latents.append(predicted_x0(sample.float(), guided, alphas[index], prediction_type))
        return _decode(pipe, torch.cat(latents))


def record_activations(
    pipe: Any,
    prompts: Sequence[str],
    *,
    blocks: Sequence[str] | None = None,
    pooling: Pooling = "mean",
    grid_size: int = DEFAULT_GRID_SIZE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    decode_x0: bool = False,
    progress: bool = True,
    **record_kwargs: Any,
) -> ActivationRecord:
    """Shortcut for ``ActivationRecorder(...).record(pipe, prompts, ...)``."""
    recorder = ActivationRecorder(
        blocks,
        pooling=pooling,
        grid_size=grid_size,
        batch_size=batch_size,
        decode_x0=decode_x0,
        progress=progress,
    )
    return recorder.record(pipe, prompts, **record_kwargs)
