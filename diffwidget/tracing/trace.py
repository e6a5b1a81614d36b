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

#: Order of the two classifier-free-guidance halves in every batched UNet call and in
#: ``Trace.prompt_embeds``: diffusers concatenates ``[negative, positive]``.
CFG_HALVES: tuple[str, str] = ("uncond", "cond")

FORMAT_VERSION = 1
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
        Scheduler timestep ``t_i`` for each loop index ``i``.
    latents : ndarray, shape (n_steps, C, h, w)
        The latent ``x_t`` handed to ``scheduler.step`` at step ``i`` (unscaled).
    noise_pred : ndarray, shape (n_steps, C, h, w)
        The guided model output ``uncond + w * (cond - uncond)`` at step ``i``.
    pred_x0 : ndarray, shape (n_steps, C, h, w)
        Predicted clean latent at step ``i``, computed from ``noise_pred`` without
        touching the scheduler.
    final_latent : ndarray, shape (C, h, w)
        The latent the loop ended with (before VAE decoding).
    prompt_embeds : ndarray, shape (2, L, D)
        Text embeddings in CFG order ``("uncond", "cond")``.
    attention : dict of str to ndarray
        ``attn2`` module path -> float16 array ``(n_steps, h_l, w_l, n_tokens)``:
        softmax(QK^T / sqrt(d)) of the conditional half, mean over heads, on the layer's
        own spatial grid. Rows sum to 1 over *all* 77 (or ``L``) tokens before the
        stored token positions were selected.
    guidance_scale : float
        The pipeline's CFG scale ``w``.
    previews : ndarray of uint8, shape (n_steps, H, W, 3), optional
        Decoded ``pred_x0`` per step (requested with ``decode_previews=True``).
    image : ndarray of uint8, shape (H, W, 3), optional
        The final decoded image.
    extra : dict of str to ndarray
        Further UNet conditioning needed for replay (SDXL ``text_embeds``, ``time_ids``),
        each in CFG order along axis 0.
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
