"""How much a trace stores per step, known before the pipeline runs.

Per step a trace keeps the latent, the guided model output and x̂0 (float32), one float16
attention row per image query and kept token at every captured site, and an RGB preview.
The number of image queries per site comes from the denoiser family
(:meth:`~diffwidget.tracing.families.base.DenoiserFamily.query_counts`), so the bytes per
step follow exactly from the latent grid, the kept tokens and the image size;
:meth:`Trace.nbytes_per_step` reports the same number afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: Default cap on what one trace may store (all steps together).
DEFAULT_MEMORY_BUDGET_MB = 2048.0
BYTES_PER_MB = 2**20
#: Stored dtypes: latents, noise_pred and pred_x0 in float32, attention in float16,
#: previews in uint8 RGB.
LATENT_ITEMSIZE = 4
ATTENTION_ITEMSIZE = 2
PREVIEW_CHANNELS = 3


class MemoryBudgetError(ValueError):
    """A trace would store more than ``memory_budget_mb``."""


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
    image_hw: tuple[int, int] | None,
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
    image_hw : tuple of int, optional
        Image size when previews are decoded, else ``None``.

    Examples
    --------
    >>> estimate_step_bytes(256, (4, 16, 16), 10, None).total
    17408
    """
    channels, h, w = latent_shape
    latents = 3 * channels * h * w * LATENT_ITEMSIZE  # latents, noise_pred, pred_x0
    attention = attention_cells * n_tokens * ATTENTION_ITEMSIZE
    previews = 0 if image_hw is None else image_hw[0] * image_hw[1] * PREVIEW_CHANNELS
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
