"""Occlusion: captum's Occlusion as reference, a known answer on the corner toy, partial maps."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from diffwidget.explain.occlusion import Occlusion, window_masks, window_plan
from diffwidget.explain.similarity import similarity
from diffwidget.tracing.replay import StepReplay
from diffwidget.tracing.trace import Trace


@pytest.mark.parametrize(
    ("settings", "kind"),
    [
        ({"windows": 4, "similarity": "cosine"}, "cosine"),
        ({"windows": 3, "similarity": "ssim"}, "ssim_structure"),
        ({"windows": 2, "similarity": "cosine", "target": "prev"}, "cosine"),
    ],
)
def test_matches_captum_occlusion(
    toy_pipe: Any, toy_trace: Trace, settings: dict[str, Any], kind: str
) -> None:
    """captum computes f(x) - f(occluded) per window and averages over the windows that
    cover each cell; f is the similarity of the replayed prediction to the unmasked one."""
    from captum.attr import Occlusion as CaptumOcclusion

    step = 1
    sal = Occlusion(batch_size=5, progress_bar=False, **settings).attribute(
        toy_pipe, toy_trace, step
    )
    replay = StepReplay(toy_pipe, toy_trace)
    target = settings.get("target", "x0")
    x = replay.latent(step)
    ref = replay.predict(x, step, target)

    def forward(latents: torch.Tensor) -> torch.Tensor:
        return similarity(replay.predict(latents, step, target), ref, kind)  # type: ignore[arg-type]

    window, stride = window_plan(toy_trace.latent_shape, settings["windows"])
    channels = x.shape[1]
    expected = CaptumOcclusion(forward).attribute(
        x,
        sliding_window_shapes=(channels, *window),
        strides=(channels, *stride),
        baselines=0.0,
        perturbations_per_eval=4,
    )
    # The window spans every channel, so each channel carries the same map.
    torch.testing.assert_close(expected[0], expected[0, :1].expand_as(expected[0]))
    np.testing.assert_allclose(sal.raw, expected[0, 0].numpy(), rtol=1e-4, atol=1e-6)
    assert sal.meta["window"] == list(window)
    assert sal.meta["n_windows"] == len(window_masks(toy_trace.latent_shape, window, stride))
    assert sal.meta["complete"]
    assert np.abs(sal.raw).max() > 0


def test_only_windows_over_the_corner_matter() -> None:
    """The corner toy reads only its top-left 4x4 cells: zeroing a window elsewhere leaves
    the prediction bit-identical, so cells all of whose windows miss the corner get exactly
    0, and the corner cells get the largest values."""
    from explain_toys import CORNER, corner_mask, make_corner_pipe, make_corner_trace

    pipe = make_corner_pipe()
    trace = make_corner_trace(pipe)
    sal = Occlusion(progress_bar=False).attribute(pipe, trace, 0)
    window, stride = window_plan(trace.latent_shape, Occlusion().config.windows)
    masks = window_masks(trace.latent_shape, window, stride)
    touches = (masks * corner_mask()).flatten(1).sum(1) > 0
    reached = (masks[touches].sum(0) > 0).numpy()
    assert (sal.raw[~reached] == 0).all()
    corner = corner_mask().bool().numpy()
    assert sal.raw[corner].min() > 0
    top = np.argsort(-sal.raw.ravel())[: CORNER * CORNER]
    assert corner.ravel()[top].mean() >= 0.75


def test_windows_cover_every_cell_like_captum() -> None:
    window, stride = window_plan((7, 5), 3)
    assert (window, stride) == ((3, 2), (1, 1))
    masks = window_masks((7, 5), window, stride)
    assert masks.shape == (5 * 4, 7, 5)
    assert (masks.sum(0) > 0).all()
    # A stride that does not divide the remainder: the last window is cut at the edge.
    masks = window_masks((5, 5), (2, 2), (2, 2))
    assert masks.shape == (9, 5, 5)
    assert float(masks[-1].sum()) == 1.0


def test_cancel_returns_a_partial_map(toy_pipe: Any, toy_trace: Trace) -> None:
    seen: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> bool:
        seen.append((done, total))
        return done < 6

    sal = Occlusion(windows=4, batch_size=3, progress_bar=False).attribute(
        toy_pipe, toy_trace, 0, progress=progress
    )
    assert seen == [(3, 49), (6, 49)]
    assert sal.meta["n_used"] == 6
    assert sal.meta["cancelled"]
    assert not sal.meta["complete"]
    assert "partial: 6 windows" in Occlusion().describe(sal)
    assert np.isfinite(sal.raw).all()


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"windows": 0}, "windows"),
        ({"similarity": "l2"}, "similarity"),
        ({"target": "eps"}, "target"),
    ],
)
def test_bad_settings(settings: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Occlusion(**settings)
