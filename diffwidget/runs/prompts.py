"""Prompt sources of a run: a text file, a JSONL file, or scene-world captions.

Every source becomes a list of :class:`PromptItem` with a unique, file-safe id. Items whose
caption is a sentence of the scene-world grammar carry the ground truth the scene metrics
need (the objects a caption names and the words that name them) and token roles
(subject / relation / object). Nothing here imports torch.

Sources
-------
``captions.txt``
    One caption a line; blank lines and lines starting with ``#`` are skipped. The id is
    ``line`` and the 1-based line number (``line00007``).
``prompts.jsonl``
    One JSON object a line: ``{"id": "dog-1", "prompt": "a dog on grass", "labels":
    {"dog": "yes"}, "roles": {"subject": [1]}, "seed": 1}``; only ``prompt`` is required
    (the id defaults to the line number). ``roles`` give word indices into
    ``prompt.split()``; ``labels`` feed the concept probes.

Both files are UTF-8 split on ``\n`` only (see :mod:`~diffwidget.runs.prompt_files` for
what is checked); ids are unique also ignoring case, since they name files.
``scene:N``
    ``N`` held-out scene-world captions (half of them combinations never seen in training),
    ids ``scene00000`` ... (:meth:`~diffwidget.models.scenes.SceneWorld.held_out_scenes`).
``scene-train:N``
    ``N`` captions from the training distribution, ids ``train00000`` ...; a split apart
    from ``scene:N`` for choosing settings before confirming them on held-out captions.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffwidget.records import Record
from diffwidget.runs.prompt_files import (
    JSONL_EXAMPLE,
    MAX_PROMPTS,
    MAX_SEED,
    PromptLine,
    PromptSourceError,
    caption_text,
    check_id,
    check_int,
    check_labels,
    check_roles,
    check_text,
    jsonl_line,
    read_lines,
)

#: Scene-world sources: ``scene:N`` (held-out) and ``scene-train:N`` (training distribution).
SCENE_PREFIX = "scene:"
SCENE_TRAIN_PREFIX = "scene-train:"
#: World seed of both scene sources; the held-out stream is apart from the training one.
SCENE_WORLD_SEED = 0
#: World seed of the training split (a stream apart from the one the model was trained on).
SCENE_TRAIN_SEED = 7
ROLE_NAMES: tuple[str, ...] = ("subject", "relation", "object")
_SCENE_COUNT = re.compile(r"[0-9]{1,9}")
#: Generator seeds derived from item ids stay below this (torch accepts any 64-bit seed;
#: 31 bits keep them readable and portable).
SEED_MODULUS = 2**31


@dataclass(frozen=True)
class SceneTruth(Record):
    """What a scene-world caption says about one object, and which words say it.

    Attributes
    ----------
    colour, shape, size, position : str
        The attribute words (``size`` is None when the caption leaves it out).
    words : dict of str to int
        Attribute -> index into ``prompt.split()`` of the word naming it
        (``"colour"``, ``"shape"``, ``"size"``).
    """

    colour: str
    shape: str
    size: str | None
    position: str
    words: dict[str, int]


@dataclass(frozen=True)
class PromptItem(Record):
    """One prompt of a run.

    Attributes
    ----------
    id : str
        Unique and file-safe (letters, digits, ``.``, ``_``, ``-``).
    prompt : str
        The caption.
    labels : dict of str to str
        Concept labels for the probes (``{}`` when none).
    roles : dict of str to list of int
        Role name -> word indices into ``prompt.split()``.
    objects : tuple of SceneTruth
        Scene-world ground truth, empty for captions outside the grammar.
    seed : int, optional
        Base generator seed given by the source; otherwise derived from ``id``.

    Raises
    ------
    PromptSourceError
        For an id that is not file-safe, an empty prompt, word indices outside the prompt or
        a seed out of range (also when read back from a run manifest).
    """

    id: str
    prompt: str
    labels: dict[str, str] = field(default_factory=dict)
    roles: dict[str, list[int]] = field(default_factory=dict)
    objects: tuple[SceneTruth, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        where = f"prompt {self.id!r}"
        check_id(where, self.id)
        if not check_text(where, "the prompt", self.prompt).strip():
            raise PromptSourceError(f"{where}: the prompt is empty")
        check_labels(where, self.labels)
        n_words = len(self.prompt.split())
        if self.roles:
            check_roles(where, self.roles, n_words)
        for truth in self.objects:
            if not all(0 <= i < n_words for i in truth.words.values()):
                raise PromptSourceError(f"{where}: scene-object words {truth.words} outside it")
        if self.seed is not None:
            check_int(where, "the seed", self.seed, 0, MAX_SEED)

    def generator_seed(self, offset: int = 0) -> int:
        """The seed of this item's generation number ``offset``.

        Derived from the id (CRC-32), so it never depends on how items are split over
        processes; a seed given by the source is used as the base instead.

        Examples
        --------
        >>> item = PromptItem("circle-1", "a red circle")
        >>> item.generator_seed(0) == PromptItem("circle-1", "another prompt").generator_seed(0)
        True
        >>> PromptItem("p", "a red circle", seed=1).generator_seed(2)
        3
        """
        base = self.seed if self.seed is not None else zlib.crc32(self.id.encode())
        return int((base + offset) % SEED_MODULUS)


def scene_ground_truth(prompt: str) -> tuple[tuple[SceneTruth, ...], dict[str, list[int]]]:
    """Objects and roles of a scene-world caption; ``((), {})`` outside the grammar.

    One-object captions have a subject (size, colour, shape) and a relation (the position
    phrase); two-object captions a subject, a relation and an object.

    Examples
    --------
    >>> objects, roles = scene_ground_truth("a small red circle left of a large blue square")
    >>> [o.colour for o in objects], roles["relation"]
    (['red', 'blue'], [4, 5])
    """
    from diffwidget.models.scenes import CENTRE_PHRASES, caption_for, parse_caption

    try:
        specs = parse_caption(prompt)
    except ValueError:
        return (), {}
    for phrase in CENTRE_PHRASES:  # "in the centre" or "in the middle"
        caption, word_sets = caption_for(specs, centre_phrase=phrase)
        if caption.split() == prompt.lower().split():
            break
    else:
        return (), {}
    objects = tuple(
        SceneTruth(s.colour, s.shape, s.size, s.position, _word_indices(s, w))
        for s, w in zip(specs, word_sets, strict=True)
    )
    n_words = len(caption.split())
    subject = sorted(objects[0].words.values())
    after_subject = subject[-1] + 1
    if len(specs) == 1:
        return objects, {"subject": subject, "relation": list(range(after_subject, n_words))}
    second = list(word_sets[1])
    # The relation words sit between the subject and the second object's article.
    return objects, {
        "subject": subject,
        "relation": list(range(after_subject, second[0] - 1)),
        "object": second,
    }


def _word_indices(spec: Any, indices: tuple[int, ...]) -> dict[str, int]:
    """Attribute -> word index for one object; a caption without a size word has none."""
    named = [a for a in ("size", "colour", "shape") if getattr(spec, a) is not None]
    return dict(zip(named, indices, strict=False))


def _scene_labels(objects: tuple[SceneTruth, ...]) -> dict[str, str]:
    """Concept labels of one-object captions (two-object captions give none)."""
    if len(objects) != 1:
        return {}
    o = objects[0]
    labels = {"colour": o.colour, "shape": o.shape, "size": o.size, "position": o.position}
    return {k: v for k, v in labels.items() if v is not None}


def _item(
    item_id: str,
    prompt: str,
    *,
    labels: dict[str, str] | None = None,
    roles: dict[str, list[int]] | None = None,
    seed: int | None = None,
) -> PromptItem:
    objects, scene_roles = scene_ground_truth(prompt)
    return PromptItem(
        id=item_id,
        prompt=prompt,
        labels=labels if labels is not None else _scene_labels(objects),
        roles=roles if roles is not None else scene_roles,
        objects=objects,
        seed=seed,
    )


def _scene_items(spec: str) -> list[PromptItem]:
    from diffwidget.models.scenes import SceneWorld

    train = spec.startswith(SCENE_TRAIN_PREFIX)
    prefix = SCENE_TRAIN_PREFIX if train else SCENE_PREFIX
    text = spec[len(prefix) :]
    if not _SCENE_COUNT.fullmatch(text) or not 1 <= int(text) <= MAX_PROMPTS:
        raise PromptSourceError(
            f"{spec!r}: write {prefix}N with a positive whole number N (at most "
            f"{MAX_PROMPTS}), e.g. {prefix}50"
        )
    n = int(text)
    if train:
        scenes = SceneWorld(seed=SCENE_TRAIN_SEED).sample(n)
        return [_item(f"train{i:05d}", s.caption) for i, s in enumerate(scenes)]
    scenes = SceneWorld(seed=SCENE_WORLD_SEED).held_out_scenes(n)
    return [_item(f"scene{i:05d}", s.caption) for i, s in enumerate(scenes)]


def _line_item(line: PromptLine) -> PromptItem:
    return _item(
        line.id if line.id is not None else f"line{line.number:05d}",
        line.prompt,
        labels=line.labels,
        roles=line.roles,
        seed=line.seed,
    )


def _jsonl_items(path: Path) -> Iterator[tuple[str, PromptItem]]:
    for number, text in read_lines(path):
        if text.strip():
            where = f"{path}:{number}"
            yield where, _line_item(jsonl_line(where, number, text))


def _text_items(path: Path) -> Iterator[tuple[str, PromptItem]]:
    for number, text in read_lines(path):
        caption = text.strip()
        if caption and not caption.startswith("#"):
            yield f"{path}:{number}", _item(f"line{number:05d}", caption)


def _check_items(source: str, found: Iterable[tuple[str, PromptItem]]) -> list[PromptItem]:
    """The items, refused with the place of the first problem: empty prompts, ids that are
    not file-safe or that collide (ids differing only in case name one file on macOS and
    Windows), or more than ``MAX_PROMPTS`` items."""
    items: list[PromptItem] = []
    seen: dict[str, tuple[str, str]] = {}
    for where, item in found:
        if len(items) == MAX_PROMPTS:
            raise PromptSourceError(
                f"{source} holds more than {MAX_PROMPTS} prompts; split it into several runs"
            )
        folded = item.id.casefold()
        if folded in seen:
            first_where, first_id = seen[folded]
            ids = [item.id] if first_id == item.id else [first_id, item.id]
            case = "" if first_id == item.id else " (the same up to case)"
            raise PromptSourceError(
                f"{where}: duplicated ids {ids}{case}, first at {first_where}; ids must be "
                "unique, also ignoring case (they name files)"
            )
        seen[folded] = (where, item.id)
        items.append(item)
    if not items:
        raise PromptSourceError(f"{source} holds no prompts; write one caption a line")
    return items


def load_prompts(source: str | Path | Sequence[str]) -> list[PromptItem]:
    """Read a prompt source (see the module docstring) into items.

    Parameters
    ----------
    source : str, Path or sequence of str
        ``scene:N``, ``scene-train:N``, a ``.jsonl`` file, a text file, or a list of
        captions (ids ``p00000`` ...).

    Raises
    ------
    PromptSourceError
        For a missing or empty file, a bad line (with its line number: not UTF-8, too long,
        a JSONL field of the wrong type), ids that are duplicated (also up to case) or not
        file-safe.

    Examples
    --------
    >>> items = load_prompts("scene:2")
    >>> [i.id for i in items], len(items[0].objects)
    (['scene00000', 'scene00001'], 1)
    """
    if not isinstance(source, (str, Path)):
        captions = (
            (
                f"prompts[{k}]",
                _item(f"p{k:05d}", caption_text(f"prompts[{k}]", c)),
            )
            for k, c in enumerate(source)
        )
        return _check_items("prompts", captions)
    text = str(source)
    if text.startswith((SCENE_PREFIX, SCENE_TRAIN_PREFIX)):
        return _check_items(text, ((text, item) for item in _scene_items(text)))
    path = Path(text).expanduser()
    if not path.is_file():
        raise PromptSourceError(
            f"no prompt file {path}; pass a text file (one caption a line), a .jsonl file, "
            "or scene:N for N scene-world captions"
        )
    suffix = path.suffix.lower()
    if suffix == ".json":
        raise PromptSourceError(
            f"{path}: a .json file is not a prompt source; write JSONL (a .jsonl file, one "
            f"object a line, e.g. {JSONL_EXAMPLE}) or a text file of captions"
        )
    found = _jsonl_items(path) if suffix == ".jsonl" else _text_items(path)
    return _check_items(str(path), found)
