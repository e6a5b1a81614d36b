"""Typed records of the array payloads the explorer sends: attention sets and the grid.

Each record is built in the kernel from NumPy arrays, written with :meth:`to_json` as the
JSON-and-buffers value of its trait (the TypeScript interfaces of the same name in
``js/src/schema.ts``), and read back — by the export, the PNG snapshot, the tests — with
:meth:`from_json`, which validates every field before anything is allocated from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from diffwidget.widget.codecs import UINT8_MAX, decode_array, encode_array, quantise_uint8


class PayloadError(ValueError):
    """A payload that does not have the shape its type promises."""


def _field(value: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(value, Mapping) or name not in value:
        raise PayloadError(f"payload field {name!r} is missing")
    found = value[name]
    if not isinstance(found, kind) or (isinstance(found, bool) and kind is not bool):
        raise PayloadError(f"payload field {name!r} must be {kind}, got {type(found).__name__}")
    return found


def _ints(value: Mapping[str, Any], name: str) -> list[int]:
    items = _field(value, name, (list, tuple))
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise PayloadError(f"payload field {name!r} must be a list of integers")
    return [int(v) for v in items]


def _strings(value: Mapping[str, Any], name: str) -> list[str]:
    items = _field(value, name, (list, tuple))
    if not all(isinstance(v, str) for v in items):
        raise PayloadError(f"payload field {name!r} must be a list of strings")
    return list(items)


def _grid(value: Mapping[str, Any], name: str) -> tuple[int, int]:
    grid = _ints(value, name)
    if len(grid) != 2 or min(grid) < 1:
        raise PayloadError(f"payload field {name!r} must be [h, w] with h, w >= 1")
    return grid[0], grid[1]


def _quantised(payload: Any, ndim: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 codes and per-map scale of a quantised ``ArrayPayload``."""
    if not isinstance(payload, Mapping) or "scale" not in payload:
        raise PayloadError(f"{what} must be a quantised uint8 payload with a scale")
    codes = decode_array({k: v for k, v in payload.items() if k != "scale"})
    scale = decode_array(payload["scale"])
    if codes.dtype != np.uint8 or codes.ndim != ndim or scale.shape != codes.shape[:-2]:
        raise PayloadError(
            f"{what} must be uint8 with {ndim} axes and one scale per map, got "
            f"{codes.dtype} {list(codes.shape)} with scale {list(scale.shape)}"
        )
    return codes, scale.astype(np.float32)


def _encode(codes: np.ndarray, scale: np.ndarray) -> dict[str, Any]:
    return encode_array(codes, scale=scale)


