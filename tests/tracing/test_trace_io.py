"""Saving and loading traces, token selection, and the memory budget."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from diffwidget.tracing.budget import BYTES_PER_MB, MemoryBudgetError, estimate_step_bytes
from diffwidget.tracing.context import TraceContext
from diffwidget.tracing.families.unet import grid_at_level, layer_grid, layer_level
from diffwidget.tracing.generate import trace
from diffwidget.tracing.tokens import prompt_tokens
from diffwidget.tracing.trace import Trace, TraceFacts, TraceFileError

PROMPT = "a red circle on the left"


def assert_traces_identical(a: Trace, b: Trace) -> None:
    for name in (
        "timesteps",
        "latents",
        "noise_pred",
        "pred_x0",
        "final_latent",
        "prompt_embeds",
        "previews",
        "image",
    ):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        assert x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), name
    assert list(a.attention) == list(b.attention)
    for layer in a.attention:
        assert a.attention[layer].dtype == b.attention[layer].dtype == np.float16
        assert a.attention[layer].tobytes() == b.attention[layer].tobytes(), layer
    assert a.extra.keys() == b.extra.keys()
    for key in a.extra:
        assert a.extra[key].tobytes() == b.extra[key].tobytes(), key
    assert (a.prompt, a.tokens, a.token_kinds, a.guidance_scale) == (
        b.prompt,
        b.tokens,
        b.token_kinds,
        b.guidance_scale,
    )
    assert a.facts == b.facts


def test_save_load_round_trip_is_exact(tiny_trace: Trace, tmp_path: Path) -> None:
    path = tiny_trace.save(tmp_path / "run.safetensors")
    assert_traces_identical(tiny_trace, Trace.load(path))


def test_save_load_round_trip_sdxl(tiny_sdxl_pipe: Any, tmp_path: Path) -> None:
    traced = trace(tiny_sdxl_pipe, PROMPT, num_inference_steps=2)
    assert traced.extra
    assert_traces_identical(traced, Trace.load(traced.save(tmp_path / "xl")))


def test_token_kinds_and_default_selection(tiny_sd_pipe: Any, tiny_trace: Trace) -> None:
    tokens = prompt_tokens(tiny_sd_pipe.tokenizer, PROMPT)
    assert len(tokens) == 77
    assert tokens.kinds[:9] == ["start"] + ["word"] * 6 + ["end", "pad"]
    assert set(tokens.kinds[9:]) == {"pad"}
    assert tiny_trace.tokens == [
        "<|startoftext|>",
        "a",
        "red",
        "circle",
        "on",
        "the",
        "left",
        "<|endoftext|>",
        "<|endoftext|>",
    ]
    assert tiny_trace.token_kinds == tokens.kinds[:9]
    assert [tiny_trace.tokens[i] for i in tiny_trace.word_indices] == PROMPT.split()
    assert tokens.select("all") == list(range(77))
    assert tokens.select([3, 1, 3]) == [1, 3]
    with pytest.raises(ValueError, match=r"0\.\.76"):
        tokens.select([80])
    with pytest.raises(ValueError, match="'default', 'all'"):
        tokens.select("some")


def test_explicit_token_positions(tiny_sd_pipe: Any) -> None:
    traced = trace(
        tiny_sd_pipe, PROMPT, num_inference_steps=2, tokens=[2, 3], decode_previews=False
    )
    assert traced.tokens == ["red", "circle"]
    assert all(maps.shape[-1] == 2 for maps in traced.attention.values())


def test_long_prompt_is_truncated_with_an_end_token(tiny_sd_pipe: Any) -> None:
    tokens = prompt_tokens(tiny_sd_pipe.tokenizer, " ".join(["red"] * 100))
    assert tokens.kinds[-1] == "end"
    assert "pad" not in tokens.kinds


def test_estimate_matches_what_is_stored(tiny_sd_pipe: Any, tiny_trace: Trace) -> None:
    ctx = TraceContext(tiny_sd_pipe, prompt=PROMPT)
    assert ctx.step_bytes(32, 32).total == tiny_trace.nbytes_per_step()
    full = trace(
        tiny_sd_pipe,
        PROMPT,
        num_inference_steps=2,
        tokens="all",
        decode_previews=False,
        height=32,
        width=48,
    )
    ctx_full = TraceContext(tiny_sd_pipe, prompt=PROMPT, tokens="all", decode_previews=False)
    assert ctx_full.step_bytes(32, 48).total == full.nbytes_per_step()
    assert ctx_full.step_bytes(32, 48).attention > ctx.step_bytes(32, 48).attention


def test_budget_refusal_says_how_much_and_how_to_fix(tiny_sd_pipe: Any) -> None:
    before = dict(tiny_sd_pipe.unet.attn_processors)
    per_step = TraceContext(tiny_sd_pipe, prompt=PROMPT, tokens="all").step_bytes(32, 32).total
    budget_mb = 10 * per_step / BYTES_PER_MB
    with pytest.raises(MemoryBudgetError) as info:
        trace(
            tiny_sd_pipe, PROMPT, num_inference_steps=20, tokens="all", memory_budget_mb=budget_mb
        )
    message = str(info.value)
    assert f"{20 * per_step / BYTES_PER_MB:.1f} MB" in message
    assert "tokens='default'" in message
    assert "decode_previews=False" in message
    assert "memory_budget_mb>=" in message
    assert dict(tiny_sd_pipe.unet.attn_processors) == before
    assert "step" not in vars(tiny_sd_pipe.scheduler)
    assert (
        trace(
            tiny_sd_pipe, PROMPT, num_inference_steps=10, tokens="all", memory_budget_mb=budget_mb
        ).n_steps
        == 10
    )


def test_budget_checked_inside_a_context_too(tiny_sd_pipe: Any) -> None:
    import torch

    with (
        pytest.raises(MemoryBudgetError),
        TraceContext(tiny_sd_pipe, prompt=PROMPT, memory_budget_mb=1e-3),
    ):
        tiny_sd_pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert "step" not in vars(tiny_sd_pipe.scheduler)


def test_grids_and_levels() -> None:
    assert grid_at_level((64, 96), 3) == (8, 12)
    assert grid_at_level((15, 9), 2) == (4, 3)  # stride-2 convs round up
    assert layer_level("down_blocks.2.attentions.0.transformer_blocks.0.attn2", 4) == 2
    assert layer_level("mid_block.attentions.0.transformer_blocks.0.attn2", 4) == 3
    assert layer_level("up_blocks.1.attentions.2.transformer_blocks.0.attn2", 4) == 2
    assert layer_grid(
        "up_blocks.3.attentions.0.transformer_blocks.0.attn2", 4, (64, 96), 64 * 96
    ) == (64, 96)
    with pytest.raises(ValueError, match="matches no"):
        layer_grid("mid_block.attentions.0.attn2", 4, (64, 64), 1000)
    with pytest.raises(ValueError, match="down_blocks"):
        layer_level("transformer.attn2", 4)


def test_sd15_sized_estimate() -> None:
    """SD 1.5's block layout at 512x512, counted by hand against the UNet family."""
    from types import SimpleNamespace

    from diffusers import UNet2DConditionModel

    from diffwidget.tracing.families import LatentLayout, UNetFamily

    # SD 1.5's blocks and layers per block, with 8 channels so it builds in milliseconds.
    unet = UNet2DConditionModel(
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=2,
        norm_num_groups=4,
        cross_attention_dim=8,
        attention_head_dim=2,
        sample_size=64,
    )
    counts = UNetFamily(SimpleNamespace(unet=unet)).query_counts(LatentLayout((64, 64)))
    # attn2 at 64^2 (2 down + 3 up), 32^2 (2 + 3), 16^2 (2 + 3), 8^2 (mid).
    cells = 5 * 64 * 64 + 5 * 32 * 32 + 5 * 16 * 16 + 8 * 8
    assert len(counts) == 16
    assert sum(counts.values()) == cells
    step = estimate_step_bytes(cells, (4, 64, 64), 77, (512, 512))
    assert step.attention == cells * 77 * 2
    assert step.latents == 3 * 4 * 64 * 64 * 4
    assert step.previews == 512 * 512 * 3


