"""Saving and loading traces, token selection, and the memory budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from diffwidget.tracing.budget import BYTES_PER_MB, MemoryBudgetError, estimate_step_bytes
from diffwidget.tracing.context import TraceContext, trace
from diffwidget.tracing.families.unet import grid_at_level, layer_grid, layer_level
from diffwidget.tracing.tokens import prompt_tokens
from diffwidget.tracing.trace import Trace

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
    assert a.meta == b.meta


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
    from diffwidget.tracing.tiny import TINY_WORDS

    tokenizer = tiny_sd_pipe.tokenizer
    # transformers 5 can silently build a 3-token vocabulary from misread files.
    assert len(tokenizer) > len(TINY_WORDS) + 2
    assert tokenizer.model_max_length == 77
    for word in TINY_WORDS:
        assert tokenizer.tokenize(word) == [word + "</w>"], word
    assert len(tokenizer.tokenize("zebra")) == 5  # unknown words fall back to letters
    assert tiny_sd_pipe.text_encoder.config.vocab_size == len(tokenizer)
