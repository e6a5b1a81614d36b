"""Token relevance on joint-attention families (SD3, Flux): Chefer's rule on the joint sequence."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch

from diffwidget.explain.relevance import TokenRelevance
from diffwidget.tracing.families import denoiser_family
from diffwidget.tracing.replay import StepReplay


@pytest.mark.parametrize("case", ["sd3", "sd35", "flux", "flux_true_cfg"])
def test_explicit_attention_reproduces_the_model(
    case: str, family_case: Any, family_trace: Any
) -> None:
    """The written-out joint attention gives the diffusers processors' output."""
    pipe, _ = family_case(case)
    trace = family_trace(case)
    replay = StepReplay(pipe, trace)
    n_text = int(trace.prompt_embeds.shape[1])
    with denoiser_family(pipe).explicit_attention(n_text) as records:
        out = replay.model_output(replay.latent(1), 1)[0].numpy()
    assert records, "no attention layer recorded"
    np.testing.assert_allclose(out, trace.noise_pred[1], atol=1e-5)
    for record in records:
        rows = record.probs.sum(-1)
        torch.testing.assert_close(rows, torch.ones_like(rows))


@pytest.mark.parametrize("case", ["sd3", "flux"])
def test_relevance_per_token(case: str, family_case: Any, family_trace: Any) -> None:
    pipe, _ = family_case(case)
    trace = family_trace(case)
    rel = TokenRelevance(progress_bar=False).attribute(pipe, trace, steps=[0, 2])
    assert rel.relevance.shape == (2, len(trace.tokens))
    assert rel.maps.shape == (2, len(trace.tokens), *trace.latent_shape)
    assert np.isfinite(rel.relevance).all()
    assert (rel.relevance >= 0).all()
    assert rel.relevance.max() > 0
    assert rel.meta["rules"] == "joint self-attention (Chefer)"
    # The spatial maps are the per-position columns; their means are the relevance.
    grid_means = rel.maps.mean(axis=(2, 3))
    np.testing.assert_allclose(grid_means, rel.relevance, rtol=1e-4, atol=1e-7)


def test_identical_text_positions_get_identical_relevance(
    family_case: Any, family_trace: Any
) -> None:
    """SD3 without T5 fills its T5 positions with zeros: they are interchangeable."""
    pipe, _ = family_case("sd3_no_t5")
    trace = family_trace("sd3_no_t5")
    keep = list(range(int(trace.prompt_embeds.shape[1])))
    full = type(trace)(**{**vars(trace), "facts": replace(trace.facts, token_indices=keep)})
    full.tokens = [str(i) for i in keep]
    full.token_kinds = ["pad"] * len(keep)
    rel = TokenRelevance(progress_bar=False).attribute(pipe, full, steps=[1])
    zero_positions = rel.relevance[0, -24:]
    np.testing.assert_allclose(zero_positions, zero_positions[0], rtol=1e-5)
    assert not np.allclose(rel.relevance[0, :8], rel.relevance[0, 0])
