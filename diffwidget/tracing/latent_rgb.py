"""Per-step previews without a VAE call: a linear latent→RGB map fitted on one exact decode.

Image tools show the denoising live by multiplying each latent cell by fixed ``[C, 3]``
factors (one set per latent space: SD 1.x/2.x, SDXL, SD3, Flux). diffwidget fits those
factors for the pipeline at hand instead, so they hold for any checkpoint, fine-tune or
random-weight test model: a least-squares fit, with a bias, of the RGB colour each latent
cell decodes to on the cell's channels,

    rgb(cell) ≈ latent(cell) @ weights + bias,

where the target colour of a cell is the mean of the pixels it covers (the ``f × f`` block
of a VAE with scale factor ``f``) in the pipeline's exact decode, clipped to ``[0, 1]`` as the
image processor clips it. The one exact decode is the pipeline's own decode of the final
latent (seen by :class:`DecodeCapture`, so it costs nothing), else one decode of the final
latent by :func:`~diffwidget.tracing.decode.decode_exact`.

Why the final image: it is the only decode of the run that exists without an extra VAE call,
and it holds the colours every step's x̂0 converges to. Fitted on step 0's x̂0 instead (the
only latent available before the loop), the map reproduced later steps far worse on the
embedded model (17–18 dB PSNR against 24–33 dB; ``tests/tracing/test_latent_rgb.py``
measures the final-image fit against the exact decode of every step, for every family).

Previews made with the map have one pixel per latent cell (``[N, h, w, 3]`` uint8): the map
cannot recover detail finer than a cell, so storing more would store nothing new.

Examples
--------
>>> import numpy as np
>>> latent = np.random.default_rng(0).normal(size=(4, 8, 8)).astype(np.float32)
>>> true = np.array([[0.1, 0.05, 0.0], [0.0, 0.1, 0.05], [0.05, 0.0, 0.1], [0.0, 0.0, 0.0]])
>>> colours = np.clip(np.moveaxis(latent, 0, -1) @ true + 0.5, 0, 1)
>>> fitted = fit_latent_rgb(latent, colours, source="pipeline decode")
>>> bool(np.allclose(fitted.weights, true, atol=1e-4)), fitted.fit_psnr_db > 60
(True, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

import numpy as np

from diffwidget.records import MaxLen, Record

if TYPE_CHECKING:
    import torch

#: Where the one exact decode the map was fitted on came from.
MapSource = Literal["pipeline decode", "exact decode"]
MAP_SOURCES: tuple[str, ...] = get_args(MapSource)
#: Latent channels a map may have (SD/SDXL 4, SD3/Flux 16; far above any VAE's).
MAX_CHANNELS = 64
#: Steps converted at once (bounds the float scratch of a long, large trace).
CHUNK_STEPS = 8
#: uint8 pixels.
_RGB_MAX = 255.0
#: Peak signal of colours in [0, 1], for PSNR.
_PEAK = 1.0


@dataclass(frozen=True)
class LatentRgbMap(Record):
    """A fitted latent→RGB map: ``rgb = latent @ weights + bias`` per latent cell.

    Attributes
    ----------
    weights : list of list of float, shape (C, 3)
        One RGB row per latent channel, for latents in the denoiser's scale (as
        ``Trace.pred_x0`` stores them).
    bias : list of float, shape (3,)
        RGB added to every cell (colours are in ``[0, 1]``).
    source : {"pipeline decode", "exact decode"}
        The one exact decode it was fitted on: the pipeline's own decode of the final latent,
        or diffwidget's (when the pipeline's was not seen).
    fit_psnr_db : float
        PSNR (dB, peak 1) of the map's colours against that decode's, on the latent grid.
    """

    weights: Annotated[list[list[float]], MaxLen(MAX_CHANNELS)]
    bias: Annotated[list[float], MaxLen(3)]
    source: MapSource
    fit_psnr_db: float

    def __post_init__(self) -> None:
        if len(self.bias) != 3 or any(len(row) != 3 for row in self.weights):
            raise ValueError("a latent→RGB map has 3 bias values and 3 weights per channel")

    @property
    def channels(self) -> int:
        """Latent channels the map takes."""
        return len(self.weights)

    def colours(self, latents: np.ndarray) -> np.ndarray:
        """Float RGB ``[N, h, w, 3]`` of latents ``[N, C, h, w]`` (not clipped)."""
        if latents.ndim != 4 or latents.shape[1] != self.channels:
            raise ValueError(
                f"this map takes latents of shape (N, {self.channels}, h, w), got "
                f"{latents.shape}; fit a map for this latent space"
            )
        weights = np.asarray(self.weights, dtype=np.float32)
        cells = np.moveaxis(np.asarray(latents, dtype=np.float32), 1, -1)
        return cells @ weights + np.asarray(self.bias, dtype=np.float32)

    def images(self, latents: np.ndarray) -> np.ndarray:
        """uint8 RGB previews ``[N, h, w, 3]``, one pixel per latent cell.

        Examples
        --------
        >>> flat = LatentRgbMap([[0.0] * 3] * 4, [0.5, 0.5, 0.5], "exact decode", 30.0)
        >>> flat.images(np.zeros((2, 4, 3, 3), np.float32))[0, 0, 0].tolist()
        [128, 128, 128]
        """
        out = np.empty((len(latents), *latents.shape[2:], 3), dtype=np.uint8)
        for start in range(0, len(latents), CHUNK_STEPS):
            rgb = self.colours(latents[start : start + CHUNK_STEPS])
            out[start : start + CHUNK_STEPS] = _to_uint8(rgb)
        return out


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    # As diffwidget.tracing.decode.to_uint8 (kept here so this module needs no torch).
    return (np.clip(rgb, 0.0, 1.0) * _RGB_MAX).round().astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of colours in ``[0, 1]`` (``inf`` when equal)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(_PEAK**2 / mse))


def fit_latent_rgb(latent: np.ndarray, colours: np.ndarray, *, source: MapSource) -> LatentRgbMap:
    """Least-squares map from one latent ``[C, h, w]`` to its cells' colours ``[h, w, 3]``.

    Parameters
    ----------
    latent : ndarray, shape (C, h, w)
        A latent in the denoiser's scale.
    colours : ndarray, shape (h, w, 3)
        The mean colour in ``[0, 1]`` of the pixels each cell decodes to (see
        :func:`cell_colours`).
    source : {"pipeline decode", "exact decode"}
        Recorded with the map.

    Raises
    ------
    ValueError
        When the shapes disagree, or the decode holds no colour to fit (a constant image,
        e.g. one a safety checker blacked out, leaves the weights undetermined).
    """
    channels, h, w = latent.shape
    if colours.shape != (h, w, 3):
        raise ValueError(f"colours of shape {colours.shape} for a latent of shape {latent.shape}")
    cells = np.moveaxis(latent, 0, -1).reshape(-1, channels).astype(np.float64)
    target = colours.reshape(-1, 3).astype(np.float64)
    if not (np.isfinite(cells).all() and np.isfinite(target).all()):
        raise ValueError("the decode or its latent holds NaN or infinite values")
    if float(target.std(axis=0).max()) == 0.0 or float(cells.std(axis=0).max()) == 0.0:
        raise ValueError(
            "the decode is a single colour (or its latent constant): nothing to fit a "
            "latent→RGB map on"
        )
    design = np.concatenate([cells, np.ones((len(cells), 1))], axis=1)
    solution, *_ = np.linalg.lstsq(design, target, rcond=None)
    fitted = np.clip(design @ solution, 0.0, 1.0)
    return LatentRgbMap(
        weights=solution[:-1].tolist(),
        bias=solution[-1].tolist(),
        source=source,
        fit_psnr_db=round(psnr(fitted, target), 3),
    )


def cell_colours(decoded: torch.Tensor, latent_hw: tuple[int, int]) -> np.ndarray:
    """Mean colour ``[h, w, 3]`` in ``[0, 1]`` of the pixels over each latent cell.

    Parameters
    ----------
    decoded : Tensor, shape (1, 3, H, W)
        A VAE's output (``[-1, 1]``), on any device and dtype; ``H`` and ``W`` are whole
        multiples of the latent grid.
    latent_hw : tuple of int
        The latent grid ``(h, w)``.
    """
    import torch.nn.functional as F

    height, width = decoded.shape[-2:]
    h, w = latent_hw
    if height % h or width % w or decoded.shape[:2] != (1, 3):
        raise ValueError(
            f"a decode of shape {tuple(decoded.shape)} does not cover a {h}×{w} latent grid"
        )
    # Clipped as the image processor clips it, then averaged: the colour a viewer sees.
    pixels = (decoded.detach().float() / 2 + 0.5).clamp_(0, 1)
    means = F.avg_pool2d(pixels, (height // h, width // w))
    return means[0].permute(1, 2, 0).cpu().numpy()


class DecodeCapture:
    """Sees the pipeline's own VAE decode of the final latent, for the map to be fitted on.

    While installed, ``vae.decode`` is wrapped on the instance (as ``scheduler.step`` is by
    the trace); each call of one latent keeps that latent (in the denoiser's scale) and the
    colours of its cells, never the decoded image itself.

    Parameters
    ----------
    vae : AutoencoderKL or compatible
        The pipeline's VAE.
    """

    def __init__(self, vae: Any) -> None:
        self.vae = vae
        self.latent: np.ndarray | None = None
        self.colours: np.ndarray | None = None
        self._had_instance_decode = False
        self._original: Any = None

    def install(self) -> None:
        """Wrap ``vae.decode``; :meth:`remove` puts it back."""
        vae = self.vae
        self._had_instance_decode = "decode" in vars(vae)
        original = vae.decode
        self._original = original
        config = vae.config
        scaling = float(config.get("scaling_factor", 1.0) or 1.0)
        shift = float(config.get("shift_factor", None) or 0.0)

        def decode(z: Any, *args: Any, **kwargs: Any) -> Any:
            out = original(z, *args, **kwargs)
            self._seen(z, out, scaling, shift)
            return out

        vae.decode = decode

    def _seen(self, z: Any, out: Any, scaling: float, shift: float) -> None:
        import torch

        decoded = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
        if not isinstance(z, torch.Tensor) or not isinstance(decoded, torch.Tensor):
            return
        if z.ndim != 4 or z.shape[0] != 1 or decoded.ndim != 4 or decoded.shape[1] != 3:
            return
        with torch.no_grad():
            try:
                colours = cell_colours(decoded, (int(z.shape[-2]), int(z.shape[-1])))
            except ValueError:
                return  # not a decode of this latent grid (a pipeline's own extra use)
            # The pipeline decodes latent / scaling + shift: back to the denoiser's scale.
            latent = ((z[0].detach().float() - shift) * scaling).cpu().numpy()
        self.latent, self.colours = latent, colours

    def remove(self) -> None:
        """Put ``vae.decode`` back (safe to call twice)."""
        if self._original is None:
            return
        if self._had_instance_decode:
            self.vae.decode = self._original
        else:
            vars(self.vae).pop("decode", None)
        self._original = None

    def fit(self) -> LatentRgbMap | None:
        """The map fitted on the captured decode, or ``None`` when none was seen."""
        if self.latent is None or self.colours is None:
            return None
        return fit_latent_rgb(self.latent, self.colours, source="pipeline decode")


__all__ = [
    "MAP_SOURCES",
    "DecodeCapture",
    "LatentRgbMap",
    "MapSource",
    "cell_colours",
    "fit_latent_rgb",
    "psnr",
]
