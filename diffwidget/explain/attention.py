"""Cross-attention maps per token and step, aggregated from a saved trace (NumPy only).

The trace stores, for every ``attn2`` layer, softmax(QK^T / sqrt(d)) of the conditional
CFG half, averaged over heads, on the layer's own spatial grid. This module brings every
layer to the latent grid by *spatial* bilinear upsampling (never by resizing the flattened
token matrix), averages the chosen layers with equal weight, and reports the attention mass
each token receives per step. It imports no torch, so the widget can use it on a saved
trace anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from diffwidget.tracing.trace import NORMALISATION_TEXT, Trace

#: Half-pixel centre convention of ``torch.nn.functional.interpolate(..., align_corners=False)``
#: so maps upsampled here match the ones a torch user would compute.
_PIXEL_CENTRE = 0.5


def _interpolation_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear-interpolation weights ``(n_out, n_in)`` with half-pixel centres.

    Each output row sums to 1, so a constant map stays constant and mass is preserved
    on average.
    """
    if n_in == n_out:
        return np.eye(n_out, dtype=np.float32)
    scale = n_in / n_out
    centres = (np.arange(n_out, dtype=np.float64) + _PIXEL_CENTRE) * scale - _PIXEL_CENTRE
    centres = np.clip(centres, 0.0, n_in - 1)
    low = np.floor(centres).astype(np.int64)
    high = np.minimum(low + 1, n_in - 1)
    frac = centres - low
    weights = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(weights, (rows, low), 1.0 - frac)
    np.add.at(weights, (rows, high), frac)
    return weights.astype(np.float32)


