"""Typed records: the one JSON form, validation and save/load of what crosses a layer or a file.

A record is a frozen dataclass deriving from :class:`Record`, declared with plain annotations:
``str``, ``int``, ``float``, ``bool``, ``None`` unions, ``Literal``, ``list``/``tuple``/
``dict[str, T]``, nested records, :data:`JsonValue`, and NumPy arrays (``np.ndarray``,
``np.ndarray | None``, ``dict[str, np.ndarray]``), which are kept aside as named arrays, never
in the JSON. ``Annotated`` adds limits: :class:`MaxLen` on a string, list or dict,
:data:`NON_FINITE` on a float that may be NaN or infinite, :class:`Array` on an array.

Reading validates every field and raises :class:`RecordError` naming the source and the field
path (``noise_schedule.alpha``) with what was expected: bools are not integers, NaN and
infinities are refused unless the field allows them, unknown keys are refused unless the record
sets ``UNKNOWN_KEYS = "ignore"``, and JSON text is parsed only after a scan that bounds its
nesting depth (``json.loads`` itself recurses). Writing validates the same way, so nothing is
written that could not be read back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, TypeVar, Union
from typing import get_args as _args
from typing import get_origin as _origin

import numpy as np

#: Deepest nesting read, in JSON text and in a record (a trace header needs 6).
MAX_DEPTH = 32
#: Largest JSON text read, in characters.
MAX_JSON_CHARS = 16 * 2**20
#: ``Annotated[float, NON_FINITE]`` (or on a :data:`JsonValue`): NaN and infinities allowed,
#: written as JSON's ``NaN``/``Infinity`` tokens (as Python's ``json`` does).
NON_FINITE = "non-finite allowed"
_SHOWN = 40
# One JSON string literal, escapes included, written so that it matches in linear time.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_JSON_MARK = "any JSON value"

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import TypeAlias

    # Sequence and Mapping (covariant) so that a list[int] or dict[str, float] is a JsonValue.
    JsonValue: TypeAlias = Union[  # noqa: UP007 - a recursive alias needs Union here
        str, int, float, bool, Sequence["JsonValue"], Mapping[str, "JsonValue"], None
    ]
else:
    #: Any JSON value (finite numbers, depth bounded): scheduler configs, method settings.
    JsonValue = Annotated[object, _JSON_MARK]

R = TypeVar("R", bound="Record")


class RecordError(ValueError):
    """A record that does not validate; subclasses say which kind of file failed.

    ``path`` is the file (or other source), ``field`` the offending field's path
    (``"noise_schedule.alpha"``, ``""`` for the whole record), ``problem`` what is wrong
    (``"should be an integer, got True"``) and ``fix`` what to do about it.
    """

    def __init__(self, path: str | Path, problem: str, fix: str = "", *, field: str = "") -> None:
        self.path, self.problem, self.fix, self.field = str(path), problem, fix, field
        super().__init__(self.message())

    def detail(self) -> str:
        """The field and the problem: ``field 'seed' should be an integer, got True``."""
        return f"field {self.field!r} {self.problem}" if self.field else self.problem

    def message(self) -> str:
        """The whole text (subclasses reword it)."""
        where = f"{self.path}: " if self.path else ""
        return where + self.detail() + (f"; {self.fix}" if self.fix else "")


@dataclasses.dataclass(frozen=True)
class MaxLen:
    """Largest length of a string, list or dict: ``Annotated[str, MaxLen(200)]``."""

    n: int


@dataclasses.dataclass(frozen=True)
class Array:
    """What an array field holds: ``Annotated[np.ndarray, Array(ndim=2, kinds="f")]``."""

    ndim: int | None = None
    #: NumPy dtype kinds accepted: b(ool), i(nt), u(nsigned int), f(loat).
    kinds: str = "biuf"


def json_depth(text: str) -> int:
    """Deepest bracket nesting of JSON ``text`` (string contents skipped), without recursion.

    Examples
    --------
    >>> json_depth('{"a": [1, {"b": "[[["}]}')
    3
    """
    codes = np.frombuffer(_JSON_STRING.sub("", text).encode("utf-8", "replace"), np.uint8)
    steps = np.isin(codes, (91, 123)).astype(np.int8) - np.isin(codes, (93, 125))
    return int(np.cumsum(steps, dtype=np.int32).max(initial=0))


def parse_json(
    text: str | bytes,
    where: str | Path = "",
    *,
    max_chars: int = MAX_JSON_CHARS,
    error: type[RecordError] = RecordError,
) -> JsonValue:
    """``json.loads`` after bounding the text's length and nesting depth.

    Examples
    --------
    >>> parse_json('{"steps": 20}')
    {'steps': 20}
    >>> parse_json("[" * 100 + "]" * 100)
    Traceback (most recent call last):
    ...
    diffwidget.records.RecordError: JSON nested 100 deep (at most 32 is read)
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(where, f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if len(text) > max_chars:
        raise error(where, f"JSON of {len(text)} characters (at most {max_chars} is read)")
    depth = json_depth(text)
    if depth > MAX_DEPTH:
        raise error(where, f"JSON nested {depth} deep (at most {MAX_DEPTH} is read)")
    try:
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or an integer with too many digits
        raise error(where, f"not valid JSON ({exc})") from None


def _shown(value: object) -> str:
    text = repr(value)
    if len(text) <= _SHOWN:
        return text
    size = f" of length {len(value)}" if isinstance(value, (str, list, dict)) else ""
    return f"a {type(value).__name__}{size}"


def _split(hint: Any) -> tuple[Any, tuple[object, ...]]:
    """The bare type and its ``Annotated`` marks."""
    if _origin(hint) is Annotated:
        base, *marks = _args(hint)
        return base, tuple(marks)
    return hint, ()


def _is_union(hint: Any) -> bool:
    return _origin(hint) in (Union, types.UnionType)


def _array_kind(hint: Any) -> Literal["one", "optional", "named", ""]:
    """How a field holds arrays: one, one or none, a dict of them; ``""`` for a JSON field."""
    base, _ = _split(hint)
    args = [_split(a)[0] for a in _args(base)]
    if base is np.ndarray:
        return "one"
    if _is_union(base) and set(args) == {np.ndarray, type(None)}:
        return "optional"
    if _origin(base) is dict and args[1] is np.ndarray:
        return "named"
    return ""


_FIELDS: dict[type, tuple[tuple[str, Any, bool, str], ...]] = {}


def _fields(cls: type) -> tuple[tuple[str, Any, bool, str], ...]:
    """``(name, annotation, required, array kind)`` of each field of the record ``cls``."""
    if cls not in _FIELDS:
        hints = typing.get_type_hints(cls, include_extras=True)
        required = {
            f.name: f.default is f.default_factory is dataclasses.MISSING
            for f in dataclasses.fields(cls)
        }
        _FIELDS[cls] = tuple((n, hints[n], required[n], _array_kind(hints[n])) for n in required)
    return _FIELDS[cls]


_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}
_CONTAINERS = (list, tuple, dict)


