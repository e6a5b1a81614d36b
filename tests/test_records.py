"""The typed-record helper: round trips, every refusal named, no crash on any mutation."""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffwidget.records import (
    MAX_DEPTH,
    NON_FINITE,
    Array,
    JsonValue,
    MaxLen,
    Record,
    RecordError,
    json_depth,
    parse_json,
)


@dataclass(frozen=True)
class Inner(Record):
    count: int
    kind: Literal["a", "b"] = "a"


@dataclass(frozen=True, eq=False)
class Outer(Record):
    name: Annotated[str, MaxLen(8)]
    scale: float
    flag: bool
    inner: Inner
    items: list[Inner] = field(default_factory=list)
    pair: tuple[int, str] = (0, "")
    table: dict[str, float] = field(default_factory=dict)
    loose: Annotated[float, NON_FINITE] = 0.0
    maybe: float | None = None
    either: str | int | bool | None = None
    config: JsonValue = None
    settings: Annotated[JsonValue, NON_FINITE] = None
    grid: Annotated[np.ndarray, Array(ndim=2, kinds="f")] = field(
        default_factory=lambda: np.zeros((1, 1), np.float32)
    )
    preview: np.ndarray | None = None
    layers: dict[str, Annotated[np.ndarray, Array(ndim=2)]] = field(default_factory=dict)


@dataclass(frozen=True)
class Lenient(Record):
    UNKNOWN_KEYS = "ignore"
    x: int = 0


finite = st.floats(allow_nan=False, allow_infinity=False)
text = st.text(max_size=8)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | finite | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=12,
)
inners = st.builds(Inner, count=st.integers(), kind=st.sampled_from(["a", "b"]))
arrays_2d = st.integers(1, 3).map(lambda n: np.arange(n * 2, dtype=np.float32).reshape(n, 2))
outers = st.builds(
    Outer,
    name=text,
    scale=finite,
    flag=st.booleans(),
    inner=inners,
    items=st.lists(inners, max_size=3),
    pair=st.tuples(st.integers(), text),
    table=st.dictionaries(text, finite, max_size=3),
    loose=st.floats(),
    maybe=st.none() | finite,
    either=st.none() | text | st.integers() | st.booleans(),
    config=json_values,
    settings=st.lists(st.floats(), max_size=3),
    grid=arrays_2d,
    preview=st.none() | arrays_2d,
    layers=st.dictionaries(st.text(min_size=1, max_size=6), arrays_2d, max_size=3),
)


def same(a: Outer, b: Outer) -> bool:
    for name in Outer.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if name in ("loose", "settings"):
            if repr(x) != repr(y):  # NaN is not equal to itself; its text is
                return False
        elif name in ("grid", "preview"):
            if (x is None) != (y is None) or (x is not None and not np.array_equal(x, y)):
                return False
        elif name == "layers":
            if list(x) != list(y) or not all(np.array_equal(x[k], y[k]) for k in x):
                return False
        elif type(x) is not type(y) or x != y:
            return False
    return True


@given(outers)
def test_round_trip_through_json_text_keeps_every_field(record: Outer) -> None:
    text = json.dumps(record.to_json())  # NaN and infinities as JSON's NaN/Infinity
    back = Outer.from_json(parse_json(text), arrays=record.arrays())
    assert same(record, back)


@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(outers)
def test_save_and_load_npz(tmp_path: Path, record: Outer) -> None:
    path = record.save(tmp_path / "r.npz")
    assert same(record, Outer.load(path))


def test_save_and_load_json(tmp_path: Path) -> None:
    record = Inner(3, "b")
    assert Inner.load(record.save(tmp_path / "r.json")) == record
    with pytest.raises(ValueError, match=r"holds arrays: save it to a \.npz"):
        Outer("x", 1.0, True, record).save(tmp_path / "o.json")


def valid() -> dict[str, Any]:
    return {"name": "n", "scale": 1.5, "flag": False, "inner": {"count": 1}}


def error_of(data: Any, **kwargs: Any) -> RecordError:
    with pytest.raises(RecordError) as info:
        Outer.from_json(data, where="f.json", **kwargs)
    assert "f.json" in str(info.value)
    return info.value


