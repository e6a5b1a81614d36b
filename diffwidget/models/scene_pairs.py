"""Caption pairs that differ in one attribute of one object, for prompt-switch interventions.

A commitment curve asks "if the prompt changes from A to B at step k, which value does the
image end up with?". On the scene world the pair is made automatically: caption B is caption
A with one attribute of one object swapped (colour, shape, size or position), every other
word kept, so that A and B have the same words at the same positions but one or two.

The swapped value is fixed, not random, so that a study is reproducible: colours and shapes
move to the next value of :data:`~diffwidget.models.scenes.COLOURS` /
:data:`~diffwidget.models.scenes.SHAPES` (skipping the other object's colour: two objects of
one colour would merge), sizes flip, and positions go to the opposite side (the centre goes
to the left). In a two-object caption the position of an object is its relation to the
other, so swapping it flips the relation ("left of" becomes "right of").

Examples
--------
>>> pair = swap_attribute("a large red circle on the left", "colour")
>>> pair.caption_b, pair.a_value, pair.b_value
('a large green circle on the left', 'red', 'green')
>>> swap_attribute("a small red circle left of a large blue square", "position").caption_b
'a small red circle right of a large blue square'
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

from diffwidget.models.scenes import (
    CENTRE_PHRASES,
    COLOURS,
    SHAPES,
    SIZES,
    ObjectSpec,
    caption_for,
    caption_words_end_with,
    parse_caption,
)

#: The attributes an object of the scene world has (and a pair can swap).
SceneAttribute = Literal["colour", "shape", "size", "position"]
ATTRIBUTES: tuple[str, ...] = get_args(SceneAttribute)
#: Where a swapped position goes: the opposite side (the centre has none: it goes left).
OPPOSITE_POSITION: dict[str, str] = {
    "left": "right",
    "right": "left",
    "top": "bottom",
    "bottom": "top",
    "centre": "left",
}


@dataclass(frozen=True)
class ScenePair:
    """Two captions that differ in one attribute of one object.

    Attributes
    ----------
    caption_a, caption_b : str
        The caption and its swapped twin (normalised, canonical wording).
    attribute : {"colour", "shape", "size", "position"}
        What differs.
    object_index : int
        Which object of the caption (0 or 1) differs.
    a_value, b_value : str
        The attribute's value in each caption.
    spec_a, spec_b : ObjectSpec
        The changed object as each caption describes it (the judge finds it by these).
    """

    caption_a: str
    caption_b: str
    attribute: str
    object_index: int
    a_value: str
    b_value: str
    spec_a: ObjectSpec
    spec_b: ObjectSpec


def _next(options: tuple[str, ...], value: str, avoid: set[str]) -> str:
    start = options.index(value)
    for offset in range(1, len(options)):
        candidate = options[(start + offset) % len(options)]
        if candidate not in avoid:
            return candidate
    raise ValueError(f"no value other than {value!r} is free among {options}")


def _swapped_specs(specs: list[ObjectSpec], attribute: str, index: int) -> list[ObjectSpec]:
    spec = specs[index]
    if attribute == "position":
        # In a two-object caption both objects move (the relation flips).
        return [replace(s, position=OPPOSITE_POSITION[s.position]) for s in specs]
    if attribute == "colour":
        others = {s.colour for i, s in enumerate(specs) if i != index}
        swapped = replace(spec, colour=_next(COLOURS, spec.colour, others))
    elif attribute == "shape":
        swapped = replace(spec, shape=_next(SHAPES, spec.shape, set()))
    elif spec.size is None:
        raise ValueError(
            "the caption does not name this object's size, so there is no size to swap; "
            "use a caption with a size word (e.g. 'a large red circle on the left')"
        )
    else:
        swapped = replace(spec, size=_next(SIZES, spec.size, set()))
    return [*specs[:index], swapped, *specs[index + 1 :]]


def swap_attribute(caption: str, attribute: str, *, object_index: int = 0) -> ScenePair:
    """Caption ``caption`` with one attribute of one object swapped (see the module docstring).

    Parameters
    ----------
    caption : str
        A caption of the scene-world grammar.
    attribute : {"colour", "shape", "size", "position"}
        What to swap.
    object_index : int
        Which object (0 for the first named, 1 for the second of a two-object caption).

    Returns
    -------
    ScenePair

    Raises
    ------
    ValueError
        For a caption outside the grammar, an unknown attribute, an object the caption does
        not have, or a size the caption does not name.

    Examples
    --------
    >>> swap_attribute("a small blue square at the top", "position").caption_b
    'a small blue square at the bottom'
    """
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; use one of {ATTRIBUTES}")
    specs = parse_caption(caption)
    if isinstance(object_index, bool) or object_index not in range(len(specs)):
        raise ValueError(
            f"object_index must be 0..{len(specs) - 1} for a caption with {len(specs)} "
            f"object(s), got {object_index!r}"
        )
    swapped = _swapped_specs(specs, attribute, object_index)
    centre = next((p for p in CENTRE_PHRASES[1:] if caption_words_end_with(caption, p)), None)
    phrase = {"centre_phrase": centre} if centre else {}
    caption_a, _ = caption_for(specs, **phrase)
    caption_b, _ = caption_for(swapped, **phrase)
    a_spec, b_spec = specs[object_index], swapped[object_index]
    return ScenePair(
        caption_a,
        caption_b,
        attribute,
        object_index,
        str(getattr(a_spec, attribute)),
        str(getattr(b_spec, attribute)),
        a_spec,
        b_spec,
    )


def swap_pairs(caption: str, attributes: tuple[str, ...] = ATTRIBUTES) -> list[ScenePair]:
    """One pair per attribute for the first object of ``caption`` (attributes it cannot swap,
    such as an unnamed size, are left out).

    Examples
    --------
    >>> [p.attribute for p in swap_pairs("a red circle on the left")]
    ['colour', 'shape', 'position']
    """
    pairs = []
    for attribute in attributes:
        try:
            pairs.append(swap_attribute(caption, attribute))
        except ValueError as error:
            if attribute != "size" or "size" not in str(error):
                raise
    return pairs
