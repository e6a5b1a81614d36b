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
_HEADS_PREFIX = "attention_heads/"
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
    attention_heads : dict of str to ndarray
        With per-head capture (``trace(..., attention_heads=True)``): layer path -> float16
        ``(n_steps, n_heads, h_l, w_l, n_tokens)``, the same probabilities before the mean
        over heads. Empty otherwise.
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
    attention_heads: dict[str, np.ndarray] = field(default_factory=dict)

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
        per_step += list(self.attention_heads.values())
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
        for layer, value in self.attention_heads.items():
            arrays[_HEADS_PREFIX + layer] = np.ascontiguousarray(value)
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
        header, arrays = _read_trace_file(path)
        missing = [name for name in _ARRAY_FIELDS if name not in arrays]
        missing += [
            _ATTN_PREFIX + layer
            for layer in header["attention_layers"]
            if _ATTN_PREFIX + layer not in arrays
        ]
        if missing:
            raise TraceFileError(path, f"arrays missing: {', '.join(missing)}")
        for key, value in arrays.items():
            _check_array(path, key, value)
        attention = {layer: arrays[_ATTN_PREFIX + layer] for layer in header["attention_layers"]}
        extra = {
            key[len(_EXTRA_PREFIX) :]: value
            for key, value in arrays.items()
            if key.startswith(_EXTRA_PREFIX)
        }
        # Layer order follows the mean-over-heads maps.
        attention_heads = {
            layer: arrays[_HEADS_PREFIX + layer]
            for layer in header["attention_layers"]
            if _HEADS_PREFIX + layer in arrays
        }
        try:
            return cls(
                prompt=header["prompt"],
                tokens=list(header["tokens"]),
                token_kinds=list(header["token_kinds"]),
                attention=attention,
                guidance_scale=float(header["guidance_scale"]),
                extra=extra,
                attention_heads=attention_heads,
                meta=header["meta"],
                previews=arrays.get("previews"),
                image=arrays.get("image"),
                **{name: arrays[name] for name in _ARRAY_FIELDS},
            )
        except ValueError as error:  # __post_init__'s consistency checks
            raise TraceFileError(path, str(error)) from None


class TraceFileError(ValueError):
    """A file that cannot be read as a trace; the message names the file and the problem.

    Examples
    --------
    >>> Trace.load("half-copied.safetensors")  # doctest: +SKIP
    TraceFileError: cannot load trace half-copied.safetensors: the file is truncated (its
    arrays are cut off) (...). The file is damaged or truncated (...): save the trace again
    """

    def __init__(self, path: Path, problem: str, fix: str = "") -> None:
        fix = fix or _RESAVE
        super().__init__(f"cannot load trace {path}: {problem}. {fix}")
        self.path = path
        self.problem = problem


_RESAVE = (
    "The file is damaged or truncated (an interrupted copy or download?): "
    "save the trace again with `trace.save(path)`"
)

#: Header fields, the JSON types each must have, and how to say them in an error.
_HEADER_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "prompt": ((str,), "a string"),
    "tokens": ((list,), "a list of strings"),
    "token_kinds": ((list,), "a list of strings"),
    "guidance_scale": ((int, float), "a number"),
    "attention_layers": ((list,), "a list of strings"),
    "meta": ((dict,), "an object"),
}
_STRING_LISTS = ("tokens", "token_kinds", "attention_layers")

#: Number of dimensions of each stored array (``attention/*`` and ``extra/*`` by prefix).
_ARRAY_NDIM = {
    "timesteps": 1,
    "latents": 4,
    "noise_pred": 4,
    "pred_x0": 4,
    "final_latent": 3,
    "prompt_embeds": 3,
    "previews": 4,
    "image": 3,
    _ATTN_PREFIX: 4,
    _HEADS_PREFIX: 5,
}
_UINT8_ARRAYS = ("previews", "image")