@pytest.mark.parametrize(
    ("path", "value", "field", "fragment"),
    [
        (("scale",), True, "scale", "should be a number, got True"),
        (("inner", "count"), True, "inner.count", "should be an integer, got True"),
        (("inner", "count"), 1.0, "inner.count", "should be an integer, got 1.0"),
        (("flag",), 0, "flag", "should be a boolean, got 0"),
        (("scale",), float("nan"), "scale", "should be a finite number, got nan"),
        (("scale",), "NaN", "scale", "should be a number, got 'NaN'"),
        (("scale",), "1.5", "scale", "should be a number, got '1.5'"),
        (("maybe",), float("inf"), "maybe", "should be a finite number"),
        (("name",), "123456789", "name", "has length 9, at most 8"),
        (("inner", "kind"), "c", "inner.kind", "should be one of 'a', 'b', got 'c'"),
        (("pair",), [1], "pair", "should hold 2 items, got 1"),
        (("table",), {"k": "v"}, "table", "should be an object, got 'v' at ['k']"),
        (("items",), [{"count": 1}, {"count": "2"}], "items[1].count", "should be an integer"),
        (("items",), [3], "items[0]", "should be an object, got 3"),
        (("config",), {"a": [float("inf")]}, "config['a'][0]", "should be a finite number"),
        (("either",), 1.5, "either", "should be a string or an integer or a boolean or a null"),
        (("inner",), {"count": 1, "extra": 2}, "inner", "has unknown keys 'extra'"),
        (("inner",), {}, "inner", "lacks 'count'"),
    ],
)
def test_each_refusal_names_the_field(
    path: tuple[str, ...], value: Any, field: str, fragment: str
) -> None:
    data = valid()
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    error = error_of(data)
    assert error.field == field
    assert fragment in str(error)


def test_non_finite_floats_where_the_field_allows_them() -> None:
    for text in ("NaN", "Infinity", "-Infinity"):
        loose = Outer.from_json(parse_json(json.dumps({**valid(), "loose": float(text)}))).loose
        assert repr(loose) == repr(float(text))
    settings = Outer.from_json({**valid(), "settings": {"lambda_min": -math.inf}}).settings
    assert settings == {"lambda_min": -math.inf}


def test_list_of_scalars_names_the_list() -> None:
    @dataclass(frozen=True)
    class Words(Record):
        tokens: list[str]

    with pytest.raises(RecordError, match=r"'tokens' should be a list of strings, got 2 at \[1\]"):
        Words.from_json({"tokens": ["a", 2]})


def test_unknown_keys_are_refused_or_ignored_as_the_record_says() -> None:
    assert Lenient.from_json({"x": 1, "later": 2}).x == 1
    assert "'later'" in str(error_of({**valid(), "later": 2}))


def test_arrays_are_checked_and_missing_ones_named() -> None:
    arrays = {"grid": np.zeros((2, 2), np.float32)}
    assert Outer.from_json(valid(), arrays=arrays).grid.shape == (2, 2)
    assert Outer.from_json(valid()).grid.shape == (1, 1)  # absent: the field's default

    @dataclass(frozen=True)
    class Needs(Record):
        values: np.ndarray

    with pytest.raises(RecordError, match="'values' is an array that is missing") as info:
        Needs.from_json({}, arrays={})
    assert info.value.field == "values"
    assert Needs.from_json({}, arrays={"p/values": np.ones(2)}, prefix="p/").values.sum() == 2
    assert "expected 2 dimensions" in str(error_of(valid(), arrays={"grid": np.zeros(3)}))
    bad = {"grid": np.zeros((2, 2), np.int64)}
    assert "expected dtype kinds 'f'" in str(error_of(valid(), arrays=bad))
    named = {**valid(), "layers": ["a.b"]}
    assert error_of(named, arrays=arrays).field == "layers['a.b']"
    loaded = Outer.from_json(named, arrays={**arrays, "layers/0": np.ones((1, 1))})
    assert list(loaded.layers) == ["a.b"]
    flat = {**arrays, "layers/0": np.ones(3)}
    assert "expected 2 dimensions" in str(error_of(named, arrays=flat))


def test_writing_refuses_what_reading_would() -> None:
    with pytest.raises(RecordError, match="writing Outer: field 'scale' should be a finite"):
        Outer("x", math.nan, True, Inner(1)).to_json()


def test_a_record_check_becomes_a_record_error() -> None:
    @dataclass(frozen=True)
    class Span(Record):
        lo: int
        hi: int

        def __post_init__(self) -> None:
            if self.hi < self.lo:
                raise ValueError("hi must not be below lo")

    with pytest.raises(RecordError, match=r"span\.json: hi must not be below lo"):
        Span.from_json({"lo": 2, "hi": 1}, where="span.json")


