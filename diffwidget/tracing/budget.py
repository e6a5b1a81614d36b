"""What a trace allocates, known before the pipeline runs: stored bytes and free memory.

Per step a trace keeps the latent, the guided model output and x̂0 (float32), one float16
attention row per image query and kept token at every captured site, and an RGB preview
(one pixel per latent cell from the linear map, one per image pixel from a decoder). The
number of image queries per site comes from the denoiser family
(:meth:`~diffwidget.tracing.families.base.DenoiserFamily.query_counts`), so the bytes per
step follow exactly from the latent grid, the kept tokens and the preview size;
:meth:`Trace.nbytes_per_step` reports the same number afterwards. :func:`check_budget`
holds them to ``memory_budget_mb``.

:class:`MemoryPlan` counts every allocation the trace adds to the plain pipeline's, on the
device that holds them: the per-step records kept on the pipeline's device during the loop,
the attention capture's scratch at its largest site, the one exact VAE decode previews may
need, and in host memory the trace's arrays and the copies made while building them.
:func:`check_free_memory` compares each device's total with what it has free (CUDA's
``mem_get_info`` plus the blocks torch keeps cached; the CPU's available RAM) and refuses,
naming the fix, before anything runs. It cannot see the pipeline's own needs (the
denoiser's activations), so it is a floor: passing it says the trace's own allocations fit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Default cap on what one trace may store (all steps together).
DEFAULT_MEMORY_BUDGET_MB = 2048.0
BYTES_PER_MB = 2**20
#: Stored dtypes: latents, noise_pred and pred_x0 in float32, attention in float16,
#: previews in uint8 RGB.
LATENT_ITEMSIZE = 4
ATTENTION_ITEMSIZE = 2
PREVIEW_CHANNELS = 3


#: float32 scores and probabilities of the capture at one site, live together.
SCRATCH_TENSORS = 2
#: Where Linux says how much memory can be allocated without swapping.
MEMINFO = Path("/proc/meminfo")
HOST = "cpu"


class MemoryBudgetError(ValueError):
    """A trace would store more than ``memory_budget_mb``."""


class InsufficientMemoryError(MemoryBudgetError):
    """A device has less free memory than the trace will allocate on it."""


@dataclass(frozen=True)
class StepBytes:
    """Bytes one traced step stores, by kind."""

    latents: int
    attention: int
    previews: int

    @property
    def total(self) -> int:
        """All bytes of one step."""
        return self.latents + self.attention + self.previews

    def describe(self) -> str:
        """A one-line breakdown in MB."""
        return (
            f"{self.total / BYTES_PER_MB:.2f} MB per step (attention "
            f"{self.attention / BYTES_PER_MB:.2f}, latents {self.latents / BYTES_PER_MB:.2f}, "
            f"previews {self.previews / BYTES_PER_MB:.2f})"
        )


def estimate_step_bytes(
    attention_cells: int,
    latent_shape: tuple[int, int, int],
    n_tokens: int,
    preview_hw: tuple[int, int] | None,
) -> StepBytes:
    """Bytes per step for ``attention_cells`` image queries, latent ``(C, h, w)``, tokens, previews.

    Parameters
    ----------
    attention_cells : int
        Image queries summed over every captured attention site.
    latent_shape : tuple of int
        ``(C, h, w)`` of the (unpacked) latent.
    n_tokens : int
        Token positions kept per attention map.
    preview_hw : tuple of int, optional
        Size of one preview (the latent grid for the linear map, the image for a decoder),
        or ``None`` without previews.

    Examples
    --------
    >>> estimate_step_bytes(256, (4, 16, 16), 10, None).total
    17408
    """
    channels, h, w = latent_shape
    latents = 3 * channels * h * w * LATENT_ITEMSIZE  # latents, noise_pred, pred_x0
    attention = attention_cells * n_tokens * ATTENTION_ITEMSIZE
    previews = 0 if preview_hw is None else preview_hw[0] * preview_hw[1] * PREVIEW_CHANNELS
    return StepBytes(latents=latents, attention=attention, previews=previews)


def check_budget(
    step_bytes: StepBytes, n_steps: int, memory_budget_mb: float, *, n_tokens: int, **_: Any
) -> None:
    """Raise :class:`MemoryBudgetError` with the numbers and the fixes if over budget."""
    needed = step_bytes.total * n_steps
    if needed <= memory_budget_mb * BYTES_PER_MB:
        return
    fixes = []
    if n_tokens > 0 and step_bytes.attention > step_bytes.latents:
        fixes.append(f"keep fewer tokens (tokens='default' or a list; now {n_tokens})")
    if step_bytes.previews:
        fixes.append("decode_previews=False")
    fixes += [
        "fewer steps or a smaller image",
        f"memory_budget_mb>={math.ceil(needed / BYTES_PER_MB)}",
    ]
    raise MemoryBudgetError(
        f"tracing {n_steps} steps needs {needed / BYTES_PER_MB:.1f} MB "
        f"({step_bytes.describe()}), over memory_budget_mb={memory_budget_mb:g}. "
        f"Pass {', or '.join(fixes)}."
    )


def attention_scratch_bytes(
    queries: dict[str, int], heads: dict[str, int], n_keys: int, chunk_bytes: int | None
) -> int:
    """Peak temporaries of the attention capture at its largest site.

    At each site the capture forms float32 scores of every head's image queries against
    ``n_keys`` keys, and their softmax: :data:`SCRATCH_TENSORS` blocks of ``heads x queries x
    n_keys``. Joint-attention capture works in query chunks of at most ``chunk_bytes`` each.

    Examples
    --------
    >>> attention_scratch_bytes({"a": 4096}, {"a": 8}, 77, None)
    20185088
    """
    largest = max((heads.get(path, 1) * n for path, n in queries.items()), default=0)
    block = largest * n_keys * LATENT_ITEMSIZE
    if chunk_bytes is not None:
        block = min(block, chunk_bytes)
    return SCRATCH_TENSORS * block


@dataclass(frozen=True)
class MemoryPlan:
    """Every allocation a trace adds to the plain pipeline's, and where it lives.

    Attributes
    ----------
    device : str
        The pipeline's device (``"cpu"``, ``"cuda:0"``, ...).
    n_steps : int
        Steps the trace will record.
    step : StepBytes
        What one step stores.
    records : int
        Per-step tensors kept on ``device`` during the loop (latents, outputs, attention).
    attention_scratch : int
        The capture's temporaries at its largest site, on ``device``.
    decode : int
        One exact VAE decode on ``device`` (0 without previews).
    stored : int
        The trace's arrays in host memory.
    building : int
        Copies made in host memory while the trace is built from the records.
    """

    device: str
    n_steps: int
    step: StepBytes
    records: int
    attention_scratch: int
    decode: int
    stored: int
    building: int

    def needs(self) -> dict[str, int]:
        """Bytes per device: the pipeline's device and the host (one entry on the CPU)."""
        on_device = self.records + self.attention_scratch + self.decode
        host = self.stored + self.building
        if self.device == HOST:
            return {HOST: on_device + host}
        return {self.device: on_device, HOST: host}

    def describe(self, device: str) -> str:
        """What makes up the bytes needed on ``device``, in MB."""
        mb = BYTES_PER_MB
        parts = []
        if device == self.device:
            parts += [
                f"records kept during the loop {self.records / mb:.0f}",
                f"attention capture scratch {self.attention_scratch / mb:.0f}",
            ]
            if self.decode:
                parts.append(f"one VAE decode {self.decode / mb:.0f}")
        if device == HOST:
            parts += [
                f"the trace's arrays {self.stored / mb:.0f}",
                f"copies while building it {self.building / mb:.0f}",
            ]
        return ", ".join(parts)


