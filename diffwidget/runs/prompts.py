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
``scene:N``
    ``N`` held-out scene-world captions (half of them combinations never seen in training),
    ids ``scene00000`` ... (:meth:`~diffwidget.models.scenes.SceneWorld.held_out_scenes`).
``scene-train:N``
    ``N`` captions from the training distribution, ids ``train00000`` ...; a split apart
    from ``scene:N`` for choosing settings before confirming them on held-out captions.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Scene-world sources: ``scene:N`` (held-out) and ``scene-train:N`` (training distribution).
SCENE_PREFIX = "scene:"
SCENE_TRAIN_PREFIX = "scene-train:"
#: World seed of both scene sources; the held-out stream is apart from the training one.
SCENE_WORLD_SEED = 0
#: World seed of the training split (a stream apart from the one the model was trained on).
SCENE_TRAIN_SEED = 7
ROLE_NAMES: tuple[str, ...] = ("subject", "relation", "object")
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
#: Generator seeds derived from item ids stay below this (torch accepts any 64-bit seed;
#: 31 bits keep them readable and portable).
SEED_MODULUS = 2**31
_JSONL_KEYS = frozenset({"id", "prompt", "labels", "roles", "seed"})


class PromptSourceError(ValueError):
    """A prompt source that cannot be read; the message says how to fix it."""


@dataclass(frozen=True)
class SceneTruth:
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
class PromptItem:
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
    """

    id: str
    prompt: str
    labels: dict[str, str] = field(default_factory=dict)
    roles: dict[str, list[int]] = field(default_factory=dict)
    objects: tuple[SceneTruth, ...] = ()
    seed: int | None = None

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

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready record (the run manifest stores one per item)."""
        return {
            "id": self.id,
            "prompt": self.prompt,
            "labels": dict(self.labels),
            "roles": {k: list(v) for k, v in self.roles.items()},
            "objects": [
                {
                    "colour": o.colour,
                    "shape": o.shape,
                    "size": o.size,
                    "position": o.position,
                    "words": dict(o.words),
                }
                for o in self.objects
            ],
            "seed": self.seed,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PromptItem:
        """Inverse of :meth:`to_json`."""
        return cls(
            id=str(data["id"]),
            prompt=str(data["prompt"]),
            labels={str(k): str(v) for k, v in data.get("labels", {}).items()},
            roles={str(k): [int(i) for i in v] for k, v in data.get("roles", {}).items()},
            objects=tuple(
                SceneTruth(o["colour"], o["shape"], o["size"], o["position"], dict(o["words"]))
                for o in data.get("objects", [])
            ),
            seed=data.get("seed"),
        )


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
    if not text.isdigit() or int(text) < 1:
        raise PromptSourceError(
            f"{spec!r}: write {prefix}N with a positive whole number N, e.g. {prefix}50"
        )
    n = int(text)
    if train:
        scenes = SceneWorld(seed=SCENE_TRAIN_SEED).sample(n)
        return [_item(f"train{i:05d}", s.caption) for i, s in enumerate(scenes)]
    scenes = SceneWorld(seed=SCENE_WORLD_SEED).held_out_scenes(n)
    return [_item(f"scene{i:05d}", s.caption) for i, s in enumerate(scenes)]


def _check_words(where: str, prompt: str, indices: Sequence[Any], what: str) -> list[int]:
    n_words = len(prompt.split())
    if not isinstance(indices, list) or not all(isinstance(i, int) for i in indices):
        raise PromptSourceError(f"{where}: {what} must be a list of word indices (integers)")
    bad = [i for i in indices if not 0 <= i < n_words]
    if bad:
        raise PromptSourceError(
            f"{where}: {what} has word indices {bad} outside 0..{n_words - 1} "
            f"(indices into the prompt's {n_words} words)"
        )
    return list(indices)


def _jsonl_items(path: Path, lines: list[str]) -> list[PromptItem]:
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptSourceError(f"{where}: not valid JSON ({error.msg})") from None
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), str):
            raise PromptSourceError(
                f'{where}: each line must be an object with a "prompt" string, e.g. '
                '{"id": "p1", "prompt": "a red circle", "labels": {"colour": "red"}}'
            )
        unknown = sorted(set(data) - _JSONL_KEYS)
        if unknown:
            raise PromptSourceError(
                f"{where}: unknown keys {unknown}; use only {sorted(_JSONL_KEYS)}"
            )
        labels = data.get("labels")
        if labels is not None and not isinstance(labels, dict):
            raise PromptSourceError(f'{where}: "labels" must map concept names to labels')
        roles = data.get("roles")
        if roles is not None:
            if not isinstance(roles, dict):
                raise PromptSourceError(f'{where}: "roles" must map role names to word indices')
            roles = {
                str(k): _check_words(where, data["prompt"], v, f"role {k!r}")
                for k, v in roles.items()
            }
        seed = data.get("seed")
        if seed is not None and (not isinstance(seed, int) or seed < 0):
            raise PromptSourceError(f'{where}: "seed" must be a non-negative integer')
        items.append(
            _item(
                str(data.get("id", f"line{number:05d}")),
                data["prompt"].strip(),
                labels={str(k): str(v) for k, v in labels.items()} if labels else None,
                roles=roles,
                seed=seed,
            )
        )
    return items


def _check_items(items: list[PromptItem], source: str) -> list[PromptItem]:
    if not items:
        raise PromptSourceError(f"{source} holds no prompts; write one caption a line")
    empty = [i.id for i in items if not i.prompt.strip()]
    if empty:
        raise PromptSourceError(f"{source}: empty prompts for ids {empty[:5]}")
    bad = [i.id for i in items if not _ID_PATTERN.match(i.id)]
    if bad:
        raise PromptSourceError(
            f"{source}: ids {bad[:5]} are not file-safe; use letters, digits, '.', '_' and "
            "'-' (at most 100 characters, starting with a letter or digit)"
        )
    seen: dict[str, int] = {}
    for item in items:
        seen[item.id] = seen.get(item.id, 0) + 1
    duplicates = sorted(k for k, v in seen.items() if v > 1)
    if duplicates:
        raise PromptSourceError(f"{source}: duplicated ids {duplicates[:5]}; ids must be unique")
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
        For a missing or empty file, a bad JSONL line (with its line number), ids that are
        duplicated or not file-safe.

    Examples
    --------
    >>> items = load_prompts("scene:2")
    >>> [i.id for i in items], len(items[0].objects)
    (['scene00000', 'scene00001'], 1)
    """
    if not isinstance(source, (str, Path)):
        captions = [str(c).strip() for c in source]
        return _check_items([_item(f"p{i:05d}", c) for i, c in enumerate(captions)], "prompts")
    text = str(source)
    if text.startswith((SCENE_PREFIX, SCENE_TRAIN_PREFIX)):
        return _check_items(_scene_items(text), text)
    path = Path(text).expanduser()
    if not path.is_file():
        raise PromptSourceError(
            f"no prompt file {path}; pass a text file (one caption a line), a .jsonl file, "
            "or scene:N for N scene-world captions"
        )
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise PromptSourceError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    if path.suffix.lower() == ".jsonl":
        return _check_items(_jsonl_items(path, lines), str(path))
    items = [
        _item(f"line{number:05d}", line.strip())
        for number, line in enumerate(lines, start=1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    return _check_items(items, str(path))