# ------------------------------------------------------------------ depth and size
@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_very_deep_json_is_refused_without_recursion(opener: str) -> None:
    closer = "]" if opener == "[" else "}"
    text = opener * 100_000 + "1" + closer * 100_000
    with pytest.raises(RecordError, match="nested 100000 deep"):
        parse_json(text, "deep.json")


def test_deep_json_value_inside_a_record_is_refused() -> None:
    deep: Any = 1
    for _ in range(MAX_DEPTH + 2):
        deep = [deep]
    assert "nested deeper" in str(error_of({**valid(), "config": deep}))


def reference_depth(value: Any) -> int:
    """Nesting depth by recursion over the parsed value (an independent count)."""
    if isinstance(value, list):
        return 1 + max((reference_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((reference_depth(v) for v in value.values()), default=0)
    return 0


@given(json_values | st.lists(st.text(alphabet='[]{}"\\ab', max_size=6)))
def test_depth_scan_agrees_with_recursion(value: Any) -> None:
    assert json_depth(json.dumps(value)) == reference_depth(value)


def test_text_that_is_not_json_or_too_long() -> None:
    with pytest.raises(RecordError, match="not valid JSON"):
        parse_json('{"a": ', "x.json")
    with pytest.raises(RecordError, match="not valid JSON"):
        parse_json("1" * 5000)  # beyond Python's integer-digit limit
    with pytest.raises(RecordError, match="not UTF-8"):
        parse_json(b"\xff\xfe")
    with pytest.raises(RecordError, match="at most 10 is read"):
        parse_json("[" + "1," * 10 + "1]", max_chars=10)


# ------------------------------------------------------------------ hostile input
def mutate(data: Any, draw: Any) -> Any:
    """``data`` with one value somewhere replaced by an arbitrary JSON value."""
    if isinstance(data, dict) and data and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(data)))
        return {**data, key: mutate(data[key], draw)}
    if isinstance(data, list) and data and draw(st.booleans()):
        i = draw(st.integers(0, len(data) - 1))
        return [*data[:i], mutate(data[i], draw), *data[i + 1 :]]
    return draw(json_values | st.sampled_from(["NaN", "Infinity", True, 2**70, {}, []]))


@given(outers, st.data())
def test_any_mutation_loads_or_raises_record_error(record: Outer, data: st.DataObject) -> None:
    mutated = mutate(record.to_json(), data.draw)
    try:
        loaded = Outer.from_json(mutated, arrays=record.arrays(), where="m.json")
    except RecordError as error:
        message = str(error)
    else:
        message = "m.json"
        loaded.to_json()  # what loads is valid through and through
    assert "m.json" in message


# ------------------------------------------------------------------ .npz files
def write_npz(path: Path, header: str, members: dict[str, bytes]) -> Path:
    np.savez(path, header=np.array(header))
    with zipfile.ZipFile(path, "a") as archive:
        for name, payload in members.items():
            archive.writestr(name, payload)
    return path


def npy_bytes(array: np.ndarray, shape: tuple[int, ...] | None = None) -> bytes:
    header = {"descr": array.dtype.str, "fortran_order": False, "shape": shape or array.shape}
    text = repr(header).encode()
    text += b" " * (63 - (len(text) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + array.tobytes()


def test_npz_whose_array_claims_more_than_it_holds_is_refused(tmp_path: Path) -> None:
    header = json.dumps(Inner(1).to_json())
    good = write_npz(tmp_path / "g.npz", header, {"grid.npy": npy_bytes(np.zeros(4))})
    assert Inner.load(good) == Inner(1)
    huge = npy_bytes(np.zeros(4), shape=(100_000, 100_000))
    lying = write_npz(tmp_path / "l.npz", header, {"grid.npy": huge})
    with pytest.raises(RecordError, match="does not match its stored bytes"):
        Inner.load(lying)


def test_npz_compressed_or_not_a_zip_is_refused(tmp_path: Path) -> None:
    packed = tmp_path / "c.npz"
    np.savez_compressed(packed, header=np.array(json.dumps(Inner(1).to_json())))
    with pytest.raises(RecordError, match="compressed"):
        Inner.load(packed)
    junk = tmp_path / "j.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(RecordError, match=r"not a readable \.npz"):
        Inner.load(junk)
