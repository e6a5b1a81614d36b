"""Tiny preview decoders in diffusers' ``AutoencoderTiny`` layout ("TAESD"-style folders).

A trace shows the predicted clean image of every step. Decoding all of them through the
full VAE costs as much as a sizeable part of the generation itself, so previews go through
a much smaller decoder distilled from that VAE (the approach of Ollin Boer Bohan's TAESD,
which diffusers loads as ``AutoencoderTiny``). The package ships one for the embedded
model's VAE (:data:`SHIPPED`); for Stable Diffusion, SDXL, SD3 or Flux pass a folder of
such weights (``madebyollin/taesd``, ``taesdxl``, ``taesd3``, ``taef1`` downloaded by you).

A shipped decoder is only used for the VAE it was distilled from: each folder records a
fingerprint of that VAE's decoder weights (:func:`vae_fingerprint`), and
:func:`shipped_preview_decoder` returns ``None`` for any other VAE.

Examples
--------
>>> from diffwidget.models.loader import load_demo_pipeline
>>> pipe = load_demo_pipeline()
>>> shipped_preview_decoder(pipe.vae) is not None
True
"""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path
from typing import Any

#: Folder of the decoders that ship with the package, one sub-folder each.
PREVIEW_DIR = Path(__file__).resolve().parent / "preview"
#: Shipped decoders by name.
SHIPPED: dict[str, Path] = {"demo": PREVIEW_DIR / "demo"}
#: File beside the weights that records what a shipped decoder was distilled from.
PROVENANCE_FILE = "preview.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"

_FINGERPRINTS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_LOADED: dict[tuple[str, str], Any] = {}


def vae_fingerprint(vae: Any) -> str:
    """A short hash of a VAE's decoder weights and latent scaling (cached per module).

    Weights and the scaling and shift factors enter rounded to three decimals.

    Parameters
    ----------
    vae : AutoencoderKL or compatible
        The VAE whose decoder a preview decoder imitates.

    Returns
    -------
    str
        16 hex digits; equal for the same decoder weights in any dtype or device.
    """
    cached = _FINGERPRINTS.get(vae)
    if cached is not None:
        return cached
    import torch

    digest = hashlib.sha256()
    config = getattr(vae, "config", {})
    # Rounded like the weights (a re-estimated scaling factor that moves in the fourth
    # digit decodes the same); a missing shift is no shift.
    scaling = round(float(config.get("scaling_factor") or 1.0), 3)
    shift = round(float(config.get("shift_factor") or 0.0), 3)
    digest.update(f"latent_channels={config.get('latent_channels')!r};".encode())
    digest.update(f"scaling_factor={scaling!r};shift_factor={shift!r};".encode())
    decoder = getattr(vae, "decoder", vae)
    with torch.no_grad():
        for name, tensor in sorted(decoder.state_dict().items()):
            digest.update(name.encode())
            # Rounded float32 so fp16/fp32 copies of the same weights agree.
            values = tensor.detach().to("cpu", torch.float32).numpy().round(3)
            digest.update(values.tobytes())
    fingerprint = digest.hexdigest()[:16]
    _FINGERPRINTS[vae] = fingerprint
    return fingerprint


def load_preview_decoder(path: str | Path, device: Any = None, dtype: Any = None) -> Any:
    """Load an ``AutoencoderTiny`` folder (``config.json`` + weights), offline.

    Parameters
    ----------
    path : str or Path
        A diffusers ``AutoencoderTiny`` folder, e.g. a local copy of ``madebyollin/taesd``.
    device, dtype : optional
        Where to put it (default: CPU, float32).

    Returns
    -------
    AutoencoderTiny
        In eval mode.

    Raises
    ------
    FileNotFoundError
        When the folder has no ``config.json``.

    Examples
    --------
    >>> decoder = load_preview_decoder(SHIPPED["demo"])
    >>> type(decoder).__name__
    'AutoencoderTiny'
    """
    import torch

    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not an AutoencoderTiny folder (no config.json); pass a folder such "
            "as a local copy of madebyollin/taesd (SD 1.x/2.x), taesdxl, taesd3 or taef1"
        )
    key = (str(folder.resolve()), f"{device}/{dtype}")
    if key in _LOADED:
        return _LOADED[key]
    from diffusers import AutoencoderTiny

    from diffwidget.models.loader import _quiet_diffusers

    # diffusers writes `block_out_channels` into every AutoencoderTiny config it saves and
    # then warns that it is unexpected when loading it; nothing is wrong with the folder.
    with _quiet_diffusers():
        decoder = AutoencoderTiny.from_pretrained(
            str(folder), local_files_only=True, torch_dtype=dtype or torch.float32
        )
    # Channels-last: its 16-channel convolutions run about twice as fast on a CPU.
    decoder = decoder.to(device or "cpu", memory_format=torch.channels_last).eval()
    decoder.requires_grad_(False)
    _LOADED[key] = decoder
    return decoder


def provenance(name: str = "demo") -> dict[str, Any]:
    """What a shipped decoder records about its training (``preview.json``)."""
    path = SHIPPED[name] / PROVENANCE_FILE
    return dict(json.loads(path.read_text())) if path.is_file() else {}


def shipped_preview_decoder(vae: Any) -> Any | None:
    """The shipped preview decoder distilled from ``vae``, or ``None`` if there is none.

    Examples
    --------
    >>> from diffwidget.testing.tiny import tiny_sd_pipeline
    >>> shipped_preview_decoder(tiny_sd_pipeline().vae) is None
    True
    """
    if vae is None or not hasattr(vae, "decoder"):
        return None
    fingerprint = None
    for name, folder in SHIPPED.items():
        recorded = provenance(name).get("vae_fingerprint")
        if recorded is None or not (folder / WEIGHTS_FILE).is_file():
            continue
        fingerprint = fingerprint or vae_fingerprint(vae)
        if recorded == fingerprint:
            param = next(vae.parameters(), None)
            device = param.device if param is not None else None
            return load_preview_decoder(folder, device=device)
    return None
