"""Commitment curves over a prompt set: mean curves per attribute with bootstrap bands.

One :class:`~diffwidget.explain.intervention_results.CommitmentCurves` per prompt (its switch
to a prompt B that differs in one attribute, over its seeds) is one *unit*; the summary
averages the units' curves per attribute and resamples whole prompts for the 95 %
percentile-bootstrap bands and for the interval of the step at which a mean curve first
crosses the commitment level (:mod:`diffwidget.explain.intervals`).

Two crossings are reported per attribute, because a switch can end in neither value (a late
switch that leaves the image between the two colours):

* ``committed``: the first switch step from which at least ``level`` of the images keep A's
  value (the commitment curve crosses 0.9);
* ``closed``: the first switch step from which at most ``1 - level`` of them take B's (the
  switch can no longer impose B's value, Concept Insertion Success below 0.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np

from diffwidget.explain.intervals import DEFAULT_RESAMPLES, bootstrap_crossing, bootstrap_curve
from diffwidget.explain.intervention_results import COMMITTED_LEVEL, CommitmentCurves, shares
from diffwidget.explain.results import Meta
from diffwidget.records import Array, MaxLen, Record

_NAME = MaxLen(1000)
Curves2d = Annotated[np.ndarray, Array(ndim=2, kinds="f")]
#: What the bands are, stated in every summary.
BAND = "95 % percentile bootstrap over prompts (each prompt's seeds resampled together)"
_BANDS = ("keep_a", "keep_a_low", "keep_a_high", "take_b", "take_b_low", "take_b_high")
_CROSSINGS = ("committed", "committed_low", "committed_high", "closed", "closed_low", "closed_high")


@dataclass(frozen=True, eq=False)
class CommitmentSummary(Record):
    """Commitment curves of a prompt set, per attribute.

    Attributes
    ----------
    attributes : list of str
        One row per attribute.
    switch_steps : ndarray of int64, shape (K,)
        The switch steps every unit shares.
    n_steps : int
        Denoising steps.
    n_prompts : list of int
        Prompts (units) per attribute.
    keep_a, keep_a_low, keep_a_high : ndarray of float32, shape (n_attributes, K)
        Mean share of images keeping A's value, and its band.
    take_b, take_b_low, take_b_high : ndarray of float32, shape (n_attributes, K)
        Mean share taking B's value (Concept Insertion Success), and its band.
    committed, closed : list of int or None
        Per attribute, the first switch step of each crossing (module docstring).
    committed_low, committed_high, closed_low, closed_high : list of float or None
        Their 95 % bootstrap intervals (a resample that never crosses counts as ``K``).
    level : float
        The commitment level (0.9).
    meta : dict
        Model, band description, resamples.
    """

    attributes: list[Annotated[str, _NAME]]
    switch_steps: Annotated[np.ndarray, Array(ndim=1, kinds="iu")]
    n_steps: int
    n_prompts: list[int]
    keep_a: Curves2d
    keep_a_low: Curves2d
    keep_a_high: Curves2d
    take_b: Curves2d
    take_b_low: Curves2d
    take_b_high: Curves2d
    committed: list[int | None]
    committed_low: list[float | None]
    committed_high: list[float | None]
    closed: list[int | None]
    closed_low: list[float | None]
    closed_high: list[float | None]
    level: float = COMMITTED_LEVEL
    meta: Meta = field(default_factory=dict)

    def row(self, attribute: str) -> int:
        """The row of ``attribute``."""
        if attribute not in self.attributes:
            raise KeyError(f"no attribute {attribute!r}; summarised: {self.attributes}")
        return self.attributes.index(attribute)


def _step(index: int | None, steps: np.ndarray) -> int | None:
    return None if index is None else int(steps[index])


def _bound(value: float | None, steps: np.ndarray) -> float | None:
    """A bootstrap bound on the index axis as a switch step (``K`` stays past the end)."""
    if value is None:
        return None
    index = int(np.floor(value))
    return float(steps[index]) if index < len(steps) else float(steps[-1] + 1)


def summarise_commitment(
    curves: Sequence[CommitmentCurves],
    *,
    level: float = COMMITTED_LEVEL,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> CommitmentSummary:
    """Average per-prompt commitment curves per attribute (see the module docstring).

    Parameters
    ----------
    curves : sequence of CommitmentCurves
        One per prompt and switched attribute (the same switch steps).
    level : float
        The commitment level.
    resamples, seed : int
        Of the bootstrap over prompts.

    Raises
    ------
    ValueError
        When there are no curves, or they were made with different switch steps.

    Examples
    --------
    >>> summary = summarise_commitment(per_prompt_curves)  # doctest: +SKIP
    >>> summary.committed[summary.row("colour")]  # doctest: +SKIP
    7
    """
    if not curves:
        raise ValueError("give at least one CommitmentCurves")
    steps = curves[0].switch_steps
    if any(not np.array_equal(c.switch_steps, steps) for c in curves):
        raise ValueError(
            "the curves were made with different switch steps; summarise like with like"
        )
    per: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for c in curves:
        for row, attribute in enumerate(c.attributes):
            keep, _, _ = shares(c.outcomes[row], "a")
            take, _, _ = shares(c.outcomes[row], "b")
            per.setdefault(attribute, []).append((keep, take))
    attributes = list(per)
    bands: dict[str, list[np.ndarray]] = {name: [] for name in _BANDS}
    crossings: dict[str, list[float | None]] = {name: [] for name in _CROSSINGS}
    for attribute in attributes:
        keep = np.stack([k for k, _ in per[attribute]])
        take = np.stack([t for _, t in per[attribute]])
        for name, values in (("keep_a", keep), ("take_b", take)):
            band = bootstrap_curve(values, resamples=resamples, seed=seed)
            bands[name].append(band.mean)
            bands[f"{name}_low"].append(band.low)
            bands[f"{name}_high"].append(band.high)
        for name, values in (("committed", keep), ("closed", 1.0 - take)):
            index, low, high = bootstrap_crossing(values, level, resamples=resamples, seed=seed)
            step = _step(index, steps)
            crossings[name].append(None if step is None else float(step))
            crossings[f"{name}_low"].append(_bound(low, steps))
            crossings[f"{name}_high"].append(_bound(high, steps))

    def stacked(name: str) -> np.ndarray:
        return np.stack(bands[name]).astype(np.float32)

    def first(name: str) -> list[int | None]:
        return [None if v is None else int(v) for v in crossings[name]]

    return CommitmentSummary(
        attributes=attributes,
        switch_steps=np.asarray(steps, np.int64),
        n_steps=int(curves[0].n_steps),
        n_prompts=[len(per[a]) for a in attributes],
        keep_a=stacked("keep_a"),
        keep_a_low=stacked("keep_a_low"),
        keep_a_high=stacked("keep_a_high"),
        take_b=stacked("take_b"),
        take_b_low=stacked("take_b_low"),
        take_b_high=stacked("take_b_high"),
        committed=first("committed"),
        committed_low=crossings["committed_low"],
        committed_high=crossings["committed_high"],
        closed=first("closed"),
        closed_low=crossings["closed_low"],
        closed_high=crossings["closed_high"],
        level=float(level),
        meta={"band": BAND, "resamples": int(resamples), "seed": int(seed)},
    )