def test_tiny_tokenizer_has_one_token_per_known_word(tiny_sd_pipe: Any) -> None:
    from diffwidget.testing.tiny import TINY_WORDS

    tokenizer = tiny_sd_pipe.tokenizer
    # transformers 5 can silently build a 3-token vocabulary from misread files.
    assert len(tokenizer) > len(TINY_WORDS) + 2
    assert tokenizer.model_max_length == 77
    for word in TINY_WORDS:
        assert tokenizer.tokenize(word) == [word + "</w>"], word
    assert len(tokenizer.tokenize("zebra")) == 5  # unknown words fall back to letters
    assert tiny_sd_pipe.text_encoder.config.vocab_size == len(tokenizer)


# ------------------------------------------------------------------ corrupt and odd files
def small_trace(n_steps: int = 2) -> Trace:
    """A valid trace built from arrays, no pipeline: every array field and one layer."""
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((n_steps, 4, 4, 4)).astype(np.float32)
    return Trace(
        prompt="a red circle",
        tokens=["<s>", "a", "red", "circle", "</s>"],
        token_kinds=["start", "word", "word", "word", "end"],
        timesteps=np.arange(n_steps, 0, -1, dtype=np.int64) * 100,
        latents=latents,
        noise_pred=latents * 0.5,
        pred_x0=latents * 0.25,
        final_latent=latents[-1],
        prompt_embeds=rng.standard_normal((2, 5, 8)).astype(np.float32),
        attention={"mid_block.attn2": np.full((n_steps, 2, 2, 5), 0.2, dtype=np.float16)},
        guidance_scale=3.0,
        previews=np.zeros((n_steps, 8, 8, 3), dtype=np.uint8),
        image=np.zeros((8, 8, 3), dtype=np.uint8),
        facts=TraceFacts(seed=0),
    )


