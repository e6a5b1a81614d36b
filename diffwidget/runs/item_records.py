"""The result file of one run item, as typed records: one schema for writing and reading.

``items/<key>.json`` is an :class:`ItemRecord`: who the item is (key, id, seed, offset,
prompt), whether it succeeded, the digest of the work that produced it, and either its error
or its :class:`ItemResult` (metrics, faithfulness curves, the maps' descriptions,
segmentation scores, role curves) with the companion files it names. Reading goes through
:meth:`ItemRecord.from_json`, which checks every field, so a record of the wrong shape is a
:class:`~diffwidget.records.RecordError` naming the file and the field, never a ``KeyError``
further on. Records written before digests existed (format 1) read with ``digest`` empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, Literal

from diffwidget.records import JsonValue, MaxLen, Record
from diffwidget.runs.segmentation import SEGMENTED_WORDS, PairScore, SegmentationScores

ItemFormat = Literal[1, 2]
#: Format of the item records written now (1: before digests; still read).
ITEM_FORMAT: ItemFormat = 2
#: Companion files an item may name: its maps and features, and its trace.
Companion = Literal["arrays", "trace"]
COMPANIONS: tuple[Companion, ...] = ("arrays", "trace")


@dataclass(frozen=True)
class CurveEntry(Record):
    """Insertion and deletion curves of one map, beside the random orders'."""

    step: int
    fractions: list[float]
    deletion: list[float]
    insertion: list[float]
    random_deletion: list[float]
    random_insertion: list[float]
    meta: dict[str, JsonValue] = field(default_factory=dict)


@dataclass(frozen=True)
class MapEntry(Record):
    """One stored saliency map: its method, step and description (arrays in the ``.npz``)."""

    method: str
    step: int
    timestep: int
    meta: dict[str, JsonValue] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SwitchEntry(Record):
    """One judged attribute of a prompt switch from the item's caption to its swapped twin.

    Attributes
    ----------
    attribute, a_value, b_value : str
        What the judge reads and its value under prompt A (the item's) and prompt B.
    prompt_b : str
        The caption switched to (one attribute of one object swapped).
    judge : str
        The judge's name; ``exact`` whether it is exact by construction.
    switch_steps : list of int
        The switch steps ``k``.
    outcomes : list of int
        Outcome code per switch step (0 keeps A's value, 1 takes B's, 2 neither).
    image_change : list of float
        Mean absolute difference of each final image from the item's own, in [0, 1].
    """

    attribute: str
    a_value: str
    b_value: str
    prompt_b: str
    judge: str
    exact: bool
    switch_steps: list[int]
    outcomes: list[int]
    image_change: list[float]

    def __post_init__(self) -> None:
        n = len(self.switch_steps)
        if len(self.outcomes) != n or len(self.image_change) != n:
            raise ValueError("outcomes and image_change need one entry per switch step")


#: A concept word as a record holds it (the tracing layer refuses longer ones).
_CONCEPT_WORD = MaxLen(100)
#: What the spatial shares of all concept words may sum to beyond 1 (float32 softmax).
_SHARE_SLACK = 1e-3


@dataclass(frozen=True)
class ConceptEntry(Record):
    """The ``concepts`` metric of one scene caption: each word's map scored, and the control.

    Attributes
    ----------
    present : list of str
        The caption objects' colour and shape words.
    absent : list of str
        Control words for nothing in the image (may be empty when every control given was
        a caption word).
    layers : list of str
        Every attention layer with a concept map, in data-flow order.
    default_layers : list of str
        The layers the ``"concept"`` map averages (the architecture's default).
    steps : list of int
        The loop indices every concept map here averages (the default window).
    found : list of bool
        Per caption object, whether the reader found it in the generated image.
    maps : dict of str to list of PairScore
        Map kind (``"concept"``, ``"attention"``, ``"daam"``) -> its (object, word) pairs.
    per_layer : dict of str to list of PairScore
        Layer -> the pairs of that layer's concept map alone (over ``steps``).
    shares : list of float
        Each word's share of the image (present words, then absent), over the default
        layers and ``steps``; the shares of all words sum to 1.
    """

    present: list[Annotated[str, _CONCEPT_WORD]]
    absent: list[Annotated[str, _CONCEPT_WORD]]
    layers: list[str]
    default_layers: list[str]
    steps: list[int]
    found: list[bool]
    maps: dict[str, list[PairScore]]
    per_layer: dict[str, list[PairScore]]
    shares: list[float]

    def __post_init__(self) -> None:
        if not self.present or set(self.present) & set(self.absent):
            raise ValueError("present words are the caption's own, absent ones never among them")
        if list(self.per_layer) != self.layers or not set(self.default_layers) <= set(self.layers):
            raise ValueError("per_layer holds one entry per layer, in the order of layers")
        if len(self.shares) != len(self.words):
            raise ValueError(f"shares holds one value per word ({len(self.words)})")
        if any(not 0.0 <= v <= 1.0 for v in self.shares) or sum(self.shares) > 1 + _SHARE_SLACK:
            raise ValueError("shares are parts of the image: each in [0, 1], summing to 1")
        keys = None
        for name, pairs in [*self.maps.items(), *self.per_layer.items()]:
            these = [(p.object, p.role) for p in pairs]
            keys = these if keys is None else keys
            if these != keys:
                raise ValueError(f"{name!r} scores other (object, word) pairs than the others")
            for pair in pairs:
                if not 0 <= pair.object < len(self.found) or not self.found[pair.object]:
                    raise ValueError(f"{name!r} scores object {pair.object}, which was not found")
                if pair.role not in SEGMENTED_WORDS or pair.word not in self.present:
                    raise ValueError(f"{name!r} scores {pair.word!r}, not a caption word")

    @property
    def words(self) -> list[str]:
        """Present words, then absent ones: the order of :attr:`shares`."""
        return [*self.present, *self.absent]

    def mass(self) -> tuple[float, float | None]:
        """Mean share of a present word and of an absent one (None without controls)."""
        n = len(self.present)
        present = sum(self.shares[:n]) / n
        absent = sum(self.shares[n:]) / len(self.absent) if self.absent else None
        return present, absent


