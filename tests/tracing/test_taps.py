"""The tap registry: listing a trace's taps, adding one, and nothing left behind."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from diffwidget.tracing.context import TraceContext
from diffwidget.tracing.generate import trace
from diffwidget.tracing.hooks import BlockTap
from diffwidget.tracing.taps import StepCallbackTap, StepEvent, Tap, TapRegistry

PROMPT = "a red circle on the left"
STEPS = 3


def model_state(pipe: Any) -> dict[str, Any]:
    """Everything a tap could leave on the UNet and the scheduler."""
    modules = dict(pipe.unet.named_modules())
    return {
        "processors": {n: m.processor for n, m in modules.items() if hasattr(m, "processor")},
        "hooks": {
            n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in modules.items()
        },
        "registries": sorted(n for n, m in modules.items() if hasattr(m, "_diffusers_hook")),
        "forward": sorted(n for n, m in modules.items() if "forward" in vars(m)),
        "step": "step" in vars(pipe.scheduler),
    }


def run(pipe: Any, prompt: str | list[str] = PROMPT) -> Any:
    generator = torch.Generator("cpu").manual_seed(0)
    return pipe(prompt, num_inference_steps=STEPS, generator=generator, output_type="np")


def test_a_trace_lists_its_taps(tiny_sd_pipe: Any) -> None:
    ctx = TraceContext(tiny_sd_pipe, prompt=PROMPT)
    assert ctx.taps.names() == ["denoiser", "scheduler.step", "attention", "vae.decode"]
    table = {info.name: info for info in ctx.taps.table()}
    assert table["denoiser"].kind == "call"
    assert table["scheduler.step"].kind == "step"
    assert table["vae.decode"].kind == "decode"
    no_previews = TraceContext(tiny_sd_pipe, prompt=PROMPT, decode_previews=False)
    assert no_previews.taps.names() == ["denoiser", "scheduler.step", "attention"]
    assert table["attention"].paths == tuple(ctx.capture.layers)
    assert all(path.endswith("attn2") for path in table["attention"].paths)
    assert ctx.taps.names("attention") == ["attention"]


def test_a_block_norm_per_step_as_an_independent_hook_sees_it(
    tiny_sd_pipe_factory: Callable[..., Any],
) -> None:
    pipe = tiny_sd_pipe_factory()
    # The reference: a plain torch forward hook on an untraced run, prompt's half = row 1.
    reference: list[torch.Tensor] = []
    handle = pipe.unet.mid_block.register_forward_hook(
        lambda _m, _a, out: reference.append(out[1:].detach().norm())
    )
    try:
        plain = run(pipe).images[0]
    finally:
        handle.remove()
    before = model_state(pipe)
    norm = BlockTap("mid_block", half="cond", reduce=lambda t: t.norm(), name="mid_norm")
    ctx = TraceContext(pipe, prompt=PROMPT, taps=[norm])
    assert ctx.taps.names()[-1] == "mid_norm"
    with ctx:
        traced = run(pipe).images[0]
    assert model_state(pipe) == before
    np.testing.assert_array_equal(traced, plain)
    assert [step for step, _ in norm.values] == list(range(STEPS))
    torch.testing.assert_close(torch.stack([v for _, v in norm.values]), torch.stack(reference))


class StepLog(Tap):
    """A loop tap: what the scheduler stepped with, per step."""

    def __init__(self) -> None:
        super().__init__("step_log")
        self.events: list[StepEvent] = []
        self.calls = 0

    def on_call(self, call: Any) -> None:
        self.calls += 1

    def on_step(self, event: StepEvent) -> None:
        self.events.append(event)


def test_a_loop_tap_sees_what_the_trace_records(tiny_sd_pipe: Any) -> None:
    log = StepLog()
    ctx = TraceContext(tiny_sd_pipe, prompt=PROMPT, taps=[log], decode_previews=False)
    with ctx:
        run(tiny_sd_pipe)
    traced = ctx.result()
    assert log.calls == STEPS
    assert [e.step for e in log.events] == list(range(STEPS))
    times = [float(e.timestep) for e in log.events]
    np.testing.assert_array_equal(times, traced.facts.timesteps_exact)
    for event, latent, output in zip(log.events, traced.latents, traced.noise_pred, strict=True):
        np.testing.assert_array_equal(event.sample[0].numpy(), latent)
        np.testing.assert_array_equal(event.model_output[0].numpy(), output)


class FailingInstall(Tap):
    def install(self, loop: Any) -> None:
        super().install(loop)
        raise RuntimeError("cannot attach")


class FailingStep(Tap):
    def on_step(self, event: StepEvent) -> None:
        if event.step == 1:
            raise KeyboardInterrupt


@pytest.mark.parametrize(
    ("tap", "error"),
    [(FailingInstall("bad"), RuntimeError), (FailingStep("bad"), KeyboardInterrupt)],
)
def test_everything_is_removed_when_a_tap_fails(
    tiny_sd_pipe_factory: Callable[..., Any], tap: Tap, error: type[BaseException]
) -> None:
    pipe = tiny_sd_pipe_factory()
    before = model_state(pipe)
    block = BlockTap("down_blocks.1", reduce=lambda t: t.mean())
    with pytest.raises(error), TraceContext(pipe, prompt=PROMPT, taps=[block, tap]):
        run(pipe)
    assert model_state(pipe) == before
    assert block.loop is None


class _Stop(Exception):
    pass


def test_a_step_callback_counts_steps_and_its_exception_stops_the_trace(
    tiny_sd_pipe_factory: Callable[..., Any],
) -> None:
    pipe = tiny_sd_pipe_factory()
    before = model_state(pipe)
    done: list[int] = []
    trace(pipe, PROMPT, num_inference_steps=STEPS, taps=[StepCallbackTap(done.append)])
    assert done == list(range(1, STEPS + 1))

    def stop_after_first(steps_done: int) -> None:
        done.append(steps_done)
        if steps_done == 1:
            raise _Stop  # a cancel button: leaves the pipeline call at once

    done.clear()
    with pytest.raises(_Stop):
        trace(pipe, PROMPT, num_inference_steps=STEPS, taps=[StepCallbackTap(stop_after_first)])
    assert done == [1]
    assert model_state(pipe) == before


def test_the_registry_refuses_what_it_cannot_hold() -> None:
    registry = TapRegistry([Tap("a")])
    with pytest.raises(ValueError, match="already registered"):
        registry.add(Tap("a"))
    with pytest.raises(TypeError, match="Tap"):
        registry.add(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty name"):
        Tap("")
    with pytest.raises(KeyError, match="taps: \\['a'\\]"):
        registry["b"]


def test_taps_alone_observe_a_batch_of_prompts(tiny_sd_pipe_factory: Callable[..., Any]) -> None:
    pipe = tiny_sd_pipe_factory()
    before = model_state(pipe)
    cond = BlockTap("mid_block", half="cond")
    uncond = BlockTap("mid_block", half="uncond", name="mid_uncond")
    whole = BlockTap("mid_block", name="mid_whole")
    ctx = TraceContext(pipe, record="taps", guidance_scale=7.5, taps=[cond, uncond, whole])
    assert "attention" not in ctx.taps
    with ctx:
        run(pipe, [PROMPT, "a blue square"])
    assert model_state(pipe) == before
    assert len(cond.values) == len(uncond.values) == len(whole.values) == STEPS
    # diffusers batches CFG as [negative x 2, prompt x 2].
    for (_, c), (_, u), (_, both) in zip(cond.values, uncond.values, whole.values, strict=True):
        assert both.shape[0] == 4
        torch.testing.assert_close(c, both[2:], rtol=0, atol=0)
        torch.testing.assert_close(u, both[:2], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="record='taps'"):
        ctx.result()


def test_a_second_observer_on_the_same_model_is_refused(
    tiny_sd_pipe_factory: Callable[..., Any],
) -> None:
    pipe = tiny_sd_pipe_factory()
    before = model_state(pipe)
    with TraceContext(pipe, record="taps", taps=[BlockTap("mid_block")]):
        with pytest.raises(RuntimeError, match="already being traced"):
            TraceContext(pipe, record="taps").__enter__()
        # The refused one left the first one's taps in place.
        assert "forward" in vars(pipe.unet)
    assert model_state(pipe) == before
    traced = trace(pipe, PROMPT, num_inference_steps=2, decode_previews=False)
    assert traced.n_steps == 2
