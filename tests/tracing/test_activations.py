"""Recording pooled UNet block activations on the tiny pipeline."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from diffwidget.tracing.activations import (
    ActivationRecord,
    ActivationRecorder,
    default_blocks,
)

PROMPTS = ["a red circle", "a blue square on the left", "a dog", "a green triangle"]
STEPS = 4
GRID = 2


def _hook_count(pipe: Any) -> int:
    """Torch hooks, diffusers hook registries and patched ``forward`` attributes on the UNet."""
    return sum(
        len(m._forward_hooks)
        + len(m._forward_pre_hooks)
        + hasattr(m, "_diffusers_hook")
        + ("forward" in vars(m))
        for m in pipe.unet.modules()
    )


def _expected_timesteps(pipe: Any, steps: int) -> np.ndarray:
    # A fresh scheduler of the same config: the pipeline's own one must stay untouched.
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps.numpy().astype(np.int64)


@pytest.fixture(scope="module")
def grid_record(tiny_sd_pipe: Any) -> ActivationRecord:
    recorder = ActivationRecorder(pooling="grid", grid_size=GRID, batch_size=3, progress=False)
    return recorder.record(tiny_sd_pipe, PROMPTS, num_inference_steps=STEPS, seed=5)


def test_shapes_for_every_step(tiny_sd_pipe: Any, grid_record: ActivationRecord) -> None:
    blocks = default_blocks(tiny_sd_pipe)
    assert grid_record.blocks == blocks
    assert "mid_block" in blocks
    for path in blocks:
        channels = tiny_sd_pipe.unet.get_submodule(path).resnets[-1].out_channels
        assert grid_record.activations[path].shape == (len(PROMPTS), STEPS, channels * GRID**2)
        assert grid_record.activations[path].dtype == np.float16
        assert np.isfinite(grid_record.activations[path]).all()
    np.testing.assert_array_equal(grid_record.timesteps, _expected_timesteps(tiny_sd_pipe, STEPS))
    assert grid_record.images is not None
    assert grid_record.images.shape[0] == len(PROMPTS)
    assert grid_record.images.dtype == np.uint8
    assert grid_record.seeds == [5, 6, 7, 8]
    total = sum(grid_record.activations[p].shape[-1] for p in blocks)
    assert grid_record.features().shape == (len(PROMPTS), STEPS, total)


def test_grid_cells_average_to_the_spatial_mean(
    tiny_sd_pipe: Any, grid_record: ActivationRecord
) -> None:
    mean = ActivationRecorder(["mid_block"], pooling="mean", batch_size=3, dtype="float32")
    mean.progress = False
    record = mean.record(tiny_sd_pipe, PROMPTS, num_inference_steps=STEPS, seed=5)
    cells = grid_record.activations["mid_block"].astype(np.float32)
    cells = cells.reshape(len(PROMPTS), STEPS, -1, GRID * GRID).mean(-1)
    # The mid block's grid is even, so the four equal cells average to the plain mean.
    np.testing.assert_allclose(cells, record.activations["mid_block"], atol=2e-2, rtol=1e-2)


def test_batched_prompts_match_single_prompt_runs(
    tiny_sd_pipe: Any, grid_record: ActivationRecord
) -> None:
    single = ActivationRecorder(pooling="grid", grid_size=GRID, batch_size=1, progress=False)
    record = single.record(tiny_sd_pipe, PROMPTS[2:3], seeds=[7], num_inference_steps=STEPS)
    for path in grid_record.blocks:
        np.testing.assert_allclose(
            record.activations[path][0].astype(np.float32),
            grid_record.activations[path][2].astype(np.float32),
            atol=2e-2,
            rtol=1e-2,
        )
    assert np.abs(record.images[0].astype(int) - grid_record.images[2]).max() <= 1


def test_records_the_conditional_half(tiny_sd_pipe: Any) -> None:
    recorder = ActivationRecorder(["mid_block"], dtype="float32", batch_size=2, progress=False)
    kwargs: dict[str, Any] = {"num_inference_steps": STEPS, "seed": 1}
    plain = recorder.record(tiny_sd_pipe, PROMPTS[:2], **kwargs)
    negative = recorder.record(tiny_sd_pipe, PROMPTS[:2], negative_prompt="a cat", **kwargs)
    no_cfg = recorder.record(tiny_sd_pipe, PROMPTS[:2], guidance_scale=1.0, **kwargs)
    first, later = (slice(0, 1), slice(1, None))
    acts = "mid_block"
    # At step 0 both runs start from the same noise and the prompt half sees the same text,
    # so only the unconditional half could tell the negative prompt apart.
    np.testing.assert_allclose(
        negative.activations[acts][:, first], plain.activations[acts][:, first], atol=1e-5
    )
    # Without CFG the whole batch is the prompt half: it must equal the CFG run's cond half.
    np.testing.assert_allclose(
        no_cfg.activations[acts][:, first], plain.activations[acts][:, first], atol=1e-5
    )
    # The negative prompt does steer the later steps (so the checks above can fail).
    assert not np.allclose(
        negative.activations[acts][:, later], plain.activations[acts][:, later], atol=1e-5
    )
    assert plain.meta["halves"] == ["cond"]


def test_unconditional_half_never_sees_the_prompt(tiny_sd_pipe: Any) -> None:
    recorder = ActivationRecorder(
        ["mid_block"], halves=["uncond", "cond"], dtype="float32", batch_size=2, progress=False
    )
    # Two different prompts from the same noise: at step 0 only the text differs.
    record = recorder.record(tiny_sd_pipe, PROMPTS[:2], seeds=[4, 4], num_inference_steps=STEPS)
    uncond, cond = record.features(half="uncond"), record.features(half="cond")
    np.testing.assert_allclose(uncond[0, 0], uncond[1, 0], atol=1e-5)
    assert not np.allclose(cond[0, 0], cond[1, 0], atol=1e-5)
    # Later the latents differ, and with them the unconditional half.
    assert not np.allclose(uncond[0, -1], uncond[1, -1], atol=1e-5)
    # Recording both halves leaves the conditional one as recording it alone does.
    alone = ActivationRecorder(["mid_block"], dtype="float32", batch_size=2, progress=False)
    single = alone.record(tiny_sd_pipe, PROMPTS[:2], seeds=[4, 4], num_inference_steps=STEPS)
    np.testing.assert_array_equal(single.features(), cond)


def test_decoded_x0_reaches_the_final_image(tiny_sd_pipe: Any) -> None:
    recorder = ActivationRecorder(decode_x0=True, batch_size=2, progress=False)
    record = recorder.record(tiny_sd_pipe, PROMPTS[:3], num_inference_steps=STEPS)
    assert record.x0_images is not None
    assert record.images is not None
    assert record.x0_images.shape == (3, STEPS, *record.images.shape[1:])
    assert record.x0_images.dtype == np.uint8
    # DPM-Solver++ ends with a first-order step to sigma 0, whose result *is* x̂0.
    last = np.abs(record.x0_images[:, -1].astype(int) - record.images.astype(int))
    assert last.max() <= 1
    first = np.abs(record.x0_images[:, 0].astype(int) - record.images.astype(int))
    assert first.mean() > last.mean()


def test_x0_from_the_conditional_half(tiny_sd_pipe: Any) -> None:
    def first_x0(guidance: float, x0_from: str) -> np.ndarray:
        recorder = ActivationRecorder(decode_x0=True, x0_from=x0_from, progress=False)  # type: ignore[arg-type]
        record = recorder.record(
            tiny_sd_pipe, PROMPTS[:1], seeds=[5], num_inference_steps=STEPS, guidance_scale=guidance
        )
        assert record.x0_images is not None
        return record.x0_images[0, 0].astype(int)

    # Step 0 starts from the same noise, so the conditional half of a CFG run predicts what
    # a run without CFG predicts, and the guided x̂0 differs from both.
    cond = first_x0(7.5, "cond")
    assert np.abs(cond - first_x0(1.0, "guided")).max() <= 1
    assert np.abs(cond - first_x0(7.5, "guided")).max() > 1


def test_no_hooks_left_behind(tiny_sd_pipe: Any) -> None:
    before = _hook_count(tiny_sd_pipe)
    for decode_x0 in (False, True):
        recorder = ActivationRecorder(decode_x0=decode_x0, progress=False)
        recorder.record(tiny_sd_pipe, PROMPTS[:1], num_inference_steps=2)
    assert _hook_count(tiny_sd_pipe) == before


def test_no_hooks_left_after_the_pipeline_raises(
    tiny_sd_pipe_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = tiny_sd_pipe_factory()
    before = _hook_count(pipe)
    bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
    original_step = pipe.scheduler.step
    calls = []

    def failing_step(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("scheduler failed")
        return original_step(*args, **kwargs)

    monkeypatch.setattr(pipe.scheduler, "step", failing_step)
    recorder = ActivationRecorder(decode_x0=True, progress=False)
    with pytest.raises(RuntimeError, match="scheduler failed"):
        recorder.record(pipe, PROMPTS[:2], num_inference_steps=STEPS)
    assert _hook_count(pipe) == before
    assert dict(getattr(pipe, "_progress_bar_config", {})) == bar_config


def test_save_load_round_trip(tiny_sd_pipe: Any, tmp_path: Path) -> None:
    recorder = ActivationRecorder(decode_x0=True, halves=["cond", "uncond"], progress=False)
    record = recorder.record(tiny_sd_pipe, PROMPTS[:2], num_inference_steps=2)
    path = record.save(tmp_path / "acts")
    assert path.suffix == ".npz"
    loaded = ActivationRecord.load(path)
    assert loaded.prompts == record.prompts
    assert loaded.seeds == record.seeds
    assert loaded.blocks == record.blocks
    assert loaded.meta == record.meta
    assert (loaded.pooling, loaded.grid_size) == (record.pooling, record.grid_size)
    np.testing.assert_array_equal(loaded.timesteps, record.timesteps)
    assert loaded.halves == ["cond", "uncond"]
    for half in ("cond", "uncond"):
        np.testing.assert_array_equal(loaded.features(half=half), record.features(half=half))
    for path_ in record.blocks:
        np.testing.assert_array_equal(loaded.activations[path_], record.activations[path_])
        assert loaded.activations[path_].dtype == record.activations[path_].dtype
    np.testing.assert_array_equal(loaded.images, record.images)
    np.testing.assert_array_equal(loaded.x0_images, record.x0_images)


def test_clear_errors(tiny_sd_pipe: Any, tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="mid_blok"):
        ActivationRecorder(["mid_blok"], progress=False).record(tiny_sd_pipe, PROMPTS[:1])
    recorder = ActivationRecorder(progress=False)
    with pytest.raises(ValueError, match="sets"):
        recorder.record(tiny_sd_pipe, PROMPTS[:1], output_type="pil")
    with pytest.raises(ValueError, match="one per prompt"):
        recorder.record(tiny_sd_pipe, PROMPTS[:2], seeds=[1])
    with pytest.raises(ValueError, match="no unconditional half"):
        ActivationRecorder(halves=["uncond"], progress=False).record(
            tiny_sd_pipe, PROMPTS[:1], guidance_scale=1.0
        )
    with pytest.raises(ValueError, match="distinct"):
        ActivationRecorder(halves=["cond", "cond"])
    with pytest.raises(ValueError, match="pooling"):
        ActivationRecorder(pooling="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="x0_from"):
        ActivationRecorder(x0_from="uncond")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        ActivationRecord.load(tmp_path / "missing.npz")


def test_x0_and_seeding_agree_with_a_traced_run(tiny_sd_pipe: Any) -> None:
    from diffwidget.tracing.generate import trace

    recorder = ActivationRecorder(decode_x0=True, progress=False)
    record = recorder.record(tiny_sd_pipe, PROMPTS[:2], seeds=[3, 11], num_inference_steps=STEPS)
    traced = trace(
        tiny_sd_pipe, PROMPTS[1], seed=11, num_inference_steps=STEPS, preview_decoder="vae"
    )
    assert traced.previews is not None
    assert record.x0_images is not None
    np.testing.assert_array_equal(record.timesteps, traced.timesteps)
    # Two independent x̂0 computations (scheduler-step wrapper vs UNet hooks) on the same
    # seeded run: equal up to uint8 rounding.
    assert np.abs(record.x0_images[1].astype(int) - traced.previews.astype(int)).max() <= 1


def test_separate_cfg_calls_record_both_halves(family_case: Callable[..., Any]) -> None:
    """Flux's true CFG runs the prompt and the negative prompt in two calls per step."""
    pipe, kwargs = family_case("flux_true_cfg")
    size = {k: kwargs[k] for k in ("max_sequence_length", "height", "width")}
    block = "transformer_blocks.1"
    recorder = ActivationRecorder(
        [block], halves=["cond", "uncond"], dtype="float32", decode_x0=True, progress=False
    )
    negative = kwargs["negative_prompt"]
    record = recorder.record(
        pipe,
        PROMPTS[:2],
        seeds=[0, 1],
        num_inference_steps=2,
        true_cfg_scale=kwargs["true_cfg_scale"],
        negative_prompt=negative,
        **size,
    )
    alone = ActivationRecorder([block], dtype="float32", progress=False)
    # Step 0 starts from the same noise: the prompt's call is a plain run of the prompt, the
    # unconditional call a plain run of the negative prompt.
    plain = alone.record(pipe, PROMPTS[:2], seeds=[0, 1], num_inference_steps=2, **size)
    negatives = alone.record(pipe, [negative] * 2, seeds=[0, 1], num_inference_steps=2, **size)
    first = slice(0, 1)
    np.testing.assert_allclose(
        record.activations[block][:, first], plain.activations[block][:, first], atol=1e-5
    )
    np.testing.assert_allclose(
        record.uncond_activations[block][:, first],
        negatives.activations[block][:, first],
        atol=1e-5,
    )
    assert not np.allclose(record.uncond_activations[block], record.activations[block])
    assert record.x0_images is not None
    assert record.x0_images.shape[:2] == (2, 2)
