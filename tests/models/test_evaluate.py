"""Adherence scoring: right objects score 1, wrong attributes are caught."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from diffwidget.models.evaluate import AdherenceReport, sample_grid, score
from diffwidget.models.reader import SceneReader
from diffwidget.models.scenes import SceneWorld


def test_wrong_colour_and_position_are_scored_wrong() -> None:
    world = SceneWorld(seed=0)
    scene = world.render_caption("a large red circle on the left")
    other = world.render_caption("a large blue circle on the right")
    report = AdherenceReport()
    score(scene, SceneReader().read(other.image), report)
    accuracy = report.accuracy()["one-object"]
    assert accuracy["colour"] == 0.0
    assert accuracy["position"] == 0.0
    assert accuracy["shape"] == 1.0
    assert accuracy["size"] == 1.0


def test_two_object_scene_scored_per_object() -> None:
    world = SceneWorld(seed=0)
    scene = world.render_caption("a small red circle left of a large blue square")
    swapped = world.render_caption("a small red square left of a large blue square")
    report = AdherenceReport()
    score(scene, SceneReader().read(swapped.image), report)
    accuracy = report.accuracy()["two-object"]
    assert accuracy["colour"] == 1.0
    assert accuracy["shape"] == 0.5
    assert accuracy["scene"] == 0.0


def test_missing_objects_score_zero() -> None:
    scene = SceneWorld(seed=0).render_caption("a small green triangle at the top")
    report = AdherenceReport()
    score(replace(scene), [], report)
    assert all(v == 0.0 for v in report.accuracy()["one-object"].values())


def test_sample_grid_size() -> None:
    images = np.zeros((7, 64, 64, 3), dtype=np.uint8)
    grid = sample_grid(images, ["a large red circle on the left"] * 7, columns=4, scale=2)
    assert grid.size[0] == 4 * (128 + 12)
    assert grid.size[1] > 2 * 128


def test_captions_without_sizes_are_scored_on_the_other_attributes() -> None:
    world = SceneWorld(seed=0)
    scene = world.render_caption("a red circle on the left")
    report = AdherenceReport()
    score(
        scene,
        SceneReader().read(world.render_caption("a small red circle on the left").image),
        report,
    )
    score(
        scene,
        SceneReader().read(world.render_caption("a large red square on the left").image),
        report,
    )
    accuracy = report.accuracy()["one-object no-size"]
    assert "size" not in accuracy
    assert accuracy["colour"] == accuracy["position"] == 1.0
    assert accuracy["shape"] == 0.5
    assert accuracy["scene"] == 0.5
    assert "one-object" not in report.accuracy()  # the size-less group stands apart
