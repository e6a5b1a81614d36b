"""Branches of recorded trajectories: exact replays, the pipeline's own arithmetic as the
reference for switched branches, every family, nothing of the pipeline touched."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from diffwidget.tracing.branch import ActivationPatch, Branch, BranchesStopped, BranchRunner
from diffwidget.tracing.branch_scheduler import BranchSchedulerError
from diffwidget.tracing.branch_setup import BranchConditioning, prepare_branches, word_positions
from diffwidget.tracing.generate import trace
from diffwidget.tracing.trace import Trace
from tests.explain.explain_support import changed_keys, hook_counts, scheduler_state
from tests.family_cases import FAMILY_CASES

PROMPT_A = "a red circle on the left"
PROMPT_B = "a blue circle on the left"
N_STEPS = 5
#: Rows batched together may round differently in the denoiser's kernels (float32).
BATCHED_ATOL = 1e-4


def _setup(
    pipe: Any, traces: list[Trace], prompts: list[str], **kwargs: Any
) -> tuple[BranchRunner, list[BranchConditioning]]:
    setup = prepare_branches(pipe, traces[0], prompts, **kwargs)
    conds = [setup.conditionings[traces[0].prompt], *[setup.conditionings[p] for p in prompts]]
    return BranchRunner(pipe, traces, setup), conds


def _switched_by_pipeline(pipe: Any, k: int, embeds_b: torch.Tensor, seed: int) -> np.ndarray:
    """Prompt A's generation with the prompt embeddings swapped for B's after step k - 1,
    run by the pipeline itself (its own scheduler and loop): the reference of a branch."""

    def swap(_pipe: Any, i: int, _t: Any, _kwargs: dict[str, Any]) -> dict[str, Any]:
        return {"prompt_embeds": embeds_b} if i == k - 1 else {}

    out = pipe(
        PROMPT_B if k == 0 else PROMPT_A,
        num_inference_steps=N_STEPS,
        guidance_scale=7.5,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        callback_on_step_end=swap,
        callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
    )
    return out.images[0].numpy()


@pytest.mark.parametrize("scheduler", ["dpm++", "ddim", "euler", "pndm"])
def test_branch_from_step_zero_is_the_trace_bit_for_bit(
    tiny_sd_pipe_factory: Any, scheduler: str
) -> None:
    pipe = tiny_sd_pipe_factory(scheduler=scheduler)
    tr = trace(pipe, PROMPT_A, num_inference_steps=N_STEPS, seed=3)
    before = scheduler_state(pipe.scheduler)
    runner, conds = _setup(pipe, [tr], [])
    one = runner.run([Branch(start=0)], conds)
    np.testing.assert_array_equal(one.latents[0], tr.final_latent)
    assert one.images is not None
    assert tr.image is not None
    np.testing.assert_array_equal(one.images[0], tr.image)
    # Batched with every other start: the same trajectory, within float32 rounding.
    many = runner.run([Branch(start=k) for k in range(tr.n_steps + 1)], conds)
    scale = 1 + np.abs(tr.final_latent).max()
    assert np.abs(many.latents - tr.final_latent).max() <= BATCHED_ATOL * scale
    np.testing.assert_array_equal(many.latents[-1], tr.final_latent)  # start = n: the trace's own
    assert changed_keys(before, scheduler_state(pipe.scheduler)) == []


@pytest.mark.parametrize("scheduler", ["dpm++", "ddim", "euler", "pndm"])
def test_switched_branches_match_the_pipeline_switching_prompts(
    tiny_sd_pipe_factory: Any, scheduler: str
) -> None:
    """The solver history of multistep samplers (DPM-Solver++, PLMS) is rebuilt from the
    trace: a branch from x_k equals the pipeline's own run whose prompt changes at step k."""
    pipe = tiny_sd_pipe_factory(scheduler=scheduler)
    traces = [trace(pipe, PROMPT_A, num_inference_steps=N_STEPS, seed=s) for s in (0, 1)]
    runner, conds = _setup(pipe, traces, [PROMPT_B])
    branches = [Branch(source=s, start=k, conditioning=1) for k in range(N_STEPS) for s in (0, 1)]
    out = runner.run(branches, conds, decode=False)
    embeds_b = conds[1].embeds
    for branch, latent in zip(branches, out.latents, strict=True):
        want = _switched_by_pipeline(pipe, branch.start, embeds_b, seed=branch.source)
        assert np.abs(latent - want).max() <= BATCHED_ATOL * (1 + np.abs(want).max()), branch
    n = traces[0].n_steps  # PLMS repeats a step: 6 for 5 inference steps
    assert out.rows == 2 * sum(n - k for k in range(N_STEPS))
    assert out.calls == n  # one batched denoiser call per step


