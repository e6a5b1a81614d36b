"""The scene reader recovers every attribute of rendered scenes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from diffwidget.models.evaluate import ATTRIBUTES, reader_accuracy
from diffwidget.models.reader import SceneReader
from diffwidget.models.scenes import BACKGROUND, SceneWorld

N_SCENES = 120
BLUR_RADIUS = 1.0  # roughly the softness of decoded images
NOISE_STD = 6.0
MIN_ACCURACY_DEGRADED = 0.95
MIN_MASK_IOU = 0.7  # edge pixels covered exactly half may fall on either side


def _match(scene, found):  # type: ignore[no-untyped-def]
    """The read object overlapping each true object most."""
    return [max(found, key=lambda o: (o.mask & t.mask).sum()) for t in scene.objects]


def test_reads_rendered_scenes_exactly() -> None:
    reader = SceneReader()
    for scene in SceneWorld(seed=21).sample(N_SCENES, include_held_out=True):
        found = reader.read(scene.image)
        assert len(found) == len(scene.objects), scene.caption
        for truth, read in zip(scene.objects, _match(scene, found), strict=True):
            for attribute in ATTRIBUTES:
                assert getattr(read, attribute) == getattr(truth, attribute), (
                    scene.caption,
                    attribute,
                )
            iou = (read.mask & truth.mask).sum() / (read.mask | truth.mask).sum()
            assert iou > MIN_MASK_IOU, scene.caption


def test_reads_blurred_noisy_scenes_mostly() -> None:
    reader = SceneReader()
    rng = np.random.default_rng(0)
    correct = total = 0
    for scene in SceneWorld(seed=22).sample(N_SCENES, include_held_out=True):
        blurred = np.asarray(
            Image.fromarray(scene.image).filter(ImageFilter.GaussianBlur(BLUR_RADIUS)), dtype=float
        )
        noisy = np.clip(blurred + rng.normal(0, NOISE_STD, blurred.shape), 0, 255).astype(np.uint8)
        found = reader.read(noisy)
        total += len(scene.objects) * len(ATTRIBUTES)
        if not found:
            continue
        for truth, read in zip(scene.objects, _match(scene, found), strict=True):
            correct += sum(getattr(read, a) == getattr(truth, a) for a in ATTRIBUTES)
    assert correct / total >= MIN_ACCURACY_DEGRADED


def test_blank_image_has_no_objects() -> None:
    blank = np.full((64, 64, 3), BACKGROUND, dtype=np.uint8)
    assert SceneReader().read(blank) == []


def test_rejects_non_rgb_input() -> None:
    with pytest.raises(ValueError, match="RGB image"):
        SceneReader().read(np.zeros((64, 64), dtype=np.uint8))


def test_reader_accuracy_report_is_perfect_on_ground_truth() -> None:
    accuracy = reader_accuracy(n=40).accuracy()
    assert set(accuracy) >= {"one-object", "two-object"}
    for group in accuracy.values():
        assert all(value == 1.0 for value in group.values()), accuracy