def describe(hint: Any, plural: bool = False) -> str:
    """How an error says what a field should be: ``describe(list[str])`` is "a list of strings"."""
    base, marks = _split(hint)
    args = _args(base)
    if base in _NAMES:
        name = _NAMES[base]
        return f"{name}s" if plural else ("an " if name[0] in "aeiou" else "a ") + name
    if _JSON_MARK in marks:
        return "JSON values" if plural else "a JSON value"
    if _origin(base) is Literal:
        return ("values among " if plural else "one of ") + ", ".join(map(repr, args))
    if _is_union(base):
        return " or ".join(describe(a, plural) for a in args)
    if _origin(base) in (list, tuple):
        return ("lists" if plural else "a list") + f" of {describe(args[0], True)}"
    return "objects" if plural else "an object"


def _at(path: str, name: str) -> str:
    return f"{path}{name}" if name.startswith("[") or not path else f"{path}.{name}"


def _key(path: str) -> str:
    """The name of the array kept for the field at ``path``."""
    return path.replace(".", "/")


def _is_record(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, Record)


class _Reader:
    """One validation pass: the source, its arrays and the error class to raise."""

    def __init__(self, where: str, arrays: Mapping[str, np.ndarray], prefix: str, error: type):
        self.where, self.arrays, self.prefix, self.error = where, arrays, prefix, error

    def fail(self, path: str, problem: str) -> RecordError:
        error: RecordError = self.error(self.where, problem, field=path)
        return error

    def typed(self, data: object, want: type, hint: Any, path: str) -> Any:
        if not isinstance(data, want) or (want is int and isinstance(data, bool)):
            raise self.fail(path, f"should be {describe(hint)}, got {_shown(data)}")
        bound = next((m.n for m in _split(hint)[1] if isinstance(m, MaxLen)), None)
        if bound is not None and isinstance(data, (str, list, dict)) and len(data) > bound:
            raise self.fail(path, f"has length {len(data)}, at most {bound}")
        return data

    def value(self, data: object, hint: Any, path: str, depth: int) -> Any:
        base, marks = _split(hint)
        origin, args = _origin(base), _args(base)
        if depth > MAX_DEPTH:
            raise self.fail(path, f"is nested deeper than {MAX_DEPTH}")
        if _JSON_MARK in marks:
            return self.json(data, path, depth, NON_FINITE in marks)
        if _is_record(base):
            return self.record(base, self.typed(data, dict, hint, path), path, depth)
        if origin is Literal:
            if any(data == a and type(data) is type(a) for a in args):
                return data
            raise self.fail(path, f"should be {describe(hint)}, got {_shown(data)}")
        if _is_union(base):
            return self.union(data, hint, path, depth)
        if base is float:
            return self.number(data, NON_FINITE in marks, path)
        if base in _NAMES:
            return self.typed(data, base, hint, path)
        if origin in (list, tuple, dict):
            return self.container(data, hint, path, depth)
        raise TypeError(f"a record field cannot be {hint!r}")

    def union(self, data: object, hint: Any, path: str, depth: int) -> Any:
        arms = [a for a in _args(_split(hint)[0]) if a is not type(None)]
        if data is None and len(arms) < len(_args(_split(hint)[0])):
            return None
        if len(arms) == 1:
            return self.value(data, arms[0], path, depth)
        for arm in arms:
            try:
                return self.value(data, arm, path, depth)
            except RecordError:
                continue
        raise self.fail(path, f"should be {describe(hint)}, got {_shown(data)}")

    def container(self, data: object, hint: Any, path: str, depth: int) -> Any:
        base, _ = _split(hint)
        origin, args = _origin(base), _args(base)
        items = self.typed(data, dict if origin is dict else list, hint, path)
        if origin is dict:
            for key in items:
                self.typed(key, str, str, _at(path, f"[{key!r}]"))
            return {
                k: self.item(v, args[1], path, f"[{k!r}]", hint, depth) for k, v in items.items()
            }
        fixed = origin is tuple and args[-1] is not Ellipsis
        if fixed and len(items) != len(args):
            raise self.fail(path, f"should hold {len(args)} items, got {len(items)}")
        hints = args if fixed else [args[0]] * len(items)
        out = [
            self.item(d, h, path, f"[{i}]", hint, depth)
            for i, (d, h) in enumerate(zip(items, hints, strict=True))
        ]
        return tuple(out) if origin is tuple else out

    def item(self, data: object, hint: Any, path: str, at: str, outer: Any, depth: int) -> Any:
        try:
            return self.value(data, hint, _at(path, at), depth + 1)
        except RecordError as exc:
            base = _split(hint)[0]
            if exc.field != _at(path, at) or _is_record(base) or _origin(base) in _CONTAINERS:
                raise
            if isinstance(base, type) and isinstance(data, base) and not isinstance(data, bool):
                raise  # the right type out of its bounds: the item's own message says which
            # A wrong scalar: name the container, the way its reader sees it.
            wrong = f"should be {describe(outer)}, got {_shown(data)} at {at}"
            raise self.fail(path, wrong) from None

    def number(self, data: object, non_finite: bool, path: str) -> float:
        if not isinstance(data, (int, float)) or isinstance(data, bool):
            raise self.fail(path, f"should be a number, got {_shown(data)}")
        if not (non_finite or math.isfinite(data)):
            raise self.fail(path, f"should be a finite number, got {data!r}")
        return float(data)

    def json(self, data: object, path: str, depth: int, non_finite: bool = False) -> object:
        if depth > MAX_DEPTH:
            raise self.fail(path, f"is nested deeper than {MAX_DEPTH}")
        if isinstance(data, list):
            return [self.json(d, f"{path}[{i}]", depth + 1, non_finite) for i, d in enumerate(data)]
        if isinstance(data, dict):
            return {
                k: self.json(v, f"{path}[{k!r}]", depth + 1, non_finite) for k, v in data.items()
            }
        if isinstance(data, float) and not (non_finite or math.isfinite(data)):
            raise self.fail(path, f"should be a finite number, got {data!r}")
        if data is None or isinstance(data, (str, int, float)):
            return data
        raise self.fail(path, f"should be a JSON value, got a {type(data).__name__}")

    def record(self, cls: type[R], data: dict[str, object], path: str, depth: int) -> R:
        fields = _fields(cls)
        unknown = sorted(set(data) - {name for name, *_ in fields})
        if unknown and cls.UNKNOWN_KEYS == "refuse":
            more = " ..." if len(unknown) > 5 else ""
            raise self.fail(path, f"has unknown keys {', '.join(map(_shown, unknown[:5]))}{more}")
        missing = [name for name, _, required, kind in fields if required and not kind]
        missing = [name for name in missing if name not in data]
        if missing:
            raise self.fail(path, f"lacks {', '.join(map(repr, missing))}")
        values: dict[str, object] = {}
        for name, hint, required, kind in fields:
            if kind == "named":
                values[name] = self.named_arrays(data.get(name), hint, _at(path, name))
            elif kind and (required or self.prefix + _key(_at(path, name)) in self.arrays):
                values[name] = self.array(_at(path, name), hint)
            elif kind == "optional":
                values[name] = None
            elif name in data:
                values[name] = self.value(data[name], hint, _at(path, name), depth + 1)
        try:
            return cls(**values)
        except RecordError:
            raise
        except (ValueError, TypeError) as exc:  # the record's own cross-field checks
            raise self.fail(path, str(exc)) from None

    def named_arrays(self, listed: object, hint: Any, path: str) -> dict[str, np.ndarray]:
        names = self.value([] if listed is None else listed, list[str], path, 0)
        each = _args(_split(hint)[0])[1]  # the values' Annotated spec
        return {
            k: self.array(f"{path}[{k!r}]", each, f"{_key(path)}/{i}") for i, k in enumerate(names)
        }

    def array(self, path: str, hint: Any, name: str = "") -> np.ndarray:
        spec = next((m for m in _split(hint)[1] if isinstance(m, Array)), Array())
        key = self.prefix + (name or _key(path))
        if key not in self.arrays:
            raise self.fail(path, f"is an array that is missing (no {key!r})")
        array = np.asarray(self.arrays[key])
        if array.dtype.kind not in spec.kinds:
            raise self.fail(path, f"is a {array.dtype} array, expected dtype kinds {spec.kinds!r}")
        if spec.ndim is not None and array.ndim != spec.ndim:
            raise self.fail(path, f"has shape {array.shape}, expected {spec.ndim} dimensions")
        return array


