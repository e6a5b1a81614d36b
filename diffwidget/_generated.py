"""Files generated from the package and checked into the repository (``schema.ts``, golden values).

Each generator's ``main`` writes its file, or with ``--check`` compares it and exits 1 when it
has drifted, so a test or a check target catches a forgotten regeneration.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def write_or_check(target: Path, text: str, command: str, argv: Sequence[str]) -> int:
    """Write ``text`` to ``target``, or with ``--check`` in ``argv`` compare it.

    Returns the exit status: 1 (after saying to run ``command``) when the check finds the file
    missing or different, else 0.

    Examples
    --------
    >>> import contextlib, io, tempfile
    >>> path = Path(tempfile.mkdtemp()) / "out.txt"
    >>> with contextlib.redirect_stdout(io.StringIO()) as said:
    ...     codes = [write_or_check(path, "a", "make it", a) for a in (["--check"], [], [])]
    >>> codes, "out of date; run `make it`" in said.getvalue()
    ([1, 0, 0], True)
    """
    if "--check" in argv:
        current = target.read_text() if target.is_file() else None
        if current != text:
            print(f"{target} is out of date; run `{command}`")
            return 1
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    print(f"wrote {target}")
    return 0
