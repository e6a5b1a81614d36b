"""Typed settings of the explanation methods: one frozen record per method, no torch.

Every method's settings are a frozen dataclass derived from :class:`MethodConfig`, defined
beside the method (``DFRiseConfig`` in :mod:`diffwidget.explain.rise`). Each default is
written once, as the field's default; the method, the runner, the command line and the
widget read it from there. A config validates itself when it is built, and has one stable
JSON form (:meth:`MethodConfig.to_json`, keys sorted) that run manifests store and hash.

Examples
--------
>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class ToyConfig(MethodConfig):
...     n: int = 3
...     kind: str = "a"
>>> ToyConfig(n=5).to_json()
{'kind': 'a', 'n': 5}
>>> ToyConfig.from_json({"n": 5}) == ToyConfig(n=5)
True
>>> ToyConfig.parse_setting("n", "7")
7
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, Union

#: A JSON value as configs write it (scalars and lists of scalars).
JsonScalar = str | int | float | bool | None
JsonValue = JsonScalar | list[JsonScalar]

C = TypeVar("C", bound="MethodConfig")

#: Words the command line accepts for ``None`` and for booleans.
_NONE_WORDS = ("none", "null", "auto")
_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")


@dataclass(frozen=True)
class MethodConfig:
    """Base of the methods' settings records (frozen, validated, JSON round trip).

    Subclasses are frozen dataclasses whose fields are JSON scalars, tuples of scalars or
    ``None``; they validate in ``__post_init__`` and may normalise a value with
    :meth:`_normalise`.
    """

    def _normalise(self, name: str, value: Any) -> None:
        """Store a checked value on the frozen record (from ``__post_init__`` only)."""
        object.__setattr__(self, name, value)

    def to_json(self) -> dict[str, JsonValue]:
        """Every setting by name, keys sorted, tuples as lists: stable for hashing."""
        out: dict[str, JsonValue] = {}
        for f in sorted(dataclasses.fields(self), key=lambda f: f.name):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json(cls: type[C], data: Mapping[str, Any]) -> C:
        """The config written by :meth:`to_json` (missing keys take their defaults).

        Raises
        ------
        ValueError
            For a key that is not a setting of this config; the message lists them.
        """
        names = cls.setting_names()
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(
                f"{cls.__name__} has no setting {', '.join(map(repr, unknown))}; "
                f"its settings are {list(names)}"
            )
        return cls(**dict(data))

    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        """The names of the settings, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def parse_setting(cls, name: str, text: str) -> Any:
        """A setting given as text (command line): converted by the field's annotation.

        Raises
        ------
        ValueError
            For an unknown setting or text the field's type cannot take.
        """
        if name not in cls.setting_names():
            raise ValueError(
                f"{cls.__name__} has no setting {name!r}; its settings are "
                f"{list(cls.setting_names())}"
            )
        hint = typing.get_type_hints(cls)[name]
        try:
            return _convert(hint, text.strip())
        except ValueError as error:
            raise ValueError(f"{cls.__name__}.{name}: {error}") from None

    def replace(self: C, **changes: Any) -> C:
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _convert(hint: Any, text: str) -> Any:
    """``text`` as a value of the annotation ``hint`` (scalars, Literals, tuples, optionals)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) < len(args) and text.lower() in _NONE_WORDS:
            return None
        errors = []
        for option in options:
            try:
                return _convert(option, text)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError("; ".join(errors))
    if origin is Literal:
        if text not in [str(a) for a in args]:
            raise ValueError(f"{text!r} is not one of {list(args)}")
        return next(a for a in args if str(a) == text)
    if origin is tuple:
        return tuple(_convert(args[0], part) for part in text.split(",") if part.strip())
    if hint is bool:
        if text.lower() not in _TRUE_WORDS + _FALSE_WORDS:
            raise ValueError(f"{text!r} is not a boolean (true or false)")
        return text.lower() in _TRUE_WORDS
    if hint in (int, float, str):
        try:
            return hint(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a {hint.__name__}") from None
    raise ValueError(f"settings of type {hint} cannot be given as text")
