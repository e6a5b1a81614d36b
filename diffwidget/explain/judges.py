"""Judges: did a final image keep prompt A's value of an attribute, take B's, or neither?

An intervention (a prompt switch, a word ablation, a patched activation) ends in final
images; a :class:`Judge` says for each image which prompt's value of one attribute it shows.

**The protocol of a judge function** (what you pass for a real model): a callable
``read(image) -> label | score | None`` taking one image as ``uint8`` ``(H, W, 3)`` RGB, and

* returning a **label** (``str``): the image keeps A when the label equals ``a_value``, takes
  B when it equals ``b_value``, and is ``"other"`` for any other label (e.g. a VQA model's
  answer "green" when A said red and B said blue);
* or returning a **score** (``float``, higher = more like B, e.g. a classifier's probability
  of B's value): the image takes B when ``score >= threshold``, else keeps A; pass
  ``threshold`` to the :class:`Judge`;
* or returning ``None`` (or NaN) when it cannot tell: counted as ``"other"``.

It must be deterministic (the same image, the same answer) and must not keep state between
calls; nothing is downloaded for it. Exceptions it raises stop the method, with the judge's
name in the message.

On the embedded models' scene world, :func:`scene_judges` builds exact judges from the two
captions: :class:`~diffwidget.models.reader.SceneReader` reads every object's colour, shape,
size and position from the pixels, and the judged object is found by its other attributes.

Examples
--------
>>> import numpy as np
>>> def redness(image):  # a deterministic fake judge: which channel dominates?
...     return "red" if image[..., 0].mean() > image[..., 2].mean() else "blue"
>>> judge = Judge("colour", "red", "blue", redness)
>>> image = np.zeros((8, 8, 3), np.uint8); image[..., 2] = 200
>>> judge.outcome(image)
'b'
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np

if TYPE_CHECKING:
    from diffwidget.models.scenes import ObjectSpec

#: Where one final image lands: keeps A's value, takes B's, or neither (unreadable included).
Outcome = Literal["a", "b", "other"]
OUTCOMES: tuple[str, ...] = get_args(Outcome)
#: Outcome codes as stored in result arrays (index into :data:`OUTCOMES`).
OUTCOME_CODE: dict[str, int] = {name: i for i, name in enumerate(OUTCOMES)}
#: What a judge function returns for one image.
JudgeValue = str | float | None
JudgeFunction = Callable[[np.ndarray], JudgeValue]


class JudgeError(TypeError):
    """A judge function broke the protocol (see the module docstring)."""


@dataclass(frozen=True)
class Judge:
    """Judges one attribute of final images against prompt A's and prompt B's values.

    Parameters
    ----------
    attribute : str
        What is judged (``"colour"``; a name for results and plots).
    a_value : str
        The attribute's value under prompt A.
    b_value : str or None
        Its value under prompt B; None when only "does the image keep A's value?" is asked
        (a removed word): every other answer is then ``"other"``.
    read : callable
        ``read(image) -> label | score | None`` (see the module docstring).
    threshold : float, optional
        For score judges: a score at or above it takes B. Labels need none.
    exact : bool
        Whether the judge is exact by construction (the scene-world reader); stated in
        results.
    name : str
        How results name the judge (default: the function's name).

    Examples
    --------
    >>> judge = Judge("dog", "no dog", "dog", lambda image: 0.8, threshold=0.5)
    >>> judge.outcome(np.zeros((4, 4, 3), np.uint8))
    'b'
    """

    attribute: str
    a_value: str
    b_value: str | None
    read: JudgeFunction
    threshold: float | None = None
    exact: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        if not callable(self.read):
            raise TypeError(
                f"the judge of {self.attribute!r} needs a callable read(image) -> label or "
                f"score, got {type(self.read).__name__}"
            )
        if not isinstance(self.a_value, str) or not isinstance(self.b_value, (str, type(None))):
            raise TypeError("a_value and b_value are the attribute's values as text")
        if self.a_value == self.b_value:
            raise ValueError(
                f"prompt A and prompt B give {self.attribute!r} the same value "
                f"{self.a_value!r}: nothing to judge; pick prompts that differ in it"
            )
        if self.threshold is not None and not (
            isinstance(self.threshold, (int, float))
            and not isinstance(self.threshold, bool)
            and math.isfinite(self.threshold)
        ):
            raise TypeError(f"threshold must be a finite number, got {self.threshold!r}")
        if not self.name:
            object.__setattr__(
                self, "name", getattr(self.read, "__name__", type(self.read).__name__)
            )

    def outcome(self, image: np.ndarray) -> Outcome:
        """Where ``image`` (uint8 ``(H, W, 3)``) lands: ``"a"``, ``"b"`` or ``"other"``.

        Raises
        ------
        JudgeError
            When the function returns something else than a label, a score or None, or a
            score without a threshold.
        """
        value = self.read(image)
        if value is None:
            return "other"
        if isinstance(value, str):
            if value == self.a_value:
                return "a"
            return "b" if self.b_value is not None and value == self.b_value else "other"
        if isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_)):
            score = float(value)
            if self.threshold is None:
                raise JudgeError(
                    f"the judge {self.name!r} returned the score {score!r}; a score judge needs "
                    "a threshold (Judge(..., threshold=0.5): a score at or above it takes B)"
                )
            if math.isnan(score):
                return "other"
            return "b" if score >= self.threshold else "a"
        raise JudgeError(
            f"the judge {self.name!r} returned a {type(value).__name__}; a judge returns a "
            "label (str), a score (float) or None for each image"
        )

    def outcomes(self, images: np.ndarray) -> np.ndarray:
        """Outcome codes (:data:`OUTCOME_CODE`) of a stack of images ``(n, H, W, 3)``, int8."""
        return np.array([OUTCOME_CODE[self.outcome(image)] for image in images], dtype=np.int8)


# ---------------------------------------------------------------------------- scene world
@dataclass(frozen=True)
class SceneAttributeReader:
    """Reads one attribute of one caption object from a scene-world image (exact).

    The object is the largest one in a one-object caption; in a two-object caption, the read
    object that agrees with ``spec`` on most of the *other* attributes (ties: the larger).
    Returns None when no object is read.
    """

    attribute: str
    spec: ObjectSpec
    n_objects: int = 1

    @property
    def __name__(self) -> str:  # judges name their function
        return f"scene reader ({self.attribute})"

    def __call__(self, image: np.ndarray) -> str | None:
        from diffwidget.models.reader import SceneReader

        objects = SceneReader().read(np.asarray(image))
        if not objects:
            return None
        others = [a for a in ("colour", "shape", "size", "position") if a != self.attribute]

        def agreement(obj: object) -> tuple[int, int]:
            said = [getattr(self.spec, a) for a in others]
            read = [getattr(obj, a) for a in others]
            matches = sum(s is not None and s == r for s, r in zip(said, read, strict=True))
            return (matches if self.n_objects > 1 else 0, int(obj.mask.sum()))  # type: ignore[attr-defined]

        return str(getattr(max(objects, key=agreement), self.attribute))


def scene_judges(caption_a: str, caption_b: str) -> list[Judge]:
    """Exact judges for every attribute in which two scene-world captions differ.

    One judge per attribute, for the first object that differs in it (a flipped relation
    moves both objects: the first is judged).

    Raises
    ------
    ValueError
        When a caption is outside the grammar, the captions describe different numbers of
        objects, or they do not differ at all.

    Examples
    --------
    >>> [(j.attribute, j.a_value, j.b_value) for j in scene_judges(
    ...     "a large red circle on the left", "a large blue circle on the right")]
    [('colour', 'red', 'blue'), ('position', 'left', 'right')]
    """
    from diffwidget.models.scenes import parse_caption

    specs_a, specs_b = parse_caption(caption_a), parse_caption(caption_b)
    if len(specs_a) != len(specs_b):
        raise ValueError(
            f"{caption_a!r} describes {len(specs_a)} object(s) and {caption_b!r} "
            f"{len(specs_b)}; compare captions of the same objects"
        )
    judges = []
    for attribute in ("colour", "shape", "size", "position"):
        for spec_a, spec_b in zip(specs_a, specs_b, strict=True):
            a, b = getattr(spec_a, attribute), getattr(spec_b, attribute)
            if a is None or b is None or a == b:
                continue
            reader = SceneAttributeReader(attribute, spec_a, len(specs_a))
            judges.append(
                Judge(attribute, str(a), str(b), reader, exact=True, name=reader.__name__)
            )
            break
    if not judges:
        raise ValueError(
            f"{caption_a!r} and {caption_b!r} name the same objects with the same attributes "
            "(sizes left unsaid are not compared); nothing to judge"
        )
    return judges


def check_judges(judges: Judge | Sequence[Judge]) -> list[Judge]:
    """A non-empty list of :class:`Judge` with distinct attribute names, or a clear error."""
    items = [judges] if isinstance(judges, Judge) else list(judges)
    if not items:
        raise ValueError("give at least one judge (scene_judges(a, b) on the scene world)")
    bad = [type(j).__name__ for j in items if not isinstance(j, Judge)]
    if bad:
        raise TypeError(
            f"judges must be Judge objects, got {bad}; wrap a function as "
            "Judge('colour', 'red', 'blue', read=my_function)"
        )
    names = [j.attribute for j in items]
    if len(set(names)) != len(names):
        raise ValueError(f"two judges share an attribute name: {names}")
    return items


def replace_word(prompt: str, word: str, replacement: str) -> str:
    """``prompt`` with the whole word ``word`` replaced by ``replacement`` (every occurrence).

    Examples
    --------
    >>> replace_word("a red circle on the left", "red", "blue")
    'a blue circle on the left'
    """
    for name, value in (("word", word), ("replacement", replacement)):
        if not isinstance(value, str) or not value.strip() or len(value.split()) != 1:
            raise ValueError(f"{name} must be one word, got {value!r}")
    pattern = re.compile(rf"(?<!\w){re.escape(word.strip())}(?!\w)", re.IGNORECASE)
    if not pattern.search(prompt):
        raise ValueError(f"{prompt!r} has no word {word!r}")
    # A function, not a template: a typed backslash or "\\g<0>" stays text.
    return pattern.sub(lambda _match: replacement.strip(), prompt)


def scene_word_judges(caption: str, word: str, replacement: str | None = None) -> list[Judge]:
    """Exact judges of the attribute a scene-world ``word`` names ("red": the colour).

    With a ``replacement`` the judge tells A's value from the replacement's; without one it
    asks only whether the image keeps ``word``'s value (``b_value`` None).

    Examples
    --------
    >>> [(j.attribute, j.a_value, j.b_value) for j in scene_word_judges(
    ...     "a large red circle on the left", "red")]
    [('colour', 'red', None)]
    """
    from diffwidget.models.scenes import parse_caption

    if replacement is not None:
        return scene_judges(caption, replace_word(caption, word, replacement))
    specs = parse_caption(caption)
    target = word.strip().lower()
    for spec in specs:
        for attribute in ("colour", "shape", "size", "position"):
            if getattr(spec, attribute) == target:
                reader = SceneAttributeReader(attribute, spec, len(specs))
                return [Judge(attribute, target, None, reader, exact=True, name=reader.__name__)]
    raise ValueError(
        f"{word!r} names no colour, shape, size or position of {caption!r}; pass judges=[...]"
    )
