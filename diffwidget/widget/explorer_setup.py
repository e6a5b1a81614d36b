"""What an explorer checks and chooses when it opens: its inputs, the first token shown."""

from __future__ import annotations

from typing import Any

from diffwidget.tracing.trace import Trace
from diffwidget.widget.concept_overlay import FUNCTION_WORDS

__all__ = ["check_inputs", "first_content_token"]


def check_inputs(trace: Any, pipe: Any) -> None:
    """Refuse, with the fix, what ``Explorer(trace, pipe)`` cannot show."""
    if isinstance(trace, Trace):
        if pipe is not None and (isinstance(pipe, Trace) or not hasattr(pipe, "scheduler")):
            raise TypeError(
                f"pipe must be the diffusers pipeline the trace came from, got "
                f"{type(pipe).__name__}; use Explorer(trace) to show a trace without one"
            )
        return
    if trace is not None and hasattr(trace, "scheduler") and hasattr(trace, "components"):
        raise TypeError(
            f"Explorer takes a Trace, not a pipeline ({type(trace).__name__}); record one "
            "first: trace = diffwidget.trace(pipe, prompt), then Explorer(trace, pipe)"
        )
    raise TypeError(
        f"Explorer takes a Trace (from diffwidget.trace(pipe, prompt) or Trace.load(path)), "
        f"got {type(trace).__name__}"
    )


def first_content_token(trace: Trace) -> int:
    """Index of the first prompt word that is not a function word (else the first word)."""
    words = trace.word_indices
    for index in words:
        if trace.tokens[index].replace("</w>", "").strip().lower() not in FUNCTION_WORDS:
            return index
    return words[0] if words else 0
