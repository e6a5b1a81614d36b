"""Requests made in code survive scrubbing; bad method results are refused; faithfulness jobs."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest

from diffwidget.explain.results import FaithfulnessCurves, FaithfulnessResult
from diffwidget.widget.codecs import decode_array
from diffwidget.widget.explorer import Explorer
from diffwidget.widget.layers import on_latent
from tests.widget.test_widget_explorer import WAIT_S, FakeMethod, wait_until


def test_scrubbing_never_cancels_an_explicit_compute(make_explorer):
    method = FakeMethod(ticks=30, delay=0.01)
    explorer = make_explorer(methods={"df_rise": method})
    explicit = explorer.compute("df_rise", step=12)  # made in code
    wait_until(lambda: method.calls == [12])
    explorer.overlay = "df_rise"  # the view now asks for the current step (0)...
    for step in range(1, 8):  # ...and the user scrubs with DF-RISE selected
        explorer.widget.set_state({"step": step})
    result = explicit.result(WAIT_S)  # no CancelledError
    assert result.step == 12
    assert method.stopped == []  # the explicit run was never asked to stop
    wait_until(lambda: 7 in explorer.cached("df_rise"))
    assert sorted(explorer.cached("df_rise")) == [7, 12]
    assert method.calls[0] == 12
    assert method.calls[-1] == 7  # the view's latest request ran after it


def test_explicit_requests_queue_in_order_and_run_before_view_requests(make_explorer):
    method = FakeMethod(ticks=3)
    method.gate.clear()
    explorer = make_explorer(methods={"df_rise": method})
    explorer.overlay = "df_rise"  # view request for step 0 starts and waits at the gate
    wait_until(lambda: method.calls == [0])
    explorer.widget.set_state({"step": 5})  # view request: replaces nothing explicit
    futures = [explorer.compute("df_rise", step=s) for s in (9, 3)]
    method.gate.set()
    for future in futures:
        future.result(WAIT_S)
    wait_until(lambda: 5 in explorer.cached("df_rise"))
    # 0 went stale when the user moved to 5 and stopped; then code requests in order, then 5.
    assert method.calls == [0, 9, 3, 5]


def test_a_view_request_upgraded_by_code_is_protected(make_explorer):
    method = FakeMethod(ticks=20, delay=0.01)
    explorer = make_explorer(methods={"df_rise": method})
    explorer.overlay = "df_rise"  # view request for step 0
    wait_until(lambda: method.calls == [0])
    same = explorer.compute("df_rise", step=0)  # code asks for the same map: one job
    explorer.widget.set_state({"step": 4})  # scrubbing must not stop it now
    assert same.result(WAIT_S).step == 0
    assert method.stopped == []


def test_cancel_stops_explicit_requests_too(make_explorer):
    method = FakeMethod(ticks=200, delay=0.01)
    explorer = make_explorer(methods={"df_rise": method})
    running = explorer.compute("df_rise", step=1)
    queued = explorer.compute("df_rise", step=2)
    wait_until(lambda: explorer.status == "running")
    explorer.cancel()
    assert running.result(WAIT_S).step == 1  # partial result, not cached
    with pytest.raises(CancelledError):
        queued.result(WAIT_S)
    assert explorer.cached("df_rise") == {}


class _NoMap:
    name, label = "df_cam", "DF-CAM"

    def attribute(self, pipe, trace, step, progress=None):
        return None

    def describe(self, result):
        return "nothing"


def test_a_method_returning_no_map_is_reported_not_raised_in_the_thread(make_explorer):
    seen = []
    previous = threading.excepthook
    threading.excepthook = lambda args: seen.append(args)
    try:
        explorer = make_explorer(methods={"df_cam": _NoMap()})
        future = explorer.compute("df_cam", step=2)
        with pytest.raises(TypeError, match="must return a SaliencyMap"):
            future.result(WAIT_S)
        wait_until(lambda: explorer.status == "error")
        assert "DF-CAM at step 2 failed" in explorer.error
        assert explorer.cached("df_cam") == {}
        time.sleep(0.1)
    finally:
        threading.excepthook = previous
    assert seen == []


def test_methods_are_checked_at_the_boundary(synthetic_trace):
    from diffwidget.explain.protocol import check_saliency_method

    with pytest.raises(TypeError, match="pass an instance"):
        Explorer(synthetic_trace, methods={"df_rise": FakeMethod})
    with pytest.raises(TypeError, match="has no attribute"):
        Explorer(synthetic_trace, methods={"df_rise": object()})
    with pytest.raises(TypeError, match="register it under"):
        check_saliency_method("df_cam", FakeMethod())
    with pytest.raises(TypeError, match="dict of overlay name"):
        Explorer(synthetic_trace, methods=[FakeMethod()])
    with pytest.raises(TypeError, match="evaluate"):
        Explorer(synthetic_trace, faithfulness=object())


def test_explorer_refuses_what_is_not_a_trace(synthetic_trace, tiny_sd_pipe):
    with pytest.raises(TypeError, match=r"Explorer takes a Trace.*got NoneType"):
        Explorer(None)
    with pytest.raises(TypeError, match=r"not a pipeline.*diffwidget.trace\(pipe, prompt\)"):
        Explorer(tiny_sd_pipe)
    with pytest.raises(TypeError, match="pipe must be the diffusers pipeline"):
        Explorer(synthetic_trace, synthetic_trace)
    with pytest.raises(TypeError, match="pipe must be the diffusers pipeline"):
        Explorer(synthetic_trace, "sd15")


def test_method_options_still_work_with_a_deprecation_warning(synthetic_trace, tiny_sd_pipe):
    with pytest.warns(DeprecationWarning, match="methods="):
        explorer = Explorer(
            synthetic_trace, tiny_sd_pipe, method_options={"df_rise": {"n_masks": 7}}
        )
    try:
        assert explorer._method("df_rise").n_masks == 7
    finally:
        explorer.close()


class FakeEvaluator:
    """Insertion/deletion stand-in: curves that depend on the map, progress, cancel."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.maps: list[np.ndarray] = []

    def evaluate(self, pipe, trace, step, saliency, progress=None):
        self.maps.append(np.asarray(saliency))
        for done in range(1, 5):
            time.sleep(self.delay)
            if progress is not None:
                progress(done, 4)
        frac = np.linspace(0, 1, 5, dtype=np.float32)
        top = float(np.max(saliency))
        curves = FaithfulnessCurves(frac, 1 - frac * top, frac, 0.3, 0.6)
        rand = FaithfulnessCurves(frac, 1 - frac / 2, frac / 2, 0.75, 0.25)
        meta = {
            "operator": "renoise",
            "operator_text": "fresh noise",
            "similarity": "ssim",
            "n_random": 3,
            "random_deletion_auc_sd": 0.02,
            "random_insertion_auc_sd": 0.01,
        }
        return FaithfulnessResult(step, curves, rand, meta)


