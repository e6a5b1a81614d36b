"""A word-level CLIP tokenizer for small vocabularies, written as standard tokenizer files.

The embedded model's captions use a few dozen words. Rather than ship CLIP's 49k-entry
BPE vocabulary, we write a ``vocab.json``/``merges.txt`` pair in CLIP's own format in which
every vocabulary word is one token and any other word falls back to single letters. The
result loads with ``CLIPTokenizer.from_pretrained`` like any Stable Diffusion tokenizer.

Captions are normalised *inside the tokenizer*, so that a plain pipeline call such as
``pipe("A Red circle, on the left.")`` sees exactly the tokens of
``"a red circle on the left"``: CLIP's own normaliser lower-cases; :func:`caption_normalizer`
also turns punctuation into spaces and the spelling "center" into "centre". transformers 5
rebuilds a ``CLIPTokenizer``'s normaliser from code when it loads one, so
:func:`use_caption_normalizer` installs ours on the loaded tokenizer (the loaders and the
training recipe call it); :func:`normalise_caption` applies the same normaliser to a string.
"""

from __future__ import annotations

import itertools
import json
import string
import tempfile
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
WORD_END = "</w>"
FALLBACK_CHARS = string.ascii_lowercase + string.digits + ",.'-!?"
#: Spelling variants the normaliser maps onto the vocabulary's word.
SPELLINGS: dict[str, str] = {"center": "centre"}


@cache
def caption_normalizer() -> Any:
    """The ``tokenizers`` normaliser of the embedded models' tokenizers.

    CLIP's own steps (NFC, lower case, runs of white space to one space) plus: every
    character that is neither a letter, a digit nor white space becomes a space, and each
    word of :data:`SPELLINGS` is replaced by its vocabulary spelling.

    Examples
    --------
    >>> caption_normalizer().normalize_str("A Red circle, in the CENTER!")
    'a red circle in the centre '
    """
    from tokenizers import Regex, normalizers

    steps = [
        normalizers.NFC(),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[^\p{L}\p{N}\s]"), " "),
        *(normalizers.Replace(Regex(rf"\b{a}\b"), b) for a, b in SPELLINGS.items()),
        normalizers.Replace(Regex(r"\s+"), " "),
    ]
    return normalizers.Sequence(steps)


def normalise_caption(text: str) -> str:
    """``text`` as the embedded models' tokenizers read it, words joined by single spaces.

    Examples
    --------
    >>> normalise_caption("  A Red circle, on the left. ")
    'a red circle on the left'
    """
    return " ".join(caption_normalizer().normalize_str(text).split())


def use_caption_normalizer(tokenizer: Any) -> Any:
    """Install :func:`caption_normalizer` on a loaded ``CLIPTokenizer``; returns it.

    Examples
    --------
    >>> tok = use_caption_normalizer(load_word_tokenizer(["red", "circle"], 8))
    >>> tok.tokenize("Red circle.") == tok.tokenize("red circle")
    True
    """
    tokenizer.backend_tokenizer.normalizer = caption_normalizer()
    return tokenizer


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair merge loop for one lower-case word."""
    pieces = [*word[:-1], word[-1] + WORD_END]
    while len(pieces) > 1:
        pairs = [(ranks.get(p, len(ranks)), i) for i, p in enumerate(itertools.pairwise(pieces))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def _merges_for(words: list[str]) -> list[tuple[str, str]]:
    """Merges under which every word is one token.

    Each word first gets its left-to-right chain; where earlier merges from other words
    split it differently, the pieces it actually ends up with are joined by merges of
    later rank, which cannot disturb any word already solved.
    """
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _bpe(word, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks.setdefault(pair, len(ranks))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    return sorted(ranks, key=ranks.__getitem__)


def write_word_tokenizer(
    words: Iterable[str], directory: str | Path, model_max_length: int = 77
) -> Path:
    """Write CLIP tokenizer files in which each of ``words`` is a single token.

    Parameters
    ----------
    words : iterable of str
        Lower-case words (letters only) that must each become one token.
    directory : str or Path
        Folder to write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` to.
    model_max_length : int
        Sequence length the tokenizer pads and truncates to.

    Returns
    -------
    Path
        The folder, ready for ``CLIPTokenizer.from_pretrained``.

    Examples
    --------
    >>> import tempfile
    >>> from transformers import CLIPTokenizer
    >>> folder = write_word_tokenizer(["red", "circle"], tempfile.mkdtemp(), 8)
    >>> CLIPTokenizer.from_pretrained(folder).tokenize("a red circle")
    ['a</w>', 'red</w>', 'circle</w>']
    """
    unique = sorted({w.strip().lower() for w in words if w.strip()})
    bad = [w for w in unique if not w.isalpha() or not w.isascii()]
    if bad:
        raise ValueError(f"words must be ASCII letters only, got {bad}")
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        if token not in vocab:
            vocab[token] = len(vocab)

    for char in FALLBACK_CHARS:
        add(char)
        add(char + WORD_END)
    merges = _merges_for(unique)
    for left, right in merges:
        add(left + right)
    add(START_TOKEN)
    add(END_TOKEN)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, indent=0))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": START_TOKEN,
        "eos_token": END_TOKEN,
        "unk_token": END_TOKEN,
        "pad_token": END_TOKEN,
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")})
    )
    return directory


def load_word_tokenizer(
    words: Iterable[str], model_max_length: int = 77, directory: str | Path | None = None
) -> Any:
    """A ``CLIPTokenizer`` in which each of ``words`` is one token, captions normalised.

    The files go to ``directory`` when given (to ship them), else to a temporary folder that
    is removed once the tokenizer is in memory. :func:`use_caption_normalizer` is applied.
    """
    from transformers import CLIPTokenizer

    if directory is not None:
        folder = write_word_tokenizer(words, directory, model_max_length)
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=model_max_length)
        return use_caption_normalizer(tokenizer)
    with tempfile.TemporaryDirectory(prefix="diffwidget-tok-") as tmp:
        folder = write_word_tokenizer(words, tmp, model_max_length)
        tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=model_max_length)
        return use_caption_normalizer(tokenizer)
