"""What the embedded models can read: their grammar, and one clear warning for other words.

The embedded models know the few dozen words of the scene world's caption grammar
(:mod:`diffwidget.models.scenes`). Their tokenizer splits any other word into single letters
and the pipeline cuts the prompt at 16 tokens, so "a cat sitting on a sofa" would silently
become a prompt about letters. :func:`check_prompt` names the unknown words in one warning,
with the grammar and an example. The loader attaches it to every embedded pipeline as
``pipe.check_prompt`` (next to ``pipe.recommended_guidance_scale``), so callers that accept
user prompts (``diffwidget.trace``, the command line) can check before generating.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from diffwidget.models.architecture import MAX_TOKENS
from diffwidget.models.scenes import (
    CENTRE_PHRASES,
    COLOURS,
    EXAMPLE_CAPTIONS,
    POSITION_PHRASE,
    RELATIONS,
    SHAPES,
    SIZES,
    VOCABULARY,
)
from diffwidget.models.tokenizer import normalise_caption

#: Words a prompt can hold: the start and end tokens take two of the tokenizer's positions.
MAX_WORDS = MAX_TOKENS - 2


class UnknownWordsWarning(UserWarning):
    """A prompt holds words the embedded models have no token for."""


class PromptTooLongWarning(UserWarning):
    """A prompt is longer than the embedded models read; the rest is cut off."""


def grammar() -> str:
    """The caption grammar in one paragraph, with its words and an example.

    Examples
    --------
    >>> "a [small|large] COLOUR SHAPE POSITION" in grammar()
    True
    """
    positions = [p for k, p in POSITION_PHRASE.items() if k != "centre"] + list(CENTRE_PHRASES)
    return (
        f"captions of the form 'a [{'|'.join(SIZES)}] COLOUR SHAPE POSITION' or "
        f"'a [size] COLOUR SHAPE RELATION a [size] COLOUR SHAPE' (the size is optional), with "
        f"COLOUR one of {', '.join(COLOURS)}; SHAPE one of {', '.join(SHAPES)}; POSITION one "
        f"of {', '.join(map(repr, positions))}; RELATION one of {', '.join(RELATIONS)}; "
        f"e.g. {EXAMPLE_CAPTIONS[0]!r} or {EXAMPLE_CAPTIONS[1]!r}"
    )


def unknown_words(prompt: str | Sequence[str]) -> list[str]:
    """Words of ``prompt`` (after the tokenizer's normalisation) outside the vocabulary.

    Parameters
    ----------
    prompt : str or sequence of str
        One prompt or a batch.

    Returns
    -------
    list of str
        Each unknown word once, in order of appearance.

    Examples
    --------
    >>> unknown_words("A cat, sitting on a sofa")
    ['cat', 'sitting', 'sofa']
    >>> unknown_words("A Red circle, in the center.")
    []
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    known = set(VOCABULARY)
    found: dict[str, None] = {}
    for text in prompts:
        for word in normalise_caption(text).split():
            if word not in known:
                found.setdefault(word)
    return list(found)


def unknown_words_message(words: Sequence[str]) -> str:
    """The explanation shown for ``words`` the embedded models do not know."""
    return (
        f"the embedded model has no word for {', '.join(map(repr, words))}: its "
        f"tokenizer spells unknown words letter by letter, and the image will not follow "
        f"them. It was trained only on {grammar()}. It knows: {' '.join(VOCABULARY)}"
    )


def too_long_message(n_words: int) -> str:
    """The explanation shown for a prompt of ``n_words`` words, more than the model reads."""
    return (
        f"the prompt has {n_words} words; the embedded model reads at most {MAX_WORDS} and "
        f"cuts the rest. It was trained on {grammar()}"
    )


def check_prompt(prompt: str | Sequence[str], *, stacklevel: int = 2) -> list[str]:
    """Warn once if ``prompt`` holds unknown words (or more words than the model reads).

    Case, punctuation and the spelling "center" are normalised by the tokenizer and never
    warned about.

    Parameters
    ----------
    prompt : str or sequence of str
        One prompt or a batch.
    stacklevel : int
        Passed to :func:`warnings.warn` (2: the caller's line).

    Returns
    -------
    list of str
        The unknown words (empty when the prompt is fine).

    Warns
    -----
    UnknownWordsWarning
        One warning naming every unknown word, with the grammar and an example caption.
    PromptTooLongWarning
        When a prompt of known words is longer than :data:`MAX_WORDS` words.

    Examples
    --------
    >>> import diffwidget
    >>> pipe = diffwidget.load_demo_pipeline()
    >>> pipe.check_prompt("a small green triangle at the top")
    []
    """
    unknown = unknown_words(prompt)
    if unknown:
        warnings.warn(unknown_words_message(unknown), UnknownWordsWarning, stacklevel=stacklevel)
        return unknown
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    longest = max((len(normalise_caption(p).split()) for p in prompts), default=0)
    if longest > MAX_WORDS:
        warnings.warn(too_long_message(longest), PromptTooLongWarning, stacklevel=stacklevel)
    return []
