"""Segmentation scores against independent references: scikit-learn's AP, hand-made IoUs,
DAAM's sum checked on maps with known answers, and a scene with a perfect attention map."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from diffwidget.models.scenes import SceneWorld
from diffwidget.runs.prompts import scene_ground_truth
from diffwidget.runs.segmentation import (
    TAU_GRID,
    average_precision,
    daam_heat_maps,
    iou_curve,
    score_item,
    summarize_pairs,
)
from diffwidget.tracing.trace import Trace


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_precision_matches_scikit_learn_with_ties(seed: int):
    rng = np.random.default_rng(seed)
    labels = rng.random(500) < 0.2
    # Rounded scores make many ties, which is where AP definitions differ.
    scores = np.round(rng.random(500) + labels * 0.3, 1)
    assert average_precision(scores, labels) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )


def test_average_precision_needs_a_positive():
    with pytest.raises(ValueError, match="empty mask"):
        average_precision(np.ones(4), np.zeros(4))


def test_iou_curve_by_hand():
    heat = np.array([[0.9, 0.5], [0.3, 0.0]])
    mask = np.array([[True, False], [True, False]])
    # τ 0.2: {0.9, 0.5, 0.3} vs mask {0.9, 0.3}: 2/3; τ 0.4: {0.9, 0.5}: 1/3; τ 0.6: {0.9}: 1/2
    np.testing.assert_allclose(
        iou_curve(heat, mask, np.array([0.2, 0.4, 0.6])), [2 / 3, 1 / 3, 0.5]
    )


def _trace(attention: dict[str, np.ndarray], tokens: list[str], kinds: list[str], **kw) -> Trace:
    n_steps = next(iter(attention.values())).shape[0]
    zeros = np.zeros((n_steps, 4, 16, 16), dtype=np.float32)
    return Trace(
        prompt=kw.pop("prompt", "p"),
        tokens=tokens,
        token_kinds=kinds,  # type: ignore[arg-type]
        timesteps=np.arange(n_steps, 0, -1, dtype=np.int64),
        latents=zeros,
        noise_pred=zeros,
        pred_x0=zeros,
        final_latent=zeros[0],
        prompt_embeds=np.zeros((2, len(tokens), 2), dtype=np.float32),
        attention=attention,
        guidance_scale=3.0,
        **kw,
    )


def test_daam_sums_steps_and_layers_then_normalises():
    rng = np.random.default_rng(0)
    # Two layers on the image grid itself: bicubic resizing to the same size is the identity,
    # so DAAM's map is min-max(sum over steps and layers) exactly.
    a = rng.random((3, 8, 8, 2)).astype(np.float32)
    b = rng.random((3, 8, 8, 2)).astype(np.float32)
    heat = daam_heat_maps(_trace({"a": a, "b": b}, ["x", "y"], ["word", "word"]), (8, 8))
    expected = (a + b).sum(axis=0)[..., 1]
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    np.testing.assert_allclose(heat[1], expected, atol=1e-5)
    # A constant coarse layer stays constant: it adds nothing after the normalisation.
    c = np.full((3, 2, 2, 2), 0.7, dtype=np.float32)
    with_c = daam_heat_maps(_trace({"a": a, "b": b, "c": c}, ["x", "y"], ["word", "word"]), (8, 8))
    np.testing.assert_allclose(with_c, heat, atol=1e-4)


def test_perfect_attention_scores_one_and_a_wrong_one_zero():
    caption = "a large red circle on the left"
    scene = SceneWorld(seed=3).render_caption(caption)
    mask = scene.objects[0].mask  # 64x64
    objects, _roles = scene_ground_truth(caption)
    words = caption.split()
    tokens = ["<s>", *words, "</s>"]
    kinds = ["start"] + ["word"] * len(words) + ["end"]
    maps = np.zeros((1, len(tokens), 64, 64), dtype=np.float32)
    maps[0, 1 + words.index("red")] = mask  # the colour word looks exactly at the object
    maps[0, 1 + words.index("circle")] = ~mask  # the shape word looks everywhere else
    trace = _trace(
        {"l": np.zeros((1, 2, 2, len(tokens)), np.float16)},
        tokens,
        kinds,
        prompt=caption,
        image=scene.image,
    )
    scores = score_item(trace, objects, {"test": maps[0]})
    assert scores.found == [True]
    by_role = {p.role: p for p in scores.pairs["test"]}
    at = int(np.argmin(np.abs(TAU_GRID - 0.4)))
    # The reader's mask of the rendered image is the object's mask itself.
    assert by_role["colour"].iou[at] == pytest.approx(1.0)
    assert by_role["colour"].ap == pytest.approx(1.0)
    assert by_role["shape"].iou[at] == 0.0
    summary = summarize_pairs(scores.pairs["test"])
    assert summary["miou_tau"] == pytest.approx(0.5)
    assert summary["n_pairs"] == 2
