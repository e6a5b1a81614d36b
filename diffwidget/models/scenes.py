"""A procedural world of coloured shapes with exact ground truth, for the embedded model.

Every image holds one or two flat-coloured shapes on a light background and comes with a
caption from a small grammar::

    a large red circle on the left
    a small green triangle at the top
    a small red circle left of a large blue square
    a large blue square above a small yellow triangle

The size word is optional ("a red circle on the left" leaves the size open) and the centre
can be said "in the centre" or "in the middle" (and "center", a spelling the tokenizer
normalises, like case and punctuation: see :mod:`diffwidget.models.tokenizer`). Training
captions use these variations (:meth:`SceneWorld.sample` with ``variations=True``).

Because the world is generated, each object carries its colour, shape, size, position, pixel
mask and the indices of the caption words that describe it. Captions for some
(colour, shape, position) combinations never occur in training (:data:`HELD_OUT_TRIPLES`), so
prompt adherence can be measured on combinations the model has not seen.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

Colour = Literal["red", "green", "blue", "yellow", "purple"]
Shape = Literal["circle", "square", "triangle"]
Size = Literal["small", "large"]
Position = Literal["left", "right", "top", "bottom", "centre"]
Relation = Literal["left of", "right of", "above", "below"]

COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

#: Palette, chosen with well separated hues so a reader can tell them apart after decoding.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 200, 30),
    "purple": (150, 60, 190),
}
BACKGROUND = (236, 236, 236)
BACKGROUND_JITTER = 10  # per-image shift of the background grey level (light variation)
COLOUR_JITTER = 8  # per-object, per-channel shift of the palette colour
POSITION_JITTER = 0.05  # fraction of the image size an object centre may move off its anchor

#: Object centres as fractions of the image size (x, y).
ANCHORS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "centre": (0.5, 0.5),
}
#: Half-extent ranges (fraction of image size) per size word; with the jitter, two large
#: objects on opposite anchors never touch.
HALF_EXTENT: dict[str, tuple[float, float]] = {"small": (0.10, 0.125), "large": (0.16, 0.19)}
SQUARE_SCALE = 0.9  # squares are drawn a little smaller so their area is close to a circle's

#: The canonical phrase of each position (captions of the held-out set use these).
POSITION_PHRASE: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "centre": "in the centre",
}
#: Every way a caption can say "in the centre" (the first is the canonical one).
CENTRE_PHRASES: tuple[str, ...] = ("in the centre", "in the middle")
#: Share of objects whose training caption leaves out the size word (``variations=True``).
SIZE_WORD_DROP = 0.25
#: Where the first and second object of a two-object caption stand, per relation.
RELATION_POSITIONS: dict[str, tuple[str, str]] = {
    "left of": ("left", "right"),
    "right of": ("right", "left"),
    "above": ("top", "bottom"),
    "below": ("bottom", "top"),
}

#: (colour, shape, position) combinations excluded from training, in any size and in both
#: one- and two-object scenes. Each colour, shape and position still occurs with others.
HELD_OUT_TRIPLES: frozenset[tuple[str, str, str]] = frozenset(
    {
        ("red", "triangle", "left"),
        ("green", "circle", "top"),
        ("blue", "square", "right"),
        ("yellow", "triangle", "centre"),
        ("purple", "circle", "bottom"),
        ("green", "square", "left"),
    }
)
#: Captions shown to users as examples (each is drawn correctly by both embedded models:
#: ``tests/models/test_examples.py``).
EXAMPLE_CAPTIONS: tuple[str, ...] = (
    "a large red circle on the left",
    "a small red circle left of a large blue square",
)
SUPERSAMPLE = 4  # render at 4x and downsample for anti-aliased edges
_HELD_OUT_SEED_OFFSET = 1_000_003  # evaluation scenes use a stream apart from training ones
_CAPTION_STREAM = 7  # second seed word of the caption-variation stream

#: Every word the grammar can produce (the tokenizer gives each one token).
VOCABULARY: tuple[str, ...] = tuple(
    sorted(
        {"a", *COLOURS, *SHAPES, *SIZES}
        | {w for phrase in (*POSITION_PHRASE.values(), *CENTRE_PHRASES) for w in phrase.split()}
        | {w for rel in RELATIONS for w in rel.split()}
    )
)


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption says about one object (no pixels); ``size`` is None when unsaid."""

    colour: str
    shape: str
    size: str | None
    position: str


