"""The one VAE decode: latents in the denoiser's scale to uint8 RGB images.

Every picture diffwidget decodes (the exact x̂0 of a step, activation-record x̂0 images, the
widget's noisy-latent view) goes through :func:`decode_latents` or :func:`decode_exact`, so
they all agree on the three facts that differ between checkpoints:

* ``latents / scaling_factor + shift_factor`` (SD3 and Flux VAEs have a shift; SD's none);
* float16 VAEs with ``force_upcast`` (SD-1.x/SDXL) are decoded in float32, as the pipelines
  do, and put back in float16 afterwards, also when decoding raises; any other VAE decodes
  in its own dtype;
* the pipeline's own ``image_processor`` post-processing (``[-1, 1]`` to ``[0, 1]``), then
  rounding to uint8 as diffusers' ``numpy_to_pil`` does.

Decodes run one latent at a time by default, so a decode never needs more memory than the
pipeline's own decode of its image; the VAE's own ``enable_tiling``/``enable_slicing``
settings apply, and a decode that runs out of memory is tried once more with tiling on
(put back afterwards). :func:`vae_decode_bytes` estimates one decode's memory beforehand.

A trace's per-step previews need no VAE call at all (:mod:`diffwidget.tracing.latent_rgb`),
except where a tiny preview decoder in diffusers' ``AutoencoderTiny`` layout is asked for or
ships with the model (the embedded model's): :func:`decode_previews` runs it a few latents at
a time, the same three facts read from the decoder's own config.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

if TYPE_CHECKING:
    import torch

#: Latents decoded per VAE call: one, so no decode needs more than the pipeline's own.
DECODE_BATCH = 1
#: Pixels per call of a tiny preview decoder: 32 of the embedded model's 64² images, one
#: 724² image (a tiny decoder's widest activation at one image stays under a VAE decode's).
TINY_PIXELS_PER_CALL = 32 * 64 * 64
#: "auto": the shipped tiny decoder when one matches the VAE, else the linear map; "linear":
#: the latent→RGB map fitted on one exact decode (no VAE call per step); "vae": every step
#: decoded exactly by the full VAE (one at a time); "tiny": the shipped tiny decoder (an
#: error when none matches).
PreviewDecoderName = Literal["auto", "linear", "vae", "tiny"]
PREVIEW_DECODERS: tuple[str, ...] = get_args(PreviewDecoderName)
#: A name above, an ``AutoencoderTiny`` folder, or a loaded decoder module.
PreviewDecoder = PreviewDecoderName | str | Path | Any
#: ``Trace.facts.preview_decoder`` of previews made by the linear map.
LINEAR_DECODER = "linear"
#: Live activations of a VAE decoder at its widest point, in units of that activation, from
#: the decode's peak resident memory on the CPU (float32, one thread): 4.6 for the SD VAE's
#: layout at full width (256²), 6.2–6.5 at narrow widths (the SD layout at 1/8 width,
#: 256²–512²; the two-level test VAE, 384²–768²), where oneDNN's layout copies weigh more,
#: and up to 7.4 for the test VAE at 384² in another run of the same measurement (the
#: allocator's high-water mark varies between runs). The largest seen plus ~15 %, so that
#: the check before a trace does not undercount a decode.
DECODE_LIVE_TENSORS = 8.5
#: Widest decoder activation assumed for a VAE whose config names no channels.
DEFAULT_DECODER_CHANNELS = 256
#: Fragments of the messages of allocation failures (CUDA, MPS, the CPU allocator).
_OOM_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory", "defaultcpu")


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


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (``torch.OutOfMemoryError`` or alike)."""
    if type(error).__name__ == "OutOfMemoryError" or isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(m in text for m in _OOM_MESSAGES)


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
        Latents per VAE call (default one: the memory of one decode).

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
    return _decode_with(_vae_of(pipe), pipe, latents, batch)


