"""RGB images per step for the view, built at the size the view draws them.

Traces made with ``decode_previews=True`` already hold decoded x̂0 previews (by the full VAE,
or by a tiny preview decoder distilled from it, as ``facts.preview_decoder`` says); the
explorer can replace one step's preview by a full VAE decode on request. The noisy
latent is decoded by the VAE when a pipeline is at hand; otherwise by a linear latent→RGB
map fitted (least squares) on the trace's own pairs of x̂0 latents and decoded previews,
which needs no torch and is close enough to see the noise being removed.

Nothing here works at full resolution: previews are area-resized from uint8 straight to the
display size one image at a time, the noisy view is computed on the latent grid and resized
from there, and the linear map is fitted from normal equations accumulated a few steps at a
time. A 1024² SDXL trace costs a few MB of scratch memory, not a float copy of every preview.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from diffwidget.explain.attention import upsample_maps
from diffwidget.tracing.decode import decode_latents, to_uint8
from diffwidget.tracing.trace import Trace

#: Side of the image drawn when a trace has no decoded previews (latent resized).
FALLBACK_SIZE = 64
#: Largest preview side sent to the browser: SD-sized previews (512²) are shrunk so a
#: 20-step trace stays within the 2 MB payload budget; the view is 384 px wide anyway.
MAX_PREVIEW_SIZE = 128
#: Steps handled at once where float scratch arrays are needed (bounds their size).
CHUNK_STEPS = 4
#: Images are stored as uint8 RGB.
_RGB_MAX = 255.0
#: Added to the standard deviation of a channel so a constant channel does not divide by 0.
_STD_FLOOR = 1e-6


def display_size(shape: Sequence[int], max_size: int = MAX_PREVIEW_SIZE) -> tuple[int, int]:
    """``(h, w)`` of an image of ``shape[:2]`` with its longer side at most ``max_size``.

    The aspect ratio is kept and images are never enlarged.

    Examples
    --------
    >>> display_size((1024, 768)), display_size((64, 64))
    ((128, 96), (64, 64))
    """
    height, width = int(shape[0]), int(shape[1])
    if max(height, width) <= max_size:
        return height, width
    scale = max_size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_images(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Area-resize uint8 ``[N, H, W, 3]`` images to ``size`` = ``(h, w)``, one at a time.

    Shrinking averages the source pixels each output pixel covers (a box filter: exact block
    means for integer factors), so no float copy of the full-size images is ever made.
    Enlarging (only small latent views are enlarged) is bilinear with half-pixel centres.

    Examples
    --------
    >>> resize_images(np.full((2, 512, 512, 3), 7, np.uint8), (128, 128)).shape
    (2, 128, 128, 3)
    """
    from PIL import Image

    count, height, width = int(images.shape[0]), int(images.shape[1]), int(images.shape[2])
    if (height, width) == tuple(size):
        return np.ascontiguousarray(images, dtype=np.uint8)
    if size[0] > height or size[1] > width:
        return _enlarge(images, size)
    out = np.empty((count, size[0], size[1], 3), dtype=np.uint8)
    integer = height % size[0] == 0 and width % size[1] == 0
    for index in range(count):
        image = Image.fromarray(np.ascontiguousarray(images[index], dtype=np.uint8))
        if integer:
            small = image.reduce((width // size[1], height // size[0]))
        else:
            small = image.resize((size[1], size[0]), Image.Resampling.BOX)
        out[index] = np.asarray(small)
    return out


def _enlarge(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    out = np.empty((len(images), size[0], size[1], 3), dtype=np.uint8)
    for start in range(0, len(images), CHUNK_STEPS):
        chunk = np.moveaxis(images[start : start + CHUNK_STEPS], -1, 1).astype(np.float32)
        up = upsample_maps(chunk, size)
        out[start : start + CHUNK_STEPS] = np.moveaxis(np.clip(np.rint(up), 0, 255), 1, -1)
    return out


def shrink_images(images: np.ndarray, max_size: int = MAX_PREVIEW_SIZE) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` images area-resized until both sides are ≤ ``max_size``.

    Examples
    --------
    >>> shrink_images(np.zeros((1, 512, 256, 3), np.uint8)).shape
    (1, 128, 64, 3)
    """
    return resize_images(images, display_size(images.shape[1:3], max_size))


def _resize_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Float ``[..., h, w]`` maps to ``size``: block means for integer factors, else bilinear."""
    height, width = maps.shape[-2:]
    if (height, width) == tuple(size):
        return maps.astype(np.float32, copy=False)
    if height % size[0] == 0 and width % size[1] == 0:
        blocks = maps.reshape(*maps.shape[:-2], size[0], height // size[0], size[1], -1)
        return blocks.mean(axis=(-3, -1), dtype=np.float32)
    return upsample_maps(maps, size)


def _latent_view(latents: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """First three channels, each standardised over the whole run: a view of the latent."""
    channels = [0, 1, 2] if latents.shape[1] >= 3 else [0, 0, 0]
    rgb = latents[:, channels]
    mean = rgb.mean(axis=(0, 2, 3), keepdims=True, dtype=np.float64)
    std = rgb.std(axis=(0, 2, 3), keepdims=True, dtype=np.float64) + _STD_FLOOR
    out = np.empty((len(latents), size[0], size[1], 3), dtype=np.uint8)
    for start in range(0, len(latents), CHUNK_STEPS):
        chunk = (rgb[start : start + CHUNK_STEPS] - mean) / (4 * std) + 0.5
        small = _resize_maps(chunk.astype(np.float32), size)
        out[start : start + CHUNK_STEPS] = to_uint8(np.moveaxis(small, 1, -1))
    return out


def x0_previews(trace: Trace, max_size: int = MAX_PREVIEW_SIZE) -> np.ndarray:
    """uint8 ``[N, h, w, 3]`` predicted clean images at display size, one per step."""
    if trace.previews is not None:
        return shrink_images(trace.previews, max_size)
    return _latent_view(trace.pred_x0, (FALLBACK_SIZE, FALLBACK_SIZE))


def preview_text(trace: Trace, exact_steps: Sequence[int] = ()) -> str:
    """The caption of the x̂0 image: which decoder made it, from which prediction."""
    decoder = trace.facts.preview_decoder or "vae"
    if trace.previews is None:
        how = "by a view of the latent's first three channels (no decoded previews)"
    elif decoder == "vae":
        how = "by the VAE"
    else:
        how = f"by the tiny preview decoder ({decoder}, distilled from the VAE)"
    text = f"Predicted clean image x̂0 at this step, decoded {how}"
    if trace.previews is not None and trace.facts.preview_source == "cond":
        text += ", from the conditional CFG half's noise prediction (no guidance)"
    elif trace.guidance_scale > 1:
        text += (
            f", from the guided noise prediction (CFG {trace.guidance_scale:g}); in early "
            "steps guidance can push x̂0's colours away from the final image's"
        )
    if exact_steps:
        steps = ", ".join(str(s) for s in exact_steps)
        text += f"; step{'s' if len(exact_steps) > 1 else ''} {steps} decoded by the full VAE"
    return text


def exact_preview(trace: Trace, pipe: Any, step: int) -> np.ndarray:
    """The full VAE decode of ``trace.pred_x0[step]``: uint8 ``[H, W, 3]``.

    Raises
    ------
    RuntimeError
        Without a pipeline that has a VAE.
    ValueError
        When the previews came from the conditional CFG half, which a trace does not keep.
    """
    if pipe is None or getattr(pipe, "vae", None) is None:
        raise RuntimeError(
            "an exact decode needs the pipeline's VAE: create the explorer with "
            "Explorer(trace, pipe=pipe)"
        )
    if trace.facts.preview_source == "cond":
        raise ValueError(
            "this trace's previews come from the conditional CFG half, which the trace does "
            "not store; trace again with preview_decoder='vae' for exact previews"
        )
    return decode_latents(pipe, trace.pred_x0[step : step + 1].astype(np.float32))[0]


def _design(latents: np.ndarray) -> np.ndarray:
    """Rows ``[cell channels..., 1]`` of a chunk of latents ``[n, C, h, w]`` (float64)."""
    cells = np.moveaxis(latents, 1, -1).reshape(-1, latents.shape[1]).astype(np.float64)
    return np.concatenate([cells, np.ones((len(cells), 1))], axis=1)


def fit_linear_decoder(trace: Trace, colours: np.ndarray | None = None) -> np.ndarray:
    """Least-squares map ``[C + 1, 3]`` from latent channels (+ bias) to preview RGB in [0, 1].

    Each latent cell's target colour is the area mean of the preview pixels it covers
    (``colours``: those means, uint8 ``[N, h, w, 3]`` on the latent grid, when already made).
    The normal equations are accumulated a few steps at a time, so memory does not grow with
    the run or the image size.

    Raises
    ------
    ValueError
        When the trace has no decoded previews to fit on.

    Examples
    --------
    >>> fit_linear_decoder(trace).shape  # 4 latent channels + bias -> RGB  # doctest: +SKIP
    (5, 3)
    """
    if trace.previews is None:
        raise ValueError("fitting a latent→RGB map needs decoded previews (decode_previews=True)")
    channels = trace.pred_x0.shape[1]
    gram = np.zeros((channels + 1, channels + 1))
    moment = np.zeros((channels + 1, 3))
    for start in range(0, trace.n_steps, CHUNK_STEPS):
        stop = start + CHUNK_STEPS
        design = _design(trace.pred_x0[start:stop])
        if colours is None:
            chunk = resize_images(trace.previews[start:stop], trace.latent_shape)
        else:
            chunk = colours[start:stop]
        target = chunk.reshape(-1, 3).astype(np.float64) / _RGB_MAX
        gram += design.T @ design
        moment += design.T @ target
    weights, *_ = np.linalg.lstsq(gram, moment, rcond=None)
    return weights.astype(np.float32)


def _linear_view(latents: np.ndarray, weights: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    out = np.empty((len(latents), size[0], size[1], 3), dtype=np.uint8)
    for start in range(0, len(latents), CHUNK_STEPS):
        chunk = latents[start : start + CHUNK_STEPS].astype(np.float32)
        rgb = np.moveaxis(chunk, 1, -1) @ weights[:-1] + weights[-1]  # [n, h, w, 3] in [0, 1]
        small = _resize_maps(np.moveaxis(rgb, -1, 1), size)
        out[start : start + CHUNK_STEPS] = to_uint8(np.moveaxis(small, 1, -1))
    return out


def _vae_view(pipe: Any, latents: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    out = np.empty((len(latents), size[0], size[1], 3), dtype=np.uint8)
    for start in range(0, len(latents), CHUNK_STEPS):
        chunk = latents[start : start + CHUNK_STEPS].astype(np.float32)
        out[start : start + CHUNK_STEPS] = resize_images(decode_latents(pipe, chunk), size)
    return out


def noisy_previews(
    trace: Trace,
    pipe: Any = None,
    max_size: int = MAX_PREVIEW_SIZE,
    x0: np.ndarray | None = None,
) -> tuple[np.ndarray, str]:
    """uint8 ``[N, h, w, 3]`` images of the noisy latent x_t and a sentence saying how.

    The images have the size of :func:`x0_previews`, so both image modes line up; pass its
    result as ``x0`` to reuse it where it already lies on the latent grid (SDXL, Flux).

    Examples
    --------
    >>> images, text = noisy_previews(trace)  # doctest: +SKIP
    >>> images.shape[1:] == x0_previews(trace).shape[1:]  # doctest: +SKIP
    True
    """
    if trace.previews is None:
        size = (FALLBACK_SIZE, FALLBACK_SIZE)
    else:
        size = display_size(trace.previews.shape[1:3], max_size)
    if pipe is not None and getattr(pipe, "vae", None) is not None:
        return _vae_view(pipe, trace.latents, size), (
            "Noisy latent x_t entering this step, decoded by the VAE"
        )
    if trace.previews is None:
        return _latent_view(trace.latents, size), (
            "Noisy latent x_t entering this step: first three channels, standardised"
        )
    on_grid = x0 is not None and tuple(x0.shape[1:3]) == trace.latent_shape
    weights = fit_linear_decoder(trace, x0 if on_grid else None)
    return _linear_view(trace.latents, weights, size), (
        "Noisy latent x_t entering this step, through a linear latent→RGB map fitted on "
        "this trace's x̂0 previews (no VAE in the kernel)"
    )