@pytest.mark.parametrize("case", sorted(FAMILY_CASES))
def test_every_family_branches_exactly(case: str, family_case: Any, family_trace: Any) -> None:
    pipe, kwargs = family_case(case)
    tr = family_trace(case)
    denoiser = pipe.transformer
    before, hooks = scheduler_state(pipe.scheduler), hook_counts(denoiser)
    forward = "forward" in vars(denoiser)
    extra = {k: v for k, v in kwargs.items() if k not in ("height", "width")}
    runner, conds = _setup(pipe, [tr], ["a blue square on the right"], **extra)
    own = runner.run([Branch(start=0)], conds)
    np.testing.assert_array_equal(own.latents[0], tr.final_latent)
    assert own.images is not None
    assert tr.image is not None
    np.testing.assert_array_equal(own.images[0], tr.image)
    switched = runner.run([Branch(start=1, conditioning=1), Branch(start=1)], conds, decode=False)
    assert not np.allclose(switched.latents[0], tr.final_latent)
    scale = 1 + np.abs(tr.final_latent).max()
    assert np.abs(switched.latents[1] - tr.final_latent).max() <= BATCHED_ATOL * scale
    assert changed_keys(before, scheduler_state(pipe.scheduler)) == []
    assert hook_counts(denoiser) == hooks
    assert ("forward" in vars(denoiser)) == forward


def test_word_positions_find_both_copies_of_an_sd3_word(family_case: Any) -> None:
    pipe, _ = family_case("sd3")
    positions = word_positions(pipe, PROMPT_A, "red", max_sequence_length=24)
    assert len(positions) == 2  # CLIP part and T5 part
    assert positions[0] < 77 <= positions[1]
    with pytest.raises(ValueError, match="has no word 'green'"):
        word_positions(pipe, PROMPT_A, "green", max_sequence_length=24)


def test_masked_text_column_equals_the_column_removed(tiny_sd_pipe: Any) -> None:
    """The UNet family's text mask takes a word out of every cross-attention softmax: the
    same as deleting its row from the text (cross-attention has no positions)."""
    tr = trace(tiny_sd_pipe, PROMPT_A, num_inference_steps=2, seed=0)
    position = word_positions(tiny_sd_pipe, PROMPT_A, "red")[0]
    text = torch.as_tensor(tr.prompt_embeds[-1:])
    x = torch.as_tensor(tr.latents[:1])
    t = torch.tensor(int(tr.timesteps[0]))
    mask = torch.ones(1, text.shape[1])
    mask[0, position] = 0
    unet = tiny_sd_pipe.unet
    with torch.no_grad():
        masked = unet(x, t, encoder_hidden_states=text, encoder_attention_mask=mask).sample
        kept = torch.cat([text[:, :position], text[:, position + 1 :]], dim=1)
        removed = unet(x, t, encoder_hidden_states=kept).sample
        plain = unet(x, t, encoder_hidden_states=text).sample
    assert torch.allclose(masked, removed, atol=1e-5)
    assert not torch.allclose(masked, plain, atol=1e-4)


def test_a_patch_writes_only_its_rows(tiny_sd_pipe: Any) -> None:
    """Patching a row with its own activation changes nothing; with another row's, only that
    row changes."""
    traces = [trace(tiny_sd_pipe, p, num_inference_steps=3, seed=0) for p in (PROMPT_A, PROMPT_B)]
    runner, conds = _setup(tiny_sd_pipe, traces[:1], [])
    path = "mid_block"
    own = runner.block_outputs(0, conds[0], [path], [1])[(1, path)]
    other = runner.block_outputs(
        0, BranchConditioning.of_trace(traces[1], runner.device, runner.dtype), [path], [1]
    )[(1, path)]
    # One row, as the activation was read: the same arithmetic, bit for bit.
    alone = runner.run([Branch(start=1)], conds, decode=False)
    same = runner.run([Branch(start=1, patch=ActivationPatch(1, path, own))], conds, decode=False)
    np.testing.assert_array_equal(same.latents, alone.latents)
    plain = runner.run([Branch(start=1), Branch(start=1)], conds, decode=False)
    patched = runner.run(
        [Branch(start=1), Branch(start=1, patch=ActivationPatch(1, path, other))],
        conds,
        decode=False,
    )
    np.testing.assert_array_equal(patched.latents[0], plain.latents[0])
    assert not np.allclose(patched.latents[1], plain.latents[1])
    assert hook_counts(tiny_sd_pipe.unet) == 0