def decode_exact(pipe: Any, latent: np.ndarray | torch.Tensor) -> np.ndarray:
    """The full VAE decode of one latent ``[C, h, w]`` (the denoiser's scale): uint8 ``[H, W, 3]``.

    One latent, in the VAE's own dtype (float32 only where its config asks for the
    upcast, as the pipelines do), with the VAE's own tiling/slicing settings; when it runs
    out of memory it is tried once more with tiling on.

    Examples
    --------
    >>> import diffwidget
    >>> pipe = diffwidget.load_demo_pipeline()
    >>> decode_exact(pipe, np.zeros((4, 16, 16), np.float32)).shape
    (64, 64, 3)
    """
    import torch

    latent = torch.as_tensor(latent)
    if latent.ndim != 3:
        raise ValueError(
            f"decode_exact takes one latent (C, h, w), got shape {tuple(latent.shape)}"
        )
    return _decode_with(_vae_of(pipe), pipe, latent[None], 1)[0]


def _vae_of(pipe: Any) -> Any:
    vae = getattr(pipe, "vae", None)
    if vae is None:
        raise TypeError(
            f"{type(pipe).__name__} has no `vae` to decode latents with; pass the pipeline "
            "the trace came from"
        )
    return vae


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
                decoded = _decode_tiling_on_oom(vae, x / scaling + shift)
                chunks.append(to_uint8(_postprocess(pipe, decoded)))
                del decoded
    finally:
        if needs_upcast:
            vae.to(dtype=original_dtype)
    return np.concatenate(chunks)


def _decode_tiling_on_oom(vae: Any, z: torch.Tensor) -> torch.Tensor:
    """``vae.decode(z)``; out of memory, once more with the VAE's tiling on (then off again)."""
    try:
        return vae.decode(z, return_dict=False)[0]
    except Exception as error:
        # Tiling is what diffusers offers against a decode too large for the device.
        if not is_out_of_memory(error) or getattr(vae, "use_tiling", True):
            raise
    _empty_cache(z.device)
    vae.enable_tiling()
    try:
        return vae.decode(z, return_dict=False)[0]
    finally:
        vae.disable_tiling()


def _empty_cache(device: Any) -> None:
    import torch

    if getattr(device, "type", None) == "cuda":
        torch.cuda.empty_cache()


def vae_decode_bytes(vae: Any, image_hw: tuple[int, int]) -> int:
    """Estimated peak bytes of one decode of a ``image_hw`` image by ``vae`` (one latent).

    The decoder's widest activation (the channels of each up block at the resolution it
    upsamples to) times :data:`DECODE_LIVE_TENSORS`, in the dtype the decode runs in, within
    one tile when the VAE's tiling is on; plus the float32 image it returns.

    Examples
    --------
    >>> from diffwidget.testing.tiny import tiny_sd_pipeline
    >>> vae_decode_bytes(tiny_sd_pipeline().vae, (32, 32)) > 0
    True
    """
    import torch

    config = getattr(vae, "config", {}) or {}
    channels = list(
        config.get("block_out_channels") or config.get("decoder_block_out_channels") or []
    )
    height, width = image_hw
    if getattr(vae, "use_tiling", False):
        tile = int(getattr(vae, "tile_sample_min_size", 0) or max(height, width))
        height, width = min(height, tile), min(width, tile)
    widest = DEFAULT_DECODER_CHANNELS * height * width
    if channels:
        levels = list(reversed(channels))
        steps = len(levels) - 1
        # Up block i works at 1/2**(steps - i) of the image and upsamples to twice that.
        widest = max(
            c
            * math.ceil(height / 2 ** max(steps - i - 1, 0))
            * math.ceil(width / 2 ** max(steps - i - 1, 0))
            for i, c in enumerate(levels)
        )
    dtype = getattr(vae, "dtype", torch.float32)
    if dtype == torch.float16 and bool(config.get("force_upcast", False)):
        dtype = torch.float32
    itemsize = torch.empty((), dtype=dtype).element_size()
    image = 3 * image_hw[0] * image_hw[1] * 4
    return int(DECODE_LIVE_TENSORS * widest * itemsize) + image


