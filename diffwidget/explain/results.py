"""Typed results of the explanation methods (NumPy only, JSON-friendly metadata).

Every method returns one of these, never a bare tensor, so the widget and a batch runner
can store and ship results without torch. Each is a :class:`~diffwidget.records.Record`:
one JSON form and one save/load (``result.save("map.npz")``, ``SaliencyMap.load(...)``,
or ``to_json()`` and ``arrays(prefix)`` for several results in one file), so every field,
arrays included, reaches the disk and comes back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import numpy as np

from diffwidget.records import NON_FINITE, Array, JsonValue, MaxLen, Record

#: A result's settings and facts: JSON values (NaN allowed, e.g. an undefined correlation).
Meta = dict[str, Annotated[JsonValue, NON_FINITE]]
Map2d = Annotated[np.ndarray, Array(ndim=2, kinds="f")]
Curve = Annotated[np.ndarray, Array(ndim=1, kinds="f")]
_NAME = MaxLen(1000)

#: Below this range a map counts as constant and normalises to zeros.
_FLAT = 1e-12


def minmax(values: np.ndarray) -> np.ndarray:
    """Min-max normalise to [0, 1] (float32); a constant array becomes zeros."""
    values = np.asarray(values, dtype=np.float32)
    lo = float(np.min(values)) if values.size else 0.0
    hi = float(np.max(values)) if values.size else 0.0
    if hi - lo < _FLAT:
        return np.zeros_like(values)
    return ((values - lo) / (hi - lo)).astype(np.float32)


@dataclass(frozen=True, eq=False)
class SaliencyMap(Record):
    """A saliency map over the latent grid at one denoising step.

    Attributes
    ----------
    method : str
        Registry name of the method (``"df_rise"``, ``"df_cam"``).
    step : int
        Loop index ``i`` the map explains.
    timestep : int
        The scheduler's ``t_i`` at that step.
    map : ndarray of float32, shape (h, w)
        Min-max normalised to [0, 1] on the latent grid.
    raw : ndarray of float32, shape (h, w)
        The unnormalised estimate (e.g. DF-RISE's ``sum_k s_k M_k / (N p)``).
    layers : dict of str to ndarray
        Per-block maps (DF-CAM), each ``(h, w)`` in [0, 1]; empty for other methods.
    meta : dict
        The settings and facts needed to reproduce or judge the map (JSON-serialisable).
    layers_raw : dict of str to ndarray
        The same per-block maps before min-max normalisation (DF-CAM's ``ReLU(sum_k
        alpha_k A_k)`` on the latent grid), so their scale can be compared and checked.
    """

    method: Annotated[str, _NAME]
    step: int
    timestep: int
    map: Map2d
    raw: Map2d
    layers: dict[str, Map2d] = field(default_factory=dict)
    meta: Meta = field(default_factory=dict)
    layers_raw: dict[str, Map2d] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """Latent grid ``(h, w)``."""
        return (int(self.map.shape[0]), int(self.map.shape[1]))


@dataclass(frozen=True, eq=False)
class TokenRelevanceResult(Record):
    """Relevance of each stored prompt token at each explained step.

    Attributes
    ----------
    tokens : list of str
        The trace's stored tokens (start, words, end, one padding).
    token_kinds : list of str
        Their kinds, as in the trace.
    steps : ndarray of int64, shape (S,)
        Loop indices explained.
    timesteps : ndarray of int64, shape (S,)
        Scheduler timesteps of those steps.
    relevance : ndarray of float32, shape (S, T)
        Raw relevance per step and stored token.
    normalized : ndarray of float32, shape (S, T)
        Min-max normalised per step over the *word* tokens; start/end/padding are set to 0
        (the start token absorbs most relevance in CLIP and would flatten the words).
    maps : ndarray of float32, shape (S, T, h, w)
        Spatial relevance of each token (the image-to-text relevance rows) on the grid
        where the last attention layer ran, upsampled to the latent grid.
    meta : dict
        Settings and documented simplifications.
    """

    tokens: list[Annotated[str, _NAME]]
    token_kinds: list[Annotated[str, _NAME]]
    steps: Annotated[np.ndarray, Array(ndim=1, kinds="iu")]
    timesteps: Annotated[np.ndarray, Array(ndim=1, kinds="iu")]
    relevance: Annotated[np.ndarray, Array(ndim=2, kinds="f")]
    normalized: Annotated[np.ndarray, Array(ndim=2, kinds="f")]
    maps: Annotated[np.ndarray, Array(ndim=4, kinds="f")]
    meta: Meta = field(default_factory=dict)

    def at(self, step: int) -> dict[str, float]:
        """Normalised relevance of the word tokens at loop index ``step``."""
        where = np.flatnonzero(self.steps == step)
        if where.size == 0:
            raise KeyError(f"step {step} was not explained; explained steps: {self.steps.tolist()}")
        row = self.normalized[int(where[0])]
        return {
            self.tokens[i]: float(row[i])
            for i, kind in enumerate(self.token_kinds)
            if kind == "word"
        }


@dataclass(frozen=True, eq=False)
class FaithfulnessCurves(Record):
    """Insertion and deletion curves for one ordering of the latent cells.

    Attributes
    ----------
    fractions : ndarray of float32, shape (S,)
        Share of cells deleted (or inserted) at each stage, from 0 to 1.
    deletion, insertion : ndarray of float32, shape (S,)
        Similarity of each stage's one-step prediction to the unmodified one.
    deletion_auc, insertion_auc : float
        Normalised trapezoid areas (x from 0 to 1). Lower deletion and higher insertion
        mean a more faithful ordering.
    """

    fractions: Curve
    deletion: Curve
    insertion: Curve
    deletion_auc: float
    insertion_auc: float


@dataclass(frozen=True, eq=False)
class FaithfulnessResult(Record):
    """Insertion/deletion evaluation of a saliency map beside a random-order baseline.

    Attributes
    ----------
    step : int
        Loop index evaluated.
    saliency : FaithfulnessCurves
        Curves when cells are taken in order of decreasing saliency.
    random : FaithfulnessCurves
        Curves for seeded random orders (mean curve over ``n_random`` orders).
    meta : dict
        Settings (stages, cells per stage, similarity, blur kernel and sigma used).
    """

    step: int
    saliency: FaithfulnessCurves
    random: FaithfulnessCurves
    meta: Meta = field(default_factory=dict)

    @property
    def deletion_gain(self) -> float:
        """Random deletion AUC minus saliency deletion AUC (positive: better than random)."""
        return self.random.deletion_auc - self.saliency.deletion_auc

    @property
    def insertion_gain(self) -> float:
        """Saliency insertion AUC minus random insertion AUC (positive: better than random)."""
        return self.saliency.insertion_auc - self.random.insertion_auc
