"""Where one DF-RISE batch spends its time, per kind of operator, against each kind's floor.

One batch of DF-RISE on the embedded model: 64 masked latents through one classifier-free
guided call of the UNet (128 rows), as ``DFRise`` runs it (``StepReplay.predict``). The
operators are grouped into convolutions, linear layers (``addmm``/``mm`` and their oneDNN /
MKL forms), attention (``scaled_dot_product_attention``'s kernels) and everything else
(element-wise work, norms, copies, and inductor's fused loops). For each group:

- **measured**: the self CPU time of its operators under ``torch.profiler``, per call
  (median of ``--repeats`` profiled calls), eager and ``torch.compile``'d (inductor with
  freezing, as ``DFRise(compile=True)``; without the C++ wrapper, so that the profiler sees
  each kernel);
- **floor**: its FLOPs (``FlopCounterMode``, attention as its two matrix products) at the
  rate of a large float32 matmul timed in the same process.

Then the attention of the 16x16 layers alone, shape (128, 4 heads, 256 positions, 8 per
head), by four ways to compute the same thing: SDPA as dispatched (the flash kernel), SDPA's
math kernel, per-chunk ``bmm``/``softmax``/``bmm``, and the exponentials alone (the
softmax's ``exp`` of every score, in the same cache-sized chunks).

Usage::

    python bench/bench_rise_ops.py --threads 1
    python bench/bench_rise_ops.py --threads 1 --results bench/RESULTS_explain.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_rise import BENCH_STEP, build, count_flops, gemm_rate, synthetic_trace
from benchlib import machine

from diffwidget.explain.rise import make_masks
from diffwidget.tracing.replay import StepReplay

GROUPS = ("convolution", "linear", "attention", "other")
#: Masks per batch (DFRise's CPU default for a 16x16 latent): 128 UNet rows with CFG.
BATCH = 64


def group_of(name: str) -> str:
    """The operator group of a profiler event or a FlopCounterMode operator name."""
    if "convolution" in name:
        return "convolution"
    if "scaled_dot_product" in name:
        return "attention"
    if any(key in name for key in ("addmm", "aten::mm", "aten.mm", "_mkl_linear", "linear_")):
        return "linear"
    return "other"


def profile_call(fn: Any, repeats: int) -> tuple[dict[str, float], float]:
    """Median self CPU seconds per group of ``fn()`` under the profiler, and the median
    process CPU seconds of the same call without it."""
    from torch.profiler import ProfilerActivity, profile

    per_group: dict[str, list[float]] = {g: [] for g in GROUPS}
    totals = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        totals.append(time.process_time() - start)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        sums = dict.fromkeys(GROUPS, 0.0)
        for event in prof.key_averages():
            sums[group_of(event.key)] += event.self_cpu_time_total / 1e6
        for g in GROUPS:
            per_group[g].append(sums[g])
    return {g: statistics.median(v) for g, v in per_group.items()}, statistics.median(totals)


def min_cpu_seconds(fn: Any, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def attention_ways(rate: float) -> list[tuple[str, float]]:
    """Seconds of the 16x16 layers' attention for one 128-row batch, four ways."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2 * BATCH, 4, 256, 8, generator=gen) for _ in range(3))
    reference = F.scaled_dot_product_attention(q, k, v)
    qf, kt, vf = q.flatten(0, 1), k.flatten(0, 1).transpose(1, 2), v.flatten(0, 1)
    # Cache-sized buffers, reused (fresh 2 MB tensors would each be mapped and page-faulted).
    scores, weights = torch.empty(8, 256, 256), torch.empty(8, 256, 256)

    def chunked() -> torch.Tensor:
        out = torch.empty_like(qf)
        for i in range(0, len(qf), 8):
            torch.bmm(qf[i : i + 8], kt[i : i + 8], out=scores)
            torch.ops.aten._softmax.out(scores.mul_(8**-0.5), -1, False, out=weights)
            torch.bmm(weights, vf[i : i + 8], out=out[i : i + 8])
        return out.view_as(q)

    def math() -> torch.Tensor:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)

    for fn in (chunked, math):
        torch.testing.assert_close(fn(), reference, rtol=1e-4, atol=1e-5)

    def exp_only() -> None:
        for _ in range(0, len(qf), 8):
            torch.exp(scores, out=weights)

    flop = 2 * 2 * len(qf) * 256 * 256 * 8
    return [
        ("floor (two matrix products at the matmul rate)", flop / rate),
        (
            "SDPA as dispatched (flash kernel)",
            min_cpu_seconds(lambda: F.scaled_dot_product_attention(q, k, v)),
        ),
        ("SDPA math kernel", min_cpu_seconds(math)),
        ("bmm, softmax, bmm in chunks of 8 heads, buffers reused", min_cpu_seconds(chunked)),
        ("exp of the 33.5 M scores alone, in the same chunks", min_cpu_seconds(exp_only)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", type=Path, default=None, help="append a markdown section")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from torch._inductor import config

    from diffwidget.explain._compile import INDUCTOR_OPTIONS

    device = torch.device("cpu")
    pipe = build("embedded")
    trace = synthetic_trace(pipe, device)
    replay = StepReplay(pipe, trace)
    x = replay.latent(BENCH_STEP)
    masks = make_masks(BATCH, trace.latent_shape, 0.5)
    masked = x * masks[:, None]
    _, by_op = count_flops(lambda: replay.predict(masked, BENCH_STEP, "x0"))
    flops = dict.fromkeys(GROUPS, 0)
    for name, count in by_op.items():
        flops[group_of(name)] += count

    options = {**INDUCTOR_OPTIONS, "cpp_wrapper": False}
    compiled = torch.compile(replay.unet, dynamic=False)

    compiled_replay = StepReplay(pipe, trace, denoiser=compiled)

    def compiled_call() -> Any:
        with config.patch(options):
            return compiled_replay.predict(masked, BENCH_STEP, "x0")

    with torch.no_grad():
        start = time.perf_counter()
        compiled_call()
        print(f"compiled in {time.perf_counter() - start:.0f} s", flush=True)
        rates = [gemm_rate(device, torch.float32)[1]]
        eager, eager_total = profile_call(
            lambda: replay.predict(masked, BENCH_STEP, "x0"), args.repeats
        )
        rates.append(gemm_rate(device, torch.float32)[1])
        comp, comp_total = profile_call(compiled_call, args.repeats)
        rates.append(gemm_rate(device, torch.float32)[1])
        ways = attention_ways(statistics.median(rates))
        rates.append(gemm_rate(device, torch.float32)[1])
    rate = statistics.median(rates)
    lines = table(flops, eager, comp, eager_total, comp_total, rate)
    lines += [
        "",
        "| 16x16 self-attention, one batch (3 such layers a call) | CPU ms |",
        "|---|---|",
    ]
    lines += [f"| {name} | {seconds * 1e3:.1f} |" for name, seconds in ways]
    info = machine(device)
    header = [
        f"- machine: {info['cpu']}; {info['cores']} cores, torch threads {info['torch_threads']}, "
        f"load average at the end {info['load_average']}; torch {info['torch']}",
        f"- matmul rate (4096², float32, per CPU second, median of {len(rates)} timings "
        f"between the others): {rate / 1e9:.1f} GFLOP/s",
    ]
    text = "\n".join([*header, "", *lines])
    print(text)
    if args.results:
        with args.results.open("a") as fh:
            fh.write("\n### One DF-RISE batch by operator group (`bench/bench_rise_ops.py`)\n\n")
            fh.write(text + "\n")


def table(
    flops: dict[str, int],
    eager: dict[str, float],
    comp: dict[str, float],
    eager_total: float,
    comp_total: float,
    rate: float,
) -> list[str]:
    """Markdown rows: per group, GFLOP, floor ms, and measured ms / ratio eager and compiled."""
    lines = [
        f"| group (one batch: {BATCH} masks, {2 * BATCH} UNet rows) | GFLOP | floor ms "
        "| eager ms | eager / floor | compiled ms | compiled / floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for g in GROUPS:
        floor = flops[g] / rate
        ratios = [f"{t / floor:.2f}" if floor else "—" for t in (eager[g], comp[g])]
        lines.append(
            f"| {g} | {flops[g] / 1e9:.2f} | {floor * 1e3:.0f} | {eager[g] * 1e3:.0f} | "
            f"{ratios[0]} | {comp[g] * 1e3:.0f} | {ratios[1]} |"
        )
    total_flops = sum(flops.values())
    floor = total_flops / rate
    lines.append(
        f"| **all** (profiled; unprofiled process CPU in brackets) | {total_flops / 1e9:.2f} | "
        f"{floor * 1e3:.0f} | {sum(eager.values()) * 1e3:.0f} ({eager_total * 1e3:.0f}) | "
        f"{sum(eager.values()) / floor:.2f} | {sum(comp.values()) * 1e3:.0f} "
        f"({comp_total * 1e3:.0f}) | {sum(comp.values()) / floor:.2f} |"
    )
    return lines


if __name__ == "__main__":
    main()
