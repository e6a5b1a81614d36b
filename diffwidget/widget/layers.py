"""Per-layer views of a trace: attention filters (layer, resolution, head), layer × step grid.

The paper's central figure (Park, Ju & Lee 2024, Fig. 8) is a grid of per-layer maps against
steps. Here it is built on request, from what the trace and the computed saliency maps
hold: cross-attention per ``attn2`` layer (per token), and per-layer maps of saliency
methods that have them (DF-CAM). Every cell is resampled to one small common grid so the
payload stays small whatever the model's size.

Per-head attention is shown when a trace carries it: ``trace.attention_heads`` maps an
``attn2`` layer path to ``(n_steps, n_heads, h, w, n_tokens)`` probabilities of the
conditional CFG half (same layout as ``trace.attention`` with a head axis after the step).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from diffwidget.explain.attention import AttentionMaps, AttentionResult, upsample_maps
from diffwidget.explain.protocol import method_label
from diffwidget.widget.codecs import encode_array, quantise_uint8
from diffwidget.widget.schema import MEAN_OVER_HEADS

if TYPE_CHECKING:
    from diffwidget.explain.results import SaliencyMap
    from diffwidget.tracing.trace import Trace

#: Largest side of one grid cell (maps are resampled to at most this many cells).
GRID_CELL_MAX = 16
#: Suffix of diffusers' attention module paths that adds nothing to a row label.
_PATH_SUFFIX = ".transformer_blocks.0.attn2"


def heads_of(trace: Trace) -> Mapping[str, np.ndarray]:
    """Per-head attention of the trace (empty when only the mean over heads was recorded)."""
    heads = getattr(trace, "attention_heads", None)
    return heads if isinstance(heads, Mapping) else {}


def n_heads(trace: Trace) -> int:
    """Number of heads recorded per layer (0 when none)."""
    heads = heads_of(trace)
    return int(min(np.asarray(v).shape[1] for v in heads.values())) if heads else 0


def short_layer(path: str) -> str:
    """A row label for a module path (drops the ``.transformer_blocks.0.attn2`` tail)."""
    return path[: -len(_PATH_SUFFIX)] if path.endswith(_PATH_SUFFIX) else path


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
        options.append({"value": name, "label": f"{short_layer(name)} ({grid[0]}×{grid[1]})"})
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
    options += [{"value": name, "label": short_layer(name)} for name in names]
    return options


def _head_view(trace: Trace, head: int) -> Trace:
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


def filtered_attention(
    trace: Trace, base: AttentionMaps | None, layer: str, head: int
) -> AttentionResult:
    """Attention aggregated under a filter (``layer``: '', a grid like '16x16', or a path).

    Examples
    --------
    >>> result = filtered_attention(trace, None, "16x16", -1)  # doctest: +SKIP
    >>> "16×16" in result.description  # doctest: +SKIP
    True
    """
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
    view = _head_view(trace, head)
    result = config.attribute(view)
    if head != MEAN_OVER_HEADS:
        result.description = result.description.replace("mean over heads", f"head {head}")
    return result


def _cell_size(latent: tuple[int, int], cap: int = GRID_CELL_MAX) -> tuple[int, int]:
    scale = min(1.0, cap / max(latent))
    return max(1, round(latent[0] * scale)), max(1, round(latent[1] * scale))


def attention_grid(trace: Trace, head: int = MEAN_OVER_HEADS) -> dict[str, Any]:
    """Grid payload of cross-attention: every layer × every step × every token.

    Examples
    --------
    >>> data = attention_grid(trace)  # doctest: +SKIP
    >>> data["layers"][:1], data["maps"]["shape"]  # doctest: +SKIP
    (['down_blocks.0.attentions.0.transformer_blocks.0.attn2'], [7, 20, 10, 16, 16])
    """
    view = _head_view(trace, head)
    cell = _cell_size(trace.latent_shape)
    names = list(view.attention)
    maps = np.zeros((len(names), trace.n_steps, len(trace.tokens), *cell), dtype=np.float32)
    for row, name in enumerate(names):
        per_token = np.moveaxis(np.asarray(view.attention[name], dtype=np.float32), -1, 1)
        maps[row] = upsample_maps(per_token, cell)
    q, scale = quantise_uint8(np.clip(maps, 0.0, None))
    head_text = "mean over heads" if head == MEAN_OVER_HEADS else f"head {head}"
    return {
        "source": "attention",
        "layers": names,
        "grids": [list(layer_grids(trace)[name]) for name in names],
        "steps": list(range(trace.n_steps)),
        "maps": encode_array(q, scale=scale),
        "per_token": True,
        "description": (
            f"Attention of the image to the selected token per captured layer (rows) and step "
            f"(columns), "
            f"conditional CFG half, {head_text}; each cell resampled to {cell[0]}×{cell[1]} and "
            "divided by its own maximum"
        ),
    }


def saliency_grid(kind: str, results: Mapping[int, SaliencyMap], latent: tuple[int, int]) -> dict:
    """Grid payload of a method's per-layer maps for the steps computed so far.

    Examples
    --------
    >>> data = saliency_grid("df_cam", explorer.cached("df_cam"), (16, 16))  # doctest: +SKIP
    >>> data["steps"]  # doctest: +SKIP
    [4, 8, 12]
    """
    steps = sorted(results)
    if not steps:
        raise ValueError(
            f"{method_label(kind)} is not computed yet: compute it at the steps you want "
            f"(explorer.compute({kind!r}, step), or show the {method_label(kind)} overlay and "
            "move the slider; both need Explorer(trace, pipe=pipe)), then open the grid"
        )
    names = [o["value"] for o in saliency_layer_options(kind, results)[1:]]
    if not names:
        raise ValueError(
            f"{method_label(kind)} maps have no per-layer maps; the layer × step grid shows "
            "attention or DF-CAM"
        )
    cell = _cell_size(latent)
    maps = np.zeros((len(names), len(steps), 1, *cell), dtype=np.float32)
    for col, step in enumerate(steps):
        layers = results[step].layers
        for row, name in enumerate(names):
            if name in layers:
                maps[row, col, 0] = upsample_maps(np.asarray(layers[name], np.float32), cell)
    q, scale = quantise_uint8(np.clip(np.nan_to_num(maps), 0.0, None))
    return {
        "source": kind,
        "layers": names,
        "grids": [list(latent)] * len(names),
        "steps": steps,
        "maps": encode_array(q, scale=scale),
        "per_token": False,
        "description": (
            f"{method_label(kind)} per layer (rows) at the {len(steps)} steps computed so far "
            f"(columns); each layer's map min–max normalised, resampled to {cell[0]}×{cell[1]}"
        ),
    }
