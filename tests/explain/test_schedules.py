"""Time-step schedules: the paper's formulas by hand, validation, and a real scheduler."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch

from diffwidget.explain.schedules import (
    check_scheduler_accepts,
    exponential_timesteps,
    make_schedule,
    run_with_timesteps,
    uniform_timesteps,
    validate_timesteps,
    window_timesteps,
)


def test_exponential_schedules_by_hand() -> None:
    # N = 3, lambda = 2: a = 1000^(1/5) = 3.98107; a^3 = 63.1, a^4 = 251.2, a^5 = 1000.
    assert exponential_timesteps(3, 2, "early") == [999, 937, 749]
    assert exponential_timesteps(3, 2, "latter") == [999, 251, 63]


def test_paper_settings() -> None:
    early = exponential_timesteps(30, 60, "early")
    latter = exponential_timesteps(30, 60, "latter")
    assert len(early) == len(latter) == 30
    # Early crowds steps at high noise, latter at low noise.
    assert sum(t > 500 for t in early) >= 20
    assert sum(t < 500 for t in latter) >= 20
    early_gaps = [a - b for a, b in itertools.pairwise(early[1:])]
    latter_gaps = [a - b for a, b in itertools.pairwise(latter)]
    assert early_gaps == sorted(early_gaps)
    assert latter_gaps == sorted(latter_gaps, reverse=True)
    for ts in (early, latter):
        assert all(a > b for a, b in itertools.pairwise(ts))


def test_window_and_uniform() -> None:
    ts = window_timesteps(20, center=400, width=50, n_outside=4)
    assert len(ts) == 20
    assert ts[0] == 999
    assert sum(375 <= t <= 425 for t in ts) == 16
    assert uniform_timesteps(5) == [999, 749, 500, 250, 0]
    assert make_schedule("latter", 3, lam=2) == [999, 251, 63]
    with pytest.raises(ValueError, match="band"):
        window_timesteps(80, center=400, width=50, n_outside=4)


@pytest.mark.parametrize(
    ("timesteps", "match"),
    [
        ([999, 500, 500], "repeat"),
        ([500, 999], "strictly decreasing"),
        ([1000, 10], "outside"),
        ([], "empty"),
        ([10.5, 3], "integers"),
    ],
)
def test_validation_errors(timesteps: list[Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_timesteps(timesteps)


def test_small_lambda_collides_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="larger lambda"):
        exponential_timesteps(30, 0, "latter")


def test_runs_a_pipeline_with_custom_timesteps(tiny_sd_pipe_factory: Callable[..., Any]) -> None:
    pipe = tiny_sd_pipe_factory()
    ts = exponential_timesteps(3, 2, "early")
    run_with_timesteps(
        pipe, "a red circle", ts, guidance_scale=2.0, output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert pipe.scheduler.timesteps.tolist() == ts
    pytest.importorskip("diffwidget.tracing.context")
    trace = run_with_timesteps(pipe, "a red circle", ts, traced=True, decode_previews=False)
    assert trace.timesteps.tolist() == ts
    pndm = tiny_sd_pipe_factory(scheduler="ddim").scheduler
    with pytest.raises(TypeError, match="does not accept custom timesteps"):
        check_scheduler_accepts(pndm, ts)
