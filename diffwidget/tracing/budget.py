"""How much a trace stores per step, known before the pipeline runs.

Each ``attn2`` layer sits at one resolution level of the UNet: down block ``k`` at level
``k``, the mid block at the deepest level, up block ``j`` at level ``n - 1 - j``. A level's
grid is the latent grid halved ``k`` times, rounding up (diffusers' stride-2 convolution
with padding 1). From that grid, the number of kept tokens and the latent shape, the bytes
per step follow exactly; :meth:`Trace.nbytes_per_step` reports the same number afterwards.
"""

from __future__ import annotations

import math
import re
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

_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.|^(mid_block)\.")


class MemoryBudgetError(ValueError):
    """A trace would store more than ``memory_budget_mb``."""


def grid_at_level(latent_hw: tuple[int, int], level: int) -> tuple[int, int]:
    """Spatial grid after ``level`` stride-2 downsamplings of ``latent_hw``."""
    h, w = latent_hw
    for _ in range(level):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def layer_level(path: str, n_levels: int) -> int:
    """Resolution level of the attention layer at the diffusers module ``path``."""
    match = _BLOCK.match(path)
    if match is None:
        raise ValueError(
            f"cannot tell the resolution of attention layer {path!r}: diffwidget expects "
            "UNet2DConditionModel-style paths (down_blocks.k / mid_block / up_blocks.k)"
        )
    if match.group(3):
        return n_levels - 1
    index = int(match.group(2))
    return index if match.group(1) == "down_blocks" else n_levels - 1 - index


def layer_grid(
    path: str, n_levels: int, latent_hw: tuple[int, int], n_queries: int
) -> tuple[int, int]:
    """The ``(h_l, w_l)`` grid of a layer with ``n_queries`` query positions.

    The level comes from the module path; if the UNet is laid out differently, the first
    level whose grid holds exactly ``n_queries`` positions is used.
    """
    candidates = [grid_at_level(latent_hw, layer_level(path, n_levels))]
    candidates += [grid_at_level(latent_hw, level) for level in range(n_levels + 2)]
    for h, w in candidates:
        if h * w == n_queries:
            return h, w
    raise ValueError(
        f"attention layer {path!r} has {n_queries} query positions, which matches no "
        f"downsampled grid of the {latent_hw[0]}x{latent_hw[1]} latent"
    )


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
    layer_paths: list[str],
    n_levels: int,
    latent_shape: tuple[int, int, int],
    n_tokens: int,
    image_hw: tuple[int, int] | None,
) -> StepBytes:
    """Bytes per step for the given layers, latent ``(C, h, w)``, tokens and previews.

    Parameters
    ----------
    layer_paths : list of str
        ``attn2`` module paths that are captured.
    n_levels : int
        ``len(unet.config.block_out_channels)``.
    latent_shape : tuple of int
        ``(C, h, w)`` of the latent.
    n_tokens : int
        Token positions kept per attention map.
    image_hw : tuple of int, optional
        Image size when previews are decoded, else ``None``.
    """
    channels, h, w = latent_shape
    latents = 3 * channels * h * w * LATENT_ITEMSIZE  # latents, noise_pred, pred_x0
    cells = 0
    for path in layer_paths:
        gh, gw = grid_at_level((h, w), layer_level(path, n_levels))
        cells += gh * gw
    attention = cells * n_tokens * ATTENTION_ITEMSIZE
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
