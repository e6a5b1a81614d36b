"""Reading a trace file from anyone: every claim checked before an array is read.

A trace file is one ``.safetensors`` file: arrays, and diffwidget's JSON header in its
metadata (``prompt``, ``tokens``, ``token_kinds``, ``guidance_scale``, ``attention_layers``,
``meta`` = :class:`~diffwidget.tracing.facts.TraceFacts`). A file from someone else may be
damaged or crafted, so :func:`read_trace_file` validates the header through
:class:`TraceHeader`, then cross-checks every array's dtype and shape as safetensors' own
header declares them — one step count, one latent grid, tokens within the text length,
attention grids that the latent grid can produce — and only then reads the arrays. Whatever
is wrong is one :class:`TraceFileError` naming the file and the field.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np

from diffwidget.records import MaxLen, Record, RecordError, parse_json
from diffwidget.tracing.facts import (
    MAX_LAYERS,
    MAX_STEPS,
    MAX_TEXT_TOKENS,
    Name,
    TraceFacts,
    check_tokens,
)

#: Format 2 records the denoiser family, the CFG layout and the denoiser's call arguments;
#: format-1 files (UNet pipelines) still load and replay (:mod:`diffwidget.tracing.facts`).
FORMAT_VERSION = 2
META_KEY = "diffwidget"
ATTN_PREFIX = "attention/"
HEADS_PREFIX = "attention_heads/"
EXTRA_PREFIX = "extra/"
ARRAY_FIELDS = ("timesteps", "latents", "noise_pred", "pred_x0", "final_latent", "prompt_embeds")
OPTIONAL_ARRAY_FIELDS = ("previews", "image")
#: Each side of an attention grid is the latent's halved (rounding up) at most this many times:
#: UNet levels 64/32/16/8 of a 64 latent, a DiT's 2x2 patches. It bounds what a view derives
#: from a stored map (a 1x1 map upsampled to a 256x256 latent is 65,536 times larger).
MAX_ATTENTION_LEVEL = 3
MAX_IMAGE_SIDE = 16_384
MAX_HEADS = 1024
#: safetensors dtypes NumPy reads; bf16 and the f8 kinds have no NumPy dtype.
_NUMPY_DTYPES = {
    "BOOL": np.bool_,
    "U8": np.uint8,
    "I8": np.int8,
    "I16": np.int16,
    "U16": np.uint16,
    "I32": np.int32,
    "U32": np.uint32,
    "I64": np.int64,
    "U64": np.uint64,
    "F16": np.float16,
    "F32": np.float32,
    "F64": np.float64,
}
#: Number of dimensions of each stored array (``attention/*`` and ``attention_heads/*`` by prefix).
_ARRAY_NDIM = {
    "timesteps": 1,
    "latents": 4,
    "noise_pred": 4,
    "pred_x0": 4,
    "final_latent": 3,
    "prompt_embeds": 3,
    "previews": 4,
    "image": 3,
    ATTN_PREFIX: 4,
    HEADS_PREFIX: 5,
}
_RESAVE = (
    "The file is damaged or truncated (an interrupted copy or download?): "
    "save the trace again with `trace.save(path)`"
)
#: Fragments of safetensors' messages and what they mean for a file that was a trace.
_SAFETENSORS_PROBLEMS = {
    "header too small": "the file is truncated (too short for a safetensors header)",
    "incomplete metadata": "the file is truncated (its arrays are cut off)",
    "not fully covered": "the file is truncated (its arrays are cut off)",
    "invalid header length": "the file is truncated or its header is damaged",
    "header too large": "not a safetensors file, or its header is damaged (impossible length)",
    "invalid json": "its safetensors header is damaged (not valid JSON)",
    "invalid utf-8": "its safetensors header is damaged (not valid UTF-8)",
}

Shapes = dict[str, tuple[str, tuple[int, ...]]]


class TraceFileError(RecordError):
    """A file that cannot be read as a trace; the message names the file and the problem.

    Examples
    --------
    >>> Trace.load("half-copied.safetensors")  # doctest: +SKIP
    TraceFileError: cannot load trace half-copied.safetensors: the file is truncated (its
    arrays are cut off) (...). The file is damaged or truncated (...): save the trace again
    """

    def __init__(self, path: str | Path, problem: str, fix: str = "", *, field: str = "") -> None:
        super().__init__(path, problem, fix or _RESAVE, field=field)

    def detail(self) -> str:
        """The header field and the problem."""
        return f"header field {self.field!r} {self.problem}" if self.field else self.problem

    def message(self) -> str:
        """``cannot load trace PATH: PROBLEM. FIX``."""
        return f"cannot load trace {self.path}: {self.detail()}. {self.fix}"


@dataclass(frozen=True)
class TraceHeader(Record):
    """diffwidget's JSON header of a trace file."""

    UNKNOWN_KEYS = "ignore"

    prompt: Annotated[str, MaxLen(100_000)]
    tokens: Annotated[list[Name], MaxLen(MAX_TEXT_TOKENS)]
    token_kinds: Annotated[list[str], MaxLen(MAX_TEXT_TOKENS)]
    guidance_scale: float
    # Layer order is part of the record; safetensors sorts keys on disk.
    attention_layers: Annotated[list[Name], MaxLen(MAX_LAYERS)]
    meta: TraceFacts
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        check_tokens(self.tokens, self.token_kinds)


