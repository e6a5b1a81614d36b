"""A trace's previews: the ``vae.decode`` tap and what it makes after the loop.

The tap (:class:`PreviewTap`, named ``vae.decode``) sees the pipeline's own decode of the
final latent (:class:`~diffwidget.tracing.latent_rgb.DecodeCapture`); nothing runs per step
in the loop. After it, :meth:`PreviewTap.outcome` makes the previews of every step's x̂0:

* ``"linear"`` (the default for any VAE without a shipped tiny decoder): the latent→RGB map
  fitted on that one decode, one pixel per latent cell, no VAE call at all; when the
  pipeline's decode was not seen (or failed) the final latent is decoded once, exactly;
* a tiny ``AutoencoderTiny`` decoder (shipped with the embedded model, or a folder), a few
  latents per call; ``"vae"``: the full VAE, one latent at a time.

Whatever fails here (a decode out of memory, a map that cannot be fitted) costs the previews
or the image, never the recorded steps: the outcome lists what is missing and why
(:class:`~diffwidget.tracing.facts.Missing`). When the pipeline itself failed after the loop,
the final image is decoded once more (with the VAE's tiling on if memory runs out).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from diffwidget.tracing.decode import (
    LINEAR_DECODER,
    PreviewDecoder,
    decode_exact,
    decode_previews,
    resolve_preview_decoder,
)
from diffwidget.tracing.facts import Missing
from diffwidget.tracing.latent_rgb import DecodeCapture, LatentRgbMap, fit_latent_rgb
from diffwidget.tracing.taps import LoopState, Tap, TapKind

if TYPE_CHECKING:
    from diffwidget.tracing.families.base import LatentLayout

#: Longest error text kept in a trace's facts.
MAX_REASON = 600


@dataclass
class PreviewOutcome:
    """What the previews step produced: images, their decoder, the map, what is missing."""

    previews: np.ndarray | None = None
    decoder: str | None = None
    preview_map: LatentRgbMap | None = None
    #: The final image decoded here, when the pipeline's own decode failed.
    image: np.ndarray | None = None
    missing: list[Missing] = field(default_factory=list)


def reason(error: BaseException) -> str:
    """``"Type: message"`` of ``error``, cut to :data:`MAX_REASON` characters."""
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"


def image_colours(image: np.ndarray, latent_hw: tuple[int, int]) -> np.ndarray:
    """Mean colour ``[h, w, 3]`` in ``[0, 1]`` of the uint8 pixels over each latent cell."""
    height, width = image.shape[:2]
    h, w = latent_hw
    blocks = image.reshape(h, height // h, w, width // w, 3).astype(np.float64)
    return blocks.mean(axis=(1, 3)) / 255.0


class PreviewTap(Tap):
    """The ``vae.decode`` tap: sees the pipeline's own decode, then makes the previews.

    Parameters
    ----------
    pipe : diffusers pipeline
        The traced pipeline (its ``vae`` is wrapped while installed, if it has one).
    decoder : {"auto", "linear", "vae", "tiny"}, folder or module
        What makes the previews (see :mod:`diffwidget.tracing.decode`).
    """

    kind: ClassVar[TapKind] = "decode"

    def __init__(self, pipe: Any, decoder: PreviewDecoder = "auto") -> None:
        super().__init__("vae.decode")
        self.pipe = pipe
        self.decoder = decoder
        vae = getattr(pipe, "vae", None)
        self.capture = DecodeCapture(vae) if vae is not None else None

    def paths(self) -> tuple[str, ...]:
        """The wrapped method."""
        return ("vae.decode",) if self.capture is not None else ()

    def install(self, loop: LoopState) -> None:
        """Wrap the VAE's ``decode`` (nothing without a VAE)."""
        super().install(loop)
        if self.capture is not None:
            self.capture.latent = self.capture.colours = None
            self.capture.install()

    def remove(self) -> None:
        """Put the VAE's ``decode`` back."""
        if self.capture is not None:
            self.capture.remove()
        super().remove()

    # ------------------------------------------------------------------ after the loop
    def outcome(
        self,
        shown_x0: np.ndarray | None,
        final_latent: np.ndarray,
        layout: LatentLayout,
        *,
        image_failed: str | None = None,
    ) -> PreviewOutcome:
        """The previews of ``shown_x0`` (``None``: previews off) and what is missing.

        Parameters
        ----------
        shown_x0 : ndarray, shape (N, C, h, w), optional
            The x̂0 each preview shows; ``None`` when previews are off.
        final_latent : ndarray, shape (C, h, w)
            The latent the loop ended with.
        layout : LatentLayout
            The latent grid.
        image_failed : str, optional
            Why the pipeline returned no image (it raised after the loop); with previews on,
            the final latent is then decoded here, once.
        """
        out = PreviewOutcome()
        exact = _ExactDecode(self.pipe, final_latent)
        if shown_x0 is not None:
            try:
                self._previews(out, exact, shown_x0, final_latent, layout)
            except Exception as error:  # the trace is kept without them
                out.missing.append(Missing("previews", reason(error)))
        if image_failed is None:
            return out  # the pipeline's image stands; a decode made here only fitted the map
        out.image = exact.image if shown_x0 is not None else None
        if out.image is None and shown_x0 is not None and exact.error is None:
            exact.run()
            out.image = exact.image
        if out.image is None:
            cause = f"the pipeline raised after the last step ({image_failed})"
            if exact.error is not None:
                cause += f"; decoding the final latent again failed too ({exact.error})"
            out.missing.append(Missing("image", cause))
        return out

    def _previews(
        self,
        out: PreviewOutcome,
        exact: _ExactDecode,
        shown_x0: np.ndarray,
        final_latent: np.ndarray,
        layout: LatentLayout,
    ) -> None:
        _module, name = resolve_preview_decoder(self.pipe, self.decoder)
        if name != LINEAR_DECODER:
            out.previews, out.decoder = decode_previews(self.pipe, shown_x0, self.decoder)
            return
        fitted = self.capture.fit() if self.capture is not None else None
        if fitted is None:
            # The pipeline's decode was not seen (it failed, or returned latents): one here.
            image = exact.run()
            if image is None:
                raise RuntimeError(
                    f"the one exact decode the latent→RGB map is fitted on failed ({exact.error})"
                )
            colours = image_colours(image, layout.latent_hw)
            fitted = fit_latent_rgb(final_latent, colours, source="exact decode")
        out.preview_map = fitted
        out.previews = fitted.images(shown_x0)
        out.decoder = LINEAR_DECODER


class _ExactDecode:
    """The one exact decode of the final latent, made at most once, its error kept."""

    def __init__(self, pipe: Any, latent: np.ndarray) -> None:
        self.pipe, self.latent = pipe, latent
        self.image: np.ndarray | None = None
        self.error: str | None = None
        self._done = False

    def run(self) -> np.ndarray | None:
        if not self._done:
            self._done = True
            try:
                self.image = decode_exact(self.pipe, self.latent)
            except Exception as error:  # reported by the caller as what is missing
                self.error = reason(error)
        return self.image


__all__ = ["PreviewOutcome", "PreviewTap", "image_colours"]
