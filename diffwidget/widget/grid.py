"""The layer × step grid (Park, Ju & Lee 2024, Fig. 8), sized for models with 70 layers.

Rows are the model's layers under their diffusers module paths, grouped by block
(``down_blocks.2``, ``mid_block``, ``single_transformer_blocks``) and by grid; columns are
steps. Each cell is the layer's own map, area-averaged to at most
:data:`GRID_CELL_MAX` cells a side and never made larger than the layer's grid. The kernel
builds every token's maps once; the live view is sent only the selected token's, an export
all of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from diffwidget.explain.attention import upsample_maps
from diffwidget.explain.protocol import method_label
from diffwidget.widget.codecs import quantise_uint8
from diffwidget.widget.layers import head_view, layer_grids
from diffwidget.widget.payloads import GridData, GridGroup
from diffwidget.widget.schema import MEAN_OVER_HEADS

if TYPE_CHECKING:
    from diffwidget.explain.results import SaliencyMap
    from diffwidget.tracing.trace import Trace

#: Largest side of one grid cell (maps are area-averaged to at most this many cells).
GRID_CELL_MAX = 16
#: Parts of a path of one layer in a numbered container (``transformer_blocks.3.attn``).
_LAYER_DEPTH = 3


def not_computed(what: str, how: str) -> ValueError:
    """The error a grid not computed yet shows: what it is, and how to compute it.

    Examples
    --------
    >>> str(not_computed("DF-CAM", "with explorer.compute('df_cam', 3)"))
    "DF-CAM is not computed yet: compute it with explorer.compute('df_cam', 3), then open the grid"
    """
    return ValueError(f"{what} is not computed yet: compute it {how}, then open the grid")


def block_of(path: str) -> str:
    """The block a module path belongs to: its rows are drawn together under this name.

    A numbered container whose children are several modules (a UNet's ``down_blocks.2``
    holds attentions, resnets, samplers) is the block; a numbered container of single
    layers (a transformer's ``transformer_blocks.3.attn``) groups under its own name.

    Examples
    --------
    >>> block_of("down_blocks.2.attentions.1.transformer_blocks.9.attn2")
    'down_blocks.2'
    >>> block_of("mid_block.attentions.0.transformer_blocks.0.attn2")
    'mid_block'
    >>> block_of("single_transformer_blocks.12.attn"), block_of("up_blocks.2")
    ('single_transformer_blocks', 'up_blocks')
    """
    parts = path.split(".")
    if len(parts) > _LAYER_DEPTH and parts[1].isdigit():
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def row_label(path: str, block: str) -> str:
    """The module path after its block's prefix (the whole path when nothing is left)."""
    return path[len(block) + 1 :] if path.startswith(block + ".") else path


def cell_size(grid: tuple[int, int], cap: int = GRID_CELL_MAX) -> tuple[int, int]:
    """Cells of a grid cell: the layer's grid, scaled down so its longer side is ≤ ``cap``."""
    scale = min(1.0, cap / max(grid))
    return max(1, round(grid[0] * scale)), max(1, round(grid[1] * scale))


def shrink_maps(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[..., h, w]`` maps to ``size``: block means for integer factors, else bilinear.

    Examples
    --------
    >>> shrink_maps(np.arange(16.0).reshape(4, 4), (2, 2)).tolist()
    [[2.5, 4.5], [10.5, 12.5]]
    """
    height, width = maps.shape[-2:]
    if (height, width) == tuple(size):
        return np.asarray(maps, dtype=np.float32)
    if height % size[0] == 0 and width % size[1] == 0:
        blocks = maps.reshape(*maps.shape[:-2], size[0], height // size[0], size[1], -1)
        return blocks.mean(axis=(-3, -1), dtype=np.float32)
    return upsample_maps(np.asarray(maps, dtype=np.float32), size)


def _shrink_stored(stored: np.ndarray, cell: tuple[int, int]) -> np.ndarray:
    """A layer's stored ``[S, h, w, T]`` probabilities as ``[S, T, *cell]`` float32 maps.

    Block means are taken in the stored layout (tokens contiguous), one axis at a time
    (NumPy reduces two strided axes at once far more slowly); the result, a few percent of
    the layer, is then transposed.
    """
    steps, height, width, _ = stored.shape
    if height % cell[0] == 0 and width % cell[1] == 0:
        fy, fx = height // cell[0], width // cell[1]
        blocks = stored.astype(np.float32).reshape(steps, cell[0], fy, cell[1], fx, -1)
        return np.moveaxis(blocks.sum(axis=2).sum(axis=3) / (fy * fx), -1, 1)
    return shrink_maps(np.moveaxis(stored, -1, 1), cell)


def grouped_rows(names: list[str], grids: Mapping[str, tuple[int, int]]) -> list[list[str]]:
    """Runs of consecutive rows with the same block and grid (the model's order is kept)."""
    groups: list[list[str]] = []
    for name in names:
        last = groups[-1][-1] if groups else None
        if last is not None and (block_of(last), grids[last]) == (block_of(name), grids[name]):
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def _group(rows: list[str], grid: tuple[int, int], maps: list[np.ndarray]) -> GridGroup:
    """One group from per-row float maps ``[S, T, h, w]`` already at the cell size."""
    codes, scale = quantise_uint8(np.clip(np.nan_to_num(np.stack(maps)), 0.0, None))
    block = block_of(rows[0])
    labels = [row_label(name, block) for name in rows]
    return GridGroup(block, rows, labels, grid, codes, scale)


def attention_grid(trace: Trace, head: int = MEAN_OVER_HEADS) -> GridData:
    """Cross-attention of every layer × step × token, cells at most the layer's grid.

    Examples
    --------
    >>> data = attention_grid(trace)  # doctest: +SKIP
    >>> data.groups[0].name, data.groups[0].codes.shape  # doctest: +SKIP
    ('down_blocks.0', (1, 20, 7, 16, 16))
    """
    view = head_view(trace, head)
    grids = layer_grids(view)
    groups = []
    for rows in grouped_rows(list(view.attention), grids):
        grid = grids[rows[0]]
        cell = cell_size(grid)
        maps = [_shrink_stored(np.asarray(view.attention[name]), cell) for name in rows]
        groups.append(_group(rows, grid, maps))
    head_text = "mean over heads" if head == MEAN_OVER_HEADS else f"head {head}"
    description = (
        "Attention of the image to the selected token per captured layer (rows, grouped by "
        f"block) and step (columns), conditional CFG half, {head_text}; each cell is the "
        f"layer's own map, area-averaged to at most {GRID_CELL_MAX}×{GRID_CELL_MAX}, divided "
        "by its own maximum"
    )
    tokens = list(range(len(trace.tokens)))
    return GridData("attention", groups, list(range(trace.n_steps)), tokens, description)


def saliency_grid(
    kind: str, results: Mapping[int, SaliencyMap], latent: tuple[int, int]
) -> GridData:
    """Grid of a method's per-layer maps for the steps computed so far.

    Raises
    ------
    ValueError
        When the method is not computed yet, or keeps no per-layer maps.

    Examples
    --------
    >>> data = saliency_grid("df_cam", explorer.cached("df_cam"), (16, 16))  # doctest: +SKIP
    >>> data.steps  # doctest: +SKIP
    [4, 8, 12]
    """
    steps = sorted(results)
    if not steps:
        raise not_computed(
            method_label(kind),
            f"at the steps you want (explorer.compute({kind!r}, step), or show the "
            f"{method_label(kind)} overlay and move the slider; both need "
            "Explorer(trace, pipe=pipe))",
        )
    names: list[str] = []
    for step in steps:
        names += [n for n in results[step].layers if n not in names]
    if not names:
        raise ValueError(
            f"{method_label(kind)} maps have no per-layer maps; the layer × step grid shows "
            "attention or DF-CAM"
        )
    cell = cell_size(latent)
    groups = []
    for rows in grouped_rows(names, dict.fromkeys(names, latent)):
        maps = []
        for name in rows:
            row = np.zeros((len(steps), 1, *cell), dtype=np.float32)
            for column, step in enumerate(steps):
                layer = results[step].layers.get(name)
                if layer is not None:
                    row[column, 0] = shrink_maps(np.asarray(layer, np.float32), cell)
            maps.append(row)
        groups.append(_group(rows, latent, maps))
    description = (
        f"{method_label(kind)} per layer (rows, grouped by block) at the {len(steps)} steps "
        f"computed so far (columns); each layer's map min–max normalised, area-averaged to at "
        f"most {GRID_CELL_MAX}×{GRID_CELL_MAX}"
    )
    return GridData(kind, groups, steps, [], description)
