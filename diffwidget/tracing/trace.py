"""The saved record of one traced diffusion run.

A :class:`Trace` holds only NumPy arrays and plain metadata, so the widget can open a
saved trace without torch installed. It is written as one ``.safetensors`` file whose
header metadata carries the JSON part; arrays keep their dtype exactly.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np

from diffwidget.tracing.facts import (
    NORMALISATION_TEXT,
    NORMALISATIONS,
    TOKEN_KINDS,
    Normalisation,
    TokenKind,
    TraceFacts,
    check_tokens,
)
from diffwidget.tracing.trace_file import (
    ARRAY_FIELDS,
    ATTN_PREFIX,
    EXTRA_PREFIX,
    FORMAT_VERSION,
    HEADS_PREFIX,
    META_KEY,
    OPTIONAL_ARRAY_FIELDS,
    TraceFileError,
    TraceHeader,
    read_trace_file,
)

__all__ = [
    "FORMAT_VERSION",
    "NORMALISATIONS",
    "NORMALISATION_TEXT",
    "TOKEN_KINDS",
    "Normalisation",
    "TokenKind",
    "Trace",
    "TraceFacts",
    "TraceFileError",
    "TraceSaveError",
]


class TraceSaveError(OSError):
    """A trace that could not be written; nothing was left at the path, the trace is intact.

    Examples
    --------
    >>> trace.save("/full-disk/run.safetensors")  # doctest: +SKIP
    TraceSaveError: [Errno 28] could not save the trace to /full-disk/run.safetensors: No
    space left on device. Nothing was written there and the trace in memory is intact: ...
    """

    def __init__(self, path: Path, error: BaseException) -> None:
        code = getattr(error, "errno", None)
        reason = getattr(error, "strerror", None) or str(error)
        if code is None and "os error 28" in str(error).lower():  # safetensors' own IO errors
            code, reason = errno.ENOSPC, os.strerror(errno.ENOSPC)
        fix = "free some space" if code == errno.ENOSPC else "check the folder is writable"
        super().__init__(
            code or errno.EIO,
            f"could not save the trace to {path}: {reason}. Nothing was written there and the "
            f"trace in memory is intact: {fix} and save again, or save elsewhere "
            "(trace.save('another/folder/run.safetensors'))",
        )


@dataclass
class Trace:
    """Everything recorded while a pipeline denoised one prompt.

    ``step`` is always the loop index ``i`` in ``0..n_steps-1``; ``timesteps[i]`` is the
    scheduler's ``t`` at that step. The two are never mixed.

    Attributes
    ----------
    prompt : str
        The prompt as given to the pipeline.
    tokens : list of str
        Token strings for the stored token positions (start, words, end, one padding).
    token_kinds : list of {"start", "word", "end", "pad"}
        Kind of each stored token; start/end/pad are hidden by default in views.
    timesteps : ndarray of int64, shape (n_steps,)
        Scheduler timestep ``t_i`` for each loop index ``i`` (rounded; flow-matching
        schedulers use ``1000 sigma``; ``facts.timesteps_exact`` keeps the exact values).
    latents : ndarray, shape (n_steps, C, h, w)
        The latent ``x_t`` handed to ``scheduler.step`` at step ``i`` (unscaled; Flux's
        2x2-packed tokens unpacked to the latent grid).
    noise_pred : ndarray, shape (n_steps, C, h, w)
        The guided model output ``uncond + w * (cond - uncond)`` at step ``i`` (epsilon, v
        or flow velocity, ``facts.prediction_type``).
    pred_x0 : ndarray, shape (n_steps, C, h, w)
        Predicted clean latent at step ``i``, computed from ``noise_pred`` without
        touching the scheduler.
    final_latent : ndarray, shape (C, h, w)
        The latent the loop ended with (before VAE decoding).
    prompt_embeds : ndarray, shape (n_halves, L, D)
        The text embeddings the denoiser attended to, one row per CFG half in
        ``facts.cfg_layout.halves`` order: ``("uncond", "cond")``, or ``("cond",)``
        without CFG (format-1 traces always hold two rows).
    attention : dict of str to ndarray
        Attention module path -> float16 array ``(n_steps, h_l, w_l, n_tokens)``: the
        image→text probabilities of the conditional half, mean over heads, on the layer's
        own spatial grid (a UNet level, or a transformer's patch grid).
        ``facts.attention_normalisation`` says what rows sum to: ``"text_softmax"``
        (cross-attention: 1 over *all* ``L`` text positions before the stored ones were
        selected) or ``"joint_share"`` (SD3/Flux joint attention: the patch's share of
        attention on text).
    guidance_scale : float
        The pipeline's CFG scale ``w``.
    previews : ndarray of uint8, shape (n_steps, h, w, 3) or (n_steps, H, W, 3), optional
        ``pred_x0`` per step as RGB (requested with ``decode_previews=True``): one pixel per
        latent cell from the linear latent→RGB map (``facts.preview_map``), or one per image
        pixel from a decoder (``facts.preview_decoder`` says which).
    image : ndarray of uint8, shape (H, W, 3), optional
        The final decoded image.
    attention_heads : dict of str to ndarray
        With per-head capture (``trace(..., attention_heads=True)``): layer path -> float16
        ``(n_steps, n_heads, h_l, w_l, n_tokens)``, the same probabilities before the mean
        over heads. Empty otherwise.
    extra : dict of str to ndarray
        The denoiser's other call arguments, for replay (SDXL ``text_embeds``/``time_ids``,
        SD3/Flux ``pooled_projections``, Flux ``guidance``/``txt_ids``/``img_ids``, PixArt's
        ``encoder_attention_mask``): one row per CFG half on axis 0, except the
        batch-free ids; ``facts.conditioning`` says how to rebuild the call.
    facts : TraceFacts
        Everything else the trace records (:mod:`diffwidget.tracing.facts`): family, CFG and
        latent layouts, noise schedule, token positions, pipeline and scheduler, seed, size,
        versions. Saved as the header's ``meta``.
    """

    prompt: str
    tokens: list[str]
    token_kinds: list[TokenKind]
    timesteps: np.ndarray
    latents: np.ndarray
    noise_pred: np.ndarray
    pred_x0: np.ndarray
    final_latent: np.ndarray
    prompt_embeds: np.ndarray
    attention: dict[str, np.ndarray]
    guidance_scale: float
    previews: np.ndarray | None = None
    image: np.ndarray | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    facts: TraceFacts = field(default_factory=TraceFacts)
    attention_heads: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_tokens(self.tokens, list(self.token_kinds))
        n = len(self.timesteps)
        for name in ("latents", "noise_pred", "pred_x0"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} steps, expected {n}")

    @property
    def n_steps(self) -> int:
        """Number of denoising steps recorded."""
        return len(self.timesteps)

    @property
    def latent_shape(self) -> tuple[int, int]:
        """Spatial size ``(h, w)`` of the latent grid."""
        return (int(self.latents.shape[-2]), int(self.latents.shape[-1]))

    @property
    def word_indices(self) -> list[int]:
        """Positions (into ``tokens``) of the prompt's own tokens."""
        return [i for i, k in enumerate(self.token_kinds) if k == "word"]

    def nbytes_per_step(self) -> int:
        """Bytes this trace stores per step (all per-step arrays together)."""
        per_step = [self.latents, self.noise_pred, self.pred_x0, *self.attention.values()]
        per_step += list(self.attention_heads.values())
        if self.previews is not None:
            per_step.append(self.previews)
        return sum(int(a.nbytes) for a in per_step) // max(self.n_steps, 1)

    def save(self, path: str | Path) -> Path:
        """Write the trace to one ``.safetensors`` file (lossless).

        The file is written beside ``path`` under a temporary name and renamed into place
        only when complete, so a failed save (a full disk) leaves no partial file, and an
        earlier file at ``path`` untouched.

        Raises
        ------
        TraceSaveError
            When the file cannot be written (its ``errno`` is the system's, e.g. ``ENOSPC``);
            the trace in memory is unchanged and can be saved elsewhere.

        Examples
        --------
        >>> path = trace.save("run.safetensors")  # doctest: +SKIP
        >>> Trace.load(path).n_steps  # doctest: +SKIP
        20
        """
        from safetensors import SafetensorError
        from safetensors.numpy import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(path.suffix + ".safetensors")
        arrays: dict[str, np.ndarray] = {}
        for name in ARRAY_FIELDS:
            arrays[name] = np.ascontiguousarray(getattr(self, name))
        for name in OPTIONAL_ARRAY_FIELDS:
            value = getattr(self, name)
            if value is not None:
                arrays[name] = np.ascontiguousarray(value)
        for layer, value in self.attention.items():
            arrays[ATTN_PREFIX + layer] = np.ascontiguousarray(value)
        for layer, value in self.attention_heads.items():
            arrays[HEADS_PREFIX + layer] = np.ascontiguousarray(value)
        for key, value in self.extra.items():
            arrays[EXTRA_PREFIX + key] = np.ascontiguousarray(value)
        header = TraceHeader(
            prompt=self.prompt,
            tokens=list(self.tokens),
            token_kinds=list(self.token_kinds),
            guidance_scale=float(self.guidance_scale),
            attention_layers=list(self.attention),
            meta=self.facts,
        )
        # Python's JSON: a scheduler config may hold -inf (NaN/Infinity tokens, read back).
        metadata = {META_KEY: json.dumps(header.to_json())}
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(arrays, str(partial), metadata=metadata)
            os.replace(partial, path)
        except (OSError, SafetensorError) as error:
            partial.unlink(missing_ok=True)
            raise TraceSaveError(path, error) from error
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        """Read a trace written by :meth:`save`.

        Parameters
        ----------
        path : str or Path
            A ``.safetensors`` file written by :meth:`save`.

        Returns
        -------
        Trace
            The trace, arrays bit-identical to the saved ones.

        Raises
        ------
        FileNotFoundError, IsADirectoryError, PermissionError
            If ``path`` is missing, a folder, or cannot be read.
        TraceFileError
            If the file is not a diffwidget trace, or is truncated or damaged; the message
            names the file and what is wrong with it.

        Examples
        --------
        >>> trace = Trace.load("run.safetensors")  # doctest: +SKIP
        >>> trace.n_steps  # doctest: +SKIP
        20
        """
        path = Path(path)
        header, arrays = read_trace_file(path)
        layers = header.attention_layers
        try:
            return cls(
                prompt=header.prompt,
                tokens=list(header.tokens),
                # Checked against TOKEN_KINDS by the header (check_tokens).
                token_kinds=cast(list[TokenKind], list(header.token_kinds)),
                attention={layer: arrays[ATTN_PREFIX + layer] for layer in layers},
                guidance_scale=header.guidance_scale,
                extra={
                    key[len(EXTRA_PREFIX) :]: value
                    for key, value in arrays.items()
                    if key.startswith(EXTRA_PREFIX)
                },
                # Layer order follows the mean-over-heads maps.
                attention_heads={
                    layer: arrays[HEADS_PREFIX + layer]
                    for layer in layers
                    if HEADS_PREFIX + layer in arrays
                },
                facts=header.meta,
                previews=arrays.get("previews"),
                image=arrays.get("image"),
                **{name: arrays[name] for name in ARRAY_FIELDS},
            )
        except ValueError as error:  # __post_init__'s consistency checks
            raise TraceFileError(path, str(error)) from None
