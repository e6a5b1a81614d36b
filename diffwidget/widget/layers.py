"""Per-layer views of a trace: the attention filters (layer, resolution, head).

Filtered attention is aggregated on the grid it was recorded on (the finest chosen layer's,
see :meth:`~diffwidget.explain.attention.AttentionMaps.attribute` with ``grid="native"``) and
sent as one :class:`~diffwidget.widget.payloads.AttentionSet`; the view upsamples it. The
layer × step grid lives in :mod:`diffwidget.widget.grid`.

Per-head attention is shown when a trace carries it: ``trace.attention_heads`` maps an
``attn2`` layer path to ``(n_steps, n_heads, h, w, n_tokens)`` probabilities of the
conditional CFG half (same layout as ``trace.attention`` with a head axis after the step).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from diffwidget.explain.attention import AttentionMaps, AttentionResult, upsample_maps
from diffwidget.explain.protocol import method_label
from diffwidget.widget.payloads import AttentionSet
from diffwidget.widget.schema import MEAN_OVER_HEADS

if TYPE_CHECKING:
    from diffwidget.tracing.trace import Trace


def heads_of(trace: Trace) -> Mapping[str, np.ndarray]:
    """Per-head attention of the trace (empty when only the mean over heads was recorded)."""
    heads = getattr(trace, "attention_heads", None)
    return heads if isinstance(heads, Mapping) else {}


def n_heads(trace: Trace) -> int:
    """Number of heads recorded per layer (0 when none)."""
    heads = heads_of(trace)
    return int(min(np.asarray(v).shape[1] for v in heads.values())) if heads else 0


def grid_text(grid: tuple[int, ...]) -> str:
    """``(16, 16)`` -> ``"16x16"`` (the value of a resolution filter)."""
    return "x".join(str(int(v)) for v in grid)


def layer_grids(trace: Trace) -> dict[str, tuple[int, int]]:
    """Each recorded ``attn2`` layer's own spatial grid."""
    return {name: (int(v.shape[1]), int(v.shape[2])) for name, v in trace.attention.items()}


#: Filter value for "every recorded layer", whatever the aggregation's default selection.
ALL_LAYERS = "all"


def attention_options(trace: Trace, default_layers: Sequence[str] = ()) -> list[dict[str, str]]:
    """Values of the attention filter: the default selection, all layers, each grid, each layer.

    ``default_layers`` are the layers the explorer's aggregation chose by default (its
    :class:`~diffwidget.explain.attention.AttentionMaps` settings), named in the label of "".
    """
    grids = layer_grids(trace)
    if not grids:
        return []
    chosen = sorted({grids[name] for name in default_layers if name in grids})
    chosen_text = ", ".join(f"{h}×{w}" for h, w in chosen)
    count = len(default_layers) or len(grids)
    options = [
        {
            "value": "",
            "label": f"default: {count} layer{'s' if count != 1 else ''} ({chosen_text})",
        },
        {"value": ALL_LAYERS, "label": f"all {len(grids)} layers (mean)"},
    ]
    for grid in sorted(set(grids.values()), key=lambda g: (-g[0] * g[1], g)):
        count = sum(1 for g in grids.values() if g == grid)
        options.append(
            {"value": grid_text(grid), "label": f"{grid[0]}×{grid[1]} layers ({count}, mean)"}
        )
    for name, grid in grids.items():
        options.append({"value": name, "label": f"{name} ({grid[0]}×{grid[1]})"})
    return options


def saliency_layer_options(kind: str, results: Mapping[int, Any]) -> list[dict[str, str]]:
    """Values of a saliency method's layer filter: its combination, then each layer."""
    names: list[str] = []
    for result in results.values():
        for name in getattr(result, "layers", {}) or {}:
            if name not in names:
                names.append(name)
    if not names:
        return []
    label = method_label(kind)
    options = [{"value": "", "label": f"{label}: all {len(names)} layers combined"}]
    options += [{"value": name, "label": name} for name in names]
    return options


def head_view(trace: Trace, head: int) -> Trace:
    """The trace with one head's probabilities as its attention (itself for the mean)."""
    heads = heads_of(trace)
    if head == MEAN_OVER_HEADS:
        return trace
    if not heads:
        raise ValueError(
            "this trace recorded only the mean over heads; trace again with per-head "
            "capture to filter by head"
        )
    # Same aggregation as the mean-over-heads maps, fed with one head's probabilities.
    return dataclasses.replace(
        trace, attention={k: np.asarray(v)[:, head] for k, v in heads.items()}
    )


def filter_config(trace: Trace, base: AttentionMaps | None, layer: str) -> AttentionMaps:
    """The explorer's aggregation settings with the layer selection of filter ``layer``."""
    # A copy of the explorer's settings (steps and anything else it was configured with)
    # with the layer selection replaced.
    config = copy.copy(base) if base is not None else AttentionMaps()
    if layer == ALL_LAYERS:
        config.layers, config.resolution = None, None
    elif layer in layer_grids(trace):
        config.layers, config.resolution = [layer], None
    elif layer:
        config.layers = None
        config.resolution = tuple(int(v) for v in layer.split("x"))  # type: ignore[assignment]
    return config


def filtered_attention(
    trace: Trace,
    base: AttentionMaps | None,
    layer: str,
    head: int,
    sums: MutableMapping[tuple[str, ...], np.ndarray] | None = None,
) -> AttentionResult:
    """Attention under a filter (``layer``: '', a grid like '16x16', or a path), on its grid.

    The maps live on the finest chosen layer's grid (never the latent's when that is larger).

    Examples
    --------
    >>> result = filtered_attention(trace, None, "16x16", -1)  # doctest: +SKIP
    >>> "16×16" in result.description  # doctest: +SKIP
    True
    """
    config = filter_config(trace, base, layer)
    # ``sums``: per-grid layer sums of this head made by earlier filters, reused.
    result = config.attribute(head_view(trace, head), grid="native", sums=sums)
    if head != MEAN_OVER_HEADS:
        result.description = result.description.replace("mean over heads", f"head {head}")
    return result


def attention_set(result: AttentionResult, layer: str, head: int, note: str = "") -> AttentionSet:
    """The payload of an aggregation under filter (``layer``, ``head``).

    ``note`` ends its description (what the trace says about its text, e.g. words cut).
    """
    description = f"{result.description}; {note}" if note else result.description
    return AttentionSet.of(result.maps, result.steps, layer, head, description)


def on_latent(
    result: AttentionResult, step: int, token: int, latent: tuple[int, int]
) -> np.ndarray:
    """The map of ``token`` at loop index ``step``, upsampled bilinearly to the latent grid.

    Raises
    ------
    ValueError
        When the aggregation did not include ``step``.
    """
    if step not in result.steps:
        raise ValueError(f"step {step} is not among the aggregated steps {result.steps}")
    native = result.maps[result.steps.index(step), token]
    return upsample_maps(native[None], latent)[0] if native.shape != latent else native