def plan_memory(
    step: StepBytes,
    n_steps: int,
    device: str,
    *,
    attention_scratch: int,
    decode: int,
) -> MemoryPlan:
    """The :class:`MemoryPlan` of ``n_steps`` steps of ``step`` bytes on ``device``.

    The loop keeps each step's latents, outputs and attention on the device (never more than
    the stored float32 copies); building the trace stacks them once more, in host memory.

    Examples
    --------
    >>> plan = plan_memory(StepBytes(100, 50, 10), 4, "cpu", attention_scratch=7, decode=9)
    >>> plan.needs()
    {'cpu': 1856}
    """
    records = n_steps * (step.latents + step.attention)
    return MemoryPlan(
        device=device,
        n_steps=n_steps,
        step=step,
        records=records,
        attention_scratch=attention_scratch,
        decode=decode,
        stored=n_steps * step.total,
        building=records,
    )


def free_bytes(device: str) -> int | None:
    """Bytes that can still be allocated on ``device``; ``None`` where that is unknown.

    CUDA: ``torch.cuda.mem_get_info`` plus what torch's allocator holds cached but unused.
    CPU: ``MemAvailable`` of ``/proc/meminfo`` (Linux), else the free physical pages.

    Examples
    --------
    >>> free_bytes("cpu") > 0
    True
    """
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device != HOST:
        return None  # MPS, XPU...: no portable query
    if MEMINFO.exists():
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_free_memory(
    plan: MemoryPlan, *, heads: bool = False, free: Callable[[str], int | None] | None = None
) -> dict[str, int]:
    """Raise :class:`InsufficientMemoryError` when a device has less free than ``plan`` needs.

    Parameters
    ----------
    plan : MemoryPlan
        What the trace will allocate.
    heads : bool
        Whether per-head maps are kept (then dropping them is one of the fixes named).
    free : callable, optional
        ``device -> bytes free or None``; default :func:`free_bytes`.

    Returns
    -------
    dict of str to int
        The bytes free per device that was checked.
    """
    free = free or free_bytes
    seen: dict[str, int] = {}
    for device, needed in plan.needs().items():
        available = free(device)
        if available is None:
            continue
        seen[device] = available
        if needed <= available:
            continue
        raise InsufficientMemoryError(
            f"tracing {plan.n_steps} steps needs {needed / BYTES_PER_MB:.0f} MB on {device} "
            f"({plan.describe(device)}) besides what the pipeline itself needs, but "
            f"{device} has {available / BYTES_PER_MB:.0f} MB free. Pass "
            f"{', or '.join(_fixes(plan, device, heads))}."
        )
    return seen


def _fixes(plan: MemoryPlan, device: str, heads: bool) -> list[str]:
    """The fixes for ``device``, largest share first."""
    shares: list[tuple[int, str]] = [
        (
            plan.n_steps * plan.step.total,
            "fewer steps (num_inference_steps=...) or a smaller image",
        ),
    ]
    attention = plan.n_steps * plan.step.attention
    if heads:
        shares.append((attention, "attention_heads=False"))
    shares.append((attention, "fewer tokens (tokens='default' or a list of positions)"))
    if plan.decode and device == plan.device:
        shares.append((plan.decode, "decode_previews=False, or turn on pipe.vae.enable_tiling()"))
    fixes = [text for _, text in sorted(shares, key=lambda share: -share[0])]
    where = "torch.cuda.empty_cache()" if device.startswith("cuda") else "closing other programs"
    return [*fixes, f"free memory on {device} first (delete unused models, {where})"]