def read_trace_file(path: Path) -> tuple[TraceHeader, dict[str, np.ndarray]]:
    """The checked header and every array of the trace file ``path``.

    Raises
    ------
    FileNotFoundError, IsADirectoryError, PermissionError, OSError
        When ``path`` cannot be opened (the message says what to do).
    TraceFileError
        For anything wrong inside the file.
    """
    from safetensors import SafetensorError, safe_open

    _check_readable(path)
    try:
        with safe_open(str(path), framework="numpy") as handle:
            header = _header(path, handle.metadata() or {})
            keys = list(handle.keys())
            if len(keys) > 2 * MAX_LAYERS + 64:
                raise TraceFileError(path, f"{len(keys)} arrays, more than any trace holds")
            shapes: Shapes = {}
            for key in keys:
                sliced = handle.get_slice(key)
                shapes[key] = (sliced.get_dtype(), tuple(sliced.get_shape()))
            check_layout(path, header, shapes)
            arrays = {key: handle.get_tensor(key) for key in keys}
    except (SafetensorError, OSError) as error:
        raise TraceFileError(path, f"{_explain_safetensors(str(error))} ({error})") from None
    return header, arrays


def _check_readable(path: Path) -> None:
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


def _explain_safetensors(message: str) -> str:
    lowered = message.lower()
    for fragment, meaning in _SAFETENSORS_PROBLEMS.items():
        if fragment in lowered:
            return meaning
    return "not a valid safetensors file"


def _header(path: Path, metadata: dict[str, str]) -> TraceHeader:
    if META_KEY not in metadata:
        raise TraceFileError(
            path,
            "a safetensors file without diffwidget's header, not a trace",
            "Open files written by `trace.save(path)`",
        )
    try:
        data = parse_json(metadata[META_KEY], path, error=TraceFileError)
    except TraceFileError as error:
        raise TraceFileError(path, f"its header is {error.problem}") from None
    if not isinstance(data, dict):
        raise TraceFileError(path, f"its header is a JSON {type(data).__name__}, not an object")
    version = data.get("format_version", FORMAT_VERSION)
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
    return TraceHeader.from_json(data, where=path, error=TraceFileError)


