"""Stateless step replay: same numbers as the pipeline, scheduler never touched."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from explain_support import PROMPT, changed_keys, record_trace, scheduler_state

from diffwidget.tracing.replay import StepReplay
from diffwidget.tracing.trace import Trace

ATOL = 1e-4


def test_replay_reproduces_recorded_guided_output(sd_pipe: Any, sd_trace: Trace) -> None:
    replay = StepReplay(sd_pipe, sd_trace)
    for step in range(sd_trace.n_steps):
        out = replay.eps(replay.latent(step), step)[0].numpy()
        np.testing.assert_allclose(out, sd_trace.noise_pred[step], atol=ATOL)
        x0 = replay.pred_x0(replay.latent(step), step)[0].numpy()
        np.testing.assert_allclose(x0, sd_trace.pred_x0[step], atol=ATOL)


def test_replay_leaves_dpm_solver_state_untouched(sd_pipe: Any, sd_trace: Trace) -> None:
    scheduler = sd_pipe.scheduler
    # After a generation DPM-Solver++ holds its history: the state we must not disturb.
    assert scheduler.model_outputs[-1] is not None
    before = scheduler_state(scheduler)
    replay = StepReplay(sd_pipe, sd_trace)
    x = replay.latent(2).repeat(3, 1, 1, 1).requires_grad_(True)
    for step in (2, 3):
        replay.eps(x, step)
        replay.prev(x, step)
        # Gradients w.r.t. the input only: the shared pipeline's parameters stay clean.
        (grad,) = torch.autograd.grad(replay.pred_x0(x, step, grad=True).sum(), x)
        assert torch.isfinite(grad).all()
    assert changed_keys(before, scheduler_state(scheduler)) == []


def test_batched_and_chunked_equal_one_at_a_time(sd_pipe: Any, sd_trace: Trace) -> None:
    gen = torch.Generator().manual_seed(0)
    x = replay_x = torch.randn(3, *sd_trace.latents.shape[1:], generator=gen)
    whole = StepReplay(sd_pipe, sd_trace).prev(replay_x, 1)
    chunked = StepReplay(sd_pipe, sd_trace, chunk_size=2).prev(x, 1)
    single = torch.cat([StepReplay(sd_pipe, sd_trace).prev(x[i : i + 1], 1) for i in range(3)])
    torch.testing.assert_close(whole, single, atol=ATOL, rtol=0)
    torch.testing.assert_close(chunked, single, atol=ATOL, rtol=0)


def test_prev_matches_ddim_step(tiny_sd_pipe_factory: Callable[..., Any]) -> None:
    pipe = tiny_sd_pipe_factory(scheduler="ddim")
    trace = record_trace(pipe, PROMPT, n_steps=3)
    replay = StepReplay(pipe, trace)
    for step in range(trace.n_steps - 1):
        prev = replay.prev(replay.latent(step), step)[0].numpy()
        np.testing.assert_allclose(prev, trace.latents[step + 1], atol=ATOL)
    last = trace.n_steps - 1
    x = replay.latent(last)
    torch.testing.assert_close(replay.prev(x, last), replay.pred_x0(x, last))


def test_sigma_space_scheduler(tiny_sd_pipe_factory: Callable[..., Any]) -> None:
    pipe = tiny_sd_pipe_factory(scheduler="euler")
    trace = record_trace(pipe, PROMPT, n_steps=2)
    before = scheduler_state(pipe.scheduler)
    replay = StepReplay(pipe, trace)
    # Euler keeps latents in sigma space: x_t = x0 + sigma eps, the UNet sees x_t / sqrt(1 + s^2).
    alpha, sigma, scale = replay.coefficients(0)
    assert alpha == 1.0
    assert scale == pytest.approx(1 / (1 + sigma**2) ** 0.5)
    for step in range(trace.n_steps):
        out = replay.eps(replay.latent(step), step)[0].numpy()
        np.testing.assert_allclose(out, trace.noise_pred[step], atol=ATOL)
    assert changed_keys(before, scheduler_state(pipe.scheduler)) == []


def test_sdxl_added_conditions(tiny_sdxl_pipe: Any, sdxl_trace: Trace) -> None:
    assert sdxl_trace.extra, "an SDXL trace records its added conditioning"
    replay = StepReplay(tiny_sdxl_pipe, sdxl_trace)
    out = replay.model_output(replay.latent(1), 1)[0].numpy()
    np.testing.assert_allclose(out, sdxl_trace.noise_pred[1], atol=ATOL)


def test_no_guidance_runs_only_the_conditional_half(sd_pipe: Any, sd_trace: Trace) -> None:
    calls: list[int] = []

    def count(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append(len(args[0] if args else kwargs["sample"]))

    handle = sd_pipe.unet.register_forward_pre_hook(count, with_kwargs=True)
    try:
        trace = Trace(**{**vars(sd_trace), "guidance_scale": 1.0})
        StepReplay(sd_pipe, trace).eps(torch.zeros(2, *sd_trace.latents.shape[1:]), 0)
        StepReplay(sd_pipe, sd_trace).eps(torch.zeros(2, *sd_trace.latents.shape[1:]), 0)
    finally:
        handle.remove()
    assert calls == [2, 4]


def test_replay_errors(sd_pipe: Any, sd_trace: Trace) -> None:
    replay = StepReplay(sd_pipe, sd_trace)
    with pytest.raises(IndexError, match="steps 0"):
        replay.latent(sd_trace.n_steps)
    with pytest.raises(TypeError, match="supported pipelines"):
        StepReplay(object(), sd_trace)
    with pytest.raises(ValueError, match="chunk_size"):
        StepReplay(sd_pipe, sd_trace, chunk_size=0)


def test_replay_reproduces_the_tracing_core(tiny_sd_pipe: Any, tiny_trace: Trace) -> None:
    replay = StepReplay(tiny_sd_pipe, tiny_trace)
    last = tiny_trace.n_steps - 1
    x = torch.as_tensor(tiny_trace.latents[[0, last]])
    np.testing.assert_allclose(replay.eps(x[:1], 0)[0].numpy(), tiny_trace.noise_pred[0], atol=ATOL)
    np.testing.assert_allclose(
        replay.pred_x0(x[1:], last)[0].numpy(), tiny_trace.pred_x0[last], atol=ATOL
    )
