"""Insertion/deletion: a perfect ordering beats random; AUC and aggregation by hand."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from explain_toys import GRID, make_toy_trace, region_mask

from diffwidget.explain.faithfulness import (
    InsertionDeletion,
    blur_latent,
    stage_plan,
    summarize,
    trapezoid_auc,
)
from diffwidget.explain.results import FaithfulnessCurves, FaithfulnessResult
from diffwidget.tracing.trace import Trace


def test_perfect_ordering_beats_random(toy_pipe: Any, toy_trace: Trace) -> None:
    perfect = region_mask().numpy()
    res = InsertionDeletion(n_random=2).evaluate(toy_pipe, toy_trace, 0, perfect)
    assert res.saliency.deletion_auc < res.random.deletion_auc
    assert res.saliency.insertion_auc > res.random.insertion_auc
    assert res.deletion_gain > 0
    assert res.insertion_gain > 0
    # Stage 0 is the unmodified latent, so both deletion curves start at similarity 1.
    assert res.saliency.deletion[0] == pytest.approx(1.0, abs=1e-5)
    assert res.random.deletion[0] == pytest.approx(1.0, abs=1e-5)
    # The last insertion stage is the full latent again.
    assert res.saliency.insertion[-1] == pytest.approx(1.0, abs=1e-5)
    # The inverted ordering is worse than random for deletion.
    worst = InsertionDeletion(n_random=2).evaluate(toy_pipe, toy_trace, 0, -perfect)
    assert worst.saliency.deletion_auc > worst.random.deletion_auc


def test_random_curves_are_shared_between_maps_of_one_step(
    toy_pipe: Any, toy_trace: Trace, monkeypatch: pytest.MonkeyPatch
) -> None:
    perfect = region_mask().numpy()
    shared = InsertionDeletion(n_random=2)
    first = shared.evaluate(toy_pipe, toy_trace, 0, perfect)
    calls = []
    original = InsertionDeletion._curves
    monkeypatch.setattr(
        InsertionDeletion, "_curves", lambda self, *a: calls.append(1) or original(self, *a)
    )
    second = shared.evaluate(toy_pipe, toy_trace, 0, -perfect)
    assert len(calls) == 1  # the map's own curves only
    assert second.meta["random_reused"]
    assert not first.meta["random_reused"]
    fresh = InsertionDeletion(n_random=2).evaluate(toy_pipe, toy_trace, 0, -perfect)
    np.testing.assert_array_equal(second.random.deletion, fresh.random.deletion)
    np.testing.assert_array_equal(second.random.insertion, fresh.random.insertion)
    np.testing.assert_array_equal(second.saliency.deletion, fresh.saliency.deletion)
    # Another trace of the same pipeline gets its own random curves.
    other = make_toy_trace(toy_pipe)
    calls.clear()
    assert not shared.evaluate(toy_pipe, other, 0, perfect).meta["random_reused"]
    assert len(calls) == 3


def test_stage_plan_scales_the_papers_protocol() -> None:
    assert stage_plan((64, 64)) == (64, 65)
    assert stage_plan((16, 16)) == (4, 65)
    assert stage_plan((8, 8)) == (1, 65)
    assert stage_plan((10, 10)) == (2, 51)  # 100 cells, 2 per stage, last stage partial
    assert stage_plan((16, 16), cells_per_stage=16) == (16, 17)


def test_trapezoid_auc_by_hand() -> None:
    assert trapezoid_auc(np.array([0, 0.5, 1.0]), np.array([1.0, 0.5, 0.0])) == 0.5
    assert trapezoid_auc(np.array([0, 0.25, 1.0]), np.array([1.0, 1.0, 0.0])) == 0.625


def test_blur_keeps_constants_and_shrinks_kernel(toy_pipe: Any, toy_trace: Trace) -> None:
    x = torch.full((1, 4, GRID, GRID), 2.0)
    torch.testing.assert_close(blur_latent(x), x)
    res = InsertionDeletion(n_random=1).evaluate(toy_pipe, toy_trace, 1, np.zeros((GRID, GRID)))
    assert res.meta["blur_kernel"] == GRID - 1
    assert "blur_note" in res.meta
    assert res.meta["n_stages"] == 65
    assert res.saliency.fractions[-1] == 1.0


def _result(deletion: list[float], random_deletion: list[float]) -> FaithfulnessResult:
    frac = np.array([0.0, 0.5, 1.0], dtype=np.float32)
    d, r = np.array(deletion, np.float32), np.array(random_deletion, np.float32)
    ins = np.ones(3, np.float32)
    curves = FaithfulnessCurves(frac, d, ins, trapezoid_auc(frac, d), 1.0)
    rand = FaithfulnessCurves(frac, r, ins, trapezoid_auc(frac, r), 1.0)
    return FaithfulnessResult(step=0, saliency=curves, random=rand)


def test_summarize_by_hand() -> None:
    a = _result([1.0, 0.2, 0.0], [1.0, 0.6, 0.2])  # AUC 0.35 vs 0.6
    b = _result([1.0, 0.6, 0.2], [1.0, 0.4, 0.2])  # AUC 0.6 vs 0.5
    out = summarize([a, b])
    per = out["per_prompt"]
    assert per["saliency_deletion_mean"] == pytest.approx(0.475)
    assert per["saliency_deletion_sd"] == pytest.approx(np.std([0.35, 0.6], ddof=1))
    assert per["deletion_beats_random"] == 0.5
    # Paper: mean curve [1, 0.4, 0.1] -> min-max [1, 1/3, 0] -> trapezoid = 2/3 * 0.5 + 1/6 ...
    assert out["paper"]["saliency_deletion_auc"] == pytest.approx((1 + 1 / 3) / 4 + (1 / 3) / 4)
    with pytest.raises(ValueError, match="no results"):
        summarize([])


def test_bad_inputs(toy_pipe: Any, toy_trace: Trace) -> None:
    with pytest.raises(ValueError, match="latent grid"):
        InsertionDeletion().evaluate(toy_pipe, toy_trace, 0, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="n_random"):
        InsertionDeletion(n_random=0)


def test_deletion_of_a_small_latents_corner_is_seen() -> None:
    """The SSIM deletion curve of a perfect map on a 16x16 corner toy drops, then stays."""
    from explain_toys import CORNER, corner_mask, make_corner_pipe, make_corner_trace

    pipe = make_corner_pipe()
    trace = make_corner_trace(pipe)
    res = InsertionDeletion(n_random=2).evaluate(pipe, trace, 0, corner_mask().numpy())
    curve = res.saliency.deletion
    n_corner_stages = int(np.ceil(CORNER * CORNER / res.meta["cells_per_stage"]))
    # All the change happens while the corner cells go; afterwards nothing moves.
    assert curve[n_corner_stages] < curve[0] - 0.1
    np.testing.assert_allclose(curve[n_corner_stages:], curve[n_corner_stages], atol=1e-5)
    assert res.deletion_gain > 0
