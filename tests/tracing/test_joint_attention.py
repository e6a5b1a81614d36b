"""The joint-attention math against a softmax written out from scratch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffwidget.tracing.families.joint import SdpaTap
from diffwidget.tracing.joint_attention import (
    image_to_text_probs,
    sdpa_with_lse,
    text_probs_from_lse,
)

HEADS, N_IMAGE, N_TEXT, D = 3, 20, 7, 16


def _joint(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(HEADS, N_IMAGE, D, generator=gen)
    key = torch.randn(HEADS, N_IMAGE + N_TEXT, D, generator=gen)
    return query, key


def _reference(query: torch.Tensor, key: torch.Tensor, text: slice) -> torch.Tensor:
    """Per-head image→text block of exp(s) / Σ exp(s), in float64, by hand."""
    scores = torch.einsum("hqd,hkd->hqk", query.double(), key.double()) / math.sqrt(D)
    weights = torch.exp(scores - scores.max(dim=-1, keepdim=True).values)
    return (weights / weights.sum(dim=-1, keepdim=True))[..., text]


@pytest.mark.parametrize("limit_bytes", [1, 256, 2**20])  # one query a chunk .. one chunk
def test_chunked_block_equals_the_full_softmax(limit_bytes: int) -> None:
    query, key = _joint()
    text = slice(N_IMAGE, None)
    expected = _reference(query, key, text)
    got = image_to_text_probs(query, key, text, 1 / math.sqrt(D), limit_bytes=limit_bytes)
    torch.testing.assert_close(got.double(), expected.mean(0), atol=1e-6, rtol=1e-5)
    per_head = image_to_text_probs(
        query, key, text, 1 / math.sqrt(D), limit_bytes=limit_bytes, heads=True
    )
    torch.testing.assert_close(per_head.double(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("limit_bytes", [1, 2**20])
def test_block_from_a_known_log_sum_exp_equals_the_full_softmax(limit_bytes: int) -> None:
    query, key = _joint(1)
    scores = torch.einsum("hqd,hkd->hqk", query.double(), key.double()) / math.sqrt(D)
    lse = torch.logsumexp(scores, dim=-1).float()
    got = text_probs_from_lse(
        query, key[:, :N_TEXT], lse, 1 / math.sqrt(D), limit_bytes=limit_bytes, heads=True
    )
    expected = _reference(query, key, slice(0, N_TEXT))
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_with_lse_returns_sdpas_own_output(scale: float | None, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, HEADS, n, D, generator=gen).to(dtype) for n in (9, 13, 13))
    found = sdpa_with_lse(q, k, v, scale=scale)
    assert found is not None, "the CPU flash kernel is SDPA's choice here"
    out, call = found
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, scale=scale))
    used = scale if scale is not None else 1 / math.sqrt(D)
    assert call.scale == used
    expected = torch.logsumexp(q.double() @ k.double().transpose(-1, -2) * used, dim=-1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(call.lse.double(), expected, atol=tol, rtol=tol)
    assert call.query is q
    assert call.key is k


def test_sdpa_with_lse_declines_what_it_cannot_match() -> None:
    q, k, v = (torch.randn(1, 2, n, 8) for n in (4, 6, 6))
    assert sdpa_with_lse(q, k, v, attn_mask=torch.zeros(4, 6)) is None
    assert sdpa_with_lse(q, k, v, dropout_p=0.1) is None
    assert sdpa_with_lse(q, k, v, is_causal=True) is None
    assert sdpa_with_lse(q.requires_grad_(), k, v) is None
    with torch.no_grad():  # no gradients needed: accepted again
        assert sdpa_with_lse(q, k, v) is not None
    with sdpa_kernel(SDPBackend.MATH):  # SDPA would not use a flash kernel
        assert sdpa_with_lse(q.detach(), k, v) is None


def test_tap_sees_one_call_and_changes_nothing() -> None:
    q, k, v = (torch.randn(1, 2, n, 8) for n in (4, 6, 6))
    expected = F.scaled_dot_product_attention(q, k, v) * 2
    with SdpaTap() as tap:
        out = F.scaled_dot_product_attention(q, k, v) * 2
    assert torch.equal(out, expected)
    call = tap.single()
    assert call is not None
    assert call.lse.shape == (1, 2, 4)
    with SdpaTap() as twice:
        F.scaled_dot_product_attention(q, k, v)
        F.scaled_dot_product_attention(q, k, v)
    assert twice.single() is None
    with sdpa_kernel(SDPBackend.MATH):
        plain = F.scaled_dot_product_attention(q, k, v)
        with SdpaTap() as math_only:
            tapped = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(tapped, plain)  # declined: SDPA ran as it would have
    assert math_only.calls == [None]
    assert math_only.single() is None
