"""The words of concept maps and the record of their scores (ConceptAttention).

:func:`check_words` checks the words a user types; :func:`encode_concepts` embeds them with the
pipeline's own text encoders, one word at a time (a concept token is the last piece of its
word in the first text segment); :class:`ConceptScores` is what
:class:`~diffwidget.tracing.concepts.ConceptTap` records.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import torch

from diffwidget.records import Array, MaxLen, Record
from diffwidget.tracing.concept_attention import Space

if TYPE_CHECKING:
    from diffwidget.tracing.families.base import DenoiserFamily

#: Most concept words one tap takes (each adds a query to every layer and a softmax column).
MAX_CONCEPT_WORDS = 32
#: Longest concept text read, in characters.
MAX_CONCEPT_CHARS = 100
#: The record key of one layer's scores in one space.
KEY_SEPARATOR = ":"
_WORD = MaxLen(MAX_CONCEPT_CHARS)
Scores = Annotated[np.ndarray, Array(ndim=4, kinds="f")]


class UnknownConceptWarning(UserWarning):
    """A concept word the pipeline's tokenizer has no token for."""


@dataclass(frozen=True, eq=False)
class ConceptScores(Record):
    """What a :class:`ConceptTap` recorded: image outputs projected onto concept outputs.

    Attributes
    ----------
    words : list of str
        The concept words, in order (the last axis of every score array).
    family : str
        The denoiser family.
    layers : list of str
        Attention layers with scores, in data-flow order.
    steps : list of int
        Loop indices recorded (axis 0 of every score array).
    spaces : list of {"output", "attention"}
        The spaces recorded.
    projected : list of str
        Layers whose ``"output"`` scores are after both output projections; the others have
        none (SD3's context-pre-only last block, Flux's single blocks) and their
        ``"output"`` scores are the attention-space ones.
    grids : dict of str to list of int
        Each layer's image-token grid ``[h, w]``.
    latent_hw : list of int
        The unpacked latent grid ``[h, w]``.
    scores : dict of str to ndarray of float32, shape (n_steps, h, w, n_words)
        ``o_x · o_c`` per image token and concept, keyed ``"<space>:<layer>"``.
    """

    words: list[Annotated[str, _WORD]]
    family: str
    layers: list[str]
    steps: list[int]
    spaces: list[Space]
    projected: list[str]
    grids: dict[str, list[int]]
    latent_hw: list[int]
    scores: dict[str, Scores]

    def __post_init__(self) -> None:
        for key, value in self.scores.items():
            space, _, layer = key.partition(KEY_SEPARATOR)
            if space not in self.spaces or layer not in self.layers:
                raise ValueError(f"scores {key!r} name no recorded space and layer")
            h, w = self.grids[layer]
            want = (len(self.steps), h, w, len(self.words))
            if value.shape != want:
                raise ValueError(f"scores {key!r} have shape {value.shape}, expected {want}")

    def layer_scores(self, layer: str, space: Space = "output") -> np.ndarray:
        """One layer's scores ``(n_steps, h, w, n_words)`` in ``space``."""
        key = f"{space}{KEY_SEPARATOR}{layer}"
        if key not in self.scores:
            raise KeyError(
                f"no {space!r} scores for layer {layer!r}; recorded spaces {self.spaces}, "
                f"layers {self.layers}"
            )
        return self.scores[key]


