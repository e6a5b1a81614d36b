"""Token relevance: the toy's token, one pass per step, processors always restored."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from explain_support import processors
from explain_toys import TOY_TOKEN

from diffwidget.explain.relevance import TokenRelevance, _normalise
from diffwidget.tracing.trace import Trace


def test_points_at_the_token_the_toy_depends_on(toy_pipe: Any, toy_trace: Trace) -> None:
    rel = TokenRelevance(progress_bar=False).attribute(toy_pipe, toy_trace)
    assert rel.meta["text_encoder_used"]
    assert rel.meta["text_attention_layers"] == 2
    assert rel.relevance.shape == (toy_trace.n_steps, len(toy_trace.tokens))
    for row in rel.relevance:
        assert int(np.argmax(row)) == TOY_TOKEN
    # Tokens after TOY_TOKEN cannot receive relevance through a causal text encoder.
    assert np.all(rel.relevance[:, TOY_TOKEN + 1 :] == 0)
    assert np.all(rel.normalized[:, TOY_TOKEN] == 1.0)
    assert rel.at(0)[toy_trace.tokens[TOY_TOKEN]] == 1.0


def test_without_text_encoder_only_the_token_itself(toy_pipe: Any, toy_trace: Trace) -> None:
    rel = TokenRelevance(text_encoder=False, progress_bar=False).attribute(toy_pipe, toy_trace)
    others = np.delete(rel.relevance, TOY_TOKEN, axis=1)
    assert np.all(others == 0)
    assert np.all(rel.relevance[:, TOY_TOKEN] > 0)


def test_one_forward_per_step_and_clean_model(sd_pipe: Any, sd_trace: Trace) -> None:
    calls: list[int] = []
    before = processors(sd_pipe.unet)
    implementation = sd_pipe.text_encoder.config._attn_implementation
    handle = sd_pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        rel = TokenRelevance(progress_bar=False).attribute(sd_pipe, sd_trace, steps=[0, 3])
    finally:
        handle.remove()
    assert len(calls) == 2
    assert rel.meta["text_encoder_used"], "the tiny SD text encoder reproduces the embedding"
    assert rel.steps.tolist() == [0, 3]
    assert rel.timesteps.tolist() == sd_trace.timesteps[[0, 3]].tolist()
    assert rel.maps.shape == (2, len(sd_trace.tokens), *sd_trace.latent_shape)
    assert np.isfinite(rel.relevance).all()
    assert (rel.relevance >= 0).all()
    words = [i for i, k in enumerate(sd_trace.token_kinds) if k == "word"]
    assert np.allclose(rel.normalized[:, words].max(1), 1.0)
    assert processors(sd_pipe.unet) == before
    assert sd_pipe.text_encoder.config._attn_implementation == implementation
    assert all(p.grad is None for p in sd_pipe.unet.parameters())


def test_cancel_keeps_finished_steps(toy_pipe: Any, toy_trace: Trace) -> None:
    rel = TokenRelevance(progress_bar=False).attribute(
        toy_pipe, toy_trace, progress=lambda done, total: False
    )
    assert rel.steps.tolist() == [0]
    assert not rel.meta["complete"]


def test_chefer_normalisation() -> None:
    r = torch.tensor([[3.0, 1.0], [0.0, 1.0]])
    # R - I = [[2, 1], [0, 0]] -> rows / row sums (+ I): [[2/3 + 1, 1/3], [0, 1]].
    expected = torch.tensor([[2 / 3 + 1, 1 / 3], [0.0, 1.0]])
    torch.testing.assert_close(_normalise(r), expected)


def test_bad_steps(toy_pipe: Any, toy_trace: Trace) -> None:
    with pytest.raises(ValueError, match="steps is empty"):
        TokenRelevance(progress_bar=False).attribute(toy_pipe, toy_trace, steps=[])
    with pytest.raises(IndexError):
        TokenRelevance(progress_bar=False).attribute(toy_pipe, toy_trace, steps=[9])


def test_sdxl_uses_the_recorded_embedding(tiny_sdxl_pipe: Any, sdxl_trace: Trace) -> None:
    rel = TokenRelevance(progress_bar=False).attribute(tiny_sdxl_pipe, sdxl_trace, steps=[1])
    # Two text encoders feed SDXL's UNet: the text self-attention rule is skipped (R_tt = I).
    assert not rel.meta["text_encoder_used"]
    assert rel.relevance.shape == (1, len(sdxl_trace.tokens))
    assert np.isfinite(rel.relevance).all()
    assert rel.relevance.max() > 0
