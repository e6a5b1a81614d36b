"""The explorer on traced runs with real methods: the tiny pipeline and the embedded model."""

from __future__ import annotations

import numpy as np
import pytest

from diffwidget.widget import schema
from diffwidget.widget.codecs import decode_array
from diffwidget.widget.explorer import Explorer
from diffwidget.widget.layers import on_latent
from diffwidget.widget.payloads import AttentionSet, GridData

pytestmark = pytest.mark.slow
#: Masks for DF-RISE in tests: enough to exercise batching and progress, fast on CPU.
TEST_MASKS = 8
WAIT_S = 300


def test_real_trace_and_methods(tiny_sd_pipe, tiny_trace):
    from diffwidget.explain.rise import DFRise

    explorer = Explorer(
        tiny_trace,
        pipe=tiny_sd_pipe,
        methods={"df_rise": DFRise(n_masks=TEST_MASKS, progress_bar=False)},
        noisy_decoder="vae",
    )
    try:
        widget = explorer.widget
        assert widget.available == [
            "none",
            "attention",
            "df_rise",
            "df_cam",
            "occlusion",
            "concept",
        ]
        h, w = tiny_trace.latent_shape
        n, t = tiny_trace.n_steps, len(tiny_trace.tokens)
        attention = AttentionSet.from_json(widget.attention)
        # Kept on the grid of the finest layer it averages, never the latent's if larger.
        finest = max(v.shape[1] * v.shape[2] for v in tiny_trace.attention.values())
        assert attention.codes.shape[:2] == (n, t)
        assert attention.codes.shape[2] * attention.codes.shape[3] <= min(finest, h * w)
        assert widget.descriptions["noisy"].endswith("decoded by the VAE")
        progress = []
        widget.observe(lambda c: progress.append(c["new"]), names=["progress"])
        rise = explorer.compute("df_rise", step=2).result(WAIT_S)
        cam = explorer.compute("df_cam", step=2).result(WAIT_S)
        assert rise.meta["n_masks"] == TEST_MASKS
        assert progress[-1] == 1.0
        for kind, result in (("df_rise", rise), ("df_cam", cam)):
            stored = decode_array(widget.overlays[kind]["maps"])
            assert stored.shape == (1, h, w)
            np.testing.assert_allclose(stored[0], result.map, atol=1 / 255 + 1e-6)
        assert f"n_masks {TEST_MASKS}" in widget.overlays["df_rise"]["descriptions"][0]
        assert "layers" in widget.overlays["df_cam"]["descriptions"][0]
        # DF-CAM's layers become filter options and grid rows.
        assert [o["value"] for o in widget.layer_options["saliency"]["df_cam"]][1:] == list(
            cam.layers
        )
        explorer.grid = "df_cam"
        assert GridData.from_json(widget.grid_data).layers == list(cam.layers)
    finally:
        explorer.close()


@pytest.mark.parametrize("kind", schema.HEAVY_OVERLAYS)
def test_every_registered_method_is_an_overlay_of_the_explorer(kind, tiny_sd_pipe, tiny_trace):
    """The overlay menu offers each registered method, and computing it fills the overlay."""
    from diffwidget.explain.rise import DFRise

    quick = {"df_rise": DFRise(n_masks=TEST_MASKS, progress_bar=False)}
    explorer = Explorer(tiny_trace, pipe=tiny_sd_pipe, methods=quick)
    try:
        assert kind in explorer.widget.available
        result = explorer.compute(kind, step=1).result(WAIT_S)
        stored = decode_array(explorer.widget.overlays[kind]["maps"])
        np.testing.assert_allclose(stored[0], result.map, atol=1 / 255 + 1e-6)
        label = schema.OVERLAY_LABELS[kind]
        assert explorer.widget.overlays[kind]["descriptions"][0].startswith(label)
    finally:
        explorer.close()


def test_faithfulness_in_the_view_equals_a_direct_evaluation(tiny_sd_pipe, tiny_trace):
    from diffwidget.explain.faithfulness import InsertionDeletion

    evaluator = InsertionDeletion(n_random=1, operator="renoise")
    explorer = Explorer(tiny_trace, pipe=tiny_sd_pipe, faithfulness=evaluator)
    try:
        explorer.overlay = "attention"
        explorer.step, explorer.token = 3, 2
        result = explorer.faithfulness().result(WAIT_S)
        direct = InsertionDeletion(n_random=1, operator="renoise").evaluate(
            tiny_sd_pipe,
            tiny_trace,
            3,
            on_latent(explorer.attention_result, 3, 2, tiny_trace.latent_shape),
        )
        assert result.saliency.deletion_auc == pytest.approx(direct.saliency.deletion_auc)
        assert result.random.insertion_auc == pytest.approx(direct.random.insertion_auc)
        entry = explorer.widget.faithfulness[0]
        assert entry["deletion_auc"] == pytest.approx(direct.saliency.deletion_auc)
        assert entry["operator"] == "renoise"
        np.testing.assert_allclose(decode_array(entry["curves"])[0], direct.saliency.deletion)
    finally:
        explorer.close()


def test_exact_decode_of_the_shown_step_on_the_embedded_model():
    from diffwidget.models.loader import load_demo_pipeline
    from diffwidget.tracing.decode import decode_latents
    from diffwidget.tracing.generate import trace

    pipe = load_demo_pipeline()
    traced = trace(pipe, "a large red circle on the left", num_inference_steps=6, seed=0)
    explorer = Explorer(traced, pipe)
    try:
        assert "tiny preview decoder" in explorer.widget.descriptions["x0"]
        assert "decode_step" in explorer.widget.actions
        explorer.step = 4
        explorer.widget._dispatch_message(explorer.widget, {"kind": "decode_step"}, [])
        previews = decode_array(explorer.widget.previews)
        np.testing.assert_array_equal(previews[4], decode_latents(pipe, traced.pred_x0[4:5])[0])
        np.testing.assert_array_equal(previews[3], traced.previews[3])  # others untouched
        assert explorer.widget.exact_steps == [4]
        assert "step 4 decoded by the full VAE" in explorer.widget.descriptions["x0"]
    finally:
        explorer.close()
