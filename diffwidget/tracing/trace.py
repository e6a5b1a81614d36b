"""The saved record of one traced diffusion run.

A :class:`Trace` holds only NumPy arrays and plain metadata, so the widget can open a
saved trace without torch installed. It is written as one ``.safetensors`` file whose
header metadata carries the JSON part; arrays keep their dtype exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

TokenKind = Literal["start", "word", "end", "pad"]
TOKEN_KINDS: tuple[str, ...] = get_args(TokenKind)
#: What the rows of ``Trace.attention`` sum to (``meta["attention_normalisation"]``).
Normalisation = Literal["text_softmax", "joint_share"]
NORMALISATIONS: tuple[str, ...] = get_args(Normalisation)
#: What each normalisation means, for metadata and overlay captions.
NORMALISATION_TEXT: dict[str, str] = {
    "text_softmax": "softmax over the text tokens (cross-attention): each patch's row sums to 1",
    "joint_share": (
        "image→text block of the joint softmax over image and text keys (raw joint share, "
        "not renormalised over text): each patch's row sums to its share of attention on text"
    ),
}

#: Format 2 records the denoiser family, the CFG layout and the denoiser's call arguments
#: (``meta["family"]``, ``["cfg_layout"]``, ``["conditioning"]``, ``["model_timesteps"]``);
#: format-1 files (UNet pipelines) still load and replay.
FORMAT_VERSION = 2
_META_KEY = "diffwidget"
_ATTN_PREFIX = "attention/"
_EXTRA_PREFIX = "extra/"
_ARRAY_FIELDS = ("timesteps", "latents", "noise_pred", "pred_x0", "final_latent", "prompt_embeds")
_OPTIONAL_ARRAY_FIELDS = ("previews", "image")


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
        schedulers use ``1000 sigma``; ``meta["timesteps_exact"]`` keeps the exact values).
    latents : ndarray, shape (n_steps, C, h, w)
        The latent ``x_t`` handed to ``scheduler.step`` at step ``i`` (unscaled; Flux's
        2x2-packed tokens unpacked to the latent grid).
    noise_pred : ndarray, shape (n_steps, C, h, w)
        The guided model output ``uncond + w * (cond - uncond)`` at step ``i`` (epsilon, v
        or flow velocity, ``meta["prediction_type"]``).
    pred_x0 : ndarray, shape (n_steps, C, h, w)
        Predicted clean latent at step ``i``, computed from ``noise_pred`` without
        touching the scheduler.
    final_latent : ndarray, shape (C, h, w)
        The latent the loop ended with (before VAE decoding).
    prompt_embeds : ndarray, shape (n_halves, L, D)
        The text embeddings the denoiser attended to, one row per CFG half in
        ``meta["cfg_layout"]["halves"]`` order: ``("uncond", "cond")``, or ``("cond",)``
        without CFG (format-1 traces always hold two rows).
    attention : dict of str to ndarray
        Attention module path -> float16 array ``(n_steps, h_l, w_l, n_tokens)``: the
        image→text probabilities of the conditional half, mean over heads, on the layer's
        own spatial grid (a UNet level, or a transformer's patch grid).
        ``meta["attention_normalisation"]`` says what rows sum to: ``"text_softmax"``
        (cross-attention: 1 over *all* ``L`` text positions before the stored ones were
        selected) or ``"joint_share"`` (SD3/Flux joint attention: the patch's share of
        attention on text).
    guidance_scale : float
        The pipeline's CFG scale ``w``.
    previews : ndarray of uint8, shape (n_steps, H, W, 3), optional
        Decoded ``pred_x0`` per step (requested with ``decode_previews=True``).
    image : ndarray of uint8, shape (H, W, 3), optional
        The final decoded image.
    extra : dict of str to ndarray
        The denoiser's other call arguments, for replay (SDXL ``text_embeds``/``time_ids``,
        SD3/Flux ``pooled_projections``, Flux ``guidance``/``txt_ids``/``img_ids``, PixArt's
        ``encoder_attention_mask``): one row per CFG half on axis 0, except the
        batch-free ids; ``meta["conditioning"]`` says how to rebuild the call.
    meta : dict
        JSON-serialisable facts: pipeline and scheduler class, scheduler config, seed,
        height, width, negative prompt, prediction type, token indices kept, versions.
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
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.token_kinds):
            raise ValueError(
                f"tokens ({len(self.tokens)}) and token_kinds ({len(self.token_kinds)}) "
                "must have the same length"
            )
        bad = [k for k in self.token_kinds if k not in TOKEN_KINDS]
        if bad:
            raise ValueError(f"unknown token kinds {bad}; use one of {TOKEN_KINDS}")
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
        if self.previews is not None:
            per_step.append(self.previews)
        return sum(int(a.nbytes) for a in per_step) // max(self.n_steps, 1)

    def save(self, path: str | Path) -> Path:
        """Write the trace to one ``.safetensors`` file (lossless).

        Examples
        --------
        >>> path = trace.save("run.safetensors")  # doctest: +SKIP
        >>> Trace.load(path).n_steps  # doctest: +SKIP
        20
        """
        from safetensors.numpy import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(path.suffix + ".safetensors")
        arrays: dict[str, np.ndarray] = {}
        for name in _ARRAY_FIELDS:
            arrays[name] = np.ascontiguousarray(getattr(self, name))
        for name in _OPTIONAL_ARRAY_FIELDS:
            value = getattr(self, name)
            if value is not None:
                arrays[name] = np.ascontiguousarray(value)
        for layer, value in self.attention.items():
            arrays[_ATTN_PREFIX + layer] = np.ascontiguousarray(value)
        for key, value in self.extra.items():
            arrays[_EXTRA_PREFIX + key] = np.ascontiguousarray(value)
        header = {
            "format_version": FORMAT_VERSION,
            "prompt": self.prompt,
            "tokens": self.tokens,
            "token_kinds": list(self.token_kinds),
            "guidance_scale": self.guidance_scale,
            # Layer order is part of the record; safetensors sorts keys on disk.
            "attention_layers": list(self.attention),
            "meta": self.meta,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(arrays, str(path), metadata={_META_KEY: json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        """Read a trace written by :meth:`save`."""
        from safetensors import safe_open
        from safetensors.numpy import load_file

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no trace at {path}; save one with trace.save(path)")
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
        if _META_KEY not in metadata:
            raise ValueError(f"{path} is a safetensors file but not a diffwidget trace")
        header = json.loads(metadata[_META_KEY])
        if header.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"{path} was written by a newer diffwidget (format "
                f"{header['format_version']}); upgrade with `pip install -U diffwidget`"
            )
        arrays = load_file(str(path))
        attention = {layer: arrays[_ATTN_PREFIX + layer] for layer in header["attention_layers"]}
        extra = {
            key[len(_EXTRA_PREFIX) :]: value
            for key, value in arrays.items()
            if key.startswith(_EXTRA_PREFIX)
        }
        return cls(
            prompt=header["prompt"],
            tokens=list(header["tokens"]),
            token_kinds=list(header["token_kinds"]),
            attention=attention,
            guidance_scale=float(header["guidance_scale"]),
            extra=extra,
            meta=header["meta"],
            previews=arrays.get("previews"),
            image=arrays.get("image"),
            **{name: arrays[name] for name in _ARRAY_FIELDS},
        )