def upsample_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize the two spatial axes of ``maps`` (``[..., h, w]``) to ``size``.

    Parameters
    ----------
    maps : ndarray, shape (..., h, w)
        Maps on a layer's grid; any leading axes are kept.
    size : tuple of int
        Target ``(height, width)``, usually the latent grid.

    Returns
    -------
    ndarray of float32, shape (..., size[0], size[1])

    Examples
    --------
    >>> upsample_maps(np.ones((2, 4, 4)), (8, 8)).shape
    (2, 8, 8)
    """
    rows = _interpolation_matrix(size[0], maps.shape[-2])
    cols = _interpolation_matrix(size[1], maps.shape[-1])
    # Two matrix products (rows, then columns) instead of one 3-operand einsum, which
    # NumPy would evaluate as a naive loop.
    return np.matmul(np.matmul(rows, maps.astype(np.float32)), cols.T)


@dataclass
class AttentionResult:
    """Aggregated cross-attention of one trace.

    Attributes
    ----------
    maps : ndarray of float32, shape (n_steps, n_tokens, h, w)
        Attention probability per latent cell, averaged over the chosen layers after each
        layer was upsampled to the latent grid. Not normalised: values are probabilities.
    mass : ndarray of float32, shape (n_steps, n_tokens)
        Share of all attention that each stored token receives at each step: the spatial
        mean of the layer's probabilities, averaged over layers. Rows sum to at most 1
        (the remaining share went to padding positions that were not stored).
    steps : list of int
        Loop indices (``step``, not scheduler ``timestep``) the rows refer to.
    layers : list of str
        The ``attn2`` module paths that were averaged.
    tokens : list of str
        Token strings, aligned with axis 1.
    description : str
        One sentence saying exactly what was aggregated, shown under the overlay.
    """

    maps: np.ndarray
    mass: np.ndarray
    steps: list[int]
    layers: list[str]
    tokens: list[str]
    description: str
    meta: dict[str, object] = field(default_factory=dict)


class AttentionMaps:
    """Per-token cross-attention maps on the latent grid, per step.

    Departs from DAAM-style heat maps in two explicit ways: layers are upsampled on their
    own (possibly non-square) spatial grid, and layers are averaged with equal weight
    instead of summed, so maps stay probabilities. Heads were already averaged and only
    the conditional CFG half was recorded when the trace was made.

    Parameters
    ----------
    layers : sequence of str, optional
        ``attn2`` module paths to include; default all recorded layers.
    steps : sequence of int, optional
        Loop indices to include; default all steps.
    resolution : int or tuple of int, optional
        Keep only layers whose own grid has this height (int) or ``(height, width)``;
        default all resolutions.

    Examples
    --------
    >>> result = AttentionMaps().attribute(trace)  # doctest: +SKIP
    >>> result.maps.shape  # (n_steps, n_tokens, h, w)  # doctest: +SKIP
    """

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        steps: Sequence[int] | None = None,
        resolution: int | tuple[int, int] | None = None,
    ) -> None:
        self.layers = list(layers) if layers is not None else None
        self.steps = list(steps) if steps is not None else None
        self.resolution = resolution

    def _select_layers(self, trace: Trace) -> list[str]:
        recorded = list(trace.attention)
        if not recorded:
            raise ValueError(
                "this trace holds no cross-attention; trace the run again with attention "
                "recording on (the default of diffwidget.trace)"
            )
        if self.layers is not None:
            unknown = [name for name in self.layers if name not in trace.attention]
            if unknown:
                raise KeyError(f"layers {unknown} were not recorded; recorded layers: {recorded}")
            chosen = list(self.layers)
        else:
            chosen = recorded
        if self.resolution is not None:
            want = (
                (self.resolution,) if isinstance(self.resolution, int) else tuple(self.resolution)
            )
            chosen = [
                name
                for name in chosen
                if tuple(trace.attention[name].shape[1 : 1 + len(want)]) == want
            ]
            if not chosen:
                grids = sorted({tuple(trace.attention[n].shape[1:3]) for n in recorded})
                raise ValueError(
                    f"no recorded layer has resolution {self.resolution}; grids present: {grids}"
                )
        return chosen

    def _select_steps(self, trace: Trace) -> list[int]:
        if self.steps is None:
            return list(range(trace.n_steps))
        bad = [s for s in self.steps if not 0 <= s < trace.n_steps]
        if bad:
            raise IndexError(
                f"steps {bad} are outside 0..{trace.n_steps - 1}; steps are loop indices, "
                "not scheduler timesteps"
            )
        return list(self.steps)

    def attribute(self, trace: Trace) -> AttentionResult:
        """Aggregate the trace's cross-attention.

        Parameters
        ----------
        trace : Trace
            A recorded run with ``attention`` filled.

        Returns
        -------
        AttentionResult
        """
        layers = self._select_layers(trace)
        steps = self._select_steps(trace)
        size = trace.latent_shape
        n_tokens = len(trace.tokens)
        maps = np.zeros((len(steps), n_tokens, *size), dtype=np.float32)
        mass = np.zeros((len(steps), n_tokens), dtype=np.float32)
        for name in layers:
            probs = np.asarray(trace.attention[name])[steps].astype(np.float32)
            if probs.shape[-1] != n_tokens:
                raise ValueError(
                    f"layer {name} stores {probs.shape[-1]} tokens but the trace lists "
                    f"{n_tokens}; the trace is inconsistent, record it again"
                )
            # [S, h_l, w_l, T] -> [S, T, h_l, w_l]: upsample on the layer's own grid.
            per_token = np.moveaxis(probs, -1, 1)
            maps += upsample_maps(per_token, size)
            mass += per_token.mean(axis=(2, 3))
        maps /= len(layers)
        mass /= len(layers)
        grids = sorted({tuple(int(v) for v in trace.attention[n].shape[1:3]) for n in layers})
        grid_text = ", ".join(f"{h}×{w}" for h, w in grids)
        step_text = (
            f"all {trace.n_steps} steps"
            if len(steps) == trace.n_steps
            else f"steps {steps[0]}–{steps[-1]} ({len(steps)})"
        )
        normalisation = str(trace.meta.get("attention_normalisation", "text_softmax"))
        kind = "Joint-attention" if normalisation == "joint_share" else "Cross-attention"
        description = (
            f"{kind} probability ({NORMALISATION_TEXT[normalisation]}), conditional CFG half, "
            f"mean over heads, mean of {len(layers)} layer{'s' if len(layers) != 1 else ''} "
            f"(grids {grid_text}) upsampled bilinearly to the {size[0]}×{size[1]} latent; "
            f"{step_text}, one map per step"
        )
        return AttentionResult(
            maps=maps,
            mass=mass,
            steps=steps,
            layers=layers,
            tokens=list(trace.tokens),
            description=description,
            meta={"grids": grids, "latent_shape": size, "normalisation": normalisation},
        )
