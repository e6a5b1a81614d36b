"""The scene world: seeded, and its ground truth agrees with its pixels and captions."""

from __future__ import annotations

import numpy as np
import pytest

from diffwidget.models.scenes import (
    ANCHORS,
    CENTRE_PHRASES,
    COLOURS,
    HALF_EXTENT,
    HELD_OUT_TRIPLES,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZE_WORD_DROP,
    SIZES,
    ObjectSpec,
    SceneWorld,
    caption_for,
    parse_caption,
)

IMAGE_SIZE = 64
#: Share of its bounding box each shape fills (circle pi/4, square 1, triangle 1/2).
FILL_RATIO = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
FILL_TOLERANCE = 0.12
COLOUR_TOLERANCE = 30  # palette jitter is 8 per channel; anti-aliasing is outside the mask core


@pytest.fixture(scope="module")
def scenes() -> list:
    return SceneWorld(seed=7).sample(120, include_held_out=True)


def test_vocabulary_sizes() -> None:
    assert len(COLOURS) >= 5
    assert set(SHAPES) >= {"circle", "square", "triangle"}
    assert len(SIZES) == 2
    assert set(POSITIONS) == set(ANCHORS)


def test_same_seed_same_scenes_other_seed_differs() -> None:
    a = SceneWorld(seed=3).sample(6)
    b = SceneWorld(seed=3).sample(6)
    c = SceneWorld(seed=4).sample(6)
    assert [s.caption for s in a] == [s.caption for s in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b, strict=True))
    assert any(not np.array_equal(x.image, y.image) for x, y in zip(a, c, strict=True))


def test_images_are_uint8_rgb(scenes: list) -> None:
    for scene in scenes:
        assert scene.image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3)
        assert scene.image.dtype == np.uint8
        assert len(scene.objects) in (1, 2)


def test_masks_match_colour_position_size_and_shape(scenes: list) -> None:
    for scene in scenes:
        for obj in scene.objects:
            ys, xs = np.nonzero(obj.mask)
            inner = scene.image[obj.mask].astype(float)
            median = np.median(inner, axis=0)
            assert np.abs(median - PALETTE[obj.colour]).max() < COLOUR_TOLERANCE, scene.caption
            cx = (xs.min() + xs.max() + 1) / 2 / IMAGE_SIZE
            cy = (ys.min() + ys.max() + 1) / 2 / IMAGE_SIZE
            nearest = min(
                ANCHORS, key=lambda p: (ANCHORS[p][0] - cx) ** 2 + (ANCHORS[p][1] - cy) ** 2
            )
            assert nearest == obj.position, scene.caption
            height = (ys.max() - ys.min() + 1) / IMAGE_SIZE
            lo, hi = HALF_EXTENT[obj.size]
            assert 2 * lo * 0.85 <= height <= 2 * hi + 2 / IMAGE_SIZE, (scene.caption, height)
            box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
            fill = obj.mask.sum() / box
            assert abs(fill - FILL_RATIO[obj.shape]) < FILL_TOLERANCE, (scene.caption, fill)


def test_two_objects_do_not_overlap(scenes: list) -> None:
    pairs = [s for s in scenes if len(s.objects) == 2]
    assert pairs
    for scene in pairs:
        a, b = scene.objects
        assert not (a.mask & b.mask).any(), scene.caption
        assert a.colour != b.colour


def test_caption_words_point_at_the_right_object(scenes: list) -> None:
    for scene in scenes:
        words = scene.caption.split()
        for obj in scene.objects:
            named = [words[i] for i in obj.words]
            assert named[:3] == [obj.size, obj.colour, obj.shape], scene.caption
            if len(scene.objects) == 1:
                assert named[3] == obj.position
        parsed = parse_caption(scene.caption)
        assert [(p.colour, p.shape, p.size, p.position) for p in parsed] == [
            (o.colour, o.shape, o.size, o.position) for o in scene.objects
        ]


def test_caption_grammar_examples() -> None:
    caption, words = caption_for([ObjectSpec("red", "circle", "large", "left")])
    assert caption == "a large red circle on the left"
    assert words == [(1, 2, 3, 6)]
    caption, _ = caption_for(
        [
            ObjectSpec("blue", "square", "small", "top"),
            ObjectSpec("yellow", "triangle", "large", "bottom"),
        ]
    )
    assert caption == "a small blue square above a large yellow triangle"
    with pytest.raises(ValueError, match="left/right or top/bottom"):
        caption_for([ObjectSpec("red", "circle", "large", "left")] * 2)
    with pytest.raises(ValueError, match="cannot parse"):
        parse_caption("a red circle somewhere")


