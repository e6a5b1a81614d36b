"""Which prompt token positions a trace keeps, and what kind each one is.

A denoiser attends to a text sequence built from one or more tokenizers, each part padded
to a fixed length ("segments"):

==========  =========================================================================
family      text sequence
==========  =========================================================================
UNet        CLIP, 77 positions: start, words, end, padding (SDXL: its two CLIP
            encoders share the positions)
SD3         CLIP (77, CLIP-L ⊕ CLIP-G features) then T5 (``max_sequence_length``,
            256 by default; all-zero embeddings when T5 is absent): each word twice
Flux        T5 only (512 for dev, 256 for schnell)
PixArt      T5 only (300 for PixArt-Σ), padding masked out
==========  =========================================================================

Attention to padding is large but says little, so by default a trace keeps, per segment,
every non-padding position and *one* padding position (enough to show how much attention
padding soaks up). ``words`` maps each position to the index of the prompt word it belongs
to within its segment, so the two copies of a word in SD3 can be found together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Union

from diffwidget.models.prompts import PromptTooLongWarning
from diffwidget.tracing.trace import TokenKind

TokenSelection = Union[Literal["default", "all"], Sequence[int]]  # noqa: UP007 - runtime alias
#: Suffix CLIP's BPE vocabulary marks word ends with; hidden in displayed token strings.
WORD_END = "</w>"
#: Prefix SentencePiece (T5) marks word starts with; hidden in displayed token strings.
T5_WORD_START = "▁"
DEFAULT_SEGMENT = "clip"
T5_SEGMENT = "t5"
#: Shown for positions whose embedding is all zeros (SD3 without T5).
EMPTY_TOKEN = "<empty>"


class PromptTruncatedWarning(PromptTooLongWarning):
    """A prompt is longer than a text encoder reads: the trace records the words it cut."""


@dataclass(frozen=True)
class PromptTokens:
    """Every token position of one tokenized prompt.

    Attributes
    ----------
    ids : list of int
        Token ids, padded to the tokenizer's ``model_max_length``.
    strings : list of str
        Readable token strings (CLIP's ``</w>`` word-end marker removed).
    kinds : list of {"start", "word", "end", "pad"}
        Kind of each position.
    segments : list of str
        The text encoder ("clip", "t5") of each position.
    words : list of int
        Index of the prompt word each position belongs to within its segment (-1 for none).
    dropped : dict of str to list of str
        Per segment cut short, the words of the prompt beyond its length (never seen by
        that encoder); empty when the prompt fits.
    """

    ids: list[int]
    strings: list[str]
    kinds: list[TokenKind]
    segments: list[str] = field(default_factory=list)
    words: list[int] = field(default_factory=list)
    dropped: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.ids)
        if not self.segments:
            object.__setattr__(self, "segments", [DEFAULT_SEGMENT] * n)
        if not self.words:
            object.__setattr__(self, "words", _word_indices(self.kinds))
        if not len(self.strings) == len(self.kinds) == len(self.segments) == len(self.words) == n:
            raise ValueError("ids, strings, kinds, segments and words must have one entry each")

    def __len__(self) -> int:
        return len(self.ids)

    def __add__(self, other: PromptTokens) -> PromptTokens:
        """The concatenated sequence (SD3: CLIP positions, then T5 positions)."""
        return PromptTokens(
            ids=self.ids + other.ids,
            strings=self.strings + other.strings,
            kinds=self.kinds + other.kinds,
            segments=self.segments + other.segments,
            words=self.words + other.words,
            dropped={**self.dropped, **other.dropped},
        )

    def select(self, selection: TokenSelection = "default") -> list[int]:
        """Positions to keep.

        Parameters
        ----------
        selection : "default", "all" or sequence of int
            ``"default"``: start, words, end and the first padding position;
            ``"all"``: every position; or explicit positions (sorted, unique, in range).
        """
        n = len(self.ids)
        if isinstance(selection, str):
            if selection == "all":
                return list(range(n))
            if selection == "default":
                keep = {i for i, k in enumerate(self.kinds) if k != "pad"}
                for segment in dict.fromkeys(self.segments):
                    first_pad = next(
                        (
                            i
                            for i, (k, g) in enumerate(zip(self.kinds, self.segments, strict=True))
                            if k == "pad" and g == segment
                        ),
                        None,
                    )
                    if first_pad is not None:
                        keep.add(first_pad)
                return sorted(keep)
            raise ValueError(
                f"unknown token selection {selection!r}; use 'default', 'all' or a list of "
                "token positions"
            )
        positions = sorted({int(i) for i in selection})
        if not positions or positions[0] < 0 or positions[-1] >= n:
            raise ValueError(
                f"token positions must be a non-empty list within 0..{n - 1}, got {list(selection)}"
            )
        return positions


def _readable(token: str) -> str:
    if token.startswith(T5_WORD_START) and token != T5_WORD_START:
        token = token[len(T5_WORD_START) :]
    return token[: -len(WORD_END)] if token.endswith(WORD_END) and token != WORD_END else token


def _word_indices(kinds: Sequence[str]) -> list[int]:
    """Ordinal of the word each ``"word"`` position belongs to; -1 for the others."""
    out, word = [], -1
    for kind in kinds:
        if kind != "word":
            out.append(-1)
            continue
        word += 1
        out.append(word)
    return out


def _cut_words(
    tokenizer: Any, prompt: str, kinds: Sequence[str], segment: str
) -> dict[str, list[str]]:
    """The words of ``prompt`` cut by the encoder's length (``{}`` when none are).

    A padded sequence held every word: only a full one is tokenized again, untruncated.
    """
    if "pad" in kinds:
        return {}
    kept = kinds.count("word")
    # verbose=False: the tokenizer's own "longer than the maximum" notice is what we replace.
    ids = tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    if len(pieces) <= kept:
        return {}
    words: list[str] = []
    new_word = True
    for piece in pieces[kept:]:
        # T5 marks where a word starts, CLIP where one ends: split the cut pieces the same way.
        if segment == T5_SEGMENT:
            new_word = new_word or piece.startswith(T5_WORD_START)
        if new_word:
            words.append("")
        words[-1] += _readable(piece)
        new_word = segment != T5_SEGMENT and piece.endswith(WORD_END)
    return {segment: [w for w in words if w]}


def _with_words(tokens: PromptTokens, raw: Sequence[str], segment: str) -> PromptTokens:
    # CLIP's BPE marks the *end* of a word with "</w>", SentencePiece (T5) the *start* of one
    # with "▁": pieces of one word share its index.
    words, word, open_word = [], -1, False
    for piece, kind in zip(raw, tokens.kinds, strict=True):
        if kind != "word":
            words.append(-1)
            open_word = False
            continue
        starts = piece.startswith(T5_WORD_START) if segment == T5_SEGMENT else not open_word
        if starts or word < 0:
            word += 1
        words.append(word)
        open_word = segment != T5_SEGMENT and not piece.endswith(WORD_END)
    return PromptTokens(tokens.ids, tokens.strings, tokens.kinds, [segment] * len(raw), words)


def prompt_tokens(
    tokenizer: Any, prompt: str, *, segment: str = DEFAULT_SEGMENT, length: int | None = None
) -> PromptTokens:
    """Tokenize ``prompt`` exactly as the Stable Diffusion pipelines do and label each position.

    The first end token after the words is ``"end"``; every later position is ``"pad"``
    (SD 1.x pads with the end token itself, SD 2.x and SDXL's second tokenizer with ``!``).

    Examples
    --------
    >>> from diffwidget.testing.tiny import tiny_sd_pipeline
    >>> tokens = prompt_tokens(tiny_sd_pipeline().tokenizer, "a red circle")
    >>> tokens.strings[:5]
    ['<|startoftext|>', 'a', 'red', 'circle', '<|endoftext|>']
    >>> tokens.kinds[:6]
    ['start', 'word', 'word', 'word', 'end', 'pad']
    """
    encoded = tokenizer(
        prompt,
        padding="max_length",
        max_length=length or tokenizer.model_max_length,
        truncation=True,
    )
    ids = [int(i) for i in encoded["input_ids"]]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    kinds: list[TokenKind] = []
    seen_end = False
    for position, token_id in enumerate(ids):
        if position == 0 and token_id == bos:
            kinds.append("start")
        elif seen_end:
            kinds.append("pad")
        elif token_id == eos:
            kinds.append("end")
            seen_end = True
        else:
            kinds.append("word")
    raw = tokenizer.convert_ids_to_tokens(ids)
    tokens = PromptTokens(ids=ids, strings=[_readable(t) for t in raw], kinds=kinds)
    return replace(
        _with_words(tokens, raw, segment), dropped=_cut_words(tokenizer, prompt, kinds, segment)
    )


def t5_tokens(tokenizer: Any, prompt: str, length: int) -> PromptTokens:
    """Tokenize ``prompt`` as SD3, Flux and PixArt pipelines feed T5 (no start token).

    Examples
    --------
    >>> from diffwidget.testing.tiny_dit import tiny_t5_tokenizer
    >>> tokens = t5_tokens(tiny_t5_tokenizer(), "a red circle", 6)
    >>> tokens.strings
    ['a', 'red', 'circle', '</s>', '<pad>', '<pad>']
    >>> tokens.kinds
    ['word', 'word', 'word', 'end', 'pad', 'pad']
    """
    encoded = tokenizer(
        prompt, padding="max_length", max_length=length, truncation=True, add_special_tokens=True
    )
    ids = [int(i) for i in encoded["input_ids"]]
    eos = tokenizer.eos_token_id
    kinds: list[TokenKind] = []
    seen_end = False
    for token_id in ids:
        if seen_end:
            kinds.append("pad")
        elif token_id == eos:
            kinds.append("end")
            seen_end = True
        else:
            kinds.append("pad" if token_id == tokenizer.pad_token_id else "word")
    raw = tokenizer.convert_ids_to_tokens(ids)
    tokens = PromptTokens(ids=ids, strings=[_readable(t) for t in raw], kinds=kinds)
    return replace(
        _with_words(tokens, raw, T5_SEGMENT),
        dropped=_cut_words(tokenizer, prompt, kinds, T5_SEGMENT),
    )


def empty_tokens(length: int, segment: str = T5_SEGMENT) -> PromptTokens:
    """Positions whose embeddings are all zero (SD3 without its T5 encoder)."""
    return PromptTokens(
        ids=[-1] * length,
        strings=[EMPTY_TOKEN] * length,
        kinds=["pad"] * length,
        segments=[segment] * length,
        words=[-1] * length,
    )