def read_raw(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        header = json.loads(handle.metadata()["diffwidget"])
        arrays = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    return arrays, header


def write_raw(path: Path, arrays: dict[str, np.ndarray], header: Any) -> Path:
    """A safetensors file with ``header`` as diffwidget's metadata (a str is written as is)."""
    from safetensors.numpy import save_file

    text = header if isinstance(header, str) else json.dumps(header)
    save_file(arrays, str(path), metadata={"diffwidget": text})
    return path


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    return small_trace().save(tmp_path / "good.safetensors")


def load_error(path: Path, error: type[Exception] = TraceFileError) -> str:
    """Load ``path``, expecting one ``error`` that names the file; return its message."""
    with pytest.raises(error) as info:
        Trace.load(path)
    message = str(info.value)
    assert str(path) in message
    # One error, not a chain of library tracebacks above it.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__
    return message


def test_small_trace_round_trips(saved: Path) -> None:
    assert_traces_identical(small_trace(), Trace.load(saved))


def test_missing_file(tmp_path: Path) -> None:
    message = load_error(tmp_path / "nope.safetensors", FileNotFoundError)
    assert "trace.save(path)" in message


def test_a_folder_is_not_a_trace(tmp_path: Path) -> None:
    folder = tmp_path / "runs"
    folder.mkdir()
    small_trace().save(folder / "inside.safetensors")
    message = load_error(folder, IsADirectoryError)
    assert "folder" in message
    assert "inside.safetensors" in message  # what to pass instead


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="root reads files whatever their mode; the simulated refusal below covers it",
)
def test_unreadable_file(saved: Path) -> None:
    saved.chmod(0)
    try:
        message = load_error(saved, PermissionError)
    finally:
        saved.chmod(stat.S_IRUSR | stat.S_IWUSR)
    assert "permission denied" in message
    assert "No such file" not in message