def _read_trace_file(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The checked JSON header and every array of the trace file ``path``."""
    from safetensors import SafetensorError, safe_open

    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.safetensors"))[:3]
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise IsADirectoryError(
            f"cannot load trace {path}: it is a folder{hint}; pass the .safetensors file"
        )
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except FileNotFoundError:
        raise FileNotFoundError(f"no trace at {path}; save one with trace.save(path)") from None
    except PermissionError:
        raise PermissionError(
            f"cannot load trace {path}: permission denied; make the file readable "
            "(chmod u+r) or copy it somewhere you can read"
        ) from None
    except OSError as error:
        raise OSError(f"cannot load trace {path}: {error.strerror or error}") from None
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            arrays = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as error:
        raise TraceFileError(path, f"{_explain_safetensors(str(error))} ({error})") from None
    if _META_KEY not in metadata:
        raise TraceFileError(
            path,
            "a safetensors file without diffwidget's header, not a trace",
            "Open files written by `trace.save(path)`",
        )
    try:
        header = json.loads(metadata[_META_KEY])
    except json.JSONDecodeError as error:
        raise TraceFileError(
            path, f"its header is not valid JSON ({error.msg} at character {error.pos})"
        ) from None
    _check_header(path, header)
    return header, arrays


#: Fragments of safetensors' messages and what they mean for a file that was a trace.
_SAFETENSORS_PROBLEMS = {
    "header too small": "the file is truncated (too short for a safetensors header)",
    "incomplete metadata": "the file is truncated (its arrays are cut off)",
    "not fully covered": "the file is truncated (its arrays are cut off)",
    "invalid header length": "the file is truncated or its header is damaged",
    "header too large": "not a safetensors file, or its header is damaged (impossible length)",
    "invalid json": "its safetensors header is damaged (not valid JSON)",
}


def _explain_safetensors(message: str) -> str:
    lowered = message.lower()
    for fragment, meaning in _SAFETENSORS_PROBLEMS.items():
        if fragment in lowered:
            return meaning
    return "not a valid safetensors file"


def _check_header(path: Path, header: Any) -> None:
    if not isinstance(header, dict):
        raise TraceFileError(path, f"its header is a JSON {type(header).__name__}, not an object")
    version = header.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise TraceFileError(path, f"format_version should be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise TraceFileError(
            path,
            f"written by a newer diffwidget (trace format {version}; this one reads "
            f"{FORMAT_VERSION})",
            "Upgrade diffwidget: in a clone `git pull` and `pip install -e .`, or install a "
            "newer wheel",
        )
    missing = [key for key in _HEADER_FIELDS if key not in header]
    if missing:
        raise TraceFileError(path, f"its header lacks {', '.join(map(repr, missing))}")
    for key, (types, what) in _HEADER_FIELDS.items():
        value = header[key]
        wrong = not isinstance(value, types) or isinstance(value, bool)
        if not wrong and key in _STRING_LISTS:
            wrong = not all(isinstance(item, str) for item in value)
        if wrong:
            shown = repr(value) if len(repr(value)) <= 40 else type(value).__name__
            raise TraceFileError(path, f"header field {key!r} should be {what}, got {shown}")


def _check_array(path: Path, key: str, value: np.ndarray) -> None:
    if key.startswith(_EXTRA_PREFIX):
        return  # pipeline-specific conditioning: any shape
    prefix = next((p for p in (_ATTN_PREFIX, _HEADS_PREFIX) if key.startswith(p)), key)
    ndim = _ARRAY_NDIM.get(prefix)
    if ndim is not None and value.ndim != ndim:
        raise TraceFileError(
            path, f"array {key!r} has shape {value.shape}, expected {ndim} dimensions"
        )
    if key in _UINT8_ARRAYS and value.dtype != np.uint8:
        raise TraceFileError(path, f"array {key!r} is {value.dtype}, expected uint8 pixels")
    if key == "timesteps" and value.dtype.kind not in "iu":
        raise TraceFileError(path, f"array 'timesteps' is {value.dtype}, expected integers")
