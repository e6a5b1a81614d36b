"""What the benchmark scripts share: published model shapes, device sync, timing helpers
(rounds under a time budget, peak CUDA memory, the dense matmul peak, top kernels) and the
machine record."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

# Stable Diffusion 1.5's published component configs (shapes only; weights are random).
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}

# Stable Diffusion XL 1.0 base's published component configs (shapes only; random weights).
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    # Six micro-conditioning numbers embedded at 256 each, plus the 1280-wide pooled text.
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
#: SDXL's VAE has SD-1.5's architecture; ``force_upcast`` is off as in the fp16-fixed VAE
#: commonly used at fp16 (with it on, the pipeline would run every decode in float32).
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=False)
#: SDXL's first text encoder is SD-1.5's CLIP ViT-L; the second is OpenCLIP ViT-bigG.
SDXL_TEXT_2 = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
#: SDXL-base's UNet layout (three levels, 1/2/10 transformer layers, 70 ``attn2`` layers on
#: 64² and 32² grids of a 128² latent, 2048-wide text context) with channels narrowed 10x:
#: what a trace stores and decodes has SDXL's shapes, the UNet's arithmetic is a CPU's size.
SDXL_UNET_NARROW = dict(SDXL_UNET, block_out_channels=(32, 64, 128), attention_head_dim=(1, 2, 4))
#: SDXL's two text encoders at their widths (768 + 1280 = the UNet's 2048-wide context and
#: the 1280-wide pooled embedding), two layers each.
SDXL_TEXT_NARROW = dict(SD15_TEXT, num_hidden_layers=2)
SDXL_TEXT_2_NARROW = dict(SDXL_TEXT_2, num_hidden_layers=2)
#: Medians are taken over at least this many timed runs (warm-up excluded).
MIN_REPEATS = 5


#: Environment of a measuring subprocess: every thread pool of the numeric libraries at one.
ONE_THREAD = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
}


def proc_status(key: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``; Linux only)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def child_json(script: str | Path, argument: str, root: str | Path) -> dict[str, Any]:
    """Run ``script --child argument`` in a fresh one-thread process importing ``root``.

    Returns the JSON object of the child's last stdout line, or ``{"error": ...}`` with the
    last line of its stderr when it failed (each measurement of a peak needs its own process).
    """
    env = {**os.environ, **ONE_THREAD, "PYTHONPATH": str(root)}
    command = [sys.executable, str(Path(script).resolve()), "--child", argument]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def sd15_text_encoder(tokenizer: Any) -> Any:
    """A CLIP text encoder of SD-1.5's shape, random weights, sized to ``tokenizer``."""
    from transformers import CLIPTextModel

    return CLIPTextModel(clip_text_config(tokenizer, SD15_TEXT))


def clip_text_config(tokenizer: Any, shape: dict[str, Any]) -> Any:
    """A ``CLIPTextConfig`` of the published ``shape``, sized to ``tokenizer``'s vocabulary."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **shape,
    )


def sync(device: str | torch.device) -> None:
    """Wait for queued GPU work, so a timer measures it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Where the numbers were measured: CPU, cores, threads, load, versions, GPU."""
    import diffusers
    import transformers

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }
    for name in ("huggingface_hub", "safetensors", "numpy"):
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_multiprocessors"] = props.multi_processor_count
        info["cuda"] = torch.version.cuda
        info["driver"] = nvidia_driver()
    return info


def free_memory() -> None:
    """Collect garbage and hand cached CUDA blocks back, so the next model has room.

    Only where CUDA is in use: a full collection of a large heap takes a while, and on the
    CPU freed tensors go back to the allocator without it.
    """
    import gc

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gc.collect()
        torch.cuda.empty_cache()


def nvidia_driver() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi``, or None where it cannot be read."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def rounds(n: int, time_left: Callable[[], float] | None = None) -> Iterator[int]:
    """Yield ``0 .. n-1``, stopping early when the next round would overrun ``time_left()``.

    The next round is assumed to take as long as the longest so far; the first always runs.

    Examples
    --------
    >>> list(rounds(3))
    [0, 1, 2]
    >>> list(rounds(3, lambda: 0.0))
    [0]
    """
    longest = 0.0
    for i in range(n):
        if i and time_left is not None and time_left() < longest:
            return
        start = time.perf_counter()
        yield i
        longest = max(longest, time.perf_counter() - start)


def spread(values: list[float]) -> dict[str, Any]:
    """Median, min, max and every value of a list of timed runs (seconds)."""
    return {
        "median_s": statistics.median(values),
        "min_s": min(values),
        "max_s": max(values),
        "n": len(values),
        "runs_s": values,
    }


def cuda_peak_mb(fn: Callable[[], Any], device: str | torch.device) -> tuple[Any, float | None]:
    """``fn()`` and its peak CUDA memory above what was allocated before it (MiB).

    The peak is None off CUDA: a process's resident-memory peak never goes down, so it
    cannot be measured per call in one process there.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return fn(), None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    return out, (torch.cuda.max_memory_allocated(device) - base) / 2**20


def matmul_peak(
    device: str | torch.device, dtype: torch.dtype, n: int, products: int = 10, batches: int = 5
) -> dict[str, Any]:
    """Dense matmul throughput of ``n x n x n`` products: the device's measured peak.

    Three untimed products warm up; then ``batches`` batches of ``products`` products are
    timed. ``flops_per_s`` is the best batch's rate (the peak, so a FLOP floor computed
    from it is the lowest defensible one).
    """
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(batches):
        sync(device)
        start = time.perf_counter()
        for _ in range(products):
            a @ b
        sync(device)
        rates.append(2 * n**3 * products / (time.perf_counter() - start))
    return {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "products_per_batch": products,
        "flops_per_s": max(rates),
        "flops_per_s_median": statistics.median(rates),
    }


def top_kernels(
    fn: Callable[[], Any], device: str | torch.device, n: int = 10, memory: bool = False
) -> dict[str, Any]:
    """Profile one ``fn()`` with ``torch.profiler``: the top ``n`` ops by device time.

    On CUDA the ranking is by self CUDA time (the kernels), or by self CUDA memory with
    ``memory=True``; on the CPU by self CPU time.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, profile_memory=memory) as prof:
        fn()
        sync(device)
    events = prof.key_averages()

    def device_us(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)))

    def device_bytes(e: Any) -> float:
        return float(
            getattr(e, "self_device_memory_usage", getattr(e, "self_cuda_memory_usage", 0))
        )

    if cuda:
        key: Callable[[Any], float] = device_bytes if memory else device_us
        sort_by = "self_cuda_memory_usage" if memory else "self_cuda_time_total"
    else:
        key, sort_by = (lambda e: float(e.self_cpu_time_total)), "self_cpu_time_total"
    ranked = sorted(events, key=key, reverse=True)[:n]
    total = sum(key(e) for e in events) or 1.0
    return {
        "ranked_by": sort_by,
        "top": [
            {
                "name": e.key,
                "calls": e.count,
                "self_device_us": device_us(e),
                "self_cpu_us": float(e.self_cpu_time_total),
                "self_device_memory_mb": device_bytes(e) / 2**20,
                "share": key(e) / total,
            }
            for e in ranked
        ],
        "table": events.table(sort_by=sort_by, row_limit=n),
    }
