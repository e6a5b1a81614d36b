"""Reading prompt files as people save them: lines, encodings and the JSONL fields' types.

A prompt file comes from someone else (a shared JSONL of captions, a text file saved by any
editor), so it is read defensively before anything is allocated from it:

* lines end at ``\\n`` (a ``\\r`` before it is dropped) and nowhere else: U+2028, U+2029,
  U+0085, form feeds and vertical tabs are characters of a caption, as ``json.dumps(...,
  ensure_ascii=False)`` and editors write them, not line breaks;
* the file is UTF-8; a UTF-8 byte-order mark is dropped, a UTF-16 one is refused;
* a line longer than :data:`MAX_LINE_BYTES` is refused with its line number before it is read
  in full, and at most :data:`MAX_PROMPTS` prompts are kept, so loading holds one line at a
  time beside the items themselves;
* every JSONL field is checked for its JSON type (``"id": null``, ``"seed": true`` or a label
  given as a list are refused), with the line number and what is expected.

Nothing here knows what a prompt item is (:mod:`diffwidget.runs.prompts` builds them).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Longest line accepted, in bytes: a caption with its labels and roles is far shorter.
MAX_LINE_BYTES = 64 * 1024
#: Most prompts one source may hold, and units of work (prompts × seeds) in one run: a run
#: of this many items already takes days on eight GPUs.
MAX_PROMPTS = 100_000
#: Largest seed a JSONL line may give (torch generators take 64-bit seeds).
MAX_SEED = 2**63 - 1
#: Longest label, concept or role name, in characters.
MAX_NAME_CHARS = 200
#: Ids name files: letters, digits, ``.``, ``_``, ``-``, starting with a letter or digit.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
#: Names Windows reserves for devices, whatever follows the first dot ("con.1" too).
_RESERVED_NAMES = frozenset(
    ["con", "prn", "aux", "nul"] + [f"{d}{k}" for d in ("com", "lpt") for k in range(10)]
)
_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
#: The keys a JSONL line may hold.
JSONL_KEYS = frozenset({"id", "prompt", "labels", "roles", "seed"})
JSONL_EXAMPLE = '{"id": "p1", "prompt": "a red circle", "labels": {"colour": "red"}}'


class PromptSourceError(ValueError):
    """A prompt file that cannot be read; the message names the line and the fix."""


@dataclass(frozen=True)
class PromptLine:
    """The checked fields of one JSONL line (``id`` ``None`` when the line gives none)."""

    number: int
    prompt: str
    id: str | None = None
    labels: dict[str, str] | None = None
    roles: dict[str, list[int]] | None = None
    seed: int | None = None
    where: str = field(default="", compare=False)


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every line of a UTF-8 file, split on ``\\n`` only.

    Raises
    ------
    PromptSourceError
        For a line longer than :data:`MAX_LINE_BYTES`, a line that is not UTF-8 or holds a
        NUL byte, or a UTF-16 file; the message names the line.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "captions.txt"
    >>> _ = path.write_bytes("\\ufeffa red\\u2028circle\\r\\nline two".encode())
    >>> list(read_lines(path))
    [(1, 'a red\\u2028circle'), (2, 'line two')]
    """
    with open(path, "rb") as handle:
        number = 0
        while True:
            # Reading at most one byte past the limit bounds memory whatever the file holds.
            raw = handle.readline(MAX_LINE_BYTES + 2)
            if not raw:
                return
            number += 1
            if number == 1:
                if raw.startswith(_UTF16_BOMS):
                    raise PromptSourceError(
                        f"{path} is saved as UTF-16; save it as UTF-8 (the usual choice of "
                        "every editor) and run again"
                    )
                raw = raw.removeprefix(_UTF8_BOM)
            if raw.endswith(b"\n"):
                raw = raw[:-1]
            elif len(raw) > MAX_LINE_BYTES:
                raise PromptSourceError(
                    f"{path}:{number}: the line is longer than {MAX_LINE_BYTES} bytes; a "
                    "prompt file holds one short caption (or JSON object) a line"
                )
            raw = raw.removesuffix(b"\r")
            if len(raw) > MAX_LINE_BYTES:
                raise PromptSourceError(
                    f"{path}:{number}: the line is longer than {MAX_LINE_BYTES} bytes; a "
                    "prompt file holds one short caption (or JSON object) a line"
                )
            yield number, _decode(path, number, raw)


