"""A prompt longer than a text encoder: recorded in the trace, warned once, shown in the widget."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest

from diffwidget.models.prompts import PromptTooLongWarning
from diffwidget.testing.tiny import TINY_WORDS
from diffwidget.tracing.facts import TextCut
from diffwidget.tracing.generate import trace
from diffwidget.tracing.tokens import PromptTruncatedWarning
from diffwidget.tracing.trace import Trace

#: 80 words of one token each: CLIP keeps 75 between its start and end tokens.
WORDS = [TINY_WORDS[i % len(TINY_WORDS)] for i in range(80)]
CLIP_WORDS = 77 - 2


def traced_with_warnings(pipe: Any, prompt: str, **kwargs: Any) -> tuple[Trace, list[Any]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = trace(pipe, prompt, num_inference_steps=2, seed=0, decode_previews=False, **kwargs)
    return traced, [w for w in caught if issubclass(w.category, PromptTooLongWarning)]


def test_cut_prompt_is_recorded_and_warned_once(tiny_sd_pipe: Any, tmp_path: Path) -> None:
    traced, caught = traced_with_warnings(tiny_sd_pipe, " ".join(WORDS))
    dropped = WORDS[CLIP_WORDS:]  # counted from the words, not from the tokenizer
    assert traced.facts.text_cut == [TextCut("clip", 77, dropped)]
    assert len(caught) == 1
    assert caught[0].category is PromptTruncatedWarning
    assert f'"{" ".join(dropped)}"' in str(caught[0].message)
    assert (
        Trace.load(traced.save(tmp_path / "cut.safetensors")).facts.text_cut
        == traced.facts.text_cut
    )


def test_the_warning_points_at_trace_so_the_package_tests_must_expect_it(
    tiny_sd_pipe: Any,
) -> None:
    """Attributed to diffwidget's trace(): pytest's filter makes an unexpected one an error."""
    _, caught = traced_with_warnings(tiny_sd_pipe, " ".join(WORDS))
    assert Path(caught[0].filename).name == "generate.py"
    with pytest.warns(PromptTruncatedWarning, match="never saw"):
        trace(tiny_sd_pipe, " ".join(WORDS), num_inference_steps=2, decode_previews=False)


def test_a_prompt_that_fits_records_no_cut(tiny_sd_pipe: Any) -> None:
    traced, caught = traced_with_warnings(tiny_sd_pipe, " ".join(WORDS[:CLIP_WORDS]))
    assert traced.facts.text_cut == []
    assert caught == []


def test_each_encoder_records_its_own_cut(family_case: Any) -> None:
    """SD3: CLIP (77) reads all 30 words, T5 (24 positions, one for its end token) does not."""
    pipe, kwargs = family_case("sd3")
    words = WORDS[:30]
    traced, caught = traced_with_warnings(pipe, " ".join(words), **kwargs)
    assert [(cut.segment, cut.limit) for cut in traced.facts.text_cut] == [("t5", 24)]
    assert traced.facts.text_cut[0].dropped == words[23:]
    assert len(caught) == 1


def test_the_explorer_names_the_dropped_words(tiny_sd_pipe: Any) -> None:
    from diffwidget.widget.explorer import Explorer

    traced, _ = traced_with_warnings(tiny_sd_pipe, " ".join(WORDS))
    explorer = Explorer(traced)
    try:
        caption = explorer.widget.attention["description"]
        assert f'never saw, beyond its 77 positions: "{" ".join(WORDS[CLIP_WORDS:])}"' in caption
    finally:
        explorer.close()
