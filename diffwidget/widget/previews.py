"""RGB images per step for the view: predicted x̂0 and the noisy latent x_t.

Traces made with ``decode_previews=True`` already hold decoded x̂0 previews (by the full VAE,
or by a tiny preview decoder distilled from it, as ``facts.preview_decoder`` says); the
explorer can replace one step's preview by a full VAE decode on request. The noisy
latent is decoded by the VAE when a pipeline is at hand; otherwise by a linear latent→RGB
map fitted (least squares) on the trace's own pairs of x̂0 latents and decoded previews,
which needs no torch and is close enough to see the noise being removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from diffwidget.explain.attention import upsample_maps
from diffwidget.tracing.decode import decode_latents, to_uint8
from diffwidget.tracing.trace import Trace

#: Side of the image drawn when a trace has no decoded previews (latent upsampled).
FALLBACK_SIZE = 64
#: Largest preview side sent to the browser: SD-sized previews (512²) are shrunk so a
#: 20-step trace stays within the 2 MB payload budget; the view is 384 px wide anyway.
MAX_PREVIEW_SIZE = 128
#: Images are stored as uint8 RGB.
_RGB_MAX = 255.0


def _latent_rgb_fallback(latents: np.ndarray) -> np.ndarray:
    """First three channels, each standardised over the whole run: a view of the latent."""
    rgb = latents[:, :3] if latents.shape[1] >= 3 else np.repeat(latents[:, :1], 3, axis=1)
    mean = rgb.mean(axis=(0, 2, 3), keepdims=True)
    std = rgb.std(axis=(0, 2, 3), keepdims=True) + 1e-6
    return np.moveaxis(np.clip((rgb - mean) / (4 * std) + 0.5, 0, 1), 1, -1)


def shrink_images(images: np.ndarray, max_size: int = MAX_PREVIEW_SIZE) -> np.ndarray:
    """Average ``[N, H, W, 3]`` images over integer blocks until both sides are ≤ max_size."""
    factor = 1
    while max(images.shape[1], images.shape[2]) // factor > max_size:
        factor *= 2
    if factor == 1:
        return images
    n, height, width, c = images.shape
    height, width = height // factor * factor, width // factor * factor
    blocks = images[:, :height, :width].reshape(
        n, height // factor, factor, width // factor, factor, c
    )
    return np.rint(blocks.mean(axis=(2, 4))).astype(np.uint8)


def x0_previews(trace: Trace) -> np.ndarray:
    """uint8 ``[N, H, W, 3]`` predicted clean images, one per step."""
    if trace.previews is not None:
        return np.ascontiguousarray(trace.previews, dtype=np.uint8)
    up = upsample_maps(trace.pred_x0.astype(np.float32), (FALLBACK_SIZE, FALLBACK_SIZE))
    return to_uint8(_latent_rgb_fallback(up))


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


def fit_linear_decoder(trace: Trace) -> np.ndarray:
    """Least-squares map ``[C + 1, 3]`` from latent channels (+ bias) to preview RGB in [0, 1].

    Raises
    ------
    ValueError
        When the trace has no decoded previews to fit on.
    """
    if trace.previews is None:
        raise ValueError("fitting a latent→RGB map needs decoded previews (decode_previews=True)")
    n, c, h, w = trace.pred_x0.shape
    previews = trace.previews.astype(np.float32) / _RGB_MAX
    # Previews resampled to the latent grid so each latent cell has one target colour.
    small = np.moveaxis(upsample_maps(np.moveaxis(previews, -1, 1), (h, w)), 1, -1)
    design = np.concatenate(
        [np.moveaxis(trace.pred_x0, 1, -1).reshape(-1, c), np.ones((n * h * w, 1))], axis=1
    )
    weights, *_ = np.linalg.lstsq(design, small.reshape(-1, 3), rcond=None)
    return weights.astype(np.float32)


def noisy_previews(trace: Trace, pipe: Any = None) -> tuple[np.ndarray, str]:
    """uint8 ``[N, H, W, 3]`` images of the noisy latent x_t and a sentence saying how."""
    latents = trace.latents.astype(np.float32)
    if pipe is not None and getattr(pipe, "vae", None) is not None:
        return decode_latents(
            pipe, latents
        ), "Noisy latent x_t entering this step, decoded by the VAE"
    if trace.previews is None:
        up = upsample_maps(latents, (FALLBACK_SIZE, FALLBACK_SIZE))
        return to_uint8(_latent_rgb_fallback(up)), (
            "Noisy latent x_t entering this step: first three channels, standardised"
        )
    weights = fit_linear_decoder(trace)
    size = trace.previews.shape[1:3]
    n, c, h, w = latents.shape
    cells = np.moveaxis(latents, 1, -1).reshape(-1, c)
    rgb = (np.concatenate([cells, np.ones((len(cells), 1))], axis=1) @ weights).reshape(n, h, w, 3)
    rgb = np.moveaxis(upsample_maps(np.moveaxis(rgb, -1, 1), (int(size[0]), int(size[1]))), 1, -1)
    return to_uint8(rgb), (
        "Noisy latent x_t entering this step, through a linear latent→RGB map fitted on "
        "this trace's x̂0 previews (no VAE in the kernel)"
    )