# ---------------------------------------------------------------------------- words
def check_words(words: Sequence[str]) -> list[str]:
    """The concept words, checked: a non-empty list of distinct, non-empty strings.

    Raises
    ------
    TypeError, ValueError
        Saying what to pass instead.

    Examples
    --------
    >>> check_words(["circle", " dog "])
    ['circle', 'dog']
    """
    if isinstance(words, str) or not isinstance(words, Sequence):
        raise TypeError(
            f"concept words are a list of strings, got {type(words).__name__}: pass e.g. "
            "['circle', 'dog']"
        )
    if not words:
        raise ValueError("no concept words: pass at least one, e.g. ['circle']")
    if len(words) > MAX_CONCEPT_WORDS:
        raise ValueError(
            f"{len(words)} concept words; at most {MAX_CONCEPT_WORDS} are mapped at once "
            "(each one is a query in every layer): split them into several runs"
        )
    checked: list[str] = []
    for word in words:
        if not isinstance(word, str):
            raise TypeError(f"a concept word must be a string, got {type(word).__name__}")
        text = " ".join(word.split())
        if not text:
            raise ValueError(f"concept word {word!r} is empty; give each concept some text")
        if len(text) > MAX_CONCEPT_CHARS:
            raise ValueError(
                f"a concept of {len(text)} characters; concepts are words or short phrases "
                f"(at most {MAX_CONCEPT_CHARS} characters)"
            )
        if text in checked:
            raise ValueError(f"concept word {text!r} is given twice; name each concept once")
        checked.append(text)
    return checked


def _warn_unknown(
    pipe: Any, family: DenoiserFamily, words: list[str], call: dict[str, Any]
) -> None:
    """The tokenizer's warning for words it cannot read: the embedded models' own check,
    else the tokenizers' unknown token."""
    check = getattr(pipe, "check_prompt", None)
    if callable(check):
        check(words, stacklevel=4)
        return
    unknown = []
    for word in words:
        tokens = family.prompt_tokens(word, call)
        unk = {
            getattr(getattr(pipe, name, None), "unk_token_id", None)
            for name in ("tokenizer", "tokenizer_2", "tokenizer_3")
        } - {None}
        if any(i in unk and k == "word" for i, k in zip(tokens.ids, tokens.kinds, strict=True)):
            unknown.append(word)
    if unknown:
        warnings.warn(
            f"the pipeline's tokenizer has no token for {', '.join(map(repr, unknown))}: it "
            "reads them as its unknown token, so their maps show what the model makes of "
            "that token, not of the word",
            UnknownConceptWarning,
            stacklevel=4,
        )


def concept_positions(family: DenoiserFamily, words: list[str], call: dict[str, Any]) -> list[int]:
    """Each word's token position: its last piece in the first text segment that holds it."""
    positions = []
    for word in words:
        tokens = family.prompt_tokens(word, call)
        pieces = [i for i, kind in enumerate(tokens.kinds) if kind == "word"]
        if not pieces:
            raise ValueError(f"concept word {word!r} makes no word token in this tokenizer")
        segment = tokens.segments[pieces[0]]
        if tokens.dropped.get(segment):
            raise ValueError(
                f"concept {word!r} is longer than the {segment} encoder reads; use a shorter one"
            )
        positions.append(max(i for i in pieces if tokens.segments[i] == segment))
    return positions


def encode_concepts(
    pipe: Any, family: DenoiserFamily, words: Sequence[str], call: dict[str, Any] | None = None
) -> tuple[list[str], torch.Tensor]:
    """The checked words and their concept embeddings ``[1, n_words, text_dim]``.

    Each word goes through the pipeline's text encoders alone (as a one-word prompt) and
    its token at :func:`concept_positions` is kept.

    Warns
    -----
    UserWarning
        For words the tokenizer cannot read (the embedded models' ``UnknownWordsWarning``,
        else :class:`UnknownConceptWarning`).
    """
    call = dict(call or {})
    checked = check_words(words)
    _warn_unknown(pipe, family, checked, call)
    positions = concept_positions(family, checked, call)
    embeds = family.text_embeddings(checked, call)
    rows = embeds[torch.arange(len(checked)), torch.tensor(positions)]
    return checked, rows.unsqueeze(0)


__all__ = [
    "MAX_CONCEPT_CHARS",
    "MAX_CONCEPT_WORDS",
    "ConceptScores",
    "UnknownConceptWarning",
    "check_words",
    "concept_positions",
    "encode_concepts",
]
