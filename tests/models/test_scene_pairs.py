"""Scene caption pairs: one attribute of one object swapped, every other word kept."""

from __future__ import annotations

import pytest

from diffwidget.models.scene_pairs import ATTRIBUTES, swap_attribute, swap_pairs
from diffwidget.models.scenes import SceneWorld, parse_caption


def test_every_held_out_caption_gets_a_pair_per_attribute() -> None:
    for caption in SceneWorld(seed=0).held_out_captions(40):
        for pair in swap_pairs(caption):
            a, b = parse_caption(pair.caption_a), parse_caption(pair.caption_b)
            assert len(a) == len(b)
            assert len(pair.caption_a.split()) == len(pair.caption_b.split())
            changed = {
                (i, attr)
                for i, (x, y) in enumerate(zip(a, b, strict=True))
                for attr in ATTRIBUTES
                if getattr(x, attr) != getattr(y, attr)
            }
            if pair.attribute == "position" and len(a) == 2:
                assert changed == {(0, "position"), (1, "position")}  # the relation flips
            else:
                assert changed == {(pair.object_index, pair.attribute)}
            assert getattr(b[pair.object_index], pair.attribute) == pair.b_value != pair.a_value
            if len(b) == 2:
                assert b[0].colour != b[1].colour


def test_values_are_fixed() -> None:
    assert swap_attribute("a large red circle on the left", "shape").b_value == "square"
    assert swap_attribute("a large red circle on the left", "size").b_value == "small"
    assert swap_attribute("a red circle in the middle", "position").caption_b == (
        "a red circle on the left"
    )
    # The second object's colour is skipped: green would be next after red.
    pair = swap_attribute("a small red circle left of a large green square", "colour")
    assert pair.b_value == "blue"
    assert swap_attribute(
        "a small red circle left of a large green square", "shape", object_index=1
    ).caption_b == ("a small red circle left of a large green triangle")


def test_bad_requests_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown attribute"):
        swap_attribute("a red circle on the left", "texture")
    with pytest.raises(ValueError, match="no size to swap"):
        swap_attribute("a red circle on the left", "size")
    with pytest.raises(ValueError, match=r"object_index must be 0\.\.0"):
        swap_attribute("a red circle on the left", "colour", object_index=1)
    with pytest.raises(ValueError, match="cannot parse"):
        swap_attribute("a cat on a sofa", "colour")
    assert [p.attribute for p in swap_pairs("a red circle on the left")] == [
        "colour",
        "shape",
        "position",
    ]
