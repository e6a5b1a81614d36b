"""Explicit attention of the cross-attention families (UNet, PixArt) for token relevance.

The processors that write the softmax out must give the model's own output (the traced
noise prediction) and, on the cross-attention layers, the probabilities the trace captured
on the side of the original kernels. The joint families' counterpart is in
``tests/explain/test_joint_relevance.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from diffwidget.tracing.families import denoiser_family
from diffwidget.tracing.replay import StepReplay

STEP = 1
#: float16 storage of the traced maps: rounding error per entry below 2**-11.
FLOAT16_ATOL = 1e-3


def _case(name: str, request: pytest.FixtureRequest) -> tuple[Any, Any]:
    if name == "unet":
        return request.getfixturevalue("tiny_sd_pipe"), request.getfixturevalue("tiny_trace")
    pipe, _ = request.getfixturevalue("family_case")(name)
    return pipe, request.getfixturevalue("family_trace")(name)


@pytest.mark.parametrize("case", ["unet", "pixart"])
def test_explicit_attention_reproduces_the_model(case: str, request: pytest.FixtureRequest) -> None:
    pipe, trace = _case(case, request)
    replay = StepReplay(pipe, trace)
    family = denoiser_family(pipe)
    before = {n: m.processor for n, m in family.denoiser.named_modules() if hasattr(m, "processor")}
    n_text = int(trace.prompt_embeds.shape[1])
    with family.explicit_attention(n_text) as records:
        out = replay.model_output(replay.latent(STEP), STEP)[0].numpy()
    after = {n: m.processor for n, m in family.denoiser.named_modules() if hasattr(m, "processor")}
    assert after == before
    np.testing.assert_allclose(out, trace.noise_pred[STEP], atol=1e-5)
    assert {r.kind for r in records} == {"self", "cross"}
    for record in records:
        module = family.denoiser.get_submodule(record.path)
        assert record.probs.ndim == 4
        assert record.probs.shape[1] == module.heads
        rows = record.probs.sum(-1)
        torch.testing.assert_close(rows, torch.ones_like(rows))
    # The cross-attention of the prompt's half, mean over heads, is what the trace captured
    # on the side of the original kernels at this step.
    cross = [r for r in records if r.kind == "cross"]
    assert [r.path for r in cross] == list(trace.attention)
    keep = trace.facts.token_indices
    for record in cross:
        assert record.n_text == n_text
        probs = replay.cfg.cond_rows(record.probs.detach(), "cond")[-1].mean(0)[:, keep]
        captured = trace.attention[record.path][STEP].reshape(-1, len(keep)).astype(np.float32)
        np.testing.assert_allclose(probs.numpy(), captured, atol=FLOAT16_ATOL)


def test_text_attention_records_the_clip_encoder_and_restores_it(tiny_sd_pipe: Any) -> None:
    family = denoiser_family(tiny_sd_pipe)
    encoder = tiny_sd_pipe.text_encoder
    implementation = encoder.config._attn_implementation
    ids = tiny_sd_pipe.tokenizer(
        "a red circle", padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad(), family.text_attention() as text:
        assert text is not None
        hidden, probs = text.encode(ids)
    with torch.no_grad():
        reference = encoder(ids)[0]
    torch.testing.assert_close(hidden, reference)
    assert len(probs) == encoder.config.num_hidden_layers
    for layer in probs:
        assert layer.shape == (1, encoder.config.num_attention_heads, 77, 77)
        # CLIP's text attention is causal: nothing above the diagonal.
        assert float(torch.triu(layer[0], diagonal=1).abs().max()) == 0.0
    assert encoder.config._attn_implementation == implementation
    assert not any(hasattr(m, "_diffusers_hook") for m in encoder.modules())
    assert not any("forward" in vars(m) for m in encoder.modules())


def test_sdxl_has_no_single_text_encoder(tiny_sdxl_pipe: Any) -> None:
    with denoiser_family(tiny_sdxl_pipe).text_attention() as text:
        assert text is None
