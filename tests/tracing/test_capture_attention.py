"""Cross-attention capture: right probabilities, right half, right grid, same outputs."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from diffwidget.tracing.attention import (
    AttentionRecorder,
    CaptureAttnProcessor,
    attention_probs,
    cross_attention_layers,
)
from diffwidget.tracing.generate import trace

PROMPT = "a red circle on the left"
#: float16 storage of probabilities: absolute rounding error per entry is below 2**-11.
FLOAT16_ATOL = 1e-3


def test_rows_sum_to_one_over_all_tokens(tiny_sd_pipe: Any) -> None:
    traced = trace(tiny_sd_pipe, PROMPT, num_inference_steps=3, tokens="all", decode_previews=False)
    assert len(traced.tokens) == 77
    for layer, maps in traced.attention.items():
        assert maps.dtype == np.float16, layer
        sums = maps.astype(np.float64).sum(axis=-1)
        np.testing.assert_allclose(sums, 1.0, atol=2e-2, err_msg=layer)
        assert (maps >= 0).all()


def test_default_selection_keeps_the_same_columns(tiny_sd_pipe: Any, tiny_trace: Any) -> None:
    full = trace(tiny_sd_pipe, PROMPT, num_inference_steps=5, tokens="all", decode_previews=False)
    kept = tiny_trace.facts.token_indices
    assert kept == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    for layer, maps in tiny_trace.attention.items():
        np.testing.assert_array_equal(maps, full.attention[layer][..., kept])


def test_layers_in_data_flow_order_with_their_grids(tiny_trace: Any) -> None:
    layers = list(tiny_trace.attention)
    assert [layer.split(".")[0] for layer in layers] == ["down_blocks"] * 2 + ["mid_block"] + [
        "up_blocks"
    ] * 4
    assert all(layer.endswith("attn2") for layer in layers)
    grids = {layer: maps.shape[1:3] for layer, maps in tiny_trace.attention.items()}
    assert grids["down_blocks.0.attentions.0.transformer_blocks.0.attn2"] == (16, 16)
    assert grids["mid_block.attentions.0.transformer_blocks.0.attn2"] == (8, 8)
    assert grids["up_blocks.1.attentions.1.transformer_blocks.0.attn2"] == (16, 16)
    assert tiny_trace.facts.attention_grids == {k: tuple(v) for k, v in grids.items()}


def _reference_probs(pipe: Any, seed: int) -> dict[str, torch.Tensor]:
    """Step-0 attention of the cond half from diffusers' own (non-SDPA) attention math."""
    layers = cross_attention_layers(pipe.unet)
    pipe.unet.set_attn_processor(AttnProcessor())
    seen: dict[str, torch.Tensor] = {}
    for layer in layers:
        module = pipe.unet.get_submodule(layer)
        original = module.get_attention_scores

        def record(query, key, mask=None, *, _layer=layer, _original=original, _heads=module.heads):
            probs = _original(query, key, mask)
            if _layer not in seen:
                # Batch-major head layout: rows [heads:] are the second (cond) sample.
                seen[_layer] = probs[_heads:].mean(0)
            return probs

        module.get_attention_scores = record
    try:
        pipe(
            PROMPT,
            num_inference_steps=1,
            generator=torch.Generator("cpu").manual_seed(seed),
            output_type="latent",
        )
    finally:
        for layer in layers:
            del pipe.unet.get_submodule(layer).get_attention_scores
    return seen


def test_matches_diffusers_attention_probabilities(
    tiny_sd_pipe_factory: Callable[..., Any],
) -> None:
    pipe = tiny_sd_pipe_factory()
    expected = _reference_probs(pipe, seed=1)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    traced = trace(pipe, PROMPT, num_inference_steps=1, seed=1, tokens="all", decode_previews=False)
    for layer, probs in expected.items():
        got = traced.attention[layer][0].reshape(-1, 77).astype(np.float32)
        np.testing.assert_allclose(got, probs.numpy(), atol=FLOAT16_ATOL, err_msg=layer)


