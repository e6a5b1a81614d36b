"""The one VAE decode: latents in the denoiser's scale to uint8 RGB images.

Every picture diffwidget shows (trace previews, activation-record x̂0 images, the widget's
noisy-latent view) goes through :func:`decode_latents`, so they all agree on the three facts
that differ between checkpoints:

* ``latents / scaling_factor + shift_factor`` (SD3 and Flux VAEs have a shift; SD's none);
* float16 VAEs with ``force_upcast`` (SD-1.x/SDXL) are decoded in float32, as the pipelines
  do, and put back in float16 afterwards, also when decoding raises;
* the pipeline's own ``image_processor`` post-processing (``[-1, 1]`` to ``[0, 1]``), then
  rounding to uint8 as diffusers' ``numpy_to_pil`` does.

Previews of every step go through :func:`decode_previews`, which uses a tiny preview decoder
in diffusers' ``AutoencoderTiny`` layout when one is available (the shipped one for the
embedded model's VAE, or a "taesd"-style folder you pass) and the full VAE otherwise; the
same three facts apply, read from the decoder's own config.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

if TYPE_CHECKING:
    import torch

#: Latents decoded per VAE call (bounds the decoder's peak memory on SD-sized VAEs).
DECODE_BATCH = 8
#: Latents per call of a tiny preview decoder (a 20-step trace in one or two calls).
TINY_BATCH = 32
#: "auto": a tiny preview decoder when one matches the VAE, else the VAE; "vae": always the
#: full VAE; "tiny": the shipped tiny decoder (an error when none matches).
PreviewDecoderName = Literal["auto", "vae", "tiny"]
PREVIEW_DECODERS: tuple[str, ...] = get_args(PreviewDecoderName)
#: A name above, an ``AutoencoderTiny`` folder, or a loaded decoder module.
PreviewDecoder = PreviewDecoderName | str | Path | Any


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
    vae = getattr(pipe, "vae", None)
    if vae is None:
        raise TypeError(
            f"{type(pipe).__name__} has no `vae` to decode latents with; pass the pipeline "
            "the trace came from"
        )
    return _decode_with(vae, pipe, latents, batch)


def _decode_with(
    vae: Any,
    pipe: Any,
    latents: np.ndarray | torch.Tensor,
    batch: int,
    *,
    channels_last: bool = False,
) -> np.ndarray:
    import torch

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
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                decoded = vae.decode(x / scaling + shift, return_dict=False)[0]
                chunks.append(to_uint8(_postprocess(pipe, decoded)))
    finally:
        if needs_upcast:
            vae.to(dtype=original_dtype)
    return np.concatenate(chunks)


def resolve_preview_decoder(pipe: Any, decoder: PreviewDecoder = "auto") -> tuple[Any, str]:
    """The module that decodes previews for ``pipe`` (``None`` = its VAE) and its name.

    Examples
    --------
    >>> import diffwidget
    >>> resolve_preview_decoder(diffwidget.load_demo_pipeline())[1]
    'shipped demo decoder'

    Raises
    ------
    ValueError
        For ``"tiny"`` when no shipped decoder matches the VAE, or an unknown name.
    """
    if decoder == "vae":
        return None, "vae"
    if isinstance(decoder, Path) or (isinstance(decoder, str) and decoder not in PREVIEW_DECODERS):
        from diffwidget.models.preview_decoder import load_preview_decoder

        param = next(pipe.vae.parameters(), None) if getattr(pipe, "vae", None) else None
        folder = Path(decoder)
        return load_preview_decoder(folder, device=getattr(param, "device", None)), folder.name
    if not isinstance(decoder, str):
        if not callable(getattr(decoder, "decode", None)):
            raise TypeError(
                f"preview_decoder must be {PREVIEW_DECODERS}, an AutoencoderTiny folder or a "
                f"decoder module; got {type(decoder).__name__}"
            )
        return decoder, type(decoder).__name__
    from diffwidget.models.preview_decoder import shipped_preview_decoder

    shipped = shipped_preview_decoder(getattr(pipe, "vae", None))
    if shipped is not None:
        return shipped, "shipped demo decoder"
    if decoder == "tiny":
        raise ValueError(
            "no shipped tiny preview decoder matches this pipeline's VAE; pass the folder of "
            "an AutoencoderTiny (e.g. a local copy of madebyollin/taesd for SD 1.x/2.x, "
            "taesdxl, taesd3, taef1) as preview_decoder=..., or preview_decoder='vae'"
        )
    return None, "vae"


def decode_previews(
    pipe: Any, latents: np.ndarray, decoder: PreviewDecoder = "auto", *, batch: int = DECODE_BATCH
) -> tuple[np.ndarray, str]:
    """Decode per-step previews: a tiny preview decoder when available, else the VAE.

    Parameters
    ----------
    pipe : diffusers pipeline
        Supplies ``vae`` and ``image_processor``.
    latents : ndarray, shape (N, C, h, w)
        Latents in the denoiser's scale (e.g. every step's x̂0).
    decoder : {"auto", "vae", "tiny"}, folder or module
        See :data:`PreviewDecoderName`; a folder is loaded as ``AutoencoderTiny``.
    batch : int
        Latents per call of the full VAE.

    Returns
    -------
    images : ndarray of uint8, shape (N, H, W, 3)
    name : str
        Which decoder made them (``"vae"``, ``"shipped demo decoder"``, a folder name).

    Examples
    --------
    >>> import diffwidget
    >>> pipe = diffwidget.load_demo_pipeline()
    >>> images, name = decode_previews(pipe, np.zeros((2, 4, 16, 16), np.float32))
    >>> images.shape, name
    ((2, 64, 64, 3), 'shipped demo decoder')
    """
    module, name = resolve_preview_decoder(pipe, decoder)
    if module is None:
        return decode_latents(pipe, latents, batch=batch), name
    channels = int(module.config.get("latent_channels", latents.shape[1]))
    if channels != latents.shape[1]:
        raise ValueError(
            f"the preview decoder {name} takes {channels}-channel latents but this pipeline's "
            f"have {latents.shape[1]}; pass the matching AutoencoderTiny folder or 'vae'"
        )
    # Narrow convolutions run about twice as fast in channels-last layout on a CPU.
    return _decode_with(module, pipe, latents, TINY_BATCH, channels_last=True), name
