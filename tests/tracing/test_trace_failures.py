"""A trace is never lost: failures after the loop, full disks, and the memory check before it."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from diffwidget.testing.tiny import tiny_sd_pipeline
from diffwidget.tracing.budget import (
    BYTES_PER_MB,
    InsufficientMemoryError,
    MemoryBudgetError,
    StepBytes,
    check_free_memory,
    plan_memory,
)
from diffwidget.tracing.context import TraceContext
from diffwidget.tracing.decode import decode_exact, vae_decode_bytes
from diffwidget.tracing.facts import TraceIncompleteWarning
from diffwidget.tracing.generate import trace
from diffwidget.tracing.replay import StepReplay
from diffwidget.tracing.trace import Trace, TraceSaveError

PROMPT = "a red circle on the left"
STEPS = 3
#: What torch's CUDA allocator says when it runs out (the text is what code matches on).
CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 15.77 GiB "
    "of which 1.06 GiB is free."
)


class FailingDecode:
    """Replaces ``vae.decode`` on the instance: raises an out-of-memory error ``times`` times."""

    def __init__(self, vae: Any, times: int) -> None:
        self.original = vae.decode
        self.times = times
        self.calls = 0
        vae.decode = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls <= self.times:
            raise torch.OutOfMemoryError(CUDA_OOM)
        return self.original(*args, **kwargs)


def _replays(pipe: Any, traced: Trace) -> None:
    replay = StepReplay(pipe, traced)
    for step in range(traced.n_steps):
        x0 = replay.pred_x0(replay.latent(step), step)[0].numpy()
        np.testing.assert_allclose(x0, traced.pred_x0[step], atol=1e-4, rtol=1e-5)


# ============================================================ failures after the loop
def test_a_decode_that_always_runs_out_of_memory_keeps_every_step(tmp_path: Path) -> None:
    pipe = tiny_sd_pipeline()
    reference = trace(pipe, PROMPT, num_inference_steps=STEPS, decode_previews=False)
    failing = FailingDecode(pipe.vae, times=10)
    with pytest.warns(TraceIncompleteWarning, match="No final image") as caught:
        kept = trace(pipe, PROMPT, num_inference_steps=STEPS)
    incomplete = [w for w in caught if w.category is TraceIncompleteWarning]
    assert len(incomplete) == 1
    assert "3 recorded steps are complete" in str(incomplete[0].message)
    # The pipeline's decode and the trace's own one (with tiling on, retried) all failed.
    assert failing.calls == 3
    assert kept.n_steps == STEPS
    np.testing.assert_array_equal(kept.pred_x0, reference.pred_x0)
    np.testing.assert_array_equal(kept.final_latent, reference.final_latent)
    assert kept.image is None
    assert kept.previews is None
    missing = {m.part: m.reason for m in kept.facts.missing}
    assert set(missing) == {"image", "previews"}
    assert (
        "the pipeline raised after the last step (OutOfMemoryError: CUDA out of"
        in (missing["image"])
    )
    assert "decoding the final latent again failed too" in missing["image"]
    assert "exact decode the latent→RGB map is fitted on failed" in missing["previews"]
    # Every tap is gone, the VAE keeps the wrapper the test put there, tiling is off again.
    assert vars(pipe.vae)["decode"] is failing
    assert "step" not in vars(pipe.scheduler)
    assert not pipe.vae.use_tiling
    # The kept trace saves, opens with what it misses, and replays.
    loaded = Trace.load(kept.save(tmp_path / "kept.safetensors"))
    assert loaded.facts.missing == kept.facts.missing
    assert loaded.image is None
    _replays(pipe, loaded)


def test_the_image_is_decoded_again_when_only_the_pipelines_decode_failed() -> None:
    pipe = tiny_sd_pipeline()
    reference = trace(pipe, PROMPT, num_inference_steps=STEPS)
    FailingDecode(pipe.vae, times=1)
    kept = trace(pipe, PROMPT, num_inference_steps=STEPS)
    assert kept.facts.missing == []
    assert kept.image is not None
    assert reference.image is not None
    assert np.abs(kept.image.astype(int) - reference.image.astype(int)).max() <= 1
    assert kept.facts.preview_map is not None
    assert kept.facts.preview_map.source == "exact decode"
    assert kept.previews is not None
    assert reference.previews is not None
    assert np.abs(kept.previews.astype(int) - reference.previews.astype(int)).max() <= 2


def test_decoded_previews_that_fail_leave_the_image(monkeypatch: pytest.MonkeyPatch) -> None:
    import diffwidget.tracing.preview_tap as preview_tap

    def no_memory(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 8 GB")

    monkeypatch.setattr(preview_tap, "decode_previews", no_memory)
    pipe = tiny_sd_pipeline()
    with pytest.warns(TraceIncompleteWarning, match="No previews: RuntimeError"):
        kept = trace(pipe, PROMPT, num_inference_steps=STEPS, preview_decoder="vae")
    assert kept.previews is None
    assert kept.image is not None
    assert [m.part for m in kept.facts.missing] == ["previews"]
    assert kept.facts.preview_decoder is None
    assert kept.facts.preview_source is None


def test_a_failure_inside_the_loop_is_raised() -> None:
    pipe = tiny_sd_pipeline()
    calls = {"n": 0}

    def fail_at_step_two(pipe: Any, step: int, timestep: Any, kwargs: dict) -> dict:
        calls["n"] += 1
        if step == 1:
            raise torch.OutOfMemoryError(CUDA_OOM)
        return kwargs

    with pytest.raises(torch.OutOfMemoryError):
        trace(pipe, PROMPT, num_inference_steps=STEPS, callback_on_step_end=fail_at_step_two)
    assert calls["n"] == 2
    assert "decode" not in vars(pipe.vae)
    assert "step" not in vars(pipe.scheduler)


def test_a_decode_out_of_memory_is_tried_again_with_tiling() -> None:
    pipe = tiny_sd_pipeline()
    vae = pipe.vae
    latent = np.random.default_rng(0).normal(size=(4, 16, 16)).astype(np.float32)
    tiled_calls = []
    original = vae.decode

    def decode(*args: Any, **kwargs: Any) -> Any:
        tiled_calls.append(vae.use_tiling)
        if not vae.use_tiling:
            raise torch.OutOfMemoryError(CUDA_OOM)
        return original(*args, **kwargs)

    vae.decode = decode
    image = decode_exact(pipe, latent)
    assert image.shape == (32, 32, 3)
    assert tiled_calls == [False, True]
    assert not vae.use_tiling
    vae.decode = original
    # Tiling below the tile size changes nothing: the same pixels as a plain decode.
    np.testing.assert_array_equal(image, decode_exact(pipe, latent))
    with pytest.raises(ValueError, match="one latent"):
        decode_exact(pipe, latent[None])


# ============================================================ a full disk on save
def test_a_full_disk_leaves_no_partial_file_and_the_trace_intact(
    tiny_trace: Trace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.numpy

    path = tmp_path / "run.safetensors"
    earlier = tiny_trace.save(path)
    before = earlier.read_bytes()
    real_save = safetensors.numpy.save_file

    def disk_full(arrays: Any, filename: str, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.numpy, "save_file", disk_full)
    with pytest.raises(TraceSaveError) as info:
        tiny_trace.save(path)
    assert info.value.errno == errno.ENOSPC
    message = str(info.value)
    assert str(path) in message
    assert "No space left on device" in message
    assert "the trace in memory is intact" in message
    assert "free some space" in message
    assert path.read_bytes() == before  # the earlier file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.safetensors"]  # no partial
    monkeypatch.setattr(safetensors.numpy, "save_file", real_save)
    again = Trace.load(tiny_trace.save(tmp_path / "elsewhere" / "run.safetensors"))
    np.testing.assert_array_equal(again.pred_x0, tiny_trace.pred_x0)
    assert again.facts == tiny_trace.facts


# ============================================================ the memory check
def test_the_plan_counts_one_decode_only_with_previews() -> None:
    pipe = tiny_sd_pipeline()
    on = TraceContext(pipe, prompt=PROMPT).memory_plan(20, 64, 64)
    off = TraceContext(pipe, prompt=PROMPT, decode_previews=False).memory_plan(20, 64, 64)
    assert on.decode == vae_decode_bytes(pipe.vae, (64, 64)) > 0
    assert off.decode == 0
    step = TraceContext(pipe, prompt=PROMPT).step_bytes(64, 64)
    assert on.stored == 20 * step.total
    assert on.records == 20 * (step.latents + step.attention)
    assert on.needs() == {
        "cpu": on.records + on.attention_scratch + on.decode + on.stored + on.building
    }
    assert on.attention_scratch > 0


def test_plans_split_the_device_from_the_host() -> None:
    plan = plan_memory(StepBytes(100, 50, 10), 4, "cuda:0", attention_scratch=7, decode=9)
    assert plan.needs() == {"cuda:0": 4 * 150 + 7 + 9, "cpu": 4 * 160 + 4 * 150}
    seen = check_free_memory(plan, free=lambda device: 10**9)
    assert seen == {"cuda:0": 10**9, "cpu": 10**9}
    assert check_free_memory(plan, free=lambda device: None) == {}  # nothing known: no check


def test_the_decode_is_named_first_when_it_is_what_does_not_fit() -> None:
    big_decode = plan_memory(
        StepBytes(100, 50, 10), 4, "cuda:0", attention_scratch=7, decode=3 * BYTES_PER_MB
    )
    with pytest.raises(InsufficientMemoryError) as info:
        check_free_memory(big_decode, free=lambda device: 2 * BYTES_PER_MB)
    message = str(info.value)
    assert "needs 3 MB on cuda:0" in message
    assert "2 MB free" in message
    assert "one VAE decode 3" in message
    fixes = message.split(". Pass ", 1)[1]
    assert fixes.startswith("decode_previews=False, or turn on pipe.vae.enable_tiling()")
    assert "torch.cuda.empty_cache()" in fixes
    assert isinstance(info.value, MemoryBudgetError)  # caught where the budget is caught


def test_trace_refuses_before_running_when_memory_is_short(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import diffwidget.tracing.budget as budget

    pipe = tiny_sd_pipeline()
    plan = TraceContext(pipe, prompt=PROMPT).memory_plan(STEPS, 32, 32)
    needed = plan.needs()["cpu"]
    monkeypatch.setattr(budget, "free_bytes", lambda device: needed - 1)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(InsufficientMemoryError, match="fewer steps"):
        trace(pipe, PROMPT, num_inference_steps=STEPS)
    assert calls == []  # refused before the pipeline ran
    monkeypatch.setattr(budget, "free_bytes", lambda device: needed)
    assert trace(pipe, PROMPT, num_inference_steps=STEPS).n_steps == STEPS
    ctx = TraceContext(pipe, prompt=PROMPT)

    def run_in_block() -> None:
        with ctx:
            monkeypatch.setattr(budget, "free_bytes", lambda device: 0)
            pipe(PROMPT, num_inference_steps=STEPS)  # a with block is checked at step 0

    with pytest.raises(InsufficientMemoryError):
        run_in_block()
    assert ctx.records.n_steps == 0
    assert "step" not in vars(pipe.scheduler)
    assert "decode" not in vars(pipe.vae)


MEASURE = """
import json, sys, torch
from pathlib import Path
from diffwidget.testing.tiny import _vae
from diffwidget.tracing.decode import vae_decode_bytes
torch.set_num_threads(1)
def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
side = int(sys.argv[1])
vae = _vae().eval()
z = torch.randn(1, 4, side // 2, side // 2)
with torch.no_grad():
    vae.decode(torch.randn(1, 4, 8, 8))
Path("/proc/self/clear_refs").write_text("5")
before = status("VmRSS")
with torch.no_grad():
    vae.decode(z)
print(json.dumps([status("VmHWM") - before, vae_decode_bytes(vae, (side, side))]))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="Linux peak RSS only")
def test_the_decode_estimate_covers_a_measured_decode() -> None:
    """The estimate against the decode's measured resident-memory peak (another process)."""
    # Large blocks mapped and unmapped one by one make the resident peak the live tensors'
    # peak: with glibc's defaults it also carried whatever the heap kept from before
    # (45 MB alone, 72 MB once after a long session, for the same decode).
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
        "MALLOC_ARENA_MAX": "1",
    }
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, "384"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    measured, estimate = json.loads(out.stdout.strip().splitlines()[-1])
    assert measured > 30 * BYTES_PER_MB  # a decode large enough to measure
    assert measured <= estimate <= 2.5 * measured, (measured, estimate)