def test_conditional_half_is_recorded(tiny_sd_pipe: Any) -> None:
    # At step 0 both runs see the same x_T and the same prompt, so the cond half's maps
    # match; the uncond half (a different negative prompt) must not leak in.
    kwargs = {"num_inference_steps": 2, "decode_previews": False, "tokens": "all"}
    plain = trace(tiny_sd_pipe, PROMPT, **kwargs)
    negative = trace(tiny_sd_pipe, PROMPT, negative_prompt="a blue square", **kwargs)
    assert not np.array_equal(plain.prompt_embeds[0], negative.prompt_embeds[0])
    for layer in plain.attention:
        np.testing.assert_array_equal(plain.attention[layer][0], negative.attention[layer][0])
        assert not np.array_equal(plain.attention[layer][1], negative.attention[layer][1])


@pytest.mark.parametrize(("height", "width"), [(32, 48), (40, 24)])
def test_non_square_grids(tiny_sd_pipe: Any, height: int, width: int) -> None:
    traced = trace(tiny_sd_pipe, PROMPT, num_inference_steps=2, height=height, width=width)
    h, w = height // 2, width // 2
    assert traced.latent_shape == (h, w)
    # The linear map's previews: one pixel per latent cell.
    assert traced.previews.shape == (2, h, w, 3)
    assert traced.image.shape == (height, width, 3)
    assert (traced.facts.height, traced.facts.width) == (height, width)
    for layer, maps in traced.attention.items():
        level = 0 if layer.startswith(("down_blocks.0", "up_blocks.1")) else 1
        assert maps.shape == (2, h >> level, w >> level, len(traced.tokens)), layer


def test_grid_is_row_major_like_the_hidden_states(tiny_sd_pipe: Any) -> None:
    # A feature map (B, C, h, w) with one distinctive pixel at row 1, column 2 of a 2x3
    # grid: its map must come back at that cell after the (h_l, w_l) reshape.
    attn = tiny_sd_pipe.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2")
    text = torch.randn(1, 77, 32)
    hidden = torch.zeros(1, 32, 2, 3)
    hidden[0, :, 1, 2] = 5 * torch.randn(32)
    probs = attention_probs(attn, hidden, text)[0]
    grid = probs.reshape(2, 3, 77)
    distinct = (grid - grid[0, 0]).abs().sum(-1)
    assert distinct[1, 2] > 0
    assert distinct.flatten().tolist().count(0.0) == 5


def test_wrapper_keeps_output_and_signature(tiny_sd_pipe: Any) -> None:
    attn = tiny_sd_pipe.unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2")
    original = AttnProcessor2_0()
    recorder = AttentionRecorder([0, 3])
    wrapped = CaptureAttnProcessor(original, "mid", recorder)
    assert inspect.signature(wrapped.__call__) == inspect.signature(original.__call__)
    hidden, text = torch.randn(2, 64, 32), torch.randn(2, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            wrapped(attn, hidden, encoder_hidden_states=text),
            original(attn, hidden, encoder_hidden_states=text),
            rtol=0,
            atol=0,
        )
    (stored,) = recorder.maps["mid"]
    assert stored.shape == (64, 2)
    assert stored.dtype == torch.float16
    expected = attention_probs(attn, hidden[1:], text[1:])[0][:, [0, 3]]
    torch.testing.assert_close(stored.float(), expected, atol=FLOAT16_ATOL, rtol=0)


def test_second_unet_call_in_one_step_is_refused() -> None:
    recorder = AttentionRecorder(None)
    recorder.add("layer", torch.full((4, 3), 1 / 3))
    with pytest.raises(RuntimeError, match="once per step"):
        recorder.add("layer", torch.full((4, 3), 1 / 3))


def test_per_head_capture_on_a_unet(tiny_sd_pipe: Any) -> None:
    from diffwidget.tracing.families import denoiser_family

    traced = trace(tiny_sd_pipe, PROMPT, num_inference_steps=2, attention_heads=True)
    heads = denoiser_family(tiny_sd_pipe).site_heads()
    for layer, per_head in traced.attention_heads.items():
        assert per_head.shape[1] == heads[layer]
        mean = per_head.astype(np.float32).mean(axis=1)
        np.testing.assert_allclose(mean, traced.attention[layer], atol=FLOAT16_ATOL)
    plain = trace(tiny_sd_pipe, PROMPT, num_inference_steps=2)
    assert plain.attention_heads == {}
    np.testing.assert_array_equal(plain.image, traced.image)
