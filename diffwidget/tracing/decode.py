"""The one VAE decode: latents in the denoiser's scale to uint8 RGB images.

Every picture diffwidget shows (trace previews, activation-record x̂0 images, the widget's
noisy-latent view) goes through :func:`decode_latents`, so they all agree on the three facts
that differ between checkpoints:

* ``latents / scaling_factor + shift_factor`` (SD3 and Flux VAEs have a shift; SD's none);
* float16 VAEs with ``force_upcast`` (SD-1.x/SDXL) are decoded in float32, as the pipelines
  do, and put back in float16 afterwards, also when decoding raises;
* the pipeline's own ``image_processor`` post-processing (``[-1, 1]`` to ``[0, 1]``), then
  rounding to uint8 as diffusers' ``numpy_to_pil`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

#: Latents decoded per VAE call (bounds the decoder's peak memory on SD-sized VAEs).
DECODE_BATCH = 8


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] to uint8, rounding as diffusers' ``numpy_to_pil`` does."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def _postprocess(pipe: Any, decoded: torch.Tensor) -> np.ndarray:
    processor = getattr(pipe, "image_processor", None)
    if processor is not None:
        return np.asarray(processor.postprocess(decoded, output_type="np"))
    # Pipelines without an image processor still decode to [-1, 1].
    images = (decoded.float().clamp(-1, 1) / 2 + 0.5).permute(0, 2, 3, 1)
    return images.cpu().numpy()


def decode_latents(
    pipe: Any, latents: np.ndarray | torch.Tensor, *, batch: int = DECODE_BATCH
) -> np.ndarray:
    """Decode latents ``[N, C, h, w]`` (the denoiser's scale) with ``pipe.vae``.

    Parameters
    ----------
    pipe : diffusers pipeline
        Supplies ``vae`` and ``image_processor``.
    latents : ndarray or Tensor, shape (N, C, h, w)
        Unpacked latents as the denoiser sees them (Flux's 2x2-packed sequences are
        unpacked by its family module before they get here).
    batch : int
        Latents per VAE call.

    Returns
    -------
    ndarray of uint8, shape (N, H, W, 3)

    Examples
    --------
    >>> import diffwidget
    >>> pipe = diffwidget.load_demo_pipeline()
    >>> import numpy as np
    >>> decode_latents(pipe, np.zeros((2, 4, 16, 16), np.float32)).shape
    (2, 64, 64, 3)
    """
    import torch

    vae = getattr(pipe, "vae", None)
    if vae is None:
        raise TypeError(
            f"{type(pipe).__name__} has no `vae` to decode latents with; pass the pipeline "
            "the trace came from"
        )
    if batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch}")
    config = vae.config
    original_dtype = vae.dtype
    needs_upcast = original_dtype == torch.float16 and bool(config.get("force_upcast", False))
    dtype = torch.float32 if needs_upcast else original_dtype
    scaling = float(config.get("scaling_factor", 1.0) or 1.0)
    shift = float(config.get("shift_factor", None) or 0.0)
    latents = torch.as_tensor(latents)
    chunks = []
    try:
        if needs_upcast:
            vae.to(dtype=torch.float32)
        with torch.no_grad():
            for start in range(0, len(latents), batch):
                x = latents[start : start + batch].to(device=vae.device, dtype=dtype)
                decoded = vae.decode(x / scaling + shift, return_dict=False)[0]
                chunks.append(to_uint8(_postprocess(pipe, decoded)))
    finally:
        if needs_upcast:
            vae.to(dtype=original_dtype)
    return np.concatenate(chunks)
