"""Joint-attention capture on SD3-medium- and Flux-shaped transformers: time and peak memory.

The transformers are built from their published config values with random weights (timings
and memory depend on shapes only); ``--blocks`` keeps the first few blocks of each kind,
which leaves every per-block ratio unchanged. A denoising loop like the pipelines' (CFG
batch of two for SD3, one call for guidance-distilled Flux; random text embeddings of the
real lengths: 77 + 256 for SD3, 512 for Flux) runs three ways, interleaved round by round:

* ``plain``: the transformer alone;
* ``ours``: with diffwidget's capture processors (image→text block of the joint softmax;
  the log-sum-exp over all keys comes from the layer's own SDPA flash kernel, so only the
  image→text scores are formed);
* ``recompute``: the same capture with the kernel's log-sum-exp declined, i.e. what runs
  under any other attention backend: the log-sum-exp formed again over all keys in query
  chunks, from projections tapped from the model's call (not recomputed);
* ``full``: a capture that materialises the full joint softmax of the prompt's half and
  slices it afterwards (attention-map-diffusers' approach; same stored maps).

Time: medians of interleaved rounds, of the process's CPU time on a CPU (robust to other
jobs on a shared machine) or of wall time on a GPU. Peak memory: one more call of each
variant, its peak above the memory held before it (the resident-set high-water mark on a
CPU, peak allocated CUDA memory on a GPU); a variant's extra is its peak minus plain's.
The extra memory of one capture at 1024² Flux shapes is also given analytically
(float32 score blocks), for when a machine cannot run that size.

Examples
--------
On the 2-core CPU (reduced resolution)::

    python bench/bench_dit.py --model sd3m --blocks 2 --size 256 --threads 1
    python bench/bench_dit.py --model flux --blocks 1 --size 256 --threads 1

On a GPU at 1024² (all blocks)::

    python bench/bench_dit.py --model flux --size 1024 --device cuda --dtype bf16 --blocks 0
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import machine, sync

from diffwidget.tracing.attention import AttentionCapture, AttentionRecorder, CaptureAttnProcessor
from diffwidget.tracing.families import denoiser_family
from diffwidget.tracing.joint_attention import CHUNK_BYTES, query_chunk

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: SD3-medium's published transformer config (stabilityai/stable-diffusion-3-medium).
SD3_MEDIUM = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}
#: FLUX.1-dev's published transformer config.
FLUX_DEV = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
TEXT = {"sd3m": 77 + 256, "flux": 512}
VAE_FACTOR = 8


class FullSoftmaxCapture(CaptureAttnProcessor):
    """The baseline: the prompt half's full joint softmax, sliced to image→text afterwards."""

    def record(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Recompute q and k, form softmax(q k^T / sqrt(d)) over all keys, keep image→text."""
        text = kwargs.get("encoder_hidden_states", args[0] if args else None)
        cond = self.recorder.cond
        h = cond(hidden_states)
        heads = attn.heads
        q, k = attn.to_q(h), attn.to_k(h)
        d = k.shape[-1] // heads
        q = q.view(1, -1, heads, d).transpose(1, 2)
        k = k.view(1, -1, heads, d).transpose(1, 2)
        n_image = q.shape[2]
        if text is not None:
            e = cond(text)
            eq = attn.add_q_proj(e).view(1, -1, heads, d).transpose(1, 2)
            ek = attn.add_k_proj(e).view(1, -1, heads, d).transpose(1, 2)
            q, k = torch.cat([q, eq], 2), torch.cat([k, ek], 2)
        probs = (q.float() @ k.float().transpose(-1, -2) / math.sqrt(d)).softmax(-1)
        self.recorder.add(self.layer, probs[0, :, :n_image, n_image:].mean(0))


def build(model: str, blocks: int, device: str, dtype: torch.dtype) -> Any:
    """The transformer with its published config (first ``blocks`` blocks of each kind)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    if model == "sd3m":
        config = dict(SD3_MEDIUM, num_layers=blocks or SD3_MEDIUM["num_layers"])
        net = SD3Transformer2DModel(**config)
    else:
        config = dict(
            FLUX_DEV,
            num_layers=blocks or FLUX_DEV["num_layers"],
            num_single_layers=blocks or FLUX_DEV["num_single_layers"],
        )
        net = FluxTransformer2DModel(**config)
    return net.to(device=device, dtype=dtype).eval()


def inputs(model: str, net: Any, size: int, device: str, dtype: torch.dtype) -> dict[str, Any]:
    """One denoiser call's arguments at ``size`` pixels, CFG-batched for SD3.

    Widths come from ``net.config``, so any SD3- or Flux-style transformer fits (the tiny
    test ones too); the text lengths are the real pipelines' (:data:`TEXT`).
    """
    latent = size // VAE_FACTOR
    gen = torch.Generator().manual_seed(0)
    channels = int(net.config.in_channels)
    text_dim = int(net.config.joint_attention_dim)
    pooled_dim = int(net.config.pooled_projection_dim)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    if model == "sd3m":
        batch = 2
        return {
            "hidden_states": rand(batch, channels, latent, latent),
            "encoder_hidden_states": rand(batch, TEXT[model], text_dim),
            "pooled_projections": rand(batch, pooled_dim),
            "timestep": torch.full((batch,), 500.0, device=device),
        }
    rows = latent // 2
    img_ids = torch.zeros(rows, rows, 3)
    img_ids[..., 1] += torch.arange(rows)[:, None]
    img_ids[..., 2] += torch.arange(rows)[None, :]
    return {
        "hidden_states": rand(1, rows * rows, channels),
        "encoder_hidden_states": rand(1, TEXT[model], text_dim),
        "pooled_projections": rand(1, pooled_dim),
        "timestep": torch.full((1,), 0.5, device=device),
        "guidance": torch.full((1,), 3.5, device=device),
        "txt_ids": torch.zeros(TEXT[model], 3, device=device, dtype=dtype),
        "img_ids": img_ids.reshape(-1, 3).to(device=device, dtype=dtype),
    }


def capture(net: Any, kind: str, batched: bool) -> AttentionCapture:
    """The capture of ``kind`` ("ours" or "full") on every joint-attention site."""
    from diffwidget.tracing.cfg import CfgLayout

    family = denoiser_family(SimpleNamespace(transformer=net))
    recorder = AttentionRecorder(None, CfgLayout("batched" if batched else "none", 2.0))
    sites = family.attention_sites()
    if kind == "full":
        sites = dict.fromkeys(sites, FullSoftmaxCapture)
    # Flux's single-stream layers see one joined sequence: a trace tells them the text length
    # of each call; here every call has the same.
    recorder.text_length = TEXT["sd3m" if net_is_sd3(net) else "flux"]
    cap = AttentionCapture(net, recorder, sites)
    cap.install()
    return cap


def run_steps(net: Any, args: dict[str, Any], steps: int, recorder: Any | None) -> None:
    with torch.no_grad():
        for step in range(steps):
            if recorder is not None:
                recorder.step = step
            net(**args, return_dict=False)


@contextmanager
def kernel_lse(allowed: bool) -> Iterator[None]:
    """Let the capture take SDPA's log-sum-exp (``allowed``), or make it form it again."""
    from diffwidget.tracing.families import joint

    original = joint.sdpa_with_lse
    if not allowed:
        joint.sdpa_with_lse = lambda *args, **kwargs: None
    try:
        yield
    finally:
        joint.sdpa_with_lse = original


def timed(
    net: Any, args: dict[str, Any], kind: str, steps: int, device: str
) -> tuple[float, float]:
    """Wall and process-CPU seconds of ``steps`` calls with the capture ``kind``."""
    which = "ours" if kind == "recompute" else kind
    cap = None if kind == "plain" else capture(net, which, net_is_sd3(net))
    try:
        with kernel_lse(kind != "recompute"):
            sync(device)
            start, cpu = time.perf_counter(), time.process_time()
            run_steps(net, args, steps, cap.recorder if cap else None)
            sync(device)
            return time.perf_counter() - start, time.process_time() - cpu
    finally:
        if cap is not None:
            cap.restore()


def net_is_sd3(net: Any) -> bool:
    return type(net).__name__ == "SD3Transformer2DModel"


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_extra_mb(net: Any, args: dict[str, Any], kind: str, device: str) -> float:
    """Peak memory one call of ``kind`` needs above what is held before it (MB).

    CUDA: peak allocated memory. CPU (Linux): the resident-set high-water mark, reset just
    before the call through ``/proc/self/clear_refs``, above the resident set before it.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        timed(net, args, kind, 1, device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kb("VmRSS")
    timed(net, args, kind, 1, device)
    return (_status_kb("VmHWM") - base) / 1024


def analytic_extra_mb(heads: int, n_image: int, n_text: int, head_dim: int) -> dict[str, float]:
    """Float32 temporaries of one capture call (the prompt's half), in MB.

    ``ours``: one chunk of image→text scores, the text keys and the log-sum-exp;
    ``recompute``: one chunk of scores against all keys, all keys, the text columns.
    """
    keys = n_image + n_text
    full = 2 * heads * (n_image + n_text) * keys * 4  # scores and softmax, all rows
    chunk = query_chunk(heads, keys)
    recompute = heads * min(chunk, n_image) * keys * 4 + heads * keys * head_dim * 4
    recompute += heads * min(chunk, n_image) * n_text * 4
    text_chunk = query_chunk(heads, n_text)
    ours = heads * min(text_chunk, n_image) * n_text * 4 + heads * n_text * head_dim * 4
    ours += heads * n_image * 4
    return {
        "full_mb": full / 2**20,
        "ours_mb": ours / 2**20,
        "recompute_mb": recompute / 2**20,
        "ratio": full / ours,
        "ratio_recompute": full / recompute,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("sd3m", "flux"), default="sd3m")
    parser.add_argument("--blocks", type=int, default=2, help="blocks of each kind; 0 = all")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=2, help="denoiser calls per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument("--json", type=Path, default=None)
    opts = parser.parse_args()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    dtype = DTYPES[opts.dtype]
    net = build(opts.model, opts.blocks, opts.device, dtype)
    args = inputs(opts.model, net, opts.size, opts.device, dtype)
    timed(net, args, "ours", 1, opts.device)  # warm-up (and first-call allocations)
    wall: dict[str, list[float]] = {"plain": [], "ours": [], "recompute": [], "full": []}
    cpu: dict[str, list[float]] = {k: [] for k in wall}
    for _ in range(opts.rounds):
        for kind in wall:
            seconds, cpu_seconds = timed(net, args, kind, opts.steps, opts.device)
            wall[kind].append(seconds)
            cpu[kind].append(cpu_seconds)
    # On a shared CPU the process's own CPU time is what the capture costs; on a GPU, wall.
    basis = cpu if opts.device == "cpu" else wall
    median = {k: statistics.median(v) for k, v in basis.items()}
    latent = opts.size // VAE_FACTOR
    n_image = (latent // 2) ** 2
    heads, head_dim = 24, (64 if opts.model == "sd3m" else 128)
    result: dict[str, Any] = {
        "model": opts.model,
        "blocks": opts.blocks,
        "size": opts.size,
        "image_tokens": n_image,
        "text_tokens": TEXT[opts.model],
        "steps_per_round": opts.steps,
        "rounds": opts.rounds,
        "wall_s": wall,
        "cpu_s": cpu,
        "ratio_basis": "process CPU time" if opts.device == "cpu" else "wall time",
        "median_s": median,
        "overhead": {k: median[k] / median["plain"] - 1 for k in median if k != "plain"},
        "paired_overhead": {
            k: statistics.median(x / p for x, p in zip(basis[k], basis["plain"], strict=False)) - 1
            for k in basis
            if k != "plain"
        },
        "chunk_bytes": CHUNK_BYTES,
        "analytic_at_this_size": analytic_extra_mb(heads, n_image, TEXT[opts.model], head_dim),
        "analytic_flux_1024": analytic_extra_mb(24, 64 * 64, 512, 128),
        "machine": machine(opts.device),
    }
    if not opts.no_memory:
        peaks = {k: peak_extra_mb(net, args, k, opts.device) for k in wall}
        result["peak_call_mb"] = peaks
        result["peak_extra_mb"] = {k: peaks[k] - peaks["plain"] for k in wall if k != "plain"}
    text = json.dumps(result, indent=2)
    print(text)
    if opts.json:
        opts.json.write_text(text)


if __name__ == "__main__":
    main()
