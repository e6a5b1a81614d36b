"""A prompt switch over several seeds asked from the explorer: the missing seeds are traced in
the job with the explorer trace's settings, kept for the next ask, and cancellable."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from diffwidget.widget import Explorer, schema
from diffwidget.widget.switch_view import SwitchRequest
from tests.widget.test_explorer_switch import CAPTION, N_STEPS, SWITCH_STEPS, WAIT_S, _settled


@pytest.fixture(scope="module")
def demo() -> tuple[Any, Any]:
    import diffwidget

    pipe = diffwidget.load_demo_pipeline("unet")
    # Previews on (the explorer's usual trace): the traces made for a switch have none.
    return pipe, diffwidget.trace(pipe, CAPTION, seed=0, num_inference_steps=N_STEPS)


@pytest.fixture(scope="module")
def own(demo) -> list[Any]:
    """What a user gets from ``diffwidget.trace`` for seeds 1 and 2 with the explorer's settings."""
    import diffwidget

    pipe, _ = demo
    return [diffwidget.trace(pipe, CAPTION, seed=s, num_inference_steps=N_STEPS) for s in (1, 2)]


@pytest.fixture
def traced(monkeypatch) -> list[Any]:
    """Every trace ``diffwidget.tracing.generate.trace`` makes while the test runs."""
    from diffwidget.tracing import generate

    made: list[Any] = []
    original = generate.trace

    def counting(*args: Any, **kwargs: Any) -> Any:
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(generate, "trace", counting)
    return made


def _press(explorer: Explorer, seeds: Any) -> None:
    content = {"kind": "prompt_switch", "word": "red", "replacement": "blue", "seeds": seeds}
    explorer.widget._dispatch_message(explorer.widget, content, [])


def test_three_seeds_trace_the_missing_two_like_the_explorer_and_keep_them(demo, own, traced):
    from diffwidget.explain.prompt_switch import PromptSwitch

    pipe, trace = demo
    explorer = Explorer(trace, pipe=pipe)
    try:
        seen: list[float] = []
        explorer.widget.observe(lambda change: seen.append(change["new"]), names=["progress"])
        ask = explorer.prompt_switch("red", "blue", seeds=3, switch_steps=SWITCH_STEPS)
        curves = ask.result(WAIT_S)
        assert _settled(explorer) == "done", explorer.error
        assert curves.seeds.tolist() == [0, 1, 2]
        assert curves.outcomes.shape[-1] == 3
        assert explorer.widget.switch_seeds == 3
        assert explorer.widget.switch["n_seeds"] == 3
        assert [t.facts.seed for t in traced] == [1, 2]
        # Bit for bit what the user gets from diffwidget.trace with the explorer's settings.
        for made, expected in zip(traced, own, strict=True):
            assert made.image is not None
            np.testing.assert_array_equal(made.image, expected.image)
            np.testing.assert_array_equal(made.final_latent, expected.final_latent)
        direct = PromptSwitch(switch_steps=SWITCH_STEPS, progress_bar=False).run(
            pipe, [trace, *own], word="red", replacement="blue"
        )
        np.testing.assert_array_equal(curves.outcomes, direct.outcomes)
        # One bar over tracing (2 x 4 steps) and switching (3 seeds x (4 + 2) steps): it
        # moved during the tracing stage and never went back.
        assert seen == sorted(seen)
        assert any(0 < p <= 2 * N_STEPS / 26 for p in seen)
        # Asking again, from the page or with fewer seeds, traces nothing new.
        _press(explorer, 3)
        deadline = time.monotonic() + WAIT_S
        while explorer.commitment is curves and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _settled(explorer) == "done", explorer.error
        assert explorer.commitment is not None
        assert explorer.commitment.seeds.tolist() == [0, 1, 2]
        # A NumPy count is a count (as from a loop over np.arange).
        fewer = explorer.prompt_switch("red", "blue", seeds=np.int64(2), switch_steps=[N_STEPS])
        assert fewer.result(WAIT_S).seeds.tolist() == [0, 1]
        assert len(traced) == 2
    finally:
        explorer.close()


def test_cancel_while_tracing_stops_the_trace_and_keeps_nothing_of_it(demo, traced):
    pipe, trace = demo
    explorer = Explorer(trace, pipe=pipe)
    processors = dict(pipe.unet.attn_processors)
    try:

        def cancel_once_moving(change: dict[str, Any]) -> None:
            if 0 < change["new"] < 1:
                explorer.cancel()

        explorer.widget.observe(cancel_once_moving, names=["progress"])
        assert explorer.prompt_switch("red", "blue", seeds=2).result(WAIT_S) is None
        assert _settled(explorer) == "cancelled"
        assert explorer.commitment is None
        assert traced == []  # the trace of seed 1 stopped inside the loop: none was returned
        assert dict(pipe.unet.attn_processors) == processors
        assert not hasattr(pipe.unet, "_diffusers_hook")
        explorer.widget.unobserve(cancel_once_moving, names=["progress"])
        curves = explorer.prompt_switch("red", "blue", seeds=2, switch_steps=[N_STEPS])
        assert curves.result(WAIT_S).seeds.tolist() == [0, 1]
        assert [t.facts.seed for t in traced] == [1]
    finally:
        explorer.close()


def test_out_of_range_seeds_are_refused_before_any_work(demo, traced):
    pipe, trace = demo
    explorer = Explorer(trace, pipe=pipe)
    try:
        top = schema.SWITCH_MAX_SEEDS
        with pytest.raises(
            ValueError, match=rf"switch_seeds {top + 1} is out of range; use 1\.\.{top}"
        ):
            explorer.prompt_switch("red", "blue", seeds=top + 1)
        with pytest.raises(ValueError, match="switch_seeds must be an integer"):
            explorer.prompt_switch("red", "blue", seeds=2.5)
        _press(explorer, 0)
        assert explorer.error == f"switch_seeds 0 is out of range; use 1..{top}"
        assert explorer.status == "idle"
        assert traced == []
    finally:
        explorer.close()


def test_asks_with_different_seed_counts_are_different_jobs(demo):
    _, trace = demo
    two = SwitchRequest("red", "blue", (trace,), (1,), None)
    three = SwitchRequest("red", "blue", (trace,), (1, 2), None)
    assert two.seeds == (0, 1)
    assert two.key != three.key
    assert three.key == SwitchRequest("red", "blue", (trace,), (1, 2), None).key
    assert three.label == "prompt switch red → blue (3 seeds)"
