"""DF-RISE: known answers on the toy, batching invariance, streaming and cancellation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from explain_toys import GRID, region_mask

from diffwidget.explain.rise import DFRise, make_masks
from diffwidget.tracing.trace import Trace


def test_points_at_the_region_the_toy_depends_on(toy_pipe: Any, toy_trace: Trace) -> None:
    sal = DFRise(n_masks=800, batch_size=200, progress_bar=False).attribute(toy_pipe, toy_trace, 0)
    inside = region_mask().bool().numpy()
    outside_mean, outside_sd = sal.raw[~inside].mean(), sal.raw[~inside].std()
    # The region's mean must stand clear of the noise of a 9-cell mean drawn from outside.
    assert sal.raw[inside].mean() > outside_mean + 3 * outside_sd / np.sqrt(inside.sum())
    assert sal.meta["complete"]
    assert sal.meta["n_used"] == 800
    assert sal.meta["window"] == GRID - 1
    assert "window_note" in sal.meta


def test_batched_equals_one_mask_at_a_time(sd_pipe: Any, sd_trace: Trace) -> None:
    kwargs = {"n_masks": 6, "seed": 3, "progress_bar": False}
    batched = DFRise(batch_size=6, **kwargs).attribute(sd_pipe, sd_trace, 1)
    single = DFRise(batch_size=1, **kwargs).attribute(sd_pipe, sd_trace, 1)
    np.testing.assert_allclose(batched.raw, single.raw, atol=1e-5)
    assert batched.meta["batch_size"] == 6
    assert single.meta["batch_size"] == 1


def test_saliency_formula(toy_pipe: Any, toy_trace: Trace) -> None:
    """S = sum_k s_k M_k / (N p), recomputed by hand from the same masks."""
    from diffwidget.explain.similarity import similarity
    from diffwidget.tracing.replay import StepReplay

    n, p = 5, 0.3
    options = {"n_masks": n, "p": p, "similarity": "cosine", "seed": 1, "progress_bar": False}
    paper = DFRise(**options, center=False).attribute(toy_pipe, toy_trace, 1)
    centred = DFRise(**options).attribute(toy_pipe, toy_trace, 1)
    replay = StepReplay(toy_pipe, toy_trace)
    x = replay.latent(1)
    ref = replay.pred_x0(x, 1)
    masks = make_masks(n, (GRID, GRID), p, seed=1)
    s = torch.stack([similarity(replay.pred_x0(x * m, 1), ref, "cosine")[0] for m in masks])
    expected = (s[:, None, None] * masks).sum(0) / (n * p)
    np.testing.assert_allclose(paper.raw, expected.numpy(), atol=1e-5)
    # The default control variate subtracts mean(s) times each cell's keep rate.
    control = s.mean() * masks.sum(0) / (n * p)
    np.testing.assert_allclose(centred.raw, (expected - control).numpy(), atol=1e-5)


def test_progress_cancel_returns_partial(toy_pipe: Any, toy_trace: Trace) -> None:
    seen: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> bool:
        seen.append((done, total))
        return done < 4

    sal = DFRise(n_masks=10, batch_size=2, progress_bar=False).attribute(
        toy_pipe, toy_trace, 0, progress=progress
    )
    assert seen == [(2, 10), (4, 10)]
    assert sal.meta["n_used"] == 4
    assert not sal.meta["complete"]
    assert sal.meta["cancelled"]
    assert np.isfinite(sal.raw).all()
    assert sal.raw.max() > 0


def test_keyboard_interrupt_returns_partial(toy_pipe: Any, toy_trace: Trace) -> None:
    def progress(done: int, total: int) -> None:
        if done >= 6:
            raise KeyboardInterrupt

    sal = DFRise(n_masks=10, batch_size=3, progress_bar=False).attribute(
        toy_pipe, toy_trace, 0, progress=progress
    )
    assert sal.meta["interrupted"]
    assert sal.meta["n_used"] == 6
    assert not sal.meta["complete"]


def test_centered_estimate_converges_faster(toy_pipe: Any, toy_trace: Trace) -> None:
    rise = DFRise(n_masks=800, batch_size=200, progress_bar=False, center=True)
    sal = rise.attribute(toy_pipe, toy_trace, 0)
    history = sal.meta["convergence"]["history"]
    assert [h[0] for h in history] == [200, 400, 600, 800]
    assert history[-1][1] > history[0][1]
    inside = region_mask().bool().numpy()
    z = (sal.raw[inside].mean() - sal.raw[~inside].mean()) / sal.raw[~inside].std()
    plain = DFRise(n_masks=800, batch_size=200, progress_bar=False, center=False).attribute(
        toy_pipe, toy_trace, 0
    )
    z_plain = (plain.raw[inside].mean() - plain.raw[~inside].mean()) / plain.raw[~inside].std()
    assert z > 2 * z_plain > 0
    r_plain = plain.meta["convergence"]["split_half_r"]
    assert sal.meta["convergence"]["split_half_r"] > r_plain


def test_options_run(toy_pipe: Any, toy_trace: Trace) -> None:
    for kwargs in ({"masks": "smooth"}, {"target": "prev"}, {"similarity": "cosine"}):
        sal = DFRise(n_masks=4, progress_bar=False, **kwargs).attribute(toy_pipe, toy_trace, 1)
        assert sal.map.shape == (GRID, GRID)
        assert np.isfinite(sal.raw).all()
        assert sal.meta[next(iter(kwargs))] == next(iter(kwargs.values()))


def test_masks() -> None:
    bern = make_masks(200, (8, 8), 0.5, seed=0)
    assert set(bern.unique().tolist()) == {0.0, 1.0}
    assert abs(float(bern.mean()) - 0.5) < 0.05
    torch.testing.assert_close(bern, make_masks(200, (8, 8), 0.5, seed=0))
    assert not torch.equal(bern, make_masks(200, (8, 8), 0.5, seed=1))
    smooth = make_masks(200, (16, 12), 0.3, kind="smooth", seed=0)
    assert smooth.shape == (200, 16, 12)
    assert float(smooth.min()) >= 0
    assert float(smooth.max()) <= 1
    assert abs(float(smooth.mean()) - 0.3) < 0.05
    # Smooth masks vary inside a coarse cell (they are not plain upsampled blocks).
    assert len(smooth[0].unique()) > 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": 1.0}, "p must"),
        ({"n_masks": 0}, "n_masks"),
        ({"masks": "grid"}, "masks"),
        ({"similarity": "l2"}, "similarity"),
        ({"target": "eps"}, "target"),
    ],
)
def test_bad_settings(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DFRise(**kwargs)


def test_bad_step(toy_pipe: Any, toy_trace: Trace) -> None:
    with pytest.raises(IndexError, match=r"steps 0\.\.1"):
        DFRise(n_masks=2, progress_bar=False).attribute(toy_pipe, toy_trace, 5)


def test_a_timestep_passed_as_step_gets_a_hint(toy_pipe: Any, toy_trace: Trace) -> None:
    t = int(toy_trace.timesteps[0])
    with pytest.raises(IndexError, match=r"pass step=0"):
        DFRise(n_masks=2, progress_bar=False).attribute(toy_pipe, toy_trace, t)


@pytest.mark.parametrize(("similarity", "least_share"), [("ssim", 0.75), ("cosine", 0.95)])
def test_corner_of_a_small_latent_is_found(similarity: str, least_share: float) -> None:
    """On a 16x16 toy that reads only its top-left corner, the top cells lie in the corner.

    With "valid" 15x15 SSIM windows only 19 % of the top cells were there. SSIM's structure
    term still weighs the corner's inner edge more than its outer corner (a property of the
    local measure, not of the windowing), so it needs more masks than cosine to find all.
    """
    from explain_toys import CORNER, corner_mask, make_corner_pipe, make_corner_trace

    pipe = make_corner_pipe()
    trace = make_corner_trace(pipe)
    rise = DFRise(n_masks=1000, batch_size=250, similarity=similarity, progress_bar=False)  # type: ignore[arg-type]
    sal = rise.attribute(pipe, trace, 0)
    top = np.argsort(-sal.raw.ravel())[: CORNER * CORNER]
    share = corner_mask().numpy().ravel()[top].mean()
    assert share >= least_share
    inside = corner_mask().bool().numpy()
    assert sal.raw[inside].min() > sal.raw[~inside].mean()


def test_compiled_equals_eager_with_one_compiled_shape(toy_pipe: Any, toy_trace: Trace) -> None:
    """``compile=True`` gives the eager map; a shorter last batch is padded, not recompiled."""
    from torch._dynamo.utils import counters

    kwargs = {"batch_size": 4, "seed": 2, "progress_bar": False, "compile": True}
    start = counters["stats"]["unique_graphs"]
    DFRise(n_masks=8, **kwargs).attribute(toy_pipe, toy_trace, 1)  # two full batches of 4
    per_shape = counters["stats"]["unique_graphs"] - start
    assert per_shape >= 1
    # 10 masks: batches of 4, 4 and 2 padded to 4, so no second shape is compiled.
    rise = DFRise(n_masks=10, **kwargs)
    compiled = rise.attribute(toy_pipe, toy_trace, 1)
    assert counters["stats"]["unique_graphs"] - start == 2 * per_shape
    eager = DFRise(n_masks=10, batch_size=4, seed=2, progress_bar=False).attribute(
        toy_pipe, toy_trace, 1
    )
    np.testing.assert_allclose(compiled.raw, eager.raw, atol=1e-5)
    assert compiled.meta["compile"]
    assert not eager.meta["compile"]
    assert compiled.meta["batch_size"] == 4
    assert compiled.meta["n_used"] == 10
    assert compiled.meta["convergence"]["history"][-1][0] == 10
    # The same object reuses its compiled code.
    again = rise.attribute(toy_pipe, toy_trace, 1)
    assert counters["stats"]["unique_graphs"] - start == 2 * per_shape
    np.testing.assert_array_equal(again.raw, compiled.raw)


def test_compiled_code_follows_changed_weights(toy_pipe: Any, toy_trace: Trace) -> None:
    """Frozen compiled code holds the weights it was compiled with: changes recompile."""
    kwargs = {"n_masks": 8, "batch_size": 4, "seed": 2, "progress_bar": False}
    rise = DFRise(compile=True, **kwargs)
    before = rise.attribute(toy_pipe, toy_trace, 1)
    bias = toy_pipe.unet.mid_block.attn2.to_out[0].bias
    with torch.no_grad():
        bias.add_(torch.linspace(-20, 20, bias.numel()))
    after = rise.attribute(toy_pipe, toy_trace, 1)
    eager = DFRise(**kwargs).attribute(toy_pipe, toy_trace, 1)
    np.testing.assert_allclose(after.raw, eager.raw, atol=1e-5)
    assert np.abs(after.raw - before.raw).max() > 1e-3
    # ``.data`` edits leave no trace on the tensor; the check against the eager call sees them.
    bias.data.mul_(-1)
    with pytest.raises(RuntimeError, match="disagrees with the eager one"):
        rise.attribute(toy_pipe, toy_trace, 1)
    recompiled = rise.attribute(toy_pipe, toy_trace, 1)
    eager = DFRise(**kwargs).attribute(toy_pipe, toy_trace, 1)
    np.testing.assert_allclose(recompiled.raw, eager.raw, atol=1e-5)


def test_compile_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="compile must be True or False"):
        DFRise(compile="yes")  # type: ignore[arg-type]
