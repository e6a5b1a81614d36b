"""Denoiser families: the one place that knows each kind of text-to-image denoiser.

=========  ==========================================  =====================================
family     pipelines                                   text→image attention kept
=========  ==========================================  =====================================
``unet``   StableDiffusionPipeline, ...XLPipeline      ``attn2`` cross-attention softmax
``sd3``    StableDiffusion3Pipeline (SD3, SD3.5)       image→text block of the joint softmax
``flux``   FluxPipeline (FLUX.1 dev, schnell)          image→text block of the joint softmax,
                                                       double- and single-stream blocks
``pixart`` PixArtSigmaPipeline, PixArtAlphaPipeline    ``attn2`` cross-attention softmax
=========  ==========================================  =====================================

:func:`denoiser_family` picks the family of a pipeline (or says clearly that none fits);
:func:`family_by_name` gives the family recorded in a saved trace. See
:mod:`diffwidget.tracing.families.base` for what a family owns.
"""

from __future__ import annotations

from typing import Any

from diffwidget.tracing.facts import LEGACY_FAMILY
from diffwidget.tracing.families.base import DenoiserCall, DenoiserFamily, FamilyInfo, LatentLayout
from diffwidget.tracing.families.flux import FluxFamily
from diffwidget.tracing.families.mmdit import SD3Family
from diffwidget.tracing.families.pixart import PixArtFamily
from diffwidget.tracing.families.unet import UNetFamily

#: Every family, tried in this order (the UNet last: it also accepts custom UNets).
FAMILIES: tuple[type[DenoiserFamily], ...] = (SD3Family, FluxFamily, PixArtFamily, UNetFamily)
#: One row per family for README tables and error messages.
SUPPORTED: tuple[FamilyInfo, ...] = tuple(f.info() for f in FAMILIES)


def supported_pipelines() -> list[str]:
    """Every pipeline class name a family claims."""
    return [name for family in FAMILIES for name in family.pipelines]


def denoiser_family(pipe: Any) -> DenoiserFamily:
    """The family of ``pipe``, bound to it.

    Raises
    ------
    TypeError
        When no family fits; the message names the supported pipelines.

    Examples
    --------
    >>> import diffwidget
    >>> denoiser_family(diffwidget.load_demo_pipeline()).name
    'unet'
    """
    if pipe is None or not hasattr(pipe, "__dict__"):
        raise TypeError(
            f"expected a diffusers pipeline, got {type(pipe).__name__}; supported pipelines: "
            f"{', '.join(supported_pipelines())}. Load one with e.g. "
            "diffwidget.load_demo_pipeline() or StableDiffusionPipeline.from_pretrained(path)"
        )
    for family in FAMILIES:
        if family.matches(pipe):
            return family(pipe)
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    detail = (
        f" (its {type(denoiser).__name__} has no text→image attention diffwidget knows)"
        if denoiser is not None
        else " (it has neither a `unet` nor a `transformer`)"
    )
    raise TypeError(
        f"diffwidget cannot trace a {type(pipe).__name__}{detail}; supported pipelines: "
        f"{', '.join(supported_pipelines())} (and their subclasses). Load your checkpoint "
        "with one of them, e.g. StableDiffusionPipeline.from_pretrained(path)"
    )


def family_by_name(name: str) -> type[DenoiserFamily]:
    """The family class recorded as ``name`` in a trace."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(
        f"unknown denoiser family {name!r} (known: {[f.name for f in FAMILIES]}); the trace "
        "was written by a newer diffwidget: upgrade with `pip install -U diffwidget`"
    )


__all__ = [
    "FAMILIES",
    "LEGACY_FAMILY",
    "SUPPORTED",
    "DenoiserCall",
    "DenoiserFamily",
    "FamilyInfo",
    "FluxFamily",
    "LatentLayout",
    "PixArtFamily",
    "SD3Family",
    "UNetFamily",
    "denoiser_family",
    "family_by_name",
    "supported_pipelines",
]