def test_training_scenes_exclude_held_out_combinations() -> None:
    for scene in SceneWorld(seed=11).sample(300):
        for obj in scene.objects:
            assert (obj.colour, obj.shape, obj.position) not in HELD_OUT_TRIPLES, scene.caption


def test_held_out_scenes_mix_unseen_and_seen_one_and_two_objects() -> None:
    world = SceneWorld(seed=0)
    scenes = world.held_out_scenes(40)
    unseen = [
        any((o.colour, o.shape, o.position) in HELD_OUT_TRIPLES for o in s.objects) for s in scenes
    ]
    assert sum(unseen) == 20
    assert [len(s.objects) for s in scenes[:4]] == [1, 2, 1, 2]
    assert world.held_out_captions(40) == [s.caption for s in scenes]
    assert any(u and len(s.objects) == 2 for u, s in zip(unseen, scenes, strict=True))


def test_render_caption_matches_the_caption() -> None:
    scene = SceneWorld(seed=0).render_caption("a small purple triangle above a large green circle")
    assert [(o.colour, o.shape, o.size, o.position) for o in scene.objects] == [
        ("purple", "triangle", "small", "top"),
        ("green", "circle", "large", "bottom"),
    ]


def test_caption_variations_keep_the_images_and_parse_back() -> None:
    plain = SceneWorld(seed=5).sample(300)
    varied = SceneWorld(seed=5).sample(300, variations=True)
    dropped = kept = 0
    phrases = set()
    for a, b in zip(plain, varied, strict=True):
        assert np.array_equal(a.image, b.image)
        parsed = parse_caption(b.caption)
        words = b.caption.split()
        for spec, obj in zip(parsed, b.objects, strict=True):
            assert (spec.colour, spec.shape, spec.position) == (obj.colour, obj.shape, obj.position)
            assert spec.size in (None, obj.size)
            dropped += spec.size is None
            kept += spec.size is not None
            named = [words[i] for i in obj.words]
            assert named[-2 if len(b.objects) == 1 else -1] == obj.shape, b.caption
            assert (obj.size in named) == (spec.size is not None), b.caption
        if len(b.objects) == 1 and b.objects[0].position == "centre":
            phrases.add(" ".join(words[-3:]))
    # About 450 objects: 4 standard deviations of a binomial share are 0.08.
    assert dropped / (dropped + kept) == pytest.approx(SIZE_WORD_DROP, abs=0.08)
    assert phrases == set(CENTRE_PHRASES)


def test_captions_without_sizes() -> None:
    caption, words = caption_for([ObjectSpec("red", "circle", None, "left")])
    assert (caption, words) == ("a red circle on the left", [(1, 2, 5)])
    caption, words = caption_for(
        [ObjectSpec("red", "circle", "small", "top"), ObjectSpec("blue", "square", None, "bottom")]
    )
    assert (caption, words) == ("a small red circle above a blue square", [(1, 2, 3), (6, 7)])
    with pytest.raises(ValueError, match="centre_phrase"):
        caption_for([ObjectSpec("red", "circle", None, "centre")], centre_phrase="in the core")
    scenes = SceneWorld(seed=0).held_out_scenes(10, size_words=False)
    with_sizes = SceneWorld(seed=0).held_out_scenes(10)
    for a, b in zip(scenes, with_sizes, strict=True):
        assert np.array_equal(a.image, b.image)
        assert not set(a.caption.split()) & set(SIZES)
        assert [s.size for s in parse_caption(a.caption)] == [None] * len(a.objects)


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("A Red circle, in the middle.", [("red", "circle", None, "centre")]),
        ("a red circle in the center", [("red", "circle", None, "centre")]),
        ("a small red circle in the centre", [("red", "circle", "small", "centre")]),
        (
            "A red square left of a LARGE blue triangle",
            [("red", "square", None, "left"), ("blue", "triangle", "large", "right")],
        ),
    ],
)
def test_parse_typed_captions(caption: str, expected: list) -> None:
    assert [(s.colour, s.shape, s.size, s.position) for s in parse_caption(caption)] == expected


def test_render_caption_fills_an_unsaid_size() -> None:
    scene = SceneWorld(seed=0).render_caption("A green square in the middle.")
    assert scene.caption == "a green square in the middle"
    (obj,) = scene.objects
    assert obj.size in SIZES
    assert obj.position == "centre"