def check_layout(path: Path, header: TraceHeader, shapes: Shapes) -> None:
    """Cross-check the arrays' dtypes and shapes (as declared) with each other and the header.

    Raises
    ------
    TraceFileError
        Naming the first array or field that disagrees.
    """

    def fail(problem: str, field: str = "") -> TraceFileError:
        return TraceFileError(path, problem, field=field)

    if not header.attention_layers:
        raise fail("lists no attention layer; a trace records at least one", "attention_layers")
    missing = [name for name in ARRAY_FIELDS if name not in shapes]
    missing += [ATTN_PREFIX + n for n in header.attention_layers if ATTN_PREFIX + n not in shapes]
    if missing:
        raise fail(f"arrays missing: {', '.join(missing)}")
    for key, (dtype, shape) in shapes.items():
        _check_array(fail, key, dtype, shape)
    n, channels, h, w = shapes["latents"][1]
    if not 1 <= n <= MAX_STEPS:
        raise fail(f"{n} steps recorded; a trace holds 1 to {MAX_STEPS}")
    for name in ("timesteps", "noise_pred", "pred_x0", "previews"):
        if name in shapes and shapes[name][1][0] != n:
            raise fail(f"{name} has {shapes[name][1][0]} steps, expected {n}")
    for name, expected in (("noise_pred", (n, channels, h, w)), ("pred_x0", (n, channels, h, w))):
        if shapes[name][1] != expected:
            raise fail(
                f"array {name!r} has shape {shapes[name][1]} beside latents of shape "
                f"{expected}; latents, predictions and x̂0 share one latent grid"
            )
    if shapes["final_latent"][1] != (channels, h, w):
        raise fail(
            f"array 'final_latent' has shape {shapes['final_latent'][1]}, expected "
            f"{(channels, h, w)}"
        )
    _check_text(fail, header, shapes["prompt_embeds"][1])
    for layer in header.attention_layers:
        _check_attention(fail, header, layer, shapes, (n, h, w))
    _check_facts(fail, header.meta, n, (h, w))
    if "previews" in shapes:
        _check_previews(fail, header.meta, shapes["previews"][1], (channels, h, w))


def _check_array(fail: Callable, key: str, dtype: str, shape: tuple[int, ...]) -> None:
    if dtype not in _NUMPY_DTYPES:
        raise fail(
            f"array {key!r} is stored as {dtype}, which NumPy cannot hold; traces store "
            "float16/float32: convert the array (e.g. `.float()` in torch) before saving"
        )
    if key.startswith(EXTRA_PREFIX):
        return  # pipeline-specific conditioning: any shape
    prefix = next((p for p in (ATTN_PREFIX, HEADS_PREFIX) if key.startswith(p)), key)
    ndim = _ARRAY_NDIM.get(prefix)
    if ndim is not None and len(shape) != ndim:
        raise fail(f"array {key!r} has shape {shape}, expected {ndim} dimensions")
    if key in OPTIONAL_ARRAY_FIELDS:
        if dtype != "U8":
            raise fail(f"array {key!r} is {np.dtype(_NUMPY_DTYPES[dtype])}, expected uint8 pixels")
        if shape[-1] != 3 or max(shape[-3:-1]) > MAX_IMAGE_SIDE:
            raise fail(f"array {key!r} has shape {shape}, expected (..., H, W, 3) pixels")
    if key == "timesteps" and dtype[0] not in "IU":
        raise fail(f"array 'timesteps' is {np.dtype(_NUMPY_DTYPES[dtype])}, expected integers")


def _check_text(fail: Callable, header: TraceHeader, embeds: tuple[int, ...]) -> None:
    rows, length, _ = embeds
    facts = header.meta
    n_text = facts.n_text_tokens if facts.n_text_tokens is not None else length
    if rows not in (1, 2):
        raise fail(f"array 'prompt_embeds' has {rows} rows, expected one per CFG half (1 or 2)")
    if not 1 <= n_text <= MAX_TEXT_TOKENS or length not in (n_text,):
        raise fail(
            f"the text sequence has {n_text} positions but 'prompt_embeds' has {length} "
            f"(at most {MAX_TEXT_TOKENS})",
            "meta.n_text_tokens",
        )
    if len(header.tokens) > n_text:
        raise fail(f"lists {len(header.tokens)} tokens for a text of {n_text}", "tokens")
    positions = facts.token_indices
    if positions is not None and (
        len(positions) != len(header.tokens)
        or positions != sorted(set(positions))
        or (positions and not 0 <= positions[0] <= positions[-1] < n_text)
    ):
        raise fail(
            f"should be {len(header.tokens)} increasing positions within 0..{n_text - 1}",
            "meta.token_indices",
        )
    for name in ("token_segments", "token_words"):
        values = getattr(facts, name)
        if values is not None and len(values) != len(header.tokens):
            raise fail(f"has {len(values)} entries for {len(header.tokens)} tokens", f"meta.{name}")


