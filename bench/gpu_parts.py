"""The parts of ``gpu_suite.py``: each measures one thing into its record ``rec``.

A part reads its models, traces, time left and output through the :class:`Suite` it is
given, writes numbers into ``rec`` as soon as they exist (``suite.save()`` puts them on
disk), states its goals with ``suite.goal`` and keeps a profile when one is not met.
"""

from __future__ import annotations

import math
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import bench_dit
import bench_rise
import bench_tracing
import torch
from benchlib import free_memory, matmul_peak, rounds, spread

from diffwidget.explain.cam import DFCam
from diffwidget.explain.relevance import TokenRelevance
from diffwidget.explain.rise import DFRise

if TYPE_CHECKING:
    from gpu_suite import Suite

#: Goals (the issue's targets and DESIGN.md section 5).
RISE_GOAL_S = 1.5
TRACE_GOALS = {"trace": 0.05, "trace_all_tokens": 0.05, "trace_previews": 0.10}
DIT_MEMORY_GOAL = 10.0
DIT_KINDS = ("plain", "ours", "recompute", "full")
#: ``--compile-backend`` value that wraps the UNet with dynamo disabled (plumbing only).
NO_DYNAMO = "none"
#: Denoising steps of a profiled tracing run.
PROFILE_STEPS = 4
#: Largest file brought back from the device (its limit for one file is 16 MiB).
MAX_BACK_BYTES = 16 * 2**20


class PartSkipped(Exception):
    """A part cannot run here; the message says why."""


def part_rise(suite: Suite, rec: dict[str, Any]) -> None:
    pipe = suite.model("sd15")
    trace, step = suite.rise_trace()
    n = suite.shapes.n_masks
    rec["matmul"] = matmul_peak(suite.device, suite.dtype, suite.shapes.matmul_n)
    rec["flops_per_cfg_call"], rec["flops_by_op"] = cfg_call_flops(pipe, trace, step)
    rec["floor_s"] = rec["flops_per_cfg_call"] * n / rec["matmul"]["flops_per_s"]
    suite.save()
    ours = measure_rise(suite, rec, pipe, trace, step)
    value = rec["ours"]["median_s"]
    met = suite.goal(
        "rise",
        "rise",
        f"DF-RISE {n} masks, one step, eager",
        value,
        f"<= {RISE_GOAL_S} s",
        value <= RISE_GOAL_S,
    )
    rec["profile"] = suite.profile(met, ours)


def part_rise_compile(suite: Suite, rec: dict[str, Any]) -> None:
    """``rise`` with ``torch.compile(unet)``; the first (untimed) runs absorb compilation.

    Backend ``"none"`` (the ``--tiny`` default) wraps the UNet the same way with dynamo
    disabled: it checks the swap and restore of ``pipe.unet`` without tracing the model,
    which takes about a minute per graph on a loaded 2-core CPU.
    """
    pipe = suite.model("sd15")
    trace, step = suite.rise_trace()
    eager = pipe.unet
    backend, mode = suite.args.compile_backend, suite.args.compile_mode
    rec.update(backend=backend, mode=mode)
    no_dynamo = backend == NO_DYNAMO
    with torch._dynamo.config.patch(disable=True) if no_dynamo else nullcontext():
        pipe.unet = torch.compile(eager, backend="eager" if no_dynamo else backend, mode=mode)
        try:
            ours = measure_rise(suite, rec, pipe, trace, step)
            value = rec["ours"]["median_s"]
            met = suite.goal(
                "rise_compile",
                "rise_compile",
                f"DF-RISE {suite.shapes.n_masks} masks, one step, torch.compile",
                value,
                f"<= {RISE_GOAL_S} s",
                value <= RISE_GOAL_S,
            )
            rec["profile"] = suite.profile(met, ours)
        finally:
            pipe.unet = eager
            torch._dynamo.reset()


