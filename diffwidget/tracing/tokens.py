"""Which prompt token positions a trace keeps, and what kind each one is.

CLIP pads every prompt to ``model_max_length`` (77) positions: a start token, the prompt's
words, an end token, then padding. Attention to the padding positions is large but says
little, so by default a trace keeps the start token, every word, the end token and *one*
padding position (enough to show how much attention padding soaks up).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

from diffwidget.tracing.trace import TokenKind

TokenSelection = Union[Literal["default", "all"], Sequence[int]]  # noqa: UP007 - runtime alias
#: Suffix CLIP's BPE vocabulary marks word ends with; hidden in displayed token strings.
WORD_END = "</w>"


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
    """

    ids: list[int]
    strings: list[str]
    kinds: list[TokenKind]

    def __len__(self) -> int:
        return len(self.ids)

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
                first_pad = next((i for i, k in enumerate(self.kinds) if k == "pad"), None)
                keep = [i for i, k in enumerate(self.kinds) if k != "pad"]
                return keep if first_pad is None else sorted([*keep, first_pad])
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
    return token[: -len(WORD_END)] if token.endswith(WORD_END) and token != WORD_END else token


def prompt_tokens(tokenizer: Any, prompt: str) -> PromptTokens:
    """Tokenize ``prompt`` exactly as the Stable Diffusion pipelines do and label each position.

    The first end token after the words is ``"end"``; every later position is ``"pad"``
    (SD 1.x pads with the end token itself, SD 2.x and SDXL's second tokenizer with ``!``).

    Examples
    --------
    >>> from diffwidget.tracing.tiny import tiny_sd_pipeline
    >>> tokens = prompt_tokens(tiny_sd_pipeline().tokenizer, "a red circle")
    >>> tokens.strings[:5]
    ['<|startoftext|>', 'a', 'red', 'circle', '<|endoftext|>']
    >>> tokens.kinds[:6]
    ['start', 'word', 'word', 'word', 'end', 'pad']
    """
    encoded = tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,
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
    strings = [_readable(t) for t in tokenizer.convert_ids_to_tokens(ids)]
    return PromptTokens(ids=ids, strings=strings, kinds=kinds)
