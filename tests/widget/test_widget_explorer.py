"""Explorer façade: state both ways, heavy overlays (cache, coalescing, cancel), payloads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from diffwidget.explain.results import SaliencyMap
from diffwidget.widget import schema
from diffwidget.widget.codecs import decode_array, describe_payloads, payload_nbytes
from diffwidget.widget.explorer import Explorer
from diffwidget.widget.payloads import AttentionSet

SNAPSHOT = Path(__file__).parent / "snapshots" / "explorer_state.json"
#: Generous bound for background work on a loaded 2-core machine.
WAIT_S = 20.0


class FakeMethod:
    """A saliency method by the protocol: counts calls, reports progress, honours cancel."""

    name = "df_rise"
    label = "DF-RISE"

    def __init__(self, ticks: int = 5, delay: float = 0.0, fail_at: int | None = None):
        self.ticks, self.delay, self.fail_at = ticks, delay, fail_at
        self.calls: list[int] = []
        self.stopped: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def describe(self, result):
        return f"fake saliency at step {result.step} (n_masks {result.meta['n_masks']})"

    def attribute(self, pipe, trace, step, progress=None):
        self.calls.append(step)
        if step == self.fail_at:
            raise RuntimeError("UNet exploded")
        self.gate.wait(WAIT_S)
        for done in range(1, self.ticks + 1):
            time.sleep(self.delay)
            if progress(done, self.ticks) is False:
                self.stopped.append(step)
                break
        h, w = trace.latent_shape
        value = np.full((h, w), step / trace.n_steps, dtype=np.float32)
        value[0, 0] = 1.0
        return SaliencyMap(
            "df_rise", step, int(trace.timesteps[step]), value, value, {}, {"n_masks": 8}
        )


def wait_until(predicate, timeout=WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached")


def test_state_flows_both_ways(make_explorer):
    explorer = make_explorer()
    explorer.step = 7
    explorer.overlay = "attention"
    explorer.opacity = 0.3
    assert (explorer.widget.step, explorer.widget.overlay, explorer.widget.opacity) == (
        7,
        "attention",
        0.3,
    )
    explorer.widget.set_state({"step": 11, "token": 2, "image_mode": "noisy"})
    assert (explorer.step, explorer.token, explorer.image_mode) == (11, 2, "noisy")
    # The default token is the first content word: "red", not "a" nor the start token.
    assert make_explorer().token == 2


def test_default_token_falls_back_to_the_first_word(synthetic_trace):
    import dataclasses

    from diffwidget.widget.explorer import first_content_token

    only_function_words = dataclasses.replace(
        synthetic_trace, tokens=["<s>", "a", "the", "of", "on", "</s>", "</s>"]
    )
    assert first_content_token(only_function_words) == 1
    bpe = dataclasses.replace(
        synthetic_trace, tokens=["<s>", "a</w>", "Red</w>", "x", "y", "e", "p"]
    )
    assert first_content_token(bpe) == 2


def test_payloads_are_binary_with_dtype_and_shape(make_explorer, synthetic_trace):
    widget = make_explorer().widget
    assert widget.previews["dtype"] == "uint8"
    np.testing.assert_array_equal(decode_array(widget.previews), synthetic_trace.previews)
    attention = AttentionSet.from_json(widget.attention)
    maps = make_explorer().attention_result.maps
    assert attention.codes.shape == maps.shape
    assert np.abs(attention.maps - maps).max() <= maps.max() / 255
    curves = decode_array(widget.curves["values"])
    assert curves.shape == (len(synthetic_trace.tokens), synthetic_trace.n_steps)
    assert [s["group"] for s in widget.curves["series"]] == ["attention_mass"] * 7
    assert widget.available == ["none", "attention"]
    assert "conditional CFG half" in attention.description
    # The noisy view is built but sent only once the view shows it.
    assert widget.noisy_previews is None
    widget.set_state({"image_mode": "noisy"})
    assert decode_array(widget.noisy_previews).shape == decode_array(widget.previews).shape


def test_x0_caption_names_the_prediction_shown(synthetic_trace):
    import dataclasses

    conditional = dataclasses.replace(
        synthetic_trace, facts=dataclasses.replace(synthetic_trace.facts, preview_source="cond")
    )
    for trace, expected in (
        (synthetic_trace, "guided noise prediction"),
        (conditional, "conditional CFG half"),
    ):
        explorer = Explorer(trace)
        try:
            assert expected in explorer.widget.descriptions["x0"]
        finally:
            explorer.close()


def test_noisy_previews_track_the_noise(make_explorer):
    explorer = make_explorer()
    explorer.image_mode = "noisy"
    widget = explorer.widget
    noisy = decode_array(widget.noisy_previews).astype(float)
    x0 = decode_array(widget.previews).astype(float)
    # Early steps are mostly noise: far from x0; the last step is close to it.
    assert np.abs(noisy[0] - x0[-1]).mean() > np.abs(noisy[-1] - x0[-1]).mean()


def test_snapshot_of_widget_state(make_explorer):
    widget = make_explorer().widget
    state = {spec.name: getattr(widget, spec.name) for spec in schema.TRAITS}
    snapshot = json.loads(json.dumps(describe_payloads(state)))
    if os.environ.get("DIFFWIDGET_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(json.dumps(snapshot, indent=1, ensure_ascii=False) + "\n")
    assert SNAPSHOT.exists(), "no snapshot; write it with DIFFWIDGET_UPDATE_SNAPSHOTS=1"
    assert snapshot == json.loads(SNAPSHOT.read_text()), (
        "widget state changed; if intended, rerun with DIFFWIDGET_UPDATE_SNAPSHOTS=1"
    )


def test_payload_of_a_20_step_trace_is_small(make_explorer):
    widget = make_explorer().widget
    total = sum(payload_nbytes(getattr(widget, spec.name)) for spec in schema.TRAITS)
    assert total < 2_000_000


def test_compute_caches_per_step_and_streams_progress(make_explorer):
    provider = FakeMethod(ticks=4, delay=0.01)
    explorer = make_explorer(methods={"df_rise": provider})
    seen = []
    explorer.widget.observe(lambda c: seen.append(c["new"]), names=["progress"])
    assert "df_rise" in explorer.widget.available
    result = explorer.compute("df_rise", step=3).result(WAIT_S)
    assert result.step == 3
    wait_until(lambda: explorer.status == "done")
    assert seen[-1] == 1.0
    assert explorer.widget.overlays["df_rise"]["steps"] == [3]
    stored = decode_array(explorer.widget.overlays["df_rise"]["maps"])
    np.testing.assert_allclose(stored[0], result.map, atol=1 / 255)
    assert "n_masks 8" in explorer.widget.overlays["df_rise"]["descriptions"][0]
    # Cached: a second request returns at once without calling the provider.
    assert explorer.compute("df_rise", step=3).result(0) is result
    assert provider.calls == [3]


def test_rapid_requests_are_coalesced_and_stale_work_cancelled(make_explorer):
    provider = FakeMethod(ticks=50, delay=0.01)
    provider.gate.clear()  # hold the first request so the others pile up
    explorer = make_explorer(methods={"df_rise": provider})
    explorer.overlay = "df_rise"  # selecting the overlay requests the current step (0)
    wait_until(lambda: provider.calls == [0])
    for step in range(1, 10):  # a user scrubbing with DF-RISE on
        explorer.step = step
    provider.gate.set()
    wait_until(lambda: 9 in explorer.cached("df_rise"))
    wait_until(lambda: explorer.status == "done")
    assert provider.calls == [0, 9]  # steps 1..8 were replaced before they started
    assert provider.stopped == [0]  # step 0 went stale and stopped early
    assert sorted(explorer.cached("df_rise")) == [9]  # partial results are not cached


def test_cancel_from_the_view(make_explorer):
    provider = FakeMethod(ticks=200, delay=0.01)
    explorer = make_explorer(methods={"df_rise": provider})
    future = explorer.compute("df_rise", step=2)
    wait_until(lambda: explorer.status == "running")
    explorer.widget._dispatch_message(explorer.widget, {"kind": "cancel"}, [])
    partial = future.result(WAIT_S)
    wait_until(lambda: explorer.status == "cancelled")
    assert provider.stopped == [2]
    assert partial.step == 2
    assert explorer.cached("df_rise") == {}


def test_failing_method_reports_and_next_request_works(make_explorer):
    provider = FakeMethod(fail_at=4)
    explorer = make_explorer(methods={"df_rise": provider})
    with pytest.raises(RuntimeError, match="exploded"):
        explorer.compute("df_rise", step=4).result(WAIT_S)
    wait_until(lambda: explorer.status == "error")
    assert "DF-RISE at step 4 failed: UNet exploded" in explorer.error
    assert explorer.compute("df_rise", step=5).result(WAIT_S).step == 5


def test_heavy_overlay_without_pipeline_says_how_to_fix(make_explorer):
    explorer = make_explorer()
    with pytest.raises(RuntimeError, match=r"Explorer\(trace, pipe=pipe\)"):
        explorer.compute("df_cam")
    explorer.widget.set_state({"overlay": "df_cam"})
    assert "no pipeline" in explorer.error
    with pytest.raises(ValueError, match="compute"):
        explorer.compute("attention")


def test_precomputed_overlay_is_available_without_pipeline(make_explorer, synthetic_trace):
    explorer = make_explorer()
    value = np.zeros(synthetic_trace.latent_shape, dtype=np.float32)
    explorer.add_overlay("df_cam", 5, SaliencyMap("df_cam", 5, 0, value, value))
    assert "df_cam" in explorer.widget.available
    assert explorer.widget.overlays["df_cam"]["steps"] == [5]


def test_extra_curves(make_explorer, synthetic_trace):
    explorer = make_explorer()
    values = np.linspace(0.5, 1.0, synthetic_trace.n_steps)
    explorer.add_curve("red", values, group="concept_auc")
    series = explorer.widget.curves["series"]
    assert series[-1] == {"name": "red", "group": "concept_auc", "token": None}
    np.testing.assert_allclose(
        decode_array(explorer.widget.curves["values"])[-1], values, rtol=1e-6
    )
    with pytest.raises(ValueError, match="one value per step"):
        explorer.add_curve("short", [0.1, 0.2])


def test_widget_modules_import_without_torch(tmp_path):
    code = (
        "import sys\n"
        "import diffwidget.widget.explorer, diffwidget.widget.export, diffwidget.widget.figures\n"
        "import diffwidget.widget.layers, diffwidget.widget.snapshot, diffwidget.widget.reporting\n"
        "import diffwidget.explain.protocol\n"
        "from diffwidget.testing.synthetic import synthetic_trace\n"
        "from diffwidget.widget.explorer import Explorer\n"
        "e = Explorer(synthetic_trace()); e.grid = 'attention'; e.attention_layer = '8x8'\n"
        f"e._repr_mimebundle_(); e.to_html({str(tmp_path / 'view.html')!r}); e.close()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_noisy_decoder_choice_is_checked(synthetic_trace):
    with pytest.raises(ValueError, match="needs the pipeline"):
        Explorer(synthetic_trace, noisy_decoder="vae")
    with pytest.raises(ValueError, match="noisy_decoder must be one of"):
        Explorer(synthetic_trace, noisy_decoder="jpeg")
    with pytest.raises(ValueError, match="use keys from"):
        Explorer(synthetic_trace, method_options={"rise": {"n_masks": 5}})


def test_token_relevance_curves_fill_explained_steps(make_explorer, synthetic_trace):
    from types import SimpleNamespace

    explorer = make_explorer()
    n_tokens = len(synthetic_trace.tokens)
    normalized = np.tile(np.linspace(0, 1, n_tokens, dtype=np.float32), (2, 1))
    result = SimpleNamespace(
        tokens=synthetic_trace.tokens, steps=np.array([3, 8]), normalized=normalized
    )
    explorer.add_token_relevance(result)
    series = [s for s in explorer.widget.curves["series"] if s["group"] == "token_relevance"]
    assert [s["token"] for s in series] == list(range(n_tokens))
    values = decode_array(explorer.widget.curves["values"])[-n_tokens:]
    assert np.isnan(values[:, 0]).all()
    np.testing.assert_allclose(values[:, [3, 8]], normalized.T)
    assert explorer.figure("token_relevance").marks[0].labels == ["a", "red", "circle", "left"]
    with pytest.raises(ValueError, match="another trace"):
        explorer.add_token_relevance(SimpleNamespace(tokens=["x"], steps=[0], normalized=[[1]]))


@pytest.mark.parametrize(
    ("name", "meaning", "caption"),
    [
        ("format2_sd", "cross-attention probability", "Cross-attention probability"),
        ("format1_sd", "cross-attention probability", "Cross-attention probability"),
        ("format2_sd3", "joint-attention share", "Joint-attention probability"),
        ("format2_flux", "joint-attention share", "Joint-attention probability"),
    ],
)
def test_colour_scale_says_what_the_attention_value_is(name, meaning, caption):
    from tests.tracing.trace_data import load_trace_data

    explorer = Explorer(load_trace_data(name))
    try:
        scale = explorer.widget.scales["attention"]["meaning"]
        assert scale.startswith(meaning)
        assert ("cross-attention" in scale) == meaning.startswith("cross")
        assert explorer.widget.attention["description"].startswith(caption)
    finally:
        explorer.close()