@dataclass(frozen=True)
class ItemResult(Record):
    """What computing one item produced, besides its arrays and trace.

    Attributes
    ----------
    metrics : dict of str to float or None
        Metric name -> value (``None`` where it was not finite).
    curves : dict of str to CurveEntry
        ``"<method>@<step>"`` -> its faithfulness curves.
    maps : tuple of MapEntry
        The maps stored in the item's arrays.
    segmentation : SegmentationScores, optional
        Scene-world segmentation scores.
    roles : dict of str to list of float, optional
        Token role -> attention mass per step.
    timesteps : list of int
        The scheduler's timesteps of the generation.
    timing : dict of str to float
        Seconds per part (varies between runs of the same work).
    commitment : tuple of SwitchEntry, optional
        Prompt switches to the caption's swapped twins, one entry per judged attribute.
    concepts : ConceptEntry, optional
        Concept maps of the caption's words scored beside the attention maps.
    skipped : dict of str to str
        Metric -> why it was not computed for this item (a caption outside the scene world).
    """

    metrics: dict[str, float | None] = field(default_factory=dict)
    curves: dict[str, CurveEntry] = field(default_factory=dict)
    maps: tuple[MapEntry, ...] = ()
    segmentation: SegmentationScores | None = None
    roles: dict[str, list[float]] | None = None
    timesteps: list[int] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    commitment: tuple[SwitchEntry, ...] | None = None
    concepts: ConceptEntry | None = None
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class FileEntry(Record):
    """A companion file: its path inside the run folder and its size."""

    path: str
    bytes: int


@dataclass(frozen=True)
class ProcessInfo(Record):
    """Which process computed an item (varies with the launch, never part of the results)."""

    rank: int
    count: int


@dataclass(frozen=True)
class ItemError(Record):
    """Why an item failed."""

    type: str
    message: str
    traceback: str = ""

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"


@dataclass(frozen=True, kw_only=True)
class ItemRecord(ItemResult):
    """The result file of one (prompt id, seed).

    Attributes
    ----------
    format_version : {1, 2}
        2 for records written with digests.
    key, id, prompt : str
        The item key (``<id>__seed<seed>``), the prompt id and the caption.
    seed, offset : int
        Generator seed and the seed offset it came from.
    status : {"ok", "failed"}
        Whether the item was computed.
    digest, settings_digest : str
        :func:`~diffwidget.runs.settings.work_digest` of the work and the run settings'
        digest (``""`` in format 1).
    process : ProcessInfo, optional
        Who computed it.
    error : ItemError, optional
        The error of a failed item.
    files : dict of {"arrays", "trace"} to FileEntry
        Companion files, each checked for its place and size when the record is read.
    """

    format_version: ItemFormat
    key: str
    id: str
    seed: int
    offset: int
    prompt: str
    status: Literal["ok", "failed"]
    digest: str = ""
    settings_digest: str = ""
    process: ProcessInfo | None = None
    error: ItemError | None = None
    files: dict[Companion, FileEntry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.status == "failed") != (self.error is not None):
            raise ValueError('a record has an "error" exactly when its status is "failed"')
        if self.format_version >= ITEM_FORMAT and not self.digest:
            raise ValueError(f"a format-{self.format_version} record needs its digest")
        unknown = sorted(set(self.files) - set(COMPANIONS))
        if unknown:
            raise ValueError(f"files names {unknown}; a record names only {list(COMPANIONS)}")


def result_fields(result: ItemResult) -> dict[str, object]:
    """The fields of ``result``, to build an :class:`ItemRecord` around it."""
    return {f.name: getattr(result, f.name) for f in fields(ItemResult)}


def json_safe(value: Any) -> Any:
    """A JSON value of ``value``: NaN and infinities become ``None``, NumPy scalars and
    tuples their Python forms (method descriptions hold all three)."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
