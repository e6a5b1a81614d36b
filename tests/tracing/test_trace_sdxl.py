"""The tiny SDXL pipeline: two text encoders, added conditioning, other attention layout."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diffwidget.tracing.decode import to_uint8
from diffwidget.tracing.generate import trace

PROMPT = "a red circle on the left"
STEPS = 3


def test_sdxl_trace(tiny_sdxl_pipe: Any) -> None:
    traced = trace(tiny_sdxl_pipe, PROMPT, num_inference_steps=STEPS, height=32, width=48, seed=2)
    plain = tiny_sdxl_pipe(
        PROMPT,
        num_inference_steps=STEPS,
        height=32,
        width=48,
        output_type="np",
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(2),
    ).images[0]
    np.testing.assert_array_equal(traced.image, to_uint8(plain))
    assert traced.facts.pipeline == "StableDiffusionXLPipeline"
    # Concatenated hidden states of both encoders (16 + 16), CFG order on axis 0.
    assert traced.prompt_embeds.shape == (2, 77, 32)
    assert traced.extra["text_embeds"].shape == (2, 16)
    assert traced.extra["time_ids"].shape == (2, 6)
    np.testing.assert_array_equal(traced.extra["time_ids"][1], [32, 48, 0, 0, 32, 48])
    # force_zeros_for_empty_prompt: SDXL's unconditional embeddings are zeros.
    assert not traced.prompt_embeds[0].any()
    assert traced.prompt_embeds[1].any()
    assert len(traced.attention) == 8  # transformer_layers_per_block=(1, 2): two attn2 per block
    for layer, maps in traced.attention.items():
        assert maps.shape == (STEPS, 8, 12, len(traced.tokens)), layer
    assert traced.previews.shape == (STEPS, 16, 24, 3)  # one pixel per latent cell


def test_sdxl_rows_sum_to_one(tiny_sdxl_pipe: Any) -> None:
    traced = trace(
        tiny_sdxl_pipe, PROMPT, num_inference_steps=2, tokens="all", decode_previews=False
    )
    for maps in traced.attention.values():
        np.testing.assert_allclose(maps.astype(np.float64).sum(-1), 1.0, atol=2e-2)


def test_context_records_added_cond_from_the_unet_call(tiny_sdxl_pipe: Any) -> None:
    """SDXL's added conditioning is read off the UNet call; user callbacks run untouched."""
    from diffwidget.tracing.context import TraceContext

    seen: list[int] = []

    def mine(_pipe: Any, step: int, _t: Any, _kwargs: dict[str, Any]) -> dict[str, Any]:
        seen.append(step)
        return {}

    with TraceContext(tiny_sdxl_pipe, prompt=PROMPT, decode_previews=False) as ctx:
        tiny_sdxl_pipe(
            PROMPT, num_inference_steps=2, output_type="latent", callback_on_step_end=mine
        )
    assert seen == [0, 1]
    record = ctx.result()
    assert record.extra["time_ids"].shape == (2, 6)
    assert record.extra["text_embeds"].shape[0] == 2
    parents = {e.name: e.parent for e in record.facts.conditioning or []}
    assert parents["time_ids"] == parents["text_embeds"] == "added_cond_kwargs"