@dataclass(frozen=True)
class SceneObject:
    """One rendered object with its ground truth.

    Attributes
    ----------
    colour, shape, size, position : str
        Attribute words (see the module constants).
    mask : np.ndarray
        bool [H, W], the object's pixels (more than half covered).
    words : tuple of int
        Indices into ``caption.split()`` of the words describing this object: its size word
        (when the caption names the size), colour and shape words, and for one-object
        captions the position word. The prompt token index of word ``k`` is ``k + 1`` (the
        tokenizer prepends a start token).
    """

    colour: str
    shape: str
    size: str
    position: str
    mask: np.ndarray
    words: tuple[int, ...]


@dataclass(frozen=True)
class Scene:
    """A caption, its objects and the rendered uint8 [H, W, 3] image."""

    caption: str
    objects: tuple[SceneObject, ...]
    image: np.ndarray


def caption_for(
    specs: list[ObjectSpec] | tuple[ObjectSpec, ...],
    *,
    centre_phrase: str = CENTRE_PHRASES[0],
) -> tuple[str, list[tuple[int, ...]]]:
    """Caption for one or two object specs, with the word indices of each object.

    A spec whose ``size`` is None gets no size word. Two objects must stand in one of
    :data:`RELATION_POSITIONS`' arrangements.

    Parameters
    ----------
    specs : sequence of ObjectSpec
        One or two objects.
    centre_phrase : str
        How a one-object caption says "in the centre" (one of :data:`CENTRE_PHRASES`).

    Examples
    --------
    >>> caption_for([ObjectSpec("red", "circle", None, "centre")], centre_phrase="in the middle")
    ('a red circle in the middle', [(1, 2, 5)])
    """
    if centre_phrase not in CENTRE_PHRASES:
        raise ValueError(f"centre_phrase must be one of {CENTRE_PHRASES}, got {centre_phrase!r}")

    def describe(spec: ObjectSpec, start: int) -> tuple[list[str], tuple[int, ...]]:
        words = [w for w in (spec.size, spec.colour, spec.shape) if w is not None]
        return words, tuple(range(start, start + len(words)))

    if len(specs) == 1:
        (s,) = specs
        phrase = centre_phrase if s.position == "centre" else POSITION_PHRASE[s.position]
        described, indices = describe(s, 1)
        words = ["a", *described, *phrase.split()]
        return " ".join(words), [(*indices, len(words) - 1)]
    if len(specs) == 2:
        first, second = specs
        relation = next(
            (r for r, p in RELATION_POSITIONS.items() if p == (first.position, second.position)),
            None,
        )
        if relation is None:
            raise ValueError(
                f"two objects must be left/right or top/bottom of each other, got "
                f"{first.position!r} and {second.position!r}"
            )
        described, first_indices = describe(first, 1)
        words = ["a", *described, *relation.split(), "a"]
        described, second_indices = describe(second, len(words))
        words += described
        return " ".join(words), [first_indices, second_indices]
    raise ValueError(f"scenes hold one or two objects, got {len(specs)}")


def parse_caption(caption: str) -> list[ObjectSpec]:
    """Object specs described by a caption of the grammar.

    The caption is normalised first as the tokenizer does it (case, punctuation, the
    spelling "center"); a missing size word gives ``size=None``.

    Raises
    ------
    ValueError
        If the caption is not a sentence of the grammar (see the module docstring).

    Examples
    --------
    >>> parse_caption("A red circle, in the center.")
    [ObjectSpec(colour='red', shape='circle', size=None, position='centre')]
    """
    from diffwidget.models.tokenizer import normalise_caption

    words = normalise_caption(caption).split()
    hint = f"expected e.g. {EXAMPLE_CAPTIONS[0]!r} or {EXAMPLE_CAPTIONS[1]!r}"

    def obj(ws: list[str]) -> ObjectSpec | None:
        """The object of 'a [size] colour shape', with the position left empty."""
        if len(ws) == 3:
            ws = [ws[0], "", *ws[1:]]
        if (
            len(ws) != 4
            or ws[0] != "a"
            or ws[1] not in ("", *SIZES)
            or ws[2] not in COLOURS
            or ws[3] not in SHAPES
        ):
            return None
        return ObjectSpec(ws[2], ws[3], ws[1] or None, "")

    phrases = [(p, phrase) for p, phrase in POSITION_PHRASE.items() if p != "centre"]
    phrases += [("centre", phrase) for phrase in CENTRE_PHRASES]
    for position, phrase in phrases:
        tail = phrase.split()
        if words[-len(tail) :] == tail:
            spec = obj(words[: -len(tail)])
            if spec is not None:
                return [replace(spec, position=position)]
    for relation, (p1, p2) in RELATION_POSITIONS.items():
        rel = relation.split()
        for start in (3, 4):
            if words[start : start + len(rel)] == rel:
                first = obj(words[:start])
                second = obj(words[start + len(rel) :])
                if first is not None and second is not None:
                    return [replace(first, position=p1), replace(second, position=p2)]
    raise ValueError(f"cannot parse {caption!r}: {hint}")


