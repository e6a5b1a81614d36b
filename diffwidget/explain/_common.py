"""Small helpers shared by the explanation methods (device memory, batch sizes, checks)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from diffwidget.explain.protocol import ProgressCallback

__all__ = ["ProgressCallback", "auto_batch_size", "check_int", "check_step", "choose_batch"]

#: Share of the free device memory a batch may use (the rest is headroom for the allocator).
MEMORY_HEADROOM = 0.6
#: Batch size on the CPU for a 16x16 latent; larger latents get proportionally fewer rows.
CPU_BATCH_AT_16x16 = 64
_CPU_REFERENCE_CELLS = 16 * 16
#: Upper bound for automatically chosen batch sizes: larger batches stop paying off once
#: the device is saturated and only delay the first streamed estimate.
MAX_AUTO_BATCH = 128


def check_int(name: str, value: Any, minimum: int = 1, *, optional: bool = False) -> int | None:
    """``value`` as an int ``>= minimum``; a clear error for floats, bools and other types.

    Examples
    --------
    >>> check_int("n_masks", 500)
    500
    """
    if value is None and optional:
        return None
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(
            f"{name} must be an integer, got {value!r} ({type(value).__name__})"
            + ("; pass None for the default" if optional else "")
        )
    value = int(value.__index__())
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def check_int_list(name: str, value: Any) -> list[int] | None:
    """An optional sequence of ints (step lists): strings and scalars get a clear error."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a list of integers, got {value!r}")
    return [int(check_int(name, v, 0)) for v in value]  # type: ignore[arg-type]


def check_str_list(name: str, value: Any) -> list[str] | None:
    """An optional sequence of strings (module paths): a bare string gets a clear error."""
    if value is None:
        return None
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise TypeError(f"{name} must be a list of strings, got {value!r}; wrap one in a list")
    items = list(value)
    bad = [v for v in items if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{name} must hold module paths (strings), got {bad}")
    return items


def check_step(trace: Any, step: int) -> int:
    """Validate a loop index against ``trace`` and return it as ``int``."""
    n = int(trace.n_steps)
    if not hasattr(step, "__index__"):
        raise TypeError(
            f"step must be an integer loop index (0..{n - 1}), got {type(step).__name__}; "
            "pass the loop index, not the scheduler timestep"
        )
    step = int(step.__index__())
    if not 0 <= step < n:
        hint = ""
        if step in [int(t) for t in trace.timesteps]:
            index = [int(t) for t in trace.timesteps].index(step)
            hint = f" ({step} is the scheduler timestep of step {index}: pass step={index})"
        raise IndexError(f"step {step} is out of range; this trace has steps 0..{n - 1}{hint}")
    return step


def available_cpu_bytes() -> int | None:
    """Available physical memory on Linux-like systems, ``None`` where unknown."""
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def auto_batch_size(
    probe: Callable[[int], Any], device: torch.device, n_items: int, grid: tuple[int, int]
) -> tuple[int, str]:
    """Choose how many latents to send through the UNet per call.

    On CUDA, ``probe(1)`` is run once and its peak memory measured; the batch fills
    ``MEMORY_HEADROOM`` of the free memory. On the CPU, a fixed budget scaled by the latent
    area is used (peak memory cannot be measured there without a profiler).

    Returns
    -------
    tuple of (int, str)
        The batch size and a short note saying how it was chosen.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        probe(1)
        torch.cuda.synchronize(device)
        per_item = max(torch.cuda.max_memory_allocated(device) - base, 1)
        free, _total = torch.cuda.mem_get_info(device)
        size = int(MEMORY_HEADROOM * free / per_item)
        size = max(1, min(size, n_items, MAX_AUTO_BATCH))
        return (
            size,
            f"from free CUDA memory ({free / 2**30:.1f} GiB, {per_item / 2**20:.0f} MiB/latent)",
        )
    cells = grid[0] * grid[1]
    size = max(1, min(n_items, MAX_AUTO_BATCH, CPU_BATCH_AT_16x16 * _CPU_REFERENCE_CELLS // cells))
    return size, "CPU default scaled by latent area"


def choose_batch(
    given: int | None,
    probe: Callable[[int], Any],
    device: torch.device,
    n_items: int,
    grid: tuple[int, int],
) -> tuple[int, str]:
    """The batch size a user gave (at most ``n_items``), else :func:`auto_batch_size`'s.

    Examples
    --------
    >>> choose_batch(64, print, torch.device("cpu"), 10, (16, 16))
    (10, 'given')
    """
    if given is not None:
        return min(given, n_items), "given"
    return auto_batch_size(probe, device, n_items, grid)
