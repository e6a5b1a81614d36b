"""Trace files from someone else: every claim cross-checked before an array is read."""

from __future__ import annotations

import json
import math
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffwidget.explain.attention import AttentionMaps
from diffwidget.tracing.trace import Trace, TraceFileError
from tests.test_records import mutate
from tests.tracing.trace_data import trace_data_path

#: What safetensors calls each dtype, and its size in bytes.
DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F64": 8}
DTYPE_SIZES.update({"I64": 8, "I32": 4, "U8": 1, "BOOL": 1, "I8": 1})
NUMPY_NAMES = {"float32": "F32", "float16": "F16", "float64": "F64", "int64": "I64"}
NUMPY_NAMES.update({"uint8": "U8", "int32": "I32", "bool": "BOOL", "int8": "I8"})
Tensors = dict[str, tuple[str, list[int], bytes]]


def read_raw(path: Path) -> tuple[Tensors, dict[str, str]]:
    """Every tensor of a safetensors file as (dtype, shape, bytes), and its metadata."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    metadata = header.pop("__metadata__", {})
    body = data[8 + size :]
    tensors = {
        key: (
            entry["dtype"],
            entry["shape"],
            body[entry["data_offsets"][0] : entry["data_offsets"][1]],
        )
        for key, entry in header.items()
    }
    return tensors, metadata


def write_raw(
    path: Path,
    tensors: Tensors,
    metadata: dict[str, str],
    offsets: dict[str, list[int]] | None = None,
) -> Path:
    """A safetensors file written byte by byte (any dtype, shape or offsets, true or not)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    start = 0
    for key, (dtype, shape, payload) in tensors.items():
        span = (offsets or {}).get(key, [start, start + len(payload)])
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": span}
        start += len(payload)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(
        len(text).to_bytes(8, "little") + text + b"".join(p for *_, p in tensors.values())
    )
    return path


def array(values: np.ndarray) -> tuple[str, list[int], bytes]:
    return NUMPY_NAMES[str(values.dtype)], list(values.shape), values.tobytes()


def refusal(path: Path) -> str:
    with pytest.raises(TraceFileError) as info:
        Trace.load(path)
    assert str(path) in str(info.value)
    assert info.value.__cause__ is None
    return str(info.value)


@pytest.fixture
def stored(tmp_path: Path) -> tuple[Tensors, dict[str, Any], Path]:
    """A valid trace file's tensors, its diffwidget header and where to write variants."""
    tensors, metadata = read_raw(trace_data_path("format2_sd"))
    return tensors, json.loads(metadata["diffwidget"]), tmp_path / "variant.safetensors"


def write(target: Path, tensors: Tensors, header: Any) -> Path:
    return write_raw(target, tensors, {"diffwidget": json.dumps(header)})


def test_the_raw_writer_reproduces_a_loadable_file(stored: Any) -> None:
    tensors, header, target = stored
    loaded = Trace.load(write(target, tensors, header))
    reference = Trace.load(trace_data_path("format2_sd"))
    assert loaded.facts == reference.facts
    assert loaded.latents.tobytes() == reference.latents.tobytes()


# ------------------------------------------------------------------ the reported cases
def crafted(target: Path, n_tokens: int) -> Path:
    """The reported file: ``n_tokens`` tokens, a 256x256 latent, one 1x1 attention layer."""
    latent = np.zeros((1, 3, 256, 256), np.float32)
    tokens = [f"t{i}" for i in range(n_tokens)]
    tensors = {
        "timesteps": array(np.array([999], np.int64)),
        "latents": array(latent),
        "noise_pred": array(latent),
        "pred_x0": array(latent),
        "final_latent": array(latent[0]),
        "prompt_embeds": array(np.zeros((1, n_tokens, 1), np.float32)),
        "attention/a": array(np.zeros((1, 1, 1, n_tokens), np.float16)),
    }
    header = {
        "format_version": 2,
        "prompt": "x",
        "tokens": tokens,
        "token_kinds": ["word"] * n_tokens,
        "guidance_scale": 1.0,
        "attention_layers": ["a"],
        "meta": {"n_text_tokens": n_tokens},
    }
    return write(target, tensors, header)


