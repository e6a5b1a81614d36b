"""The ``curves`` payload as a typed record: written, read back, refused when malformed."""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from diffwidget.widget import schema
from diffwidget.widget.codecs import encode_array
from diffwidget.widget.curves import Curve, CurveSet
from diffwidget.widget.payloads import PayloadError


def _set() -> CurveSet:
    return CurveSet(
        (
            Curve("red", "attention_mass", 2, np.array([0.1, 0.2, np.nan])),
            Curve("colour", "commitment", None, np.array([1.0, 0.5, 0.0])),
        )
    )


def test_a_curve_set_reads_back_what_it_wrote():
    payload = _set().to_json()
    assert payload is not None
    assert payload["series"] == [
        {"name": "red", "group": "attention_mass", "token": 2},
        {"name": "colour", "group": "commitment", "token": None},
    ]
    back = CurveSet.from_json(payload)
    assert [(c.name, c.group, c.token) for c in back.curves] == [
        ("red", "attention_mass", 2),
        ("colour", "commitment", None),
    ]
    np.testing.assert_array_equal(back.curves[0].values, np.float32([0.1, 0.2, np.nan]))
    assert CurveSet().to_json() is None
    assert CurveSet.from_json(None).curves == ()


def test_replacing_a_group_keeps_the_others_in_order():
    curves = _set().replacing("attention_mass", [Curve("blue", "attention_mass", 3, np.ones(3))])
    assert [c.name for c in curves.curves] == ["colour", "blue"]
    first = _set().replacing(
        "attention_mass", [Curve("b", "attention_mass", 3, np.ones(3))], first=True
    )
    assert [c.name for c in first.curves] == ["b", "colour"]
    assert [c.name for c in _set().of_group("commitment")] == ["colour"]


def test_keeping_steps_keeps_those_columns():
    kept = _set().keep([0, 2])
    np.testing.assert_array_equal(kept.curves[1].values, np.float32([1.0, 0.0]))


def test_malformed_curves_are_refused():
    with pytest.raises(ValueError, match="group must be one of"):
        Curve("x", cast(Any, "nonsense"), None, np.zeros(2))
    with pytest.raises(ValueError, match="share the step axis"):
        CurveSet(
            (
                Curve("a", "concept_auc", None, np.zeros(2)),
                Curve("b", "concept_auc", None, np.zeros(3)),
            )
        )
    good = _set().to_json()
    assert good is not None
    with pytest.raises(PayloadError, match=r"\[series, steps\] with 3 series"):
        CurveSet.from_json({**good, "series": [*good["series"], good["series"][0]]})
    with pytest.raises(PayloadError, match="token must be an integer"):
        CurveSet.from_json(
            {**good, "series": [{**good["series"][0], "token": True}, good["series"][1]]}
        )
    with pytest.raises(PayloadError, match="is not one of"):
        CurveSet.from_json(
            {**good, "series": [{**good["series"][0], "group": "x"}, good["series"][1]]}
        )
    with pytest.raises(PayloadError, match="'name' must be"):
        CurveSet.from_json(
            {**good, "series": [{**good["series"][0], "name": 3}, good["series"][1]]}
        )


@given(
    names=st.lists(st.text(max_size=12), min_size=1, max_size=4),
    group=st.sampled_from(schema.CURVE_GROUPS),
    steps=st.integers(1, 6),
)
def test_any_names_and_groups_round_trip(names: list[str], group: str, steps: int):
    values = np.arange(len(names) * steps, dtype=np.float32).reshape(len(names), steps)
    payload = {
        "series": [{"name": n, "group": group, "token": None} for n in names],
        "values": encode_array(values),
    }
    back = CurveSet.from_json(payload)
    assert back.to_json() is not None
    assert [c.name for c in back.curves] == names
    np.testing.assert_array_equal(np.stack([c.values for c in back.curves]), values)