def cfg_call_flops(pipe: Any, trace: Any, step: int) -> tuple[int, dict[str, int]]:
    """FLOPs of one CFG denoiser call at ``step`` (attention counted through the math path)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from diffwidget.tracing.replay import StepReplay

    replay = StepReplay(pipe, trace)
    x = replay.latent(step)
    # The math backend's matmuls are counted on every device; fused kernels only where
    # FlopCounterMode has a formula registered for them.
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter:
        replay.predict(x, step, "x0")
    by_op = {str(op): int(v) for op, v in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op


def measure_rise(
    suite: Suite, rec: dict[str, Any], pipe: Any, trace: Any, step: int
) -> Callable[[], Any]:
    """Ours vs one call per mask, interleaved; returns the call of ours (for a profile)."""
    n, paper_n = suite.shapes.n_masks, min(suite.shapes.paper_masks, suite.shapes.n_masks)
    rec.update(
        model=suite.label("sd15"),
        unet_params_M=sum(p.numel() for p in pipe.unet.parameters()) / 1e6,
        latent=list(trace.latent_shape),
        step=step,
        n_masks=n,
        one_call_per_mask_masks_per_run=paper_n,
    )
    ours = DFRise(n_masks=n, progress_bar=False)
    paper = DFRise(n_masks=paper_n, batch_size=1, progress_bar=False)

    def run_ours() -> Any:
        return ours.attribute(pipe, trace, step)

    def run_paper() -> Any:
        return paper.attribute(pipe, trace, step)

    # Untimed first runs: kernels, allocator, the automatic batch probe, compilation.
    start = time.perf_counter()
    sal, peak_ours = suite.peak(run_ours)
    _, peak_paper = suite.peak(run_paper)
    rec["first_runs_s"] = time.perf_counter() - start
    rec.update(
        batch_size=sal.meta["batch_size"],
        batch_size_source=sal.meta["batch_size_source"],
        peak_cuda_mb={"ours": peak_ours, "one_call_per_mask": peak_paper},
    )
    suite.save()
    t_ours: list[float] = []
    t_paper: list[float] = []  # as measured, on paper_n masks
    for _ in rounds(suite.shapes.repeats, suite.rounds_left):
        t_ours.append(suite.seconds(run_ours))
        t_paper.append(suite.seconds(run_paper))
        rec["ours"] = spread(t_ours)
        # One call per mask costs the same per mask: scale the measured runs to n masks.
        rec["one_call_per_mask"] = spread([t * n / paper_n for t in t_paper])
        rec["one_call_per_mask_measured_s"] = list(t_paper)
        rec["speedup"] = rec["one_call_per_mask"]["median_s"] / rec["ours"]["median_s"]
        if "floor_s" in rec:
            rec["ours_over_floor"] = rec["ours"]["median_s"] / rec["floor_s"]
        suite.save()
    return run_ours


def part_tracing(key: str) -> Callable[[Suite, dict[str, Any]], None]:
    def run(suite: Suite, rec: dict[str, Any]) -> None:
        pipe = suite.model(key)
        size, steps = suite.shapes.sizes[key], suite.shapes.steps
        rec.update(
            model=suite.label(key),
            size=size,
            steps=steps,
            unet_params_M=sum(p.numel() for p in pipe.unet.parameters()) / 1e6,
        )
        keep: dict[str, Any] = {}
        rec.update(
            bench_tracing.overhead(
                pipe,
                size,
                steps,
                suite.shapes.repeats,
                str(suite.device),
                time_left=suite.rounds_left,
                keep=keep,
            )
        )
        suite.traces[key] = keep["trace"]
        suite.save()
        # A profile of a few steps has the same kernels in the same proportions as one of
        # all steps, at a fraction of the profiler's cost.
        calls = bench_tracing.variant_calls(pipe, size, min(steps, PROFILE_STEPS))
        rec["profiles"] = {}
        rec["profile_steps"] = min(steps, PROFILE_STEPS)
        for variant, limit in TRACE_GOALS.items():
            value = rec["wall_paired_overhead_median"][variant]
            met = suite.goal(
                f"tracing_{key}_{variant}",
                f"tracing_{key}",
                f"{variant} overhead vs plain, {suite.label(key)} {size}², {steps} steps",
                value,
                f"<= {limit:.0%}",
                value <= limit,
            )
            profile = suite.profile(met, calls[variant])
            if profile is not None:
                rec["profiles"][variant] = profile
                if "plain" not in rec["profiles"]:  # the baseline's kernels, once
                    rec["profiles"]["plain"] = suite.profile(met, calls["plain"])
                suite.save()

    return run


def part_cam(key: str) -> Callable[[Suite, dict[str, Any]], None]:
    def run(suite: Suite, rec: dict[str, Any]) -> None:
        pipe = suite.model(key)
        trace = suite.trace_of(key)
        step = min(bench_rise.BENCH_STEP, trace.n_steps - 1)
        rec.update(model=suite.label(key), size=suite.shapes.sizes[key], step=step)
        cam = DFCam()
        first, peak = suite.peak(lambda: cam.attribute(pipe, trace, step))  # warm-up
        times = [
            suite.seconds(lambda: cam.attribute(pipe, trace, step))
            for _ in rounds(suite.shapes.repeats, suite.rounds_left)
        ]
        rec["cam"] = {**spread(times), "layers": len(first.layers), "peak_cuda_mb": peak}
        suite.save()
        relevance = TokenRelevance(progress_bar=False)
        first, peak = suite.peak(lambda: relevance.attribute(pipe, trace, steps=[step]))
        times = [
            suite.seconds(lambda: relevance.attribute(pipe, trace, steps=[step]))
            for _ in rounds(suite.shapes.repeats, suite.rounds_left)
        ]
        rec["relevance"] = {
            **spread(times),
            "text_encoder_used": first.meta.get("text_encoder_used"),
            "peak_cuda_mb": peak,
        }

    return run


def build_dit(suite: Suite, model: str) -> Any:
    """The transformer: published shape (built on the device), or a tiny test one."""
    if suite.tiny:
        from diffwidget.testing.tiny_dit import tiny_flux_pipeline, tiny_sd3_pipeline

        pipe: Any = tiny_sd3_pipeline() if model == "sd3m" else tiny_flux_pipeline()
        return pipe.transformer.to(device=suite.device, dtype=suite.dtype).eval()
    with torch.device(suite.device):
        return bench_dit.build(model, 0, str(suite.device), suite.dtype)


def part_dit(model: str) -> Callable[[Suite, dict[str, Any]], None]:
    def run(suite: Suite, rec: dict[str, Any]) -> None:
        device = str(suite.device)
        start = time.perf_counter()
        net = build_dit(suite, model)
        suite.record["builds_s"][f"dit_{model}"] = time.perf_counter() - start
        try:
            measure_dit(suite, rec, model, net, device)
        finally:
            del net
            free_memory()

    return run


def measure_dit(suite: Suite, rec: dict[str, Any], model: str, net: Any, device: str) -> None:
    size, steps = suite.shapes.dit_size, suite.shapes.dit_steps
    args = bench_dit.inputs(model, net, size, device, suite.dtype)
    cfg = net.config
    n_image = (size // bench_dit.VAE_FACTOR // 2) ** 2
    n_text = bench_dit.TEXT[model]
    rec.update(
        model=suite.label(model),
        params_M=sum(p.numel() for p in net.parameters()) / 1e6,
        size=size,
        image_tokens=n_image,
        text_tokens=n_text,
        calls_per_round=steps,
        analytic_one_capture_mb=bench_dit.analytic_extra_mb(
            int(cfg.num_attention_heads), n_image, n_text, int(cfg.attention_head_dim)
        ),
    )
    for kind in DIT_KINDS:  # warm-up
        bench_dit.timed(net, args, kind, 1, device)
    times: dict[str, list[float]] = {kind: [] for kind in DIT_KINDS}
    for _ in rounds(suite.shapes.repeats, suite.rounds_left):
        for kind in DIT_KINDS:
            # bench_dit.timed gives (wall, process CPU) seconds; on a GPU wall time counts.
            times[kind].append(bench_dit.timed(net, args, kind, steps, device)[0] / steps)
        rec["per_call"] = {kind: spread(values) for kind, values in times.items()}
        plain = rec["per_call"]["plain"]["median_s"]
        rec["overhead_vs_plain"] = {
            kind: rec["per_call"][kind]["median_s"] / plain - 1 for kind in DIT_KINDS[1:]
        }
        suite.save()

    def one_call(kind: str) -> Callable[[], float]:
        return lambda: bench_dit.timed(net, args, kind, 1, device)[0]

    peaks = {kind: suite.peak(one_call(kind))[1] for kind in DIT_KINDS}
    rec["peak_cuda_mb"] = peaks
    ratio = None
    if all(v is not None for v in peaks.values()):
        extra = {kind: peaks[kind] - peaks["plain"] for kind in DIT_KINDS[1:]}  # type: ignore[operator]
        rec["peak_extra_mb"] = extra
        ratio = extra["full"] / extra["ours"] if extra["ours"] > 0 else math.inf
        rec["full_over_ours_extra"] = ratio
    else:
        rec["peak_note"] = "peak memory is measured on CUDA only (torch.cuda.max_memory_allocated)"
    met = suite.goal(
        f"dit_{model}",
        f"dit_{model}",
        f"peak extra memory, full softmax / ours, {suite.label(model)} {size}²",
        ratio,
        f">= {DIT_MEMORY_GOAL:.0f}x",
        ratio is not None and ratio >= DIT_MEMORY_GOAL,
    )
    # Kernels by device time as for every goal, and by memory, which this goal is about.
    by_time = suite.profile(met, one_call("ours"))
    if by_time is not None:
        rec["profile"] = {**by_time, "by_memory": suite.profile(met, one_call("ours"), memory=True)}


def part_train(suite: Suite, rec: dict[str, Any]) -> None:
    """The training recipe by its command line, stopped at the part's time cap."""
    module = suite.args.train_module
    suite.drop_models()
    helptext = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if "--device" not in helptext.stdout:
        raise PartSkipped(
            f"`python -m {module}` has no --device option here, so it cannot train on the "
            "GPU; run the suite from a checkout whose recipe takes --device cuda"
        )
    with tempfile.TemporaryDirectory(prefix="gpu-suite-train-") as name:
        run_recipe(suite, rec, module, Path(name))
    if not rec["stopped_at_cap"] and rec["returncode"] != 0:
        raise RuntimeError(f"the training command exited with {rec['returncode']}; see log_tail")


def run_recipe(suite: Suite, rec: dict[str, Any], module: str, folder: Path) -> None:
    """Run the recipe into ``folder`` until it ends or the part's time is up."""
    cmd = [sys.executable, "-m", module, "--device", suite.device.type, "--out", str(folder)]
    cmd += shlex.split(suite.args.train_args)
    rec["command"] = shlex.join(cmd[1:])
    log = folder / "train.log"
    start = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT)
        try:
            rec["returncode"] = proc.wait(timeout=max(1.0, suite.left()))
            rec["stopped_at_cap"] = False
        except subprocess.TimeoutExpired:
            rec["stopped_at_cap"] = True
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    rec["seconds"] = time.perf_counter() - start
    rec["log_tail"] = log.read_text(errors="replace").splitlines()[-40:]
    # The newest weights small enough to come back from the device.
    weights = sorted(folder.rglob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    small = [p for p in weights if p.stat().st_size <= MAX_BACK_BYTES]
    if small:
        back = suite.out / f"train_{small[-1].name}"
        shutil.copyfile(small[-1], back)
        rec["weights_file"] = back.name