def test_unreadable_file_simulated(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The operating system's refusal to open a file, as a non-root user gets it."""
    real_open = Path.open

    def refuse(self: Path, *args: Any, **kwargs: Any) -> Any:
        if self == saved:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse)
    message = load_error(saved, PermissionError)
    assert "permission denied" in message
    assert "chmod" in message


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        ("empty", "truncated (too short"),
        ("first_4_bytes", "truncated (too short"),
        ("half", "truncated (its arrays are cut off)"),
        ("last_byte_missing", "truncated (its arrays are cut off)"),
        ("length_bytes_flipped", "header is damaged"),
        ("length_high_byte_flipped", "impossible length"),
        ("header_byte_zeroed", "header is damaged (not valid JSON)"),
        ("not_safetensors", "safetensors"),
    ],
)
def test_truncated_or_damaged_files(saved: Path, damage: str, fragment: str) -> None:
    data = saved.read_bytes()
    damaged = {
        "empty": b"",
        "first_4_bytes": data[:4],
        "half": data[: len(data) // 2],
        "last_byte_missing": data[:-1],
        "length_bytes_flipped": bytes([data[0] ^ 0xFF]) + data[1:],
        "length_high_byte_flipped": data[:7] + b"\x7f" + data[8:],
        "header_byte_zeroed": data[:12] + b"\x00" + data[13:],
        "not_safetensors": b"%PDF-1.4 this is some other file\n" * 10,
    }[damage]
    saved.write_bytes(damaged)
    message = load_error(saved)
    assert fragment in message
    assert "trace.save(path)" in message  # the way out


def test_safetensors_file_that_is_not_a_trace(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(path))
    assert "without diffwidget's header" in load_error(path)


def test_header_that_is_not_json(saved: Path) -> None:
    arrays, header = read_raw(saved)
    text = json.dumps(header)
    write_raw(saved, arrays, text[: len(text) // 2])
    assert "header is not valid JSON" in load_error(saved)


def test_missing_header_keys_are_all_named(saved: Path) -> None:
    arrays, header = read_raw(saved)
    del header["tokens"], header["meta"]
    message = load_error(write_raw(saved, arrays, header))
    assert "'tokens'" in message
    assert "'meta'" in message


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("tokens", 3, "'tokens' should be a list of strings, got 3"),
        ("tokens", ["a", 2, "c", "d", "e"], "'tokens' should be a list of strings"),
        ("guidance_scale", "7.5", "'guidance_scale' should be a number, got '7.5'"),
        ("guidance_scale", True, "'guidance_scale' should be a number"),
        ("meta", [], "'meta' should be an object"),
        ("attention_layers", "mid_block.attn2", "'attention_layers' should be a list"),
        ("prompt", None, "'prompt' should be a string, got None"),
        ("format_version", "1", "format_version should be an integer"),
    ],
)
def test_header_fields_of_the_wrong_type(saved: Path, key: str, value: Any, fragment: str) -> None:
    arrays, header = read_raw(saved)
    header[key] = value
    assert fragment in load_error(write_raw(saved, arrays, header))


def test_header_that_is_not_an_object(saved: Path) -> None:
    arrays, _ = read_raw(saved)
    assert "JSON list, not an object" in load_error(write_raw(saved, arrays, [1, 2]))


def test_inconsistent_header(saved: Path) -> None:
    arrays, header = read_raw(saved)
    header["token_kinds"] = ["word"]
    assert "must have the same length" in load_error(write_raw(saved, arrays, header))
    header["token_kinds"] = ["start", "word", "word", "word", "finish"]
    assert "unknown token kinds ['finish']" in load_error(write_raw(saved, arrays, header))


def test_missing_arrays_are_all_named(saved: Path) -> None:
    arrays, header = read_raw(saved)
    del arrays["latents"], arrays["attention/mid_block.attn2"]
    message = load_error(write_raw(saved, arrays, header))
    assert "arrays missing: latents, attention/mid_block.attn2" in message


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("latents", np.zeros((2, 4, 4), np.float32), "'latents' has shape (2, 4, 4)"),
        ("attention/mid_block.attn2", np.zeros((2, 4), np.float16), "expected 4 dimensions"),
        ("previews", np.zeros((2, 8, 8, 3), np.float32), "'previews' is float32, expected uint8"),
        ("timesteps", np.array([1.5, 0.5]), "'timesteps' is float64, expected integers"),
        ("noise_pred", np.zeros((3, 4, 4, 4), np.float32), "noise_pred has 3 steps, expected 2"),
    ],
)
def test_arrays_of_the_wrong_shape_or_dtype(
    saved: Path, key: str, value: np.ndarray, fragment: str
) -> None:
    arrays, header = read_raw(saved)
    arrays[key] = value
    assert fragment in load_error(write_raw(saved, arrays, header))


def test_trace_from_a_newer_version(saved: Path) -> None:
    arrays, header = read_raw(saved)
    header["format_version"] = 99
    message = load_error(write_raw(saved, arrays, header))
    assert "newer diffwidget" in message
    assert "git pull" in message
