"""Classifier-free guidance: the one home of the batch layout and the guidance formula.

diffusers runs classifier-free guidance (CFG) in one of three ways, and every part of
diffwidget that splits a denoiser batch, combines two predictions or replays a step asks
this module which one a trace used:

===========  =====================================================  ==========================
layout       how the pipeline calls the denoiser                    pipelines
===========  =====================================================  ==========================
``batched``  one call per step on ``[uncond, cond]`` (negative       SD 1.x/2.x, SDXL, SD3,
             prompt first), guided ``u + w (c - u)``                PixArt
``separate`` two calls per step, labelled by diffusers'             Flux with ``true_cfg_scale``
             ``cache_context("cond")`` then ``("uncond")``
``none``     one call on the prompt alone                           Flux (guidance-distilled),
                                                                    any pipeline at ``w <= 1``
===========  =====================================================  ==========================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeVar, get_args

if TYPE_CHECKING:
    import torch

CfgKind = Literal["batched", "separate", "none"]
CFG_KINDS: tuple[str, ...] = get_args(CfgKind)
Half = Literal["uncond", "cond"]
#: Order of the two halves in a batched call and in every stored CFG record (rows of
#: ``Trace.prompt_embeds`` and ``Trace.extra``): diffusers concatenates [negative, positive].
CFG_HALVES: tuple[Half, Half] = ("uncond", "cond")
#: The ``cache_context`` names Flux-style pipelines give their two separate calls.
CACHE_CONTEXT_NAMES: dict[str, Half] = {"cond": "cond", "uncond": "uncond"}

T = TypeVar("T")


def guide(uncond: T, cond: T, guidance_scale: float) -> T:
    """The guided prediction ``uncond + w (cond - uncond)`` (arrays or tensors).

    Examples
    --------
    >>> guide(1.0, 3.0, 2.0)
    5.0
    """
    return uncond + guidance_scale * (cond - uncond)  # type: ignore[operator]


@dataclass(frozen=True)
class CfgLayout:
    """How one trace's denoiser calls hold the CFG halves.

    Attributes
    ----------
    kind : {"batched", "separate", "none"}
        See the module docstring.
    guidance_scale : float
        ``w`` (``true_cfg_scale`` for Flux's separate calls). Recorded as given, also when
        it is 0 or 1 (then no unconditional half runs).
    """

    kind: CfgKind
    guidance_scale: float

    def __post_init__(self) -> None:
        if self.kind not in CFG_KINDS:
            raise ValueError(f"unknown CFG layout {self.kind!r}; use one of {CFG_KINDS}")

    @property
    def halves(self) -> tuple[Half, ...]:
        """The halves stored in the trace, in order: ``("uncond", "cond")`` or ``("cond",)``."""
        return CFG_HALVES if self.kind != "none" else ("cond",)

    @property
    def calls_per_step(self) -> int:
        """Denoiser calls the pipeline makes per step."""
        return 2 if self.kind == "separate" else 1

    @property
    def guided(self) -> bool:
        """Whether an unconditional half exists."""
        return self.kind != "none"

    def split(self, batch: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(uncond, cond)`` rows of one batched call's tensor (``uncond`` is None without CFG).

        Raises
        ------
        RuntimeError
            When a batched-CFG tensor has an odd batch.
        """
        if self.kind != "batched":
            return None, batch
        if batch.shape[0] % 2:
            raise RuntimeError(
                f"a denoiser tensor has batch {batch.shape[0]} under batched classifier-free "
                "guidance; expected [uncond, cond] halves of equal size"
            )
        uncond, cond = batch.chunk(2)
        return uncond, cond

    def cond_rows(self, batch: torch.Tensor) -> torch.Tensor:
        """The prompt's rows of one call's tensor (the whole batch without batched CFG)."""
        return self.split(batch)[1]

    def combine(self, uncond: torch.Tensor | None, cond: torch.Tensor) -> torch.Tensor:
        """The guided prediction from the two halves (``cond`` alone without CFG)."""
        if uncond is None or not self.guided:
            return cond
        return guide(uncond, cond, self.guidance_scale)