def resolve_preview_decoder(pipe: Any, decoder: PreviewDecoder = "auto") -> tuple[Any, str]:
    """The module that decodes previews for ``pipe`` and its name.

    The module is ``None`` for the full VAE (name ``"vae"``) and for the linear map (name
    ``"linear"``, :mod:`diffwidget.tracing.latent_rgb`).

    Examples
    --------
    >>> import diffwidget
    >>> resolve_preview_decoder(diffwidget.load_demo_pipeline())[1]
    'shipped demo decoder'
    >>> from diffwidget.testing.tiny import tiny_sd_pipeline
    >>> resolve_preview_decoder(tiny_sd_pipeline())
    (None, 'linear')

    Raises
    ------
    ValueError
        For ``"tiny"`` when no shipped decoder matches the VAE, or an unknown name.
    """
    if decoder in ("vae", LINEAR_DECODER):
        return None, str(decoder)
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
            "taesdxl, taesd3, taef1) as preview_decoder=..., or preview_decoder='linear'"
        )
    return None, LINEAR_DECODER


def check_decoder_channels(module: Any, name: str, channels: int) -> int:
    """Raise ``ValueError`` (with the fix) when a preview decoder takes other latents.

    Examples
    --------
    >>> from types import SimpleNamespace
    >>> check_decoder_channels(SimpleNamespace(config={"latent_channels": 4}), "taesd", 4)
    4
    """
    wanted = int(module.config.get("latent_channels", channels))
    if wanted != channels:
        raise ValueError(
            f"the preview decoder {name} takes {wanted}-channel latents but this pipeline's "
            f"have {channels}; pass the matching AutoencoderTiny folder or 'linear'"
        )
    return wanted


def decode_previews(
    pipe: Any, latents: np.ndarray, decoder: PreviewDecoder = "vae"
) -> tuple[np.ndarray, str]:
    """Decode per-step previews with a tiny preview decoder or, one at a time, the VAE.

    Parameters
    ----------
    pipe : diffusers pipeline
        Supplies ``vae`` and ``image_processor``.
    latents : ndarray, shape (N, C, h, w)
        Latents in the denoiser's scale (e.g. every step's x̂0).
    decoder : {"auto", "vae", "tiny"}, folder or module
        See :data:`PreviewDecoderName`; a folder is loaded as ``AutoencoderTiny``. The
        linear map decodes nothing: use :mod:`diffwidget.tracing.latent_rgb`.

    Returns
    -------
    images : ndarray of uint8, shape (N, H, W, 3)
    name : str
        Which decoder made them (``"vae"``, ``"shipped demo decoder"``, a folder name).

    Raises
    ------
    ValueError
        When ``decoder`` resolves to the linear map.

    Examples
    --------
    >>> import diffwidget
    >>> pipe = diffwidget.load_demo_pipeline()
    >>> images, name = decode_previews(pipe, np.zeros((2, 4, 16, 16), np.float32), "auto")
    >>> images.shape, name
    ((2, 64, 64, 3), 'shipped demo decoder')
    """
    module, name = resolve_preview_decoder(pipe, decoder)
    if name == LINEAR_DECODER:
        raise ValueError(
            "the linear latent→RGB map decodes nothing; fit one with "
            "diffwidget.tracing.latent_rgb.fit_latent_rgb"
        )
    if module is None:
        return decode_latents(pipe, latents), name
    check_decoder_channels(module, name, latents.shape[1])
    factor = 2 ** (len(module.config.get("decoder_block_out_channels", (0,) * 4)) - 1)
    pixels = latents.shape[-2] * latents.shape[-1] * factor * factor
    batch = max(1, TINY_PIXELS_PER_CALL // max(pixels, 1))
    # Narrow convolutions run about twice as fast in channels-last layout on a CPU.
    return _decode_with(module, pipe, latents, batch, channels_last=True), name