def _check_attention(
    fail: Callable, header: TraceHeader, layer: str, shapes: Shapes, latent: tuple[int, int, int]
) -> None:
    n, h, w = latent
    key = ATTN_PREFIX + layer
    steps, gh, gw, tokens = shapes[key][1]
    if steps != n:
        raise fail(f"attention layer {layer!r} has {steps} steps, expected {n}")
    if tokens != len(header.tokens):
        raise fail(
            f"attention layer {layer!r} stores {tokens} tokens, the header lists "
            f"{len(header.tokens)}"
        )
    # Each side on its own: a bound on what views derive, not a model's exact geometry.
    rows, cols = ([math.ceil(n / 2**k) for k in range(MAX_ATTENTION_LEVEL + 1)] for n in (h, w))
    if gh not in rows or gw not in cols:
        raise fail(
            f"attention layer {layer!r} has a {gh}×{gw} grid, which a {h}×{w} latent does not "
            f"produce (each side is the latent's halved at most {MAX_ATTENTION_LEVEL} times: "
            f"{'/'.join(map(str, rows))} × {'/'.join(map(str, cols))})"
        )
    recorded = header.meta.attention_grids.get(layer)
    if recorded is not None and recorded != (gh, gw):
        raise fail(
            f"says {recorded} but the array is {gh}×{gw}", f"meta.attention_grids[{layer!r}]"
        )
    heads = shapes.get(HEADS_PREFIX + layer)
    if heads is not None and (
        heads[1][:1] + heads[1][2:] != shapes[key][1] or heads[1][1] > MAX_HEADS
    ):
        raise fail(f"per-head maps of {layer!r} have shape {heads[1]}, beside {shapes[key][1]}")


def _check_previews(
    fail: Callable, facts: TraceFacts, shape: tuple[int, ...], latent: tuple[int, int, int]
) -> None:
    """Previews lie on the latent grid (the linear map) or at the image size (a decoder)."""
    channels, h, w = latent
    grid = tuple(shape[1:3])
    sizes = [(h, w)]
    if facts.height is not None and facts.width is not None:
        sizes.append((facts.height, facts.width))
    elif facts.preview_map is None:
        return  # older traces recorded no image size: any size within MAX_IMAGE_SIDE
    if grid not in sizes:
        raise fail(
            f"array 'previews' is {grid[0]}×{grid[1]}, neither the {h}×{w} latent grid nor "
            f"the recorded image size {sizes[-1][0]}×{sizes[-1][1]}"
        )
    mapped = facts.preview_map
    if mapped is not None and (mapped.channels != channels or grid != (h, w)):
        raise fail(
            f"says the previews come from a {mapped.channels}-channel latent→RGB map, for "
            f"{grid[0]}×{grid[1]} previews of a {channels}-channel {h}×{w} latent",
            "meta.preview_map",
        )


def _check_facts(fail: Callable, facts: TraceFacts, n: int, grid: tuple[int, int]) -> None:
    per_step = {
        "model_timesteps": facts.model_timesteps,
        "timesteps_exact": facts.timesteps_exact,
    }
    if facts.noise_schedule is not None:
        per_step["noise_schedule.alpha"] = facts.noise_schedule.alpha
    for name, values in per_step.items():
        if values is not None and len(values) != n:
            raise fail(f"has {len(values)} values for {n} steps", f"meta.{name}")
    layout = facts.latent_layout
    if layout is not None and (tuple(layout.latent_hw) != grid or not 1 <= layout.patch <= 8):
        raise fail(
            f"says {layout.latent_hw} (patch {layout.patch}) for a {grid} latent",
            "meta.latent_layout",
        )
