"""The run manifest (``run.json``): the settings, the prompt items and the units of work.

A :class:`RunManifest` is read and written through one schema (a typed record): every field
is checked, so a manifest of the wrong shape is an error naming ``run.json`` and the field.
Manifests written before digests existed (format 1) still read; their items carry no digest
and the run cannot be resumed, only opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from diffwidget.records import Record
from diffwidget.runs.prompt_files import MAX_PROMPTS
from diffwidget.runs.prompts import PromptItem
from diffwidget.runs.settings import RunSettings, work_digest

ManifestFormat = Literal[1, 2]
#: Format of the manifests written now (1: before digests; still read).
MANIFEST_FORMAT: ManifestFormat = 2


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
