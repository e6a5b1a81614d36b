"""Results files shared by several benchmarks: each script owns one marked section."""

from __future__ import annotations

from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    """The start and end comments of benchmark ``name``'s section."""
    return f"<!-- {name}: start -->", f"<!-- {name}: end -->"


def write_section(path: Path, name: str, section: str) -> None:
    """Replace (or append) benchmark ``name``'s section of ``path``, leaving the rest alone.

    Examples
    --------
    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "r.md"
    >>> write_section(p, "a", "one"); write_section(p, "b", "two"); write_section(p, "a", "1")
    >>> [line for line in p.read_text().splitlines() if line and "<!--" not in line]
    ['1', 'two']
    """
    start, end = markers(name)
    text = path.read_text() if path.exists() else ""
    block = f"{start}\n{section}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + block + "\n"
    path.write_text(text)
