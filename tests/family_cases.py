"""Denoiser-family test cases: one tiny pipeline per case and its trace() arguments."""

from __future__ import annotations

from typing import Any

#: One tiny pipeline per denoiser-family case: name -> (builder, extra trace() arguments).
#: The tiny T5 sequences are 24 positions long; PixArt's resolution binning only knows
#: real image sizes, so it is off.
FAMILY_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "sd3": ("tiny_sd3_pipeline", {"max_sequence_length": 24}),
    "sd3_no_t5": ("tiny_sd3_pipeline:no_t5", {"max_sequence_length": 24}),
    "sd35": ("tiny_sd3_pipeline:sd35", {"max_sequence_length": 24}),
    "flux": ("tiny_flux_pipeline", {"max_sequence_length": 24, "height": 32, "width": 32}),
    "flux_true_cfg": (
        "tiny_flux_pipeline",
        {
            "max_sequence_length": 24,
            "height": 32,
            "width": 32,
            "true_cfg_scale": 2.0,
            "negative_prompt": "blurry",
        },
    ),
    "pixart": (
        "tiny_pixart_pipeline",
        {"max_sequence_length": 24, "use_resolution_binning": False, "clean_caption": False},
    ),
}
#: The family each case belongs to.
CASE_FAMILY = {"sd3": "sd3", "sd3_no_t5": "sd3", "sd35": "sd3", "flux": "flux"}
CASE_FAMILY.update({"flux_true_cfg": "flux", "pixart": "pixart"})


def build_family_case(name: str) -> tuple[Any, dict[str, Any]]:
    """A fresh tiny pipeline of the case ``name`` and its trace() arguments."""
    from diffwidget.testing import tiny_dit

    builder, kwargs = FAMILY_CASES[name]
    function, _, variant = builder.partition(":")
    options = {"no_t5": {"t5": False}, "sd35": {"sd35": True}}.get(variant, {})
    return getattr(tiny_dit, function)(**options), dict(kwargs)
