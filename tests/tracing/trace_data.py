"""Trace files written by earlier versions of diffwidget, kept to check they still open.

``trace_format1_sd`` was written by the format-1 code (commit 860985b: ``trace()`` of the tiny
SD pipeline, "a red circle on the left", 2 steps, seed 0); the ``trace_format2_*`` files by
the format-2 code before the trace's facts became a typed record (commit 622bdf7: the same
prompt, 2 steps; tiny SD seed 0, tiny SD3 and tiny Flux with ``true_cfg_scale=2`` seed 1,
``max_sequence_length=24``).
"""

from __future__ import annotations

from pathlib import Path

from diffwidget.tracing.trace import Trace

DATA = Path(__file__).parent / "data"
NAMES = ("format1_sd", "format2_sd", "format2_sd3", "format2_flux")


def trace_data_path(name: str) -> Path:
    """Path of the stored trace ``name`` (one of :data:`NAMES`)."""
    return DATA / f"trace_{name}.safetensors"


def load_trace_data(name: str) -> Trace:
    """The stored trace ``name``, loaded by this version."""
    return Trace.load(trace_data_path(name))