def test_faithfulness_of_the_shown_map_from_the_view(make_explorer):
    evaluator = FakeEvaluator()
    explorer = make_explorer(faithfulness=evaluator)
    assert "faithfulness" in explorer.widget.actions
    explorer.widget.set_state({"overlay": "attention", "step": 6, "token": 3})
    explorer.widget._dispatch_message(explorer.widget, {"kind": "faithfulness"}, [])
    wait_until(lambda: explorer.widget.faithfulness)
    entry = explorer.widget.faithfulness[0]
    assert (entry["overlay"], entry["step"], entry["token"], entry["layer"]) == (
        "attention", 6, 3, ""
    )  # fmt: skip
    shown = on_latent(explorer.attention_result, 6, 3, explorer.trace.latent_shape)
    np.testing.assert_array_equal(evaluator.maps[0], shown)
    assert entry["operator"] == "renoise"
    assert (entry["deletion_auc"], entry["random_deletion_auc"]) == (0.3, 0.75)
    curves = decode_array(entry["curves"])
    assert curves.shape == (4, 5)
    np.testing.assert_allclose(curves[2], 1 - np.linspace(0, 1, 5) / 2)
    # A second request for the same map reuses the entry key; another token adds one.
    explorer.token = 2
    explorer.faithfulness().result(WAIT_S)
    assert len(explorer.widget.faithfulness) == 2


def test_faithfulness_can_be_cancelled_and_needs_a_map(make_explorer):
    explorer = make_explorer(faithfulness=FakeEvaluator(delay=0.5))
    explorer.overlay = "attention"
    future = explorer.faithfulness()
    wait_until(lambda: explorer.status == "running")
    explorer.cancel()
    assert future.result(WAIT_S) is None  # stopped, nothing stored
    assert explorer.widget.faithfulness == []
    explorer.overlay = "none"
    with pytest.raises(ValueError, match="choose an overlay"):
        explorer.faithfulness()
    with pytest.raises(RuntimeError, match="needs the pipeline"):
        Explorer(explorer.trace).faithfulness()
