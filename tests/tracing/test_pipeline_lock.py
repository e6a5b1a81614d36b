"""One lock per pipeline: a trace and an explorer's DF-RISE on one pipeline never interleave.

Real threads, the tiny random-weight pipeline and the real DF-RISE. A gate parks one side
mid-work while it holds the pipeline; the other side is started then. The order of events
(the trace's denoising steps, DF-RISE's start and end) shows whether they overlapped, and
both results are compared bit for bit with the same computation run alone.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from diffwidget.explain.rise import DFRise
from diffwidget.tracing import lock
from diffwidget.tracing.context import TraceContext
from diffwidget.tracing.generate import trace
from diffwidget.tracing.lock import PipelineBusyError, hold_pipeline, pipeline_lock
from diffwidget.tracing.taps import Tap
from diffwidget.widget.explorer import Explorer

PROMPT = "a red circle on the left"
STEPS = 4
RISE_STEP = 2
MASKS = 8
#: Seconds a side waits to see that the other one does not start.
BLOCKED_S = 1.0
#: Upper bound for any wait in these tests (a loaded 2-core machine).
WAIT_S = 120.0


def _trace(pipe: Any, on_step: Callable[[int], None] | None = None) -> Any:
    def callback(_pipe: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if on_step is not None:
            on_step(step)
        return kwargs

    return trace(pipe, PROMPT, num_inference_steps=STEPS, seed=3, callback_on_step_end=callback)


class GatedRise:
    """The real DF-RISE, parked at its first progress call until ``gate`` opens."""

    name, label = "df_rise", "DF-RISE"

    def __init__(self, gate_closed: bool) -> None:
        self.inner = DFRise(n_masks=MASKS, batch_size=4, progress_bar=False)
        self.gate = threading.Event()
        if not gate_closed:
            self.gate.set()
        self.parked = threading.Event()
        self.started_at = self.ended_at = float("nan")

    def attribute(self, pipe: Any, trace: Any, step: int, progress: Any = None) -> Any:
        self.started_at = time.monotonic()

        def gated(done: int, total: int) -> bool:
            self.parked.set()
            assert self.gate.wait(WAIT_S)
            return True if progress is None else progress(done, total)

        result = self.inner.attribute(pipe, trace, step, progress=gated)
        self.ended_at = time.monotonic()
        return result

    def describe(self, result: Any) -> str:
        return self.inner.describe(result)


@pytest.fixture(scope="module")
def pipe(tiny_sd_pipe_factory: Callable[..., Any]) -> Any:
    return tiny_sd_pipe_factory()


@pytest.fixture(scope="module")
def alone(pipe: Any) -> dict[str, Any]:
    """The trace and the DF-RISE map, each computed with nothing else running."""
    reference = _trace(pipe)
    rise = DFRise(n_masks=MASKS, batch_size=4, progress_bar=False)
    return {"trace": reference, "rise": rise.attribute(pipe, reference, RISE_STEP).map}


@pytest.fixture
def explorer_of(pipe: Any, alone: dict[str, Any]) -> Iterator[Callable[[GatedRise], Explorer]]:
    made: list[Explorer] = []

    def build(method: GatedRise) -> Explorer:
        explorer = Explorer(alone["trace"], pipe, methods={"df_rise": method})
        made.append(explorer)
        return explorer

    yield build
    for explorer in made:
        explorer.close()


def _same_trace(a: Any, b: Any) -> None:
    np.testing.assert_array_equal(a.latents, b.latents)
    np.testing.assert_array_equal(a.noise_pred, b.noise_pred)
    for layer in a.attention:
        np.testing.assert_array_equal(a.attention[layer], b.attention[layer])


def test_trace_waits_for_a_running_df_rise(pipe, alone, explorer_of):
    method = GatedRise(gate_closed=True)
    explorer = explorer_of(method)
    future = explorer.compute("df_rise", RISE_STEP)
    assert method.parked.wait(WAIT_S)  # DF-RISE is mid-way and holds the pipeline
    steps: list[float] = []
    result: dict[str, Any] = {}
    worker = threading.Thread(
        target=lambda: result.update(trace=_trace(pipe, lambda _s: steps.append(time.monotonic())))
    )
    worker.start()
    worker.join(BLOCKED_S)
    assert worker.is_alive(), "the trace ran while DF-RISE held the pipeline"
    assert steps == []
    method.gate.set()
    saliency = future.result(WAIT_S)
    worker.join(WAIT_S)
    assert not worker.is_alive()
    assert len(steps) == STEPS
    assert min(steps) > method.ended_at  # strictly after DF-RISE
    _same_trace(result["trace"], alone["trace"])
    np.testing.assert_array_equal(saliency.map, alone["rise"])
    assert explorer.status == "done"
    assert explorer.error == ""


def test_df_rise_waits_for_a_running_trace(pipe, alone, explorer_of):
    method = GatedRise(gate_closed=False)
    explorer = explorer_of(method)
    in_step, resume = threading.Event(), threading.Event()
    steps: list[float] = []

    def park_at_first_step(step: int) -> None:
        steps.append(time.monotonic())
        if step == 0:
            in_step.set()
            assert resume.wait(WAIT_S)

    result: dict[str, Any] = {}

    def run_trace() -> None:
        result["trace"] = _trace(pipe, park_at_first_step)

    worker = threading.Thread(target=run_trace)
    worker.start()
    assert in_step.wait(WAIT_S)  # the trace's hooks are installed, its loop is parked
    future = explorer.compute("df_rise", RISE_STEP)
    time.sleep(BLOCKED_S)
    assert not future.done(), "DF-RISE ran inside the trace"
    assert np.isnan(method.started_at)
    assert explorer.status == "running"
    resume.set()
    worker.join(WAIT_S)
    saliency = future.result(WAIT_S)
    assert len(steps) == STEPS
    assert method.started_at > max(steps)  # after the trace's loop
    _same_trace(result["trace"], alone["trace"])
    np.testing.assert_array_equal(saliency.map, alone["rise"])


def test_trace_refuses_a_busy_pipeline_after_its_wait(pipe, explorer_of, monkeypatch):
    monkeypatch.setattr(lock, "DEFAULT_WAIT_S", 0.3)
    monkeypatch.setattr("diffwidget.tracing.context.DEFAULT_WAIT_S", 0.3)
    method = GatedRise(gate_closed=True)
    explorer = explorer_of(method)
    future = explorer.compute("df_rise", RISE_STEP)
    assert method.parked.wait(WAIT_S)
    processors = dict(pipe.unet.attn_processors)
    try:
        with pytest.raises(PipelineBusyError) as error:
            _trace(pipe)
    finally:
        method.gate.set()
    message = str(error.value)
    assert message.startswith("pipeline busy: DF-RISE at step 2 is running on it")
    assert "cancel the DF-RISE at step 2 (explorer.cancel()" in message
    assert "or wait for it to finish" in message
    future.result(WAIT_S)
    # The refused trace installed nothing.
    assert dict(pipe.unet.attn_processors) == processors
    assert "step" not in vars(pipe.scheduler)


def test_a_job_waiting_for_the_pipeline_can_be_cancelled(pipe, explorer_of):
    method = GatedRise(gate_closed=False)
    explorer = explorer_of(method)
    with hold_pipeline(pipe, "the trace of 'x'"):
        future = explorer.compute("df_rise", RISE_STEP)
        time.sleep(0.3)
        started = time.monotonic()
        explorer.cancel()
        assert future.result(WAIT_S) is None  # stopped while waiting, nothing computed
        assert time.monotonic() - started < 5.0
    assert np.isnan(method.started_at)
    assert explorer.status == "cancelled"


def test_the_same_thread_may_take_the_lock_again(pipe, alone):
    # A run item holds the pipeline, then traces inside: no deadlock.
    done: dict[str, Any] = {}

    def nested() -> None:
        with hold_pipeline(pipe, "run item x"):
            done["trace"] = _trace(pipe)

    worker = threading.Thread(target=nested)
    worker.start()
    worker.join(WAIT_S)
    assert not worker.is_alive()
    _same_trace(done["trace"], alone["trace"])


def _free_for_another_thread(pipe: Any) -> bool:
    """Whether another thread can take the pipeline (reentrancy cannot hide a leak there)."""
    got: list[bool] = []

    def probe() -> None:
        with hold_pipeline(pipe, "probe", timeout=0.5) as held:
            got.append(held)

    other = threading.Thread(target=probe)
    other.start()
    other.join(WAIT_S)
    return got == [True]


def test_lock_is_released_when_the_pipeline_raises(pipe):
    with pytest.raises(ValueError, match="nope"), TraceContext(pipe, prompt=PROMPT):
        raise ValueError("nope")
    assert _free_for_another_thread(pipe)


class _RefusingTap(Tap):
    def install(self, loop: Any) -> None:
        super().install(loop)
        raise RuntimeError("cannot attach")


def test_lock_is_released_when_a_tap_fails_to_install(pipe):
    ctx = TraceContext(pipe, prompt=PROMPT, taps=[_RefusingTap("refusing")])
    with pytest.raises(RuntimeError, match="cannot attach"), ctx:
        pass
    assert pipeline_lock(pipe).holder is None
    assert _free_for_another_thread(pipe)


def test_pipelines_sharing_a_denoiser_share_the_lock(pipe):
    again = type(pipe)(**pipe.components)
    assert pipeline_lock(again) is pipeline_lock(pipe)


def test_locks_go_with_their_pipeline():
    class Plain:
        pass

    owner = Plain()
    pipeline_lock(owner)
    key = id(owner)
    assert key in lock._locks
    del owner
    gc.collect()
    assert key not in lock._locks
