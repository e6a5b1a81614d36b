"""The run manifest (``run.json``): the settings, the prompt items and the units of work.

A :class:`RunManifest` is read and written through one schema (a typed record): every field
is checked, so a manifest of the wrong shape is an error naming ``run.json`` and the field.
Manifests written before digests existed (format 1) still read; their items carry no digest
and the run cannot be resumed, only opened. Format 1 also kept three method settings as plain
fields (:data:`FORMAT1_METHOD_SETTINGS`); reading moves them into the methods' configs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from diffwidget.records import Record, RecordError
from diffwidget.runs.item_records import ITEM_FORMAT, ItemRecord
from diffwidget.runs.prompt_files import MAX_PROMPTS
from diffwidget.runs.prompts import PromptItem
from diffwidget.runs.settings import FAITHFULNESS, RunSettings, work_digest

ManifestFormat = Literal[1, 2]
#: Format of the manifests written now (1: before digests; still read).
MANIFEST_FORMAT: ManifestFormat = 2
#: Where the plain method settings of a format-1 manifest live now: (method, setting).
FORMAT1_METHOD_SETTINGS: dict[str, tuple[str, str]] = {
    "rise_masks": ("df_rise", "n_masks"),
    "n_random": (FAITHFULNESS, "n_random"),
    "cells_per_stage": (FAITHFULNESS, "cells_per_stage"),
}


def item_key(item_id: str, seed: int) -> str:
    """File stem of one (prompt id, seed) result.

    Examples
    --------
    >>> item_key("scene00003", 42)
    'scene00003__seed42'
    """
    return f"{item_id}__seed{seed}"


@dataclass(frozen=True)
class Work:
    """One unit of work: a prompt item at one seed offset.

    Attributes
    ----------
    item : PromptItem
        The prompt.
    offset, seed : int
        The seed offset and the generator seed it gives.
    key : str
        File stem of its result (:func:`item_key`).
    digest, settings_digest : str
        :func:`~diffwidget.runs.settings.work_digest` of it and the run settings' digest
        (``""`` in a format-1 run).
    """

    item: PromptItem
    offset: int
    seed: int
    key: str
    digest: str = ""
    settings_digest: str = ""

    def record(self, **fields: Any) -> ItemRecord:
        """The item record of this work: its identity filled in, ``fields`` the rest.

        Examples
        --------
        >>> item = PromptItem("a", "a red circle")
        >>> work = Work(item, offset=0, seed=1, key="a__seed1", digest="0" * 64)
        >>> work.record(status="ok").key
        'a__seed1'
        """
        return ItemRecord(
            format_version=ITEM_FORMAT,
            key=self.key,
            id=self.item.id,
            seed=self.seed,
            offset=self.offset,
            prompt=self.item.prompt,
            digest=self.digest,
            settings_digest=self.settings_digest,
            **fields,
        )


@dataclass(frozen=True)
class RunManifest(Record):
    """Settings and items of a run.

    Attributes
    ----------
    format_version : {1, 2}
        2 for manifests written with digests.
    settings : RunSettings
        What every item is computed with.
    items : tuple of PromptItem
        The prompts, in order.
    settings_digest : str
        ``settings.digest()`` when the run was made (``""`` in format 1).

    Examples
    --------
    >>> manifest = RunManifest.create(RunSettings(), [PromptItem("a", "a red circle")])
    >>> [w.key for w in manifest.work()]
    ['a__seed1756872259']
    """

    format_version: ManifestFormat
    settings: RunSettings
    items: tuple[PromptItem, ...]
    settings_digest: str = ""

    def __post_init__(self) -> None:
        if (
            self.format_version >= MANIFEST_FORMAT
            and self.settings_digest != self.settings.digest()
        ):
            raise ValueError(
                "settings_digest is not the digest of the settings (the file was edited); "
                "restore it or start a new run"
            )
        units = len(self.items) * len(self.settings.seeds)
        if units > MAX_PROMPTS:
            raise ValueError(
                f"{len(self.items)} items × {len(self.settings.seeds)} seeds make {units} units "
                f"of work, more than {MAX_PROMPTS} in one run"
            )
        seen: set[str] = set()
        for item in self.items:
            if item.id.casefold() in seen:
                raise ValueError(f"item id {item.id!r} is used twice (ids ignore case)")
            seen.add(item.id.casefold())

    @classmethod
    def from_json(
        cls,
        data: object,
        *,
        where: str | Path = "",
        arrays: Mapping[str, np.ndarray] | None = None,
        prefix: str = "",
        error: type[RecordError] = RecordError,
    ) -> RunManifest:
        """The validated manifest of ``data`` (a format-1 one's method settings moved first)."""
        return super().from_json(
            _format1_upgraded(data), where=where, arrays=arrays, prefix=prefix, error=error
        )

    @classmethod
    def create(cls, settings: RunSettings, items: list[PromptItem]) -> RunManifest:
        """A manifest of the current format."""
        return cls(MANIFEST_FORMAT, settings, tuple(items), settings.digest())

    @property
    def legacy(self) -> bool:
        """Whether the run was written before digests (it opens, but cannot be resumed)."""
        return self.format_version < MANIFEST_FORMAT

    def work(self) -> list[Work]:
        """Every unit of work, in order: each item at each seed offset."""
        units = []
        for item in self.items:
            for offset in self.settings.seeds:
                seed = item.generator_seed(offset)
                digest = "" if self.legacy else work_digest(self.settings_digest, item, offset)
                key = item_key(item.id, seed)
                units.append(Work(item, offset, seed, key, digest, self.settings_digest))
        return units


def _format1_upgraded(data: object) -> object:
    """A format-1 manifest with its plain method settings moved into the configs' entries
    (a method the run did not compute drops its setting); any other data unchanged."""
    if not isinstance(data, dict) or data.get("format_version") != 1:
        return data
    settings = data.get("settings")
    if not isinstance(settings, dict) or not set(settings) & set(FORMAT1_METHOD_SETTINGS):
        return data
    settings = dict(settings)
    methods = settings.get("methods")
    configs: dict[str, dict[str, object]] = {}
    for old, (method, name) in FORMAT1_METHOD_SETTINGS.items():
        if old not in settings:
            continue
        value = settings.pop(old)
        if method == FAITHFULNESS or (isinstance(methods, list) and method in methods):
            configs.setdefault(method, {})[name] = value
    settings[FAITHFULNESS] = configs.pop(FAITHFULNESS, {})
    settings["configs"] = configs
    return {**data, "settings": settings}
