"""Captions the way people type them: normalisation in the tokenizer, one warning for OOV words."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch

from diffwidget.models.architecture import MAX_TOKENS, build_demo_pipeline, build_tokenizer
from diffwidget.models.dit import build_dit_pipeline
from diffwidget.models.loader import DEMO_DIR, demo_weights_available, load_demo_pipeline
from diffwidget.models.prompts import (
    MAX_WORDS,
    PromptTooLongWarning,
    UnknownWordsWarning,
    check_prompt,
    grammar,
    unknown_words,
)
from diffwidget.models.scenes import COLOURS, EXAMPLE_CAPTIONS, SHAPES, VOCABULARY
from diffwidget.models.tokenizer import normalise_caption

TYPED = {
    "A Red circle, on the left.": "a red circle on the left",
    "a LARGE blue square   above a small yellow triangle!": (
        "a large blue square above a small yellow triangle"
    ),
    "a green triangle in the center": "a green triangle in the centre",
    "A purple circle (in the middle)": "a purple circle in the middle",
    "a red-circle": "a red circle",
}


@pytest.mark.parametrize(("typed", "normal"), TYPED.items())
def test_normalise_caption(typed: str, normal: str) -> None:
    assert normalise_caption(typed) == normal


@pytest.mark.parametrize(("typed", "normal"), TYPED.items())
def test_the_tokenizer_reads_typed_captions_as_their_normal_form(typed: str, normal: str) -> None:
    tokenizer = build_tokenizer()
    assert tokenizer(typed).input_ids == tokenizer(normal).input_ids
    # Every word of the normal form is one token: nothing is spelled out.
    assert tokenizer.tokenize(typed) == [w + "</w>" for w in normal.split()]


def _embed(pipe: Any, prompt: str) -> torch.Tensor:
    if type(pipe).__name__ == "StableDiffusion3Pipeline":
        return pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=False)[0]
    return pipe.encode_prompt(prompt, "cpu", 1, False)[0]


@pytest.mark.parametrize("build", [build_demo_pipeline, build_dit_pipeline])
def test_a_plain_pipeline_call_embeds_the_normal_form(build: Any) -> None:
    """``pipe("A Red circle, on the left.")`` is exactly ``pipe("a red circle on the left")``."""
    pipe = build(seed=0)
    typed, normal = "A Red circle, on the left.", "a red circle on the left"
    assert torch.equal(_embed(pipe, typed), _embed(pipe, normal))
    assert not torch.equal(_embed(pipe, normal), _embed(pipe, "a red circle on the right"))


def test_unknown_words_are_named_once_each() -> None:
    assert unknown_words("a cat sitting on a sofa, a cat") == ["cat", "sitting", "sofa"]
    assert unknown_words(["a red dog", "a blue dog on the moon"]) == ["dog", "moon"]
    assert unknown_words(list(EXAMPLE_CAPTIONS)) == []
    assert unknown_words("A Red circle, in the CENTER.") == []


def test_one_clear_warning_for_words_outside_the_vocabulary() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check_prompt("a cat sitting on a sofa") == ["cat", "sitting", "sofa"]
    assert len(caught) == 1
    warning = caught[0]
    assert warning.category is UnknownWordsWarning
    message = str(warning.message)
    for fragment in ("'cat'", "'sitting'", "'sofa'", EXAMPLE_CAPTIONS[0], "size is optional"):
        assert fragment in message
    assert all(word in message for word in (*COLOURS, *SHAPES))
    assert warning.filename == __file__  # points at the caller's line


def test_good_captions_give_no_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for caption in [*EXAMPLE_CAPTIONS, *TYPED]:
            assert check_prompt(caption) == []


def test_too_long_prompts_warn() -> None:
    words = " ".join(["a red circle"] * 6)
    assert len(words.split()) > MAX_WORDS
    with pytest.warns(PromptTooLongWarning, match=f"at most {MAX_WORDS}"):
        assert check_prompt(words) == []
    assert MAX_WORDS == MAX_TOKENS - 2


def test_grammar_lists_every_word() -> None:
    text = grammar()
    assert all(word in text for word in VOCABULARY)


@pytest.mark.skipif(not demo_weights_available(DEMO_DIR), reason="no shipped weights")
def test_the_loader_attaches_the_check() -> None:
    pipe = load_demo_pipeline()
    with pytest.warns(UnknownWordsWarning, match="'sofa'"):
        assert pipe.check_prompt("a cat on a sofa") == ["cat", "sofa"]
    assert pipe.tokenizer.tokenize("A Red circle.") == ["a</w>", "red</w>", "circle</w>"]
