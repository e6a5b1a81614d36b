"""Intervals for shares and curves: Wilson for a share over seeds, the bootstrap over prompts.

Two questions, two intervals:

* a share of images (e.g. "3 of 4 seeds kept A's colour") is a binomial proportion: the
  two-sided **Wilson score interval** (:func:`wilson_interval`), which stays inside [0, 1] and
  is sensible at 0 and n (the normal approximation gives zero width there);
* a curve averaged over a prompt set varies between prompts far more than between seeds of
  one prompt: the **percentile bootstrap over prompts** (:func:`bootstrap_curve`), resampling
  whole prompts (their seeds together), and for the step at which a curve first crosses a
  level, the same resamples' crossing steps (:func:`bootstrap_crossing`).

Examples
--------
>>> low, high = wilson_interval(np.array([4]), np.array([4]))
>>> round(float(low[0]), 3), float(high[0])
(0.51, 1.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: z of the two-sided 95 % interval.
Z_95 = 1.959963984540054
#: Bootstrap resamples for bands and crossing steps.
DEFAULT_RESAMPLES = 2000
#: Percentiles of a 95 % percentile-bootstrap interval.
_PERCENTILES = (2.5, 97.5)


def wilson_interval(
    hits: np.ndarray, n: np.ndarray, z: float = Z_95
) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided Wilson score interval of ``hits / n`` (elementwise; ``n = 0`` gives [0, 1]).

    Parameters
    ----------
    hits, n : ndarray
        Successes and trials (same shape, or broadcastable).
    z : float
        Normal quantile (1.96 for 95 %).

    Returns
    -------
    (low, high) : tuple of ndarray of float64

    Examples
    --------
    >>> low, high = wilson_interval(np.array([0, 5]), np.array([10, 10]))
    >>> np.round(low, 3).tolist(), np.round(high, 3).tolist()
    ([0.0, 0.237], [0.278, 0.763])
    """
    hits = np.asarray(hits, dtype=np.float64)
    trials = np.asarray(n, dtype=np.float64)
    empty = trials <= 0
    safe = np.where(empty, 1.0, trials)
    p = hits / safe
    z2 = z * z
    centre = (p + z2 / (2 * safe)) / (1 + z2 / safe)
    half = z * np.sqrt(p * (1 - p) / safe + z2 / (4 * safe**2)) / (1 + z2 / safe)
    # At 0 and n the bounds are 0 and 1 exactly (the formula leaves rounding residue there).
    low = np.where(empty | (hits <= 0), 0.0, np.clip(centre - half, 0.0, 1.0))
    high = np.where(empty | (hits >= trials), 1.0, np.clip(centre + half, 0.0, 1.0))
    return low, high


def first_crossing(curve: np.ndarray, level: float, *, sustained: bool = True) -> int | None:
    """The first index at which ``curve`` reaches ``level`` (and, if ``sustained``, stays there).

    Examples
    --------
    >>> first_crossing(np.array([0.1, 0.95, 0.5, 0.92, 1.0]), 0.9)
    3
    >>> first_crossing(np.array([0.1, 0.95, 0.5]), 0.9, sustained=False)
    1
    """
    above = np.asarray(curve) >= level
    if not above.any():
        return None
    if not sustained:
        return int(np.argmax(above))
    if not above[-1]:
        return None
    below = np.flatnonzero(~above)
    return 0 if below.size == 0 else int(below[-1]) + 1


@dataclass(frozen=True)
class BootstrapCurve:
    """A curve averaged over prompts with its percentile-bootstrap band.

    Attributes
    ----------
    mean : ndarray, shape (n_points,)
        The curve over all prompts.
    low, high : ndarray, shape (n_points,)
        2.5 and 97.5 percentiles of the resampled curves.
    """

    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


def _resamples(n_units: int, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_units, size=(resamples, n_units))


def bootstrap_curve(
    per_unit: np.ndarray, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> BootstrapCurve:
    """Mean curve over units (prompts) and its 95 % percentile-bootstrap band.

    Parameters
    ----------
    per_unit : ndarray, shape (n_units, n_points)
        One curve per prompt (e.g. its share of seeds that kept A's value at each step).
    resamples : int
        Bootstrap resamples of the units.
    seed : int
        Seed of the resampling.

    Examples
    --------
    >>> band = bootstrap_curve(np.array([[0.0, 1.0], [0.0, 1.0]]))
    >>> band.mean.tolist(), band.low.tolist(), band.high.tolist()
    ([0.0, 1.0], [0.0, 1.0], [0.0, 1.0])
    """
    values = np.asarray(per_unit, dtype=np.float64)
    if values.ndim != 2 or len(values) == 0:
        raise ValueError(
            f"expected one curve per unit, shape (n_units, n_points), got {values.shape}"
        )
    means = values[_resamples(len(values), resamples, seed)].mean(axis=1)
    low, high = np.percentile(means, _PERCENTILES, axis=0)
    return BootstrapCurve(values.mean(axis=0), low, high)


def bootstrap_crossing(
    per_unit: np.ndarray,
    level: float,
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    sustained: bool = True,
) -> tuple[int | None, float | None, float | None]:
    """The first index where the mean curve crosses ``level``, with a 95 % bootstrap interval.

    Resamples whose curve never crosses count as crossing after the last index (so a wide
    upper bound says so instead of disappearing).

    Returns
    -------
    (step, low, high)
        ``step`` of the full-sample curve (None if it never crosses) and the 2.5 / 97.5
        percentiles of the resamples' crossing indices (None when no resample crosses).

    Examples
    --------
    >>> bootstrap_crossing(np.array([[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]), 0.9, resamples=200)[0]
    2
    """
    values = np.asarray(per_unit, dtype=np.float64)
    means = values[_resamples(len(values), resamples, seed)].mean(axis=1)
    never = values.shape[1]
    steps = [first_crossing(m, level, sustained=sustained) for m in means]
    found = np.array([never if s is None else s for s in steps], dtype=np.float64)
    step = first_crossing(values.mean(axis=0), level, sustained=sustained)
    if all(s is None for s in steps):
        return step, None, None
    low, high = np.percentile(found, _PERCENTILES)
    return step, float(low), float(high)