@pytest.mark.parametrize(
    ("n_tokens", "fragment"),
    [
        (20_000, "'tokens' has length 20000, at most 4096"),
        (4_000, "1×1 grid, which a 256×256 latent does not produce"),
    ],
)
def test_crafted_file_is_refused_before_anything_is_derived(
    tmp_path: Path, n_tokens: int, fragment: str
) -> None:
    path = crafted(tmp_path / "crafted.safetensors", n_tokens)
    assert 3e6 < path.stat().st_size < 5e6
    tracemalloc.start()
    try:
        message = refusal(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert fragment in message
    # No array was read: the header alone (a few hundred kB of JSON) was parsed.
    assert peak < 8 * 2**20, peak


def test_layer_with_fewer_steps(stored: Any) -> None:
    tensors, header, target = stored
    key = "attention/" + header["attention_layers"][0]
    dtype, shape, payload = tensors[key]
    tensors[key] = (dtype, [1, *shape[1:]], payload[: len(payload) // shape[0]])
    assert "has 1 steps, expected 2" in refusal(write(target, tensors, header))


def test_one_latent_grid_for_latents_predictions_and_x0(stored: Any) -> None:
    tensors, header, target = stored
    tensors["latents"] = array(np.zeros((2, 4, 8, 8), np.float32))
    assert "share one latent grid" in refusal(write(target, tensors, header))


def test_deep_header_is_refused_without_recursion(stored: Any) -> None:
    tensors, _, target = stored
    text = "[" * 100_000 + "]" * 100_000
    write_raw(target, tensors, {"diffwidget": text})
    assert "header is JSON nested 100000 deep" in refusal(target)


@pytest.mark.parametrize("dtype", ["BF16", "F8_E4M3", "F8_E5M2"])
def test_arrays_numpy_cannot_hold_are_refused(stored: Any, dtype: str) -> None:
    tensors, header, target = stored
    _, shape, payload = tensors["latents"]
    size = DTYPE_SIZES[dtype]
    tensors["latents"] = (dtype, shape, payload[: math.prod(shape) * size])
    message = refusal(write(target, tensors, header))
    assert f"'latents' is stored as {dtype}, which NumPy cannot hold" in message


@pytest.mark.parametrize(
    ("path", "value", "fragment"),
    [
        (("guidance_scale",), float("nan"), "'guidance_scale' should be a finite number, got nan"),
        (("meta", "model_timestep_dtype"), "load", "'meta.model_timestep_dtype' should be one of"),
        (("meta", "n_text_tokens"), 5, "'meta.n_text_tokens'"),
        (("meta", "token_indices"), [0, 0, 1, 2, 3, 4, 5, 6, 7], "'meta.token_indices'"),
        (("meta", "noise_schedule", "alpha"), [0.5], "'meta.noise_schedule'"),
        (
            ("meta", "attention_grids", "mid_block.attentions.0.transformer_blocks.0.attn2"),
            [4, 4],
            "attention_grids",
        ),
        (("meta", "latent_layout", "latent_hw"), [8, 8], "'meta.latent_layout'"),
        (("meta", "family"), "dalle", "'meta.family' should be one of"),
    ],
)
def test_header_values_are_checked_against_the_arrays(
    stored: Any, path: tuple[str, ...], value: Any, fragment: str
) -> None:
    tensors, header, target = stored
    node = header
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert fragment in refusal(write(target, tensors, header))


def test_replay_dtype_comes_from_an_allow_list_only() -> None:
    """No file value reaches ``getattr(torch, ...)``: replay reads a fixed table."""
    import inspect

    from diffwidget.tracing import replay

    source = inspect.getsource(replay)
    assert "getattr(torch" not in source
    assert "_TIMESTEP_DTYPES[facts.model_timestep_dtype]" in source


# ------------------------------------------------------------------ any mutation
DTYPES = st.sampled_from(sorted(DTYPE_SIZES))


@st.composite
def mutations(draw: Any, base: tuple[Tensors, dict[str, Any]]) -> tuple[Tensors, Any, Any]:
    """The stored trace with one header value, shape, dtype or offset changed."""
    tensors, header = dict(base[0]), json.loads(json.dumps(base[1]))
    key = draw(st.sampled_from(sorted(tensors)))
    dtype, shape, payload = tensors[key]
    offsets = None
    what = draw(st.sampled_from(["header", "dim", "shape", "dtype", "offsets", "shape_and_bytes"]))
    if what == "header":
        header = mutate(header, draw)
    elif what == "dim" and shape:  # one axis resized, the bytes to match: a consistent lie
        axis = draw(st.integers(0, len(shape) - 1))
        shape = [*shape[:axis], draw(st.integers(0, 2 * shape[axis] + 1)), *shape[axis + 1 :]]
        tensors[key] = (dtype, shape, bytes(math.prod(shape) * DTYPE_SIZES[dtype]))
    elif what == "shape":
        tensors[key] = (dtype, draw(st.lists(st.integers(0, 70), max_size=5)), payload)
    elif what == "shape_and_bytes":
        shape = draw(st.lists(st.integers(0, 40), max_size=5))
        size = math.prod(shape) * DTYPE_SIZES.get(dtype, 4)
        tensors[key] = (dtype, shape, bytes(min(size, 2**20)))
    elif what == "dtype":
        tensors[key] = (draw(DTYPES), shape, payload)
    else:
        offsets = {key: [draw(st.integers(0, 2**40)), draw(st.integers(0, 2**40))]}
    return tensors, header, offsets


BASE = read_raw(trace_data_path("format2_sd"))
BASE_HEADER = (BASE[0], json.loads(BASE[1]["diffwidget"]))


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(mutations(BASE_HEADER))
def test_any_mutation_loads_a_valid_trace_or_raises_trace_file_error(
    tmp_path: Path, case: tuple[Tensors, Any, Any]
) -> None:
    tensors, header, offsets = case
    path = write_raw(
        tmp_path / "m.safetensors", tensors, {"diffwidget": json.dumps(header)}, offsets
    )
    tracemalloc.start()
    try:
        try:
            trace = Trace.load(path)
        except TraceFileError as error:
            message, trace = str(error), None
        else:
            message = str(path)
        assert str(path) in message
        if trace is not None:  # what loads is usable: its views derive without errors
            AttentionMaps().attribute(trace).heat_map()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 * 2**20 + 64 * path.stat().st_size, peak
