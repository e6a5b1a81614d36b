"""Scene-world judges read rendered scenes exactly, and find the judged object."""

from __future__ import annotations

import pytest

from diffwidget.explain.judges import check_judges, scene_judges, scene_word_judges
from diffwidget.models.scene_pairs import swap_pairs
from diffwidget.models.scenes import SceneWorld


def test_scene_judges_read_rendered_scenes_exactly() -> None:
    world = SceneWorld(seed=3)
    for caption in world.held_out_captions(30):
        for pair in swap_pairs(caption):
            (judge,) = scene_judges(pair.caption_a, pair.caption_b)
            assert judge.exact
            assert judge.outcome(world.render_caption(pair.caption_a).image) == "a"
            assert judge.outcome(world.render_caption(pair.caption_b).image) == "b"


def test_judges_from_two_captions_and_from_a_word() -> None:
    judges = scene_judges(
        "a small red circle left of a large blue square",
        "a small red triangle left of a large blue square",
    )
    assert [(j.attribute, j.a_value, j.b_value) for j in judges] == [
        ("shape", "circle", "triangle")
    ]
    (word,) = scene_word_judges("a large red circle on the left", "left")
    assert (word.attribute, word.a_value, word.b_value) == ("position", "left", None)
    image = SceneWorld(seed=0).render_caption("a large red circle on the right").image
    assert word.outcome(image) == "other"
    with pytest.raises(ValueError, match="same objects"):
        scene_judges("a red circle on the left", "a red circle on the left")
    with pytest.raises(ValueError, match=r"same objects|number"):
        scene_judges("a red circle on the left", "a red circle left of a blue square")
    with pytest.raises(ValueError, match="names no colour"):
        scene_word_judges("a red circle on the left", "the")
    with pytest.raises(TypeError, match="Judge objects"):
        check_judges([lambda image: "red"])  # type: ignore[list-item]