def _decode(path: Path, number: int, raw: bytes) -> str:
    if b"\x00" in raw:
        raise PromptSourceError(
            f"{path}:{number}: the line holds a NUL byte; save the file as UTF-8 text "
            "(UTF-16 files look like this)"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise PromptSourceError(
            f"{path}:{number}: not UTF-8 (byte {error.start + 1} of the line); save the file "
            "as UTF-8"
        ) from None


def _json_kind(value: Any) -> str:
    """How a JSON value is called in an error message."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def check_text(where: str, what: str, value: Any, *, max_chars: int | None = None) -> str:
    """``value`` as a string that can be written as UTF-8, or an error naming ``what``."""
    if not isinstance(value, str):
        raise PromptSourceError(f"{where}: {what} must be a string, got {_json_kind(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise PromptSourceError(
            f"{where}: {what} holds an unpaired surrogate (a broken \\ud8xx escape); write the "
            "character itself"
        ) from None
    if "\x00" in value:
        raise PromptSourceError(f"{where}: {what} holds a NUL character (\\u0000); remove it")
    if max_chars is not None and not 0 < len(value) <= max_chars:
        raise PromptSourceError(f"{where}: {what} must hold 1 to {max_chars} characters")
    return value


def caption_text(where: str, value: Any) -> str:
    """A caption: a string, stripped, not empty."""
    caption = check_text(where, "the prompt", value).strip()
    if not caption:
        raise PromptSourceError(f"{where}: the prompt is empty")
    return caption


def check_id(where: str, value: Any) -> str:
    """A file-safe id: it names the item's files on every operating system.

    Examples
    --------
    >>> check_id("p.jsonl:2", "dog-1")
    'dog-1'
    >>> check_id("p.jsonl:2", "a/b")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    diffwidget.runs.prompt_files.PromptSourceError: p.jsonl:2: id 'a/b' is not file-safe; ...
    """
    text = check_text(where, "the id", value)
    if not ID_PATTERN.fullmatch(text):
        raise PromptSourceError(
            f"{where}: id {text!r} is not file-safe; use letters, digits, '.', '_' and '-' "
            "(at most 100 characters, starting with a letter or digit)"
        )
    if text.split(".", 1)[0].lower() in _RESERVED_NAMES:
        raise PromptSourceError(
            f"{where}: id {text!r} starts with a name Windows reserves for a device; choose "
            "another id"
        )
    return text


def check_int(where: str, what: str, value: Any, low: int, high: int) -> int:
    """``value`` as an integer in ``low..high`` (JSON ``true``/``false`` are not integers)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise PromptSourceError(f"{where}: {what} must be a whole number, got {_json_kind(value)}")
    if not low <= value <= high:
        raise PromptSourceError(f"{where}: {what} must be in {low}..{high}, got {value}")
    return value


def check_labels(where: str, value: Any) -> dict[str, str]:
    """Concept name -> label, both strings."""
    if not isinstance(value, dict):
        raise PromptSourceError(
            f'{where}: "labels" must be an object of concept names to labels, e.g. '
            f'{{"colour": "red"}}; got {_json_kind(value)}'
        )
    return {
        check_text(where, "a concept name", name, max_chars=MAX_NAME_CHARS): check_text(
            where, f"label {name!r}", label, max_chars=MAX_NAME_CHARS
        )
        for name, label in value.items()
    }


def check_roles(where: str, value: Any, n_words: int) -> dict[str, list[int]]:
    """Role name -> word indices into the prompt's ``n_words`` words."""
    if not isinstance(value, dict):
        raise PromptSourceError(
            f'{where}: "roles" must be an object of role names to word indices, e.g. '
            f'{{"subject": [1, 2]}}; got {_json_kind(value)}'
        )
    roles: dict[str, list[int]] = {}
    for name, indices in value.items():
        check_text(where, "a role name", name, max_chars=MAX_NAME_CHARS)
        if not isinstance(indices, list) or not indices:
            raise PromptSourceError(
                f"{where}: role {name!r} must be a non-empty list of word indices (whole "
                f"numbers), got {_json_kind(indices)}"
            )
        if n_words == 0:
            raise PromptSourceError(f"{where}: role {name!r} names words of an empty prompt")
        roles[name] = [
            check_int(where, f"a word index of role {name!r}", i, 0, MAX_SEED) for i in indices
        ]
        outside = [i for i in roles[name] if i >= n_words]
        if outside:
            raise PromptSourceError(
                f"{where}: role {name!r} has word indices {outside} outside 0..{n_words - 1} "
                f"(indices into the prompt's {n_words} words)"
            )
    return roles


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise ValueError(f"the key {key!r} is given twice")
        data[key] = value
    return data


def parse_json_line(where: str, line: str) -> Any:
    """One JSON value, strictly: no NaN, no repeated keys, no nesting too deep to parse."""
    try:
        return json.loads(line, object_pairs_hook=_unique_keys, parse_constant=_refuse_constant)
    except json.JSONDecodeError as error:
        raise PromptSourceError(f"{where}: not valid JSON ({error.msg})") from None
    except ValueError as error:  # a repeated key, NaN, or an integer too long to convert
        raise PromptSourceError(f"{where}: not valid JSON ({error})") from None
    except RecursionError:
        raise PromptSourceError(f"{where}: not valid JSON (nested too deeply)") from None


def jsonl_line(where: str, number: int, line: str) -> PromptLine:
    """The checked fields of one JSONL line.

    Examples
    --------
    >>> jsonl_line("p.jsonl:1", 1, '{"prompt": "a dog", "seed": 3}').seed
    3
    >>> jsonl_line("p.jsonl:1", 1, '{"prompt": "a dog", "seed": true}')  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    diffwidget.runs.prompt_files.PromptSourceError: p.jsonl:1: "seed" must be a whole ...
    """
    data = parse_json_line(where, line)
    if not isinstance(data, dict) or "prompt" not in data:
        raise PromptSourceError(
            f'{where}: each line must be an object with a "prompt" string, e.g. {JSONL_EXAMPLE}'
        )
    unknown = sorted(set(data) - JSONL_KEYS)
    if unknown:
        raise PromptSourceError(f"{where}: unknown keys {unknown}; use only {sorted(JSONL_KEYS)}")
    prompt = caption_text(where, data["prompt"])
    item_id = data.get("id")
    if "id" in data:
        if isinstance(item_id, int) and not isinstance(item_id, bool):
            item_id = str(item_id)
        item_id = check_id(where, item_id)
    seed = data.get("seed")
    if "seed" in data:
        seed = check_int(where, '"seed"', seed, 0, MAX_SEED)
    labels = check_labels(where, data["labels"]) if "labels" in data else None
    roles = check_roles(where, data["roles"], len(prompt.split())) if "roles" in data else None
    return PromptLine(number, prompt, item_id, labels, roles, seed, where)
