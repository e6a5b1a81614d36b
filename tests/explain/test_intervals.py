"""Intervals against independent computations: scipy's Wilson interval, exact bootstraps."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from diffwidget.explain.intervals import (
    bootstrap_crossing,
    bootstrap_curve,
    first_crossing,
    wilson_interval,
)


@pytest.mark.parametrize(("hits", "n"), [(0, 4), (1, 4), (3, 4), (4, 4), (7, 20), (199, 200)])
def test_wilson_matches_scipy(hits: int, n: int) -> None:
    low, high = wilson_interval(np.array([hits]), np.array([n]))
    ci = binomtest(hits, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert low[0] == pytest.approx(ci.low, abs=1e-12)
    assert high[0] == pytest.approx(ci.high, abs=1e-12)


def test_wilson_of_no_trials_is_everything() -> None:
    low, high = wilson_interval(np.array([0]), np.array([0]))
    assert (low[0], high[0]) == (0.0, 1.0)


def test_first_crossing() -> None:
    curve = np.array([0.0, 0.95, 0.2, 0.9, 1.0])
    assert first_crossing(curve, 0.9) == 3
    assert first_crossing(curve, 0.9, sustained=False) == 1
    assert first_crossing(np.array([0.1, 0.5]), 0.9) is None
    assert first_crossing(np.array([1.0, 0.5]), 0.9) is None


def test_bootstrap_of_identical_units_has_no_width() -> None:
    band = bootstrap_curve(np.tile([0.0, 0.5, 1.0], (6, 1)), resamples=100)
    np.testing.assert_array_equal(band.low, band.mean)
    np.testing.assert_array_equal(band.high, band.mean)


def test_bootstrap_band_covers_the_mean_and_shrinks_with_more_units() -> None:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 2, size=(10, 1)).astype(float)
    large = rng.integers(0, 2, size=(400, 1)).astype(float)
    for units in (small, large):
        band = bootstrap_curve(units, resamples=500)
        assert band.low[0] <= band.mean[0] <= band.high[0]
    width = [bootstrap_curve(u, resamples=500) for u in (small, large)]
    assert width[1].high[0] - width[1].low[0] < width[0].high[0] - width[0].low[0]
    # The percentile band of a share over n units is close to the normal one.
    p = large.mean()
    half = 1.96 * np.sqrt(p * (1 - p) / len(large))
    assert width[1].high[0] - width[1].low[0] == pytest.approx(2 * half, rel=0.15)


def test_bootstrap_crossing() -> None:
    units = np.array([[0.0, 0.0, 1.0, 1.0]] * 5 + [[0.0, 1.0, 1.0, 1.0]] * 5)
    step, low, high = bootstrap_crossing(units, 0.9, resamples=300)
    assert step == 2
    assert low is not None
    assert high is not None
    assert 1 <= low <= step <= high <= 2
    never = bootstrap_crossing(np.zeros((4, 3)), 0.9, resamples=50)
    assert never == (None, None, None)
    with pytest.raises(ValueError, match="one curve per unit"):
        bootstrap_curve(np.zeros(3))
