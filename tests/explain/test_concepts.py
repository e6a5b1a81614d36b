"""Concept sources and x̂0 attribute curves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from diffwidget.explain.concepts import (
    ATTRIBUTES,
    ConceptSet,
    read_attributes,
    x0_attribute_curves,
)
from diffwidget.explain.probes import ConceptProbe

#: Codes the fake reader decodes from pixel (0, 0): channel 0 -> colour, 1 -> shape.
COLOURS = ("red", "green", "blue")
SHAPES = ("circle", "square")


@dataclass(frozen=True)
class _Read:
    colour: str
    shape: str
    size: str
    position: str
    mask: np.ndarray


class _PixelReader:
    """Reads attributes from pixel (0, 0); a blank (all-zero) image holds no object."""

    def read(self, image: np.ndarray) -> list[_Read]:
        if not image.any():
            return []
        mask = np.ones(image.shape[:2], dtype=bool)
        r, g = int(image[0, 0, 0]), int(image[0, 0, 1])
        return [_Read(COLOURS[r % 3], SHAPES[g % 2], "small", "left", mask)]


def _image(colour: int, shape: int) -> np.ndarray:
    image = np.ones((4, 4, 3), dtype=np.uint8)
    image[0, 0, :2] = (colour, shape)
    return image


def test_from_prompts_labels_and_seeds() -> None:
    concepts = ConceptSet.from_prompts(
        {"dog": ["a dog", "two dogs", "a dog running"], "no dog": ["a cat", "grass"]},
        concept="dog",
        seed=10,
    )
    assert concepts.prompts == ["a dog", "two dogs", "a dog running", "a cat", "grass"]
    assert concepts.labels == {"dog": ["dog", "dog", "dog", "no dog", "no dog"]}
    assert concepts.seeds == [10, 11, 12, 13, 14]
    assert concepts.class_counts() == {"dog": {"dog": 3, "no dog": 2}}
    with pytest.raises(ValueError, match="two groups"):
        ConceptSet.from_prompts({"dog": ["a dog"]})
    with pytest.raises(TypeError, match="list of prompts"):
        ConceptSet.from_prompts({"dog": "a dog", "no dog": ["grass"]})


def test_scene_world_labels_are_the_caption_ground_truth() -> None:
    from diffwidget.models.scenes import parse_caption

    concepts = ConceptSet.from_scene_world(40, seed=3)
    assert len(concepts) == 40
    assert concepts.concepts == list(ATTRIBUTES)
    for i, prompt in enumerate(concepts.prompts):
        (spec,) = parse_caption(prompt)
        assert [concepts.labels[a][i] for a in ATTRIBUTES] == [
            spec.colour,
            spec.shape,
            spec.size,
            spec.position,
        ]
    # Deterministic: the same seed gives the same prompts.
    assert ConceptSet.from_scene_world(40, seed=3).prompts == concepts.prompts


def test_two_object_scenes_are_left_out() -> None:
    from diffwidget.models.scenes import SceneWorld

    scenes = SceneWorld(seed=1).sample(30, n_objects=(1, 2))
    concepts = ConceptSet.from_scenes(scenes, ["colour"])
    for scene, label in zip(scenes, concepts.labels["colour"], strict=True):
        if len(scene.objects) == 1:
            assert label == scene.objects[0].colour
        else:
            assert label is None
    assert any(label is None for label in concepts.labels["colour"])
    with pytest.raises(ValueError, match="unknown attributes"):
        ConceptSet.from_scenes(scenes, ["texture"])


def test_x0_curves_say_when_each_attribute_is_fixed() -> None:
    n_prompts, n_steps = 6, 5
    colour_fixed, shape_fixed = 1, 3
    final = np.stack([_image(i % 3, i % 2) for i in range(n_prompts)])
    x0 = np.zeros((n_prompts, n_steps, 4, 4, 3), dtype=np.uint8)
    for i in range(n_prompts):
        for step in range(n_steps):
            colour = i % 3 if step >= colour_fixed else (i + 1) % 3
            shape = i % 2 if step >= shape_fixed else (i + 1) % 2
            x0[i, step] = _image(colour, shape)
    x0[0, 0] = 0  # nothing readable in one early x̂0: counts as disagreement
    curves = x0_attribute_curves(
        x0, final, reader=_PixelReader(), attributes=["colour", "shape"], timesteps=range(5)
    )
    assert curves.kind == "x0_agreement"
    np.testing.assert_array_equal(curves.curve("colour"), [0, 1, 1, 1, 1])
    np.testing.assert_array_equal(curves.curve("shape"), [0, 0, 0, 1, 1])
    assert curves.first_step_above(0.9) == {"colour": colour_fixed, "shape": shape_fixed}
    # Chance: a guess drawn from the final images' class frequencies (uniform here).
    np.testing.assert_allclose(curves.chance, [1 / 3, 1 / 2])
    assert np.all(curves.band_low <= curves.curves)
    assert np.all(curves.band_high >= curves.curves)
    assert curves.band_high[0, 0] > 0  # the Wilson band is not degenerate at 0


def test_x0_curves_skip_unreadable_final_images_and_score_captions() -> None:
    final = np.stack([_image(0, 0), _image(1, 1), np.zeros((4, 4, 3), np.uint8)])
    x0 = np.repeat(final[:, None], 2, axis=1)
    truth = ConceptSet(
        ["p0", "p1", "p2"], {"colour": ["red", "blue", "red"], "shape": ["circle"] * 3}
    )
    curves = x0_attribute_curves(
        x0, final, reader=_PixelReader(), attributes=["colour", "shape"], truth=truth
    )
    np.testing.assert_array_equal(curves.curves, np.ones((2, 2)))
    assert curves.meta["n_unreadable_final"] == 1
    assert curves.n_examples == {"colour": 2, "shape": 2}
    # p0 matches on both; p1 is green/square (caption blue/circle); p2 unreadable -> miss.
    assert curves.meta["final_matches_caption"] == pytest.approx({"colour": 1 / 3, "shape": 1 / 3})
    with pytest.raises(ValueError, match="no object could be read"):
        x0_attribute_curves(x0[2:], final[2:], reader=_PixelReader())


def test_scene_reader_reads_rendered_scenes() -> None:
    from diffwidget.models.scenes import SceneWorld

    scenes = SceneWorld(seed=0).sample(12, n_objects=(1,))
    images = np.stack([s.image for s in scenes])
    read = read_attributes(images)
    truth = ConceptSet.from_scenes(scenes)
    for i, attrs in enumerate(read):
        assert attrs is not None
        assert attrs == {a: truth.labels[a][i] for a in ATTRIBUTES}
    # Perfect x̂0 from step 0: every curve is 1 and every final image matches its caption.
    x0 = np.repeat(images[:, None], 3, axis=1)
    curves = x0_attribute_curves(x0, images, truth=truth)
    np.testing.assert_array_equal(curves.curves, np.ones((4, 3)))
    assert curves.meta["final_matches_caption"] == dict.fromkeys(ATTRIBUTES, 1.0)


def test_prompt_sets_end_to_end_on_the_tiny_pipeline(tiny_sd_pipe: Any) -> None:
    from diffwidget.tracing.activations import ActivationRecorder

    concepts = ConceptSet.from_prompts(
        {
            "red": [f"a red {w}" for w in ("circle", "square", "dog", "cat")],
            "blue": [f"a blue {w}" for w in ("circle", "square", "dog", "cat")],
        },
        concept="colour",
    )
    recorder = ActivationRecorder(
        ["mid_block"], halves=["cond", "uncond"], batch_size=8, progress=False
    )
    record = concepts.record(tiny_sd_pipe, recorder, num_inference_steps=3)
    assert record.seeds == concepts.seeds
    for half in ("cond", "uncond"):
        curves = ConceptProbe(cv=2).fit(record, concepts, half=half)
        assert curves.curves.shape == (1, 3)
        np.testing.assert_array_equal(curves.timesteps, record.timesteps)
        assert curves.meta["blocks"] == ["mid_block"]
        assert curves.meta["half"] == half
        assert np.all((curves.curves >= 0) & (curves.curves <= 1))


@pytest.mark.parametrize("suffix", [".json", ".npz"])
def test_x0_curves_round_trip(tmp_path: Any, suffix: str) -> None:
    from diffwidget.explain.probes import ConceptCurves

    final = np.stack([_image(i % 3, i % 2) for i in range(6)])
    x0 = np.repeat(final[:, None], 2, axis=1)
    curves = x0_attribute_curves(x0, final, reader=_PixelReader(), attributes=["colour"])
    loaded = ConceptCurves.load(curves.save(tmp_path / f"x0{suffix}"))
    assert loaded.fold_scores is None
    assert loaded.meta == curves.meta
    np.testing.assert_array_equal(loaded.curves, curves.curves)
    np.testing.assert_allclose(loaded.chance, curves.chance)


def test_labels_read_from_generated_images() -> None:
    from diffwidget.tracing.activations import ActivationRecord

    images = np.stack([_image(0, 1), _image(2, 0), np.zeros((4, 4, 3), np.uint8)])
    record = ActivationRecord(
        prompts=["p0", "p1", "p2"],
        seeds=[5, 6, 7],
        timesteps=np.array([999, 499]),
        activations={"mid_block": np.zeros((3, 2, 4), np.float16)},
        images=images,
    )
    drawn = ConceptSet.from_images(record, _PixelReader(), ["colour", "shape"])
    assert drawn.prompts == record.prompts
    assert drawn.seeds == [5, 6, 7]
    assert drawn.labels == {"colour": ["red", "blue", None], "shape": ["square", "circle", None]}


def test_drop_rare_classes() -> None:
    concepts = ConceptSet(
        ["a", "b", "c", "d", "e"], {"colour": ["red", "red", "blue", "red", None]}
    )
    kept = concepts.drop_rare(2)
    assert kept.labels == {"colour": ["red", "red", None, "red", None]}
    assert kept.meta["dropped_classes"] == {"colour": ["blue"]}
    assert concepts.labels["colour"][2] == "blue"  # the original is unchanged