def _encode(value: object, path: str, arrays: dict[str, np.ndarray]) -> object:
    """The JSON form of ``value``; arrays of records go to ``arrays`` under their names."""
    if isinstance(value, Record):
        out: dict[str, object] = {}
        for name, _, _, kind in _fields(type(value)):
            item, at = getattr(value, name), _at(path, name)
            if kind == "named":
                out[name] = list(item)
                arrays.update({f"{_key(at)}/{i}": a for i, a in enumerate(item.values())})
            elif kind:
                if item is not None:
                    arrays[_key(at)] = item
            else:
                out[name] = _encode(item, at, arrays)
        return out
    if isinstance(value, (list, tuple)):
        return [_encode(v, _at(path, f"[{i}]"), arrays) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _encode(v, _at(path, f"[{k!r}]"), arrays) for k, v in value.items()}
    if isinstance(value, np.generic):
        value = value.item()
    return value


class Record:
    """Base of every typed record (subclasses are ``@dataclass(frozen=True)``).

    Examples
    --------
    >>> @dataclasses.dataclass(frozen=True)
    ... class Point(Record):
    ...     x: int
    ...     label: str = ""
    >>> Point.from_json({"x": 1}).to_json()
    {'x': 1, 'label': ''}
    >>> Point.from_json({"x": True}, where="p.json")
    Traceback (most recent call last):
    ...
    diffwidget.records.RecordError: p.json: field 'x' should be an integer, got True
    """

    #: What reading does with keys the record does not declare: ``"refuse"`` or ``"ignore"``.
    UNKNOWN_KEYS: ClassVar[Literal["refuse", "ignore"]] = "refuse"

    @classmethod
    def from_json(
        cls: type[R],
        data: object,
        *,
        where: str | Path = "",
        arrays: Mapping[str, np.ndarray] | None = None,
        prefix: str = "",
        error: type[RecordError] = RecordError,
    ) -> R:
        """The validated record of ``data`` (and of ``arrays[prefix + name]`` for array fields)."""
        reader = _Reader(str(where), arrays if arrays is not None else {}, prefix, error)
        if not isinstance(data, dict):
            raise reader.fail("", f"should be an object, got {_shown(data)}")
        return reader.record(cls, data, "", 0)

    def to_json(self) -> dict[str, JsonValue]:
        """The JSON form (checked: what :meth:`from_json` would refuse is refused here)."""
        arrays: dict[str, np.ndarray] = {}
        data: Any = _encode(self, "", arrays)
        type(self).from_json(data, where=f"writing {type(self).__name__}", arrays=arrays)
        return data

    def arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The record's arrays by name (``field``, ``field/0`` for dicts of arrays)."""
        arrays: dict[str, np.ndarray] = {}
        _encode(self, "", arrays)
        return {prefix + k: v for k, v in arrays.items()}

    def save(self, path: str | Path) -> Path:
        """Write ``.json`` (records without arrays) or ``.npz`` (a JSON header and the arrays)."""
        path, text = Path(path), json.dumps(self.to_json())
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".npz":
            write_npz(path, {"header": np.array(text), **self.arrays()})
        elif self.arrays():
            raise ValueError(f"{type(self).__name__} holds arrays: save it to a .npz file")
        else:
            path.write_text(text, encoding="utf-8")
        return path

    @classmethod
    def load(cls: type[R], path: str | Path, *, error: type[RecordError] = RecordError) -> R:
        """Read what :meth:`save` wrote, every array's size checked before it is read."""
        path = Path(path)
        if path.suffix != ".npz":
            if path.stat().st_size > 4 * MAX_JSON_CHARS:
                raise error(path, f"a JSON file of {path.stat().st_size} bytes, too large")
            return cls.from_json(
                parse_json(path.read_bytes(), path, error=error), where=path, error=error
            )
        check_npz(path, error)
        with np.load(path, allow_pickle=False) as npz:
            if "header" not in npz.files:
                raise error(path, f"not a saved {cls.__name__} (no header)")
            header = parse_json(str(npz["header"]), path, error=error)
            return cls.from_json(header, where=path, arrays=npz, error=error)


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """An uncompressed ``.npz`` of ``arrays``, as ``np.savez`` writes it (:func:`check_npz`)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
    return path


def check_npz(path: Path, error: type[RecordError] = RecordError) -> None:
    """Refuse an ``.npz`` whose arrays are compressed, hold objects or lie about their size."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise error(path, f"array {info.filename!r} is compressed; save it again")
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read = {
                        (1, 0): np.lib.format.read_array_header_1_0,
                        (2, 0): np.lib.format.read_array_header_2_0,
                    }.get(version)
                    if read is None:
                        raise error(path, f"array {info.filename!r} has .npy version {version}")
                    shape, _, dtype = read(member)
                    size = math.prod(shape) * dtype.itemsize
                    if dtype.hasobject or size != info.file_size - member.tell():
                        raise error(
                            path,
                            f"array {info.filename!r} ({dtype}, shape {shape}) "
                            "does not match its stored bytes",
                        )
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        if isinstance(exc, RecordError):
            raise
        raise error(path, f"not a readable .npz file ({exc})") from None