def caption_words_end_with(caption: str, phrase: str) -> bool:
    """Whether the normalised ``caption`` ends with the words of ``phrase``."""
    from diffwidget.models.tokenizer import normalise_caption

    tail = phrase.split()
    return normalise_caption(caption).split()[-len(tail) :] == tail


def _is_held_out(spec: ObjectSpec) -> bool:
    return (spec.colour, spec.shape, spec.position) in HELD_OUT_TRIPLES


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        h = r * SQUARE_SCALE
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # Upright isosceles triangle filling its 2r x 2r box.
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    return None


class SceneWorld:
    """Seeded generator of scenes.

    Parameters
    ----------
    seed : int
        Seed of the random stream; the same seed gives the same scenes.
    image_size : int
        Side of the square images in pixels.

    Examples
    --------
    >>> world = SceneWorld(seed=0)
    >>> scene = world.sample(1, n_objects=(1,))[0]
    >>> scene.image.shape, len(scene.objects)
    ((64, 64, 3), 1)
    """

    def __init__(self, seed: int = 0, image_size: int = 64) -> None:
        self.seed = seed
        self.image_size = image_size
        self._rng = np.random.default_rng(seed)
        # Caption variations draw from their own stream, so that ``variations=True`` gives the
        # same images as the canonical captions.
        self._caption_rng = np.random.default_rng([seed, _CAPTION_STREAM])

    # -- sampling ---------------------------------------------------------------------------
    def _random_specs(self, rng: np.random.Generator, n_objects: int) -> list[ObjectSpec]:
        def pick(options: tuple[str, ...]) -> str:
            return options[int(rng.integers(len(options)))]

        if n_objects == 1:
            return [ObjectSpec(pick(COLOURS), pick(SHAPES), pick(SIZES), pick(POSITIONS))]
        p1, p2 = RELATION_POSITIONS[pick(RELATIONS)]
        c1 = pick(COLOURS)
        c2 = pick(tuple(c for c in COLOURS if c != c1))  # distinct colours keep objects apart
        return [
            ObjectSpec(c1, pick(SHAPES), pick(SIZES), p1),
            ObjectSpec(c2, pick(SHAPES), pick(SIZES), p2),
        ]

    def sample(
        self,
        n: int,
        n_objects: tuple[int, ...] = (1, 2),
        *,
        include_held_out: bool = False,
        variations: bool = False,
    ) -> list[Scene]:
        """Draw ``n`` scenes (training distribution: held-out combinations excluded).

        Parameters
        ----------
        n : int
            Number of scenes.
        n_objects : tuple of int
            Object counts to draw from uniformly (1 and/or 2).
        include_held_out : bool
            Also allow the combinations in :data:`HELD_OUT_TRIPLES`.
        variations : bool
            Word captions the ways people type them: each object's size word is left out
            with probability :data:`SIZE_WORD_DROP`, and the centre is said with any of
            :data:`CENTRE_PHRASES`. The images are the same as without variations.
        """
        bad = [k for k in n_objects if k not in (1, 2)]
        if bad or not n_objects:
            raise ValueError(f"n_objects must hold 1 and/or 2, got {n_objects}")
        scenes: list[Scene] = []
        while len(scenes) < n:
            k = n_objects[int(self._rng.integers(len(n_objects)))]
            specs = self._random_specs(self._rng, k)
            if not include_held_out and any(_is_held_out(s) for s in specs):
                continue
            if variations:
                said = [self._caption_rng.random() >= SIZE_WORD_DROP for _ in specs]
                centre = CENTRE_PHRASES[int(self._caption_rng.integers(len(CENTRE_PHRASES)))]
                scenes.append(self._render(specs, self._rng, said, centre))
            else:
                scenes.append(self._render(specs, self._rng))
        return scenes

    def held_out_scenes(
        self, n: int, *, unseen_fraction: float = 0.5, size_words: bool = True
    ) -> list[Scene]:
        """Evaluation scenes, alternating one- and two-object captions.

        A share ``unseen_fraction`` contains a combination from :data:`HELD_OUT_TRIPLES`
        (never seen in training); the rest use seen combinations. The stream is fixed by the
        world's seed and independent of :meth:`sample`. With ``size_words=False`` the
        captions leave every size out (the images, and their ground truth, stay the same).
        """
        rng = np.random.default_rng(self.seed + _HELD_OUT_SEED_OFFSET)
        triples = sorted(HELD_OUT_TRIPLES)
        scenes: list[Scene] = []
        for i in range(n):
            k = 1 + i % 2
            # Deterministic interleaving so any prefix keeps about the requested share.
            want_unseen = int((i // 2 + 1) * unseen_fraction) > int((i // 2) * unseen_fraction)
            while True:
                specs = self._random_specs(rng, k)
                if k == 1 and want_unseen:
                    colour, shape, position = triples[int(rng.integers(len(triples)))]
                    specs = [ObjectSpec(colour, shape, specs[0].size, position)]
                if any(_is_held_out(s) for s in specs) == want_unseen:
                    break
            scenes.append(self._render(specs, rng, [size_words] * len(specs)))
        return scenes

    def held_out_captions(self, n: int, *, unseen_fraction: float = 0.5) -> list[str]:
        """Captions of :meth:`held_out_scenes` (half of them unseen combinations)."""
        return [s.caption for s in self.held_out_scenes(n, unseen_fraction=unseen_fraction)]

    def render_caption(self, caption: str) -> Scene:
        """A scene matching ``caption`` (random jitter, and any unsaid size, from the stream).

        The scene's caption is the normalised, canonical form of ``caption``.
        """
        specs = parse_caption(caption)
        said = [spec.size is not None for spec in specs]
        centre = next(
            (p for p in CENTRE_PHRASES[1:] if caption_words_end_with(caption, p)), CENTRE_PHRASES[0]
        )
        specs = [
            spec if spec.size is not None else replace(spec, size=SIZES[self._rng.integers(2)])
            for spec in specs
        ]
        return self._render(specs, self._rng, said, centre)

    # -- rendering --------------------------------------------------------------------------
    def _render(
        self,
        specs: list[ObjectSpec],
        rng: np.random.Generator,
        size_words: list[bool] | None = None,
        centre_phrase: str = CENTRE_PHRASES[0],
    ) -> Scene:
        size = self.image_size
        big = size * SUPERSAMPLE
        grey = int(
            np.clip(BACKGROUND[0] + rng.integers(-BACKGROUND_JITTER, BACKGROUND_JITTER + 1), 0, 255)
        )
        canvas = Image.new("RGB", (big, big), (grey, grey, grey))
        draw = ImageDraw.Draw(canvas)
        said = size_words if size_words is not None else [True] * len(specs)
        caption, word_sets = caption_for(
            [s if keep else replace(s, size=None) for s, keep in zip(specs, said, strict=True)],
            centre_phrase=centre_phrase,
        )
        objects = []
        for spec, words in zip(specs, word_sets, strict=True):
            if spec.size is None:
                raise ValueError(f"a rendered object needs a size, got {spec}")
            ax, ay = ANCHORS[spec.position]
            jx, jy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
            lo, hi = HALF_EXTENT[spec.size]
            r = rng.uniform(lo, hi) * big
            cx, cy = (ax + jx) * big, (ay + jy) * big
            base = np.array(PALETTE[spec.colour])
            colour = tuple(
                int(v)
                for v in np.clip(base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3), 0, 255)
            )
            mask_img = Image.new("L", (big, big), 0)
            mask_draw = ImageDraw.Draw(mask_img)
            polygon = _shape_polygon(spec.shape, cx, cy, r)
            for target, fill in ((draw, colour), (mask_draw, 255)):
                if polygon is None:
                    target.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
                else:
                    target.polygon(polygon, fill=fill)
            coverage = np.asarray(mask_img.resize((size, size), Image.Resampling.BOX))
            objects.append(
                SceneObject(
                    spec.colour, spec.shape, spec.size, spec.position, coverage > 127, tuple(words)
                )
            )
        image = np.asarray(canvas.resize((size, size), Image.Resampling.BOX), dtype=np.uint8).copy()
        return Scene(caption, tuple(objects), image)
