"""Curves over the denoising steps, as the explorer draws them: typed series and their payload.

Every curve panel (attention mass, token relevance, concept probes, commitment) draws
:class:`Curve` records; :class:`CurveSet` is the ``curves`` trait's value (``CurveSet`` in
``js/src/schema.ts``), written with :meth:`CurveSet.to_json` and read back — by the bqplot
figures, the export — with :meth:`CurveSet.from_json`, which checks every field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from diffwidget.widget import schema
from diffwidget.widget.codecs import decode_array, encode_array
from diffwidget.widget.payloads import PayloadError, _field


@dataclass(frozen=True, eq=False)
class Curve:
    """One curve over the steps.

    Attributes
    ----------
    name : str
        Its label (a token, a concept, an attribute).
    group : CurveGroup
        The panel it is drawn in (one of ``schema.CURVE_GROUPS``).
    token : int or None
        The prompt token it belongs to (``None``: not a token's curve).
    values : ndarray of float32, shape (n_steps,)
        One value per step, NaN where not computed.

    Examples
    --------
    >>> Curve("red", "attention_mass", 2, np.array([0.1, np.nan])).series()
    {'name': 'red', 'group': 'attention_mass', 'token': 2}
    """

    name: str
    group: schema.CurveGroup
    token: int | None
    values: np.ndarray

    def __post_init__(self) -> None:
        if self.group not in schema.CURVE_GROUPS:
            raise ValueError(f"group must be one of {schema.CURVE_GROUPS}, not {self.group!r}")
        object.__setattr__(self, "values", np.asarray(self.values, np.float32))
        if self.values.ndim != 1:
            raise ValueError(f"a curve has one value per step, got shape {self.values.shape}")

    def series(self) -> dict[str, Any]:
        """What the page knows of it besides the values (``CurveSeries`` in schema.ts)."""
        return {"name": self.name, "group": self.group, "token": self.token}


@dataclass(frozen=True, eq=False)
class CurveSet:
    """The explorer's curves, all on one step axis (the ``curves`` trait).

    Examples
    --------
    >>> curves = CurveSet((Curve("red", "concept_auc", None, np.zeros(3)),))
    >>> back = CurveSet.from_json(curves.to_json())
    >>> [c.name for c in back.of_group("concept_auc")], back.curves[0].values.tolist()
    (['red'], [0.0, 0.0, 0.0])
    """

    curves: tuple[Curve, ...] = ()

    def __post_init__(self) -> None:
        lengths = {len(c.values) for c in self.curves}
        if len(lengths) > 1:
            raise ValueError(f"curves of one set share the step axis, got lengths {lengths}")

    def of_group(self, group: str) -> list[Curve]:
        """The curves of one panel, in order."""
        return [c for c in self.curves if c.group == group]

    def replacing(self, group: str, curves: Sequence[Curve], *, first: bool = False) -> CurveSet:
        """This set with ``group``'s curves replaced by ``curves`` (put first, or last)."""
        kept = tuple(c for c in self.curves if c.group != group)
        return CurveSet((*curves, *kept) if first else (*kept, *curves))

    def adding(self, curves: Sequence[Curve]) -> CurveSet:
        """This set with ``curves`` after its own."""
        return CurveSet((*self.curves, *curves))

    def keep(self, steps: Sequence[int]) -> CurveSet:
        """Only the given step positions of every curve (an export of some steps)."""
        index = np.asarray(steps, dtype=np.int64)
        return CurveSet(
            tuple(Curve(c.name, c.group, c.token, c.values[index]) for c in self.curves)
        )

    def to_json(self) -> dict[str, Any] | None:
        """The trait value (``None`` when there is no curve)."""
        if not self.curves:
            return None
        values = np.stack([c.values for c in self.curves])
        return {"series": [c.series() for c in self.curves], "values": encode_array(values)}

    @classmethod
    def from_json(cls, value: Mapping[str, Any] | None) -> CurveSet:
        """Read a trait value back (``None``: no curve), every field checked."""
        if value is None:
            return cls()
        series = _field(value, "series", (list, tuple))
        values = decode_array(_field(value, "values", Mapping))
        if values.ndim != 2 or values.shape[0] != len(series):
            raise PayloadError(
                f"curve values must be [series, steps] with {len(series)} series, "
                f"got {list(values.shape)}"
            )
        return cls(tuple(_curve(s, row) for s, row in zip(series, values, strict=True)))


def _curve(series: Any, values: np.ndarray) -> Curve:
    name = _field(series, "name", str)
    group = _field(series, "group", str)
    if group not in schema.CURVE_GROUPS:
        raise PayloadError(f"curve group {group!r} is not one of {schema.CURVE_GROUPS}")
    token = series.get("token")
    if token is not None and (not isinstance(token, int) or isinstance(token, bool)):
        raise PayloadError("a curve's token must be an integer or null")
    return Curve(name, cast(schema.CurveGroup, group), token, values)