class _Boom(RuntimeError):
    pass


def test_nothing_left_behind_when_the_denoiser_raises(
    tiny_sd_pipe_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = tiny_sd_pipe_factory()
    tr = trace(pipe, PROMPT_A, num_inference_steps=3, seed=0)
    runner, conds = _setup(pipe, [tr], [])
    acts = runner.block_outputs(0, conds[0], ["mid_block"], [1])
    before, hooks = scheduler_state(pipe.scheduler), hook_counts(pipe.unet)
    processors = {n: m.processor for n, m in pipe.unet.named_modules() if hasattr(m, "processor")}

    def explode(*_: Any, **__: Any) -> None:
        raise _Boom("mid-run failure")

    monkeypatch.setattr(pipe.unet.up_blocks[-1], "forward", explode)
    patch = ActivationPatch(1, "mid_block", acts[(1, "mid_block")])
    with pytest.raises(_Boom):
        runner.run([Branch(start=1, patch=patch)], conds)
    monkeypatch.undo()
    assert changed_keys(before, scheduler_state(pipe.scheduler)) == []
    assert hook_counts(pipe.unet) == hooks
    assert not hasattr(pipe.unet.mid_block, "_diffusers_hook")
    assert processors == {
        n: m.processor for n, m in pipe.unet.named_modules() if hasattr(m, "processor")
    }
    # The runner still works afterwards.
    out = runner.run([Branch(start=0)], conds, decode=False)
    np.testing.assert_array_equal(out.latents[0], tr.final_latent)


def test_progress_can_stop_a_run(tiny_sd_pipe: Any) -> None:
    tr = trace(tiny_sd_pipe, PROMPT_A, num_inference_steps=3, seed=0)
    runner, conds = _setup(tiny_sd_pipe, [tr], [])
    seen: list[tuple[int, int]] = []

    def stop(done: int, total: int) -> bool:
        seen.append((done, total))
        return False

    with pytest.raises(BranchesStopped, match="stopped after 1 of 5"):
        runner.run([Branch(start=0), Branch(start=1)], conds, progress=stop)
    assert seen == [(1, 5)]


def test_a_stochastic_sampler_is_refused(tiny_sd_pipe_factory: Any) -> None:
    from diffusers import EulerAncestralDiscreteScheduler

    pipe = tiny_sd_pipe_factory()
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    tr = trace(pipe, PROMPT_A, num_inference_steps=3, seed=0)
    runner, conds = _setup(pipe, [tr], [])
    with pytest.raises(BranchSchedulerError, match="deterministic sampler"):
        runner.run([Branch(start=2)], conds)


def test_settings_that_do_not_reproduce_the_trace_are_refused(
    tiny_sd_pipe_factory: Any, family_case: Any, family_trace: Any
) -> None:
    pipe = tiny_sd_pipe_factory()
    tr = trace(pipe, PROMPT_A, num_inference_steps=3, seed=0)
    with pytest.raises(ValueError, match="timesteps"):
        prepare_branches(pipe, tr, [], num_inference_steps=4)
    with pytest.raises(ValueError, match="guidance"):
        prepare_branches(pipe, tr, [], guidance_scale=2.0)
    sd3, _ = family_case("sd3")
    with pytest.raises(ValueError, match="max_sequence_length"):
        prepare_branches(sd3, family_trace("sd3"), [])


def test_bad_branches_get_clear_errors(tiny_sd_pipe: Any) -> None:
    traces = [trace(tiny_sd_pipe, PROMPT_A, num_inference_steps=n, seed=0) for n in (2, 3)]
    runner, conds = _setup(tiny_sd_pipe, traces[:1], [])
    with pytest.raises(IndexError, match="start 5"):
        runner.run([Branch(start=5)], conds)
    with pytest.raises(IndexError, match="source 1"):
        runner.run([Branch(source=1)], conds)
    with pytest.raises(IndexError, match="conditioning index"):
        runner.run([Branch(conditioning=3)], conds)
    with pytest.raises(ValueError, match="per-step conditioning needs 2"):
        runner.run([Branch(conditioning=(0,))], conds)
    with pytest.raises(ValueError, match="outside its branch"):
        runner.run([Branch(start=1, patch=ActivationPatch(0, "mid_block", ()))], conds)
    with pytest.raises(ValueError, match="at least one branch"):
        runner.run([], conds)
    with pytest.raises(ValueError, match="differ in their settings"):
        BranchRunner(tiny_sd_pipe, traces, runner.setup)
    with pytest.raises(ValueError, match="max_batch"):
        BranchRunner(tiny_sd_pipe, traces[:1], runner.setup, max_batch=0)
