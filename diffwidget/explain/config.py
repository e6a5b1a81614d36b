"""Typed settings of the explanation methods: one frozen record per method, no torch.

Every method's settings are a frozen dataclass derived from :class:`MethodConfig`, defined
beside the method (``DFRiseConfig`` in :mod:`diffwidget.explain.rise`). Each default is
written once, as the field's default; the method, the runner, the command line and the
widget read it from there. A config checks its values when it is built and has the one
JSON form of :class:`~diffwidget.records.Record` (fields in declaration order, read back
with every type checked), which run manifests store and hash.

Examples
--------
>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class ToyConfig(MethodConfig):
...     n: int = 3
...     kind: str = "a"
>>> ToyConfig(n=5).to_json()
{'n': 5, 'kind': 'a'}
>>> ToyConfig.from_json({"n": 5}) == ToyConfig(n=5)
True
>>> ToyConfig().with_text("n", "7")
ToyConfig(n=7, kind='a')
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, TypeVar

from diffwidget.records import Record

C = TypeVar("C", bound="MethodConfig")


@dataclass(frozen=True)
class MethodConfig(Record):
    """Base of the methods' settings records (frozen, checked, one JSON form).

    Subclasses are frozen dataclasses whose fields have defaults; they check their values in
    ``__post_init__`` and may store a normalised value with :meth:`_normalise`.
    """

    def _normalise(self, name: str, value: Any) -> None:
        """Store a checked value on the frozen record (from ``__post_init__`` only)."""
        object.__setattr__(self, name, value)

    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        """The names of the settings, in declaration order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self: C, **changes: Any) -> C:
        """A copy with some settings changed (checked again)."""
        return dataclasses.replace(self, **changes)

    def with_text(self: C, name: str, text: str) -> C:
        """A copy with the setting ``name`` given as text (command line): JSON, else a string.

        Raises
        ------
        ValueError
            For an unknown setting or a value of the wrong type; the message names both.
        """
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        data = self.to_json()
        data[name] = value
        return type(self).from_json(data, where=f"{type(self).__name__} setting {name}={text}")