@dataclass(frozen=True)
class AttentionSet:
    """Per-token attention under one filter, on the grid it was recorded on.

    Attributes
    ----------
    layer : str
        The ``attention_layer`` filter the maps answer ('' = the explorer's default).
    head : int
        The ``attention_head`` they answer (-1 = mean over heads).
    grid : (int, int)
        The maps' own grid: the finest averaged layer's, never larger.
    steps : list of int
        Loop index of each row of ``codes``.
    codes : ndarray of uint8, shape (S, T, h, w)
        Quantised maps; probability = ``codes / 255 * scale``.
    scale : ndarray of float32, shape (S, T)
        Each map's maximum.
    description : str
        What was aggregated (shown under the overlay).
    """

    layer: str
    head: int
    grid: tuple[int, int]
    steps: list[int]
    codes: np.ndarray
    scale: np.ndarray
    description: str

    @classmethod
    def of(
        cls, maps: np.ndarray, steps: Sequence[int], layer: str, head: int, text: str
    ) -> AttentionSet:
        """Quantise float maps ``[S, T, h, w]`` (probabilities) into a set."""
        codes, scale = quantise_uint8(maps)
        grid = (int(maps.shape[-2]), int(maps.shape[-1]))
        return cls(layer, int(head), grid, [int(s) for s in steps], codes, scale, text)

    @property
    def maps(self) -> np.ndarray:
        """Dequantised float32 maps ``[S, T, h, w]``."""
        return self.codes.astype(np.float32) / UINT8_MAX * self.scale[..., None, None]

    def to_json(self) -> dict[str, Any]:
        """The trait value (``AttentionSet`` in schema.ts)."""
        return {
            "layer": self.layer,
            "head": self.head,
            "grid": list(self.grid),
            "steps": list(self.steps),
            "maps": _encode(self.codes, self.scale),
            "description": self.description,
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> AttentionSet:
        """Read and validate a trait value.

        Raises
        ------
        PayloadError
            When a field is missing or the maps do not match ``grid`` and ``steps``.
        """
        codes, scale = _quantised(_field(value, "maps", Mapping), 4, "attention maps")
        grid, steps = _grid(value, "grid"), _ints(value, "steps")
        if codes.shape[-2:] != grid or len(codes) != len(steps):
            raise PayloadError(
                f"attention maps {list(codes.shape)} do not match grid {list(grid)} and "
                f"{len(steps)} steps"
            )
        return cls(
            _field(value, "layer", str),
            int(_field(value, "head", int)),
            grid,
            steps,
            codes,
            scale,
            _field(value, "description", str),
        )

    def keep_steps(self, keep: Sequence[int]) -> AttentionSet:
        """The set with only the loop indices in ``keep``, renumbered 0, 1, … in that order."""
        rows = [self.steps.index(s) for s in keep if s in self.steps]
        positions = [i for i, s in enumerate(keep) if s in self.steps]
        return replace(self, steps=positions, codes=self.codes[rows], scale=self.scale[rows])


@dataclass(frozen=True)
class GridGroup:
    """Rows of the layer × step grid that share a block (module-path prefix) and a grid.

    Attributes
    ----------
    name : str
        The shared prefix, e.g. ``down_blocks.2`` or ``single_transformer_blocks``.
    layers : list of str
        Full module paths of the rows.
    labels : list of str
        Each path after the prefix (what a row is labelled with under its group).
    grid : (int, int)
        The rows' own spatial grid.
    codes : ndarray of uint8, shape (L, S, T, h, w)
        One map per row, step and token, each resampled to at most ``grid``.
    scale : ndarray of float32, shape (L, S, T)
        Each map's maximum.
    values : ndarray of float32, shape (L, S), optional
        One number per cell (a grid of scalars, :attr:`GridData.cells` says how they are
        coloured); ``codes`` then hold each value's place on that scale as a 1×1 map.
    """

    name: str
    layers: list[str]
    labels: list[str]
    grid: tuple[int, int]
    codes: np.ndarray
    scale: np.ndarray
    values: np.ndarray | None = None

    def to_json(self) -> dict[str, Any]:
        """The value inside ``GridData.groups``."""
        return {
            "name": self.name,
            "layers": list(self.layers),
            "labels": list(self.labels),
            "grid": list(self.grid),
            "maps": _encode(self.codes, self.scale),
            "values": None
            if self.values is None
            else encode_array(np.asarray(self.values, np.float32)),
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> GridGroup:
        """Read and validate one group."""
        codes, scale = _quantised(_field(value, "maps", Mapping), 5, "grid maps")
        layers, labels = _strings(value, "layers"), _strings(value, "labels")
        grid = _grid(value, "grid")
        if len(layers) != len(labels) or len(codes) != len(layers):
            raise PayloadError("a grid group needs one label and one row of maps per layer")
        if codes.shape[-2] > grid[0] or codes.shape[-1] > grid[1]:
            raise PayloadError(f"grid cells {list(codes.shape[-2:])} exceed the layers' grid")
        values = None
        if value.get("values") is not None:
            values = decode_array(_field(value, "values", Mapping))
            if values.dtype != np.float32 or values.shape != codes.shape[:2]:
                raise PayloadError(
                    f"grid cell values must be float32 {list(codes.shape[:2])} (layers × steps), "
                    f"got {values.dtype} {list(values.shape)}"
                )
        return cls(_field(value, "name", str), layers, labels, grid, codes, scale, values)


@dataclass(frozen=True)
class CellScale:
    """How the scalar cells of a grid are coloured: ``low`` to ``high``, and what a value is.

    Attributes
    ----------
    low, high : float
        The values at the two ends of the colour map (inferno, dark to bright).
    meaning : str
        What one value means and how the scale was chosen (the view's colour-scale text).

    Examples
    --------
    >>> CellScale(0.0, 1.0, "share of seeds").position(np.array([0.5])).tolist()
    [128]
    """

    low: float
    high: float
    meaning: str

    def __post_init__(self) -> None:
        if not (np.isfinite(self.low) and np.isfinite(self.high) and self.high > self.low):
            raise PayloadError(f"a cell scale needs finite low < high, got {self.low}, {self.high}")

    def position(self, values: np.ndarray) -> np.ndarray:
        """uint8 place of each value on the scale (0 at ``low``, 255 at ``high``; NaN → 0)."""
        share = (np.nan_to_num(np.asarray(values, np.float64), nan=self.low) - self.low) / (
            self.high - self.low
        )
        return np.rint(np.clip(share, 0.0, 1.0) * UINT8_MAX).astype(np.uint8)

    def to_json(self) -> dict[str, Any]:
        """The value of ``GridData.cells``."""
        return {"low": float(self.low), "high": float(self.high), "meaning": self.meaning}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> CellScale:
        """Read and validate ``GridData.cells``."""
        low, high = _field(value, "low", (int, float)), _field(value, "high", (int, float))
        return cls(float(low), float(high), _field(value, "meaning", str))


@dataclass(frozen=True)
class GridData:
    """Small multiples of per-layer maps (rows, grouped) against steps (columns).

    Attributes
    ----------
    source : str
        The overlay kind the maps come from ("attention", "df_cam", …).
    groups : list of GridGroup
        Row groups in display order.
    steps : list of int
        Loop index of each column.
    tokens : list of int
        Token indices held along the maps' T axis (per-token sources); ``[]`` otherwise.
    description : str
        What a cell shows.
    cells : CellScale, optional
        Set when each cell is one number (the groups' ``values``), not a map.
    """

    source: str
    groups: list[GridGroup]
    steps: list[int]
    tokens: list[int]
    description: str
    cells: CellScale | None = None

    @property
    def per_token(self) -> bool:
        """Whether the maps depend on the selected token."""
        return bool(self.tokens)

    @property
    def layers(self) -> list[str]:
        """Every row's module path, in display order."""
        return [name for group in self.groups for name in group.layers]

    def to_json(self) -> dict[str, Any]:
        """The trait value (``GridData`` in schema.ts)."""
        return {
            "source": self.source,
            "groups": [g.to_json() for g in self.groups],
            "steps": list(self.steps),
            "tokens": list(self.tokens),
            "per_token": self.per_token,
            "description": self.description,
            "cells": None if self.cells is None else self.cells.to_json(),
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> GridData:
        """Read and validate a trait value."""
        groups = [GridGroup.from_json(g) for g in _field(value, "groups", (list, tuple))]
        steps, tokens = _ints(value, "steps"), _ints(value, "tokens")
        width = max(len(tokens), 1)
        for group in groups:
            if group.codes.shape[1:3] != (len(steps), width):
                raise PayloadError(
                    f"grid group {group.name!r} holds {list(group.codes.shape[1:3])} steps × "
                    f"tokens, expected [{len(steps)}, {width}]"
                )
        cells = value.get("cells")
        scale = None if cells is None else CellScale.from_json(_field(value, "cells", Mapping))
        if (scale is None) != all(g.values is None for g in groups):
            raise PayloadError("a grid of scalar cells needs `cells` and every group's values")
        return cls(
            _field(value, "source", str),
            groups,
            steps,
            tokens,
            _field(value, "description", str),
            scale,
        )

    def with_tokens(self, tokens: Sequence[int]) -> GridData:
        """Only the maps of ``tokens`` (indices into the trace's tokens), in that order."""
        if not self.per_token:
            return self
        columns = [self.tokens.index(t) for t in tokens if t in self.tokens]
        groups = [
            replace(g, codes=g.codes[:, :, columns], scale=g.scale[:, :, columns])
            for g in self.groups
        ]
        return replace(self, groups=groups, tokens=[self.tokens[c] for c in columns])

    def keep(
        self, steps: Sequence[int] | None = None, layers: Sequence[str] | None = None
    ) -> GridData:
        """Only the given loop indices (renumbered in their order) and layer paths."""
        columns = (
            list(range(len(self.steps)))
            if steps is None
            else [self.steps.index(s) for s in steps if s in self.steps]
        )
        positions = (
            self.steps if steps is None else [i for i, s in enumerate(steps) if s in self.steps]
        )
        groups = []
        for group in self.groups:
            rows = [i for i, name in enumerate(group.layers) if layers is None or name in layers]
            if rows:
                groups.append(
                    replace(
                        group,
                        layers=[group.layers[i] for i in rows],
                        labels=[group.labels[i] for i in rows],
                        codes=group.codes[rows][:, columns],
                        scale=group.scale[rows][:, columns],
                        values=None if group.values is None else group.values[rows][:, columns],
                    )
                )
        return replace(self, groups=groups, steps=list(positions))


@dataclass(frozen=True)
class OverlaySet:
    """Computed overlay maps of one kind for the steps computed so far.

    Attributes
    ----------
    steps : list of int
        Loop index of each map.
    maps : ndarray of float32, shape (K, h, w)
        The maps shown, in [0, 1] (sent as uint8 codes, one step of 1/255).
    ranges : list of [float, float]
        Each map's values at the two ends of its colour scale.
    layer : str
        The per-layer map shown ('' = the method's combination of its layers).
    descriptions : list of str
        One caption per map.
    """

    steps: list[int]
    maps: np.ndarray
    ranges: list[tuple[float, float]]
    layer: str
    descriptions: list[str]

    def __post_init__(self) -> None:
        k = len(self.steps)
        if self.maps.ndim != 3 or self.maps.shape[0] != k:
            raise PayloadError(f"maps must be [K, h, w] with K = {k}, got {list(self.maps.shape)}")
        if len(self.ranges) != k or len(self.descriptions) != k:
            raise PayloadError("an overlay set needs one range and one caption per step")

    def to_json(self) -> dict[str, Any]:
        """The trait value (``OverlaySet`` in schema.ts)."""
        codes = np.rint(np.clip(np.nan_to_num(self.maps), 0.0, 1.0) * UINT8_MAX).astype(np.uint8)
        return {
            "steps": [int(s) for s in self.steps],
            "maps": _encode(codes, np.ones(len(self.steps), np.float32)),
            "ranges": [[float(low), float(high)] for low, high in self.ranges],
            "layer": self.layer,
            "descriptions": list(self.descriptions),
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> OverlaySet:
        """Read a trait value back, every field checked."""
        codes, scale = _quantised(_field(value, "maps", Mapping), 3, "overlay maps")
        ranges = _field(value, "ranges", (list, tuple))
        if not all(
            isinstance(r, (list, tuple))
            and len(r) == 2
            and all(isinstance(v, (int, float)) for v in r)
            for r in ranges
        ):
            raise PayloadError("payload field 'ranges' must be a list of [low, high] pairs")
        maps = codes.astype(np.float32) / UINT8_MAX * scale[:, None, None]
        return cls(
            _ints(value, "steps"),
            maps,
            [(float(r[0]), float(r[1])) for r in ranges],
            _field(value, "layer", str),
            _strings(value, "descriptions"),
        )
