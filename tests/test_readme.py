"""Every Python snippet in README.md runs: in order, in one namespace, on the embedded model.

Snippets are found anew on every run, so a section added later is tested without changes
here. A snippet that needs what the tests cannot have (a GPU, an online checkpoint) carries
``<!-- readme-test: skip, needs … -->`` on the line above its fence and is skipped with that
reason. As in a notebook, a bare expression's value is kept: a future (``explorer.compute``)
must finish without error.
"""

from __future__ import annotations

import ast
import os
import re
import textwrap
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PYTHON_FENCES = ("python", "py", "python3")
SKIP_MARK = re.compile(r"<!--\s*readme-test:\s*skip\b[\s,:;—-]*(?P<reason>.*?)\s*-->")
FENCE = re.compile(r"^\s*(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+.-]*)")
#: Background work a snippet starts (DF-RISE on the embedded model takes seconds).
FUTURE_TIMEOUT_S = 600


@dataclass(frozen=True)
class Snippet:
    """One fenced Python block: the README line of its fence, its code, a skip reason."""

    line: int
    code: str
    skip: str | None = None


def fenced_blocks(text: str) -> Iterator[tuple[int, str, str]]:
    """``(fence line, language, body)`` for every fenced block, 1-based lines."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        start, fence = i, match["fence"]
        i += 1
        body = []
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        yield start + 1, match["lang"].lower(), textwrap.dedent("\n".join(body))
        i += 1


def python_snippets(text: str) -> list[Snippet]:
    """The Python blocks of a Markdown text, with their skip marks."""
    lines = text.splitlines()
    snippets = []
    for line, lang, body in fenced_blocks(text):
        if lang not in PYTHON_FENCES:
            continue
        above = line - 2  # index of the line before the fence
        while above >= 0 and not lines[above].strip():
            above -= 1
        mark = SKIP_MARK.fullmatch(lines[above].strip()) if above >= 0 else None
        snippets.append(Snippet(line, body, mark["reason"] if mark else None))
    return snippets


SNIPPETS = python_snippets(README.read_text())


def run_snippet(snippet: Snippet, namespace: dict[str, Any]) -> None:
    """Run ``snippet`` statement by statement, reporting errors at README line numbers."""
    tree = ast.parse(snippet.code)
    ast.increment_lineno(tree, snippet.line)  # the code starts on the line after the fence
    values = []
    for node in tree.body:
        if isinstance(node, ast.Expr):
            code = compile(ast.Expression(node.value), str(README), "eval")
            values.append(eval(code, namespace))
        else:
            exec(compile(ast.Module([node], type_ignores=[]), str(README), "exec"), namespace)
    for value in values:
        if isinstance(value, Future):
            value.result(timeout=FUTURE_TIMEOUT_S)  # raises what the background work raised


def close_widgets(namespace: dict[str, Any]) -> None:
    """Close explorers and widgets the snippets made, and stop their background work."""
    import ipywidgets

    for value in namespace.values():
        ours = type(value).__module__.startswith("diffwidget.widget") and hasattr(value, "close")
        if ours or isinstance(value, ipywidgets.Widget):
            value.close()


@pytest.fixture(scope="module")
def namespace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One namespace for all snippets, run in a temporary folder (they may write files)."""
    here = Path.cwd()
    os.chdir(tmp_path_factory.mktemp("readme"))
    scope: dict[str, Any] = {"__name__": "__readme__"}
    try:
        yield scope
    finally:
        close_widgets(scope)
        os.chdir(here)


def test_readme_has_python_snippets() -> None:
    assert SNIPPETS, "README.md has no ```python blocks: the parser or the README is broken"


@pytest.mark.slow
@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"README.md:{s.line}" for s in SNIPPETS])
def test_readme_snippet_runs(snippet: Snippet, namespace: dict[str, Any]) -> None:
    if snippet.skip is not None:
        pytest.skip(f"README.md:{snippet.line}: {snippet.skip}")
    failed = namespace.get("__failed_at__")
    if failed is not None:
        pytest.skip(f"not run: the snippet at README.md:{failed} failed first")
    try:
        run_snippet(snippet, namespace)
    except BaseException:
        namespace["__failed_at__"] = snippet.line
        raise


# ------------------------------------------------------------------ the finder itself
MARKDOWN = """\
# Title

```python
x = 1
```

<!-- readme-test: skip, needs a CUDA GPU and the online SD v1.4 checkpoint -->

```python
pipe = load("CompVis/stable-diffusion-v1-4").to("cuda")
```

```bash
echo "not python"
```

- a list item with code:

  ```py
  y = x + 1
  ```
"""


def test_finder_sees_every_python_block_and_its_skip_mark() -> None:
    snippets = python_snippets(MARKDOWN)
    assert [s.line for s in snippets] == [3, 9, 19]
    assert snippets[0] == Snippet(3, "x = 1")
    assert snippets[1].skip == "needs a CUDA GPU and the online SD v1.4 checkpoint"
    assert snippets[2] == Snippet(19, "y = x + 1")  # indented fences count too


def test_runner_keeps_one_namespace_and_waits_for_futures() -> None:
    scope: dict[str, Any] = {}
    run_snippet(Snippet(1, "from concurrent.futures import Future\nx = 2"), scope)
    run_snippet(Snippet(5, "y = x * 3"), scope)
    assert scope["y"] == 6
    failing = "f = Future()\nf.set_exception(ValueError('boom'))\nf"
    with pytest.raises(ValueError, match="boom"):
        run_snippet(Snippet(9, failing), scope)


def test_runner_reports_readme_line_numbers() -> None:
    with pytest.raises(NameError) as info:
        run_snippet(Snippet(40, "a = 1\nb = undefined_name"), {})
    assert info.traceback[-1].lineno + 1 == 42  # pytest's line numbers are 0-based


def test_every_skip_mark_has_a_reason_and_a_snippet() -> None:
    # A mark stands on its own line (one quoted inside a sentence is prose).
    lines = [line.strip() for line in README.read_text().splitlines()]
    marks = [m["reason"] for m in map(SKIP_MARK.fullmatch, lines) if m is not None]
    assert all(marks), "say why a snippet is skipped"
    assert len(marks) == sum(s.skip is not None for s in SNIPPETS), "a mark above no snippet"


def test_no_python_block_hides_under_another_name() -> None:
    langs = {lang for _, lang, _ in fenced_blocks(README.read_text())}
    hidden = {lang for lang in langs if lang.startswith("py") and lang not in PYTHON_FENCES}
    assert not hidden, f"use ```python for {hidden}, or teach tests/test_readme.py about it"


# ------------------------------------------------------------------ install lines
def test_install_lines_work_before_a_release() -> None:
    """No release is on an index yet: install from the clone or a built wheel."""
    from diffwidget import __version__

    text = README.read_text()
    from_index = re.search(r"pip install[^\n`&|;]*[\"' ]diffwidget(\[|[\"' ]|$)", text, re.M)
    assert from_index is None, from_index
    wheels = set(re.findall(r"dist/diffwidget-([^-\s]+)-py3-none-any\.whl", text))
    assert wheels == {__version__}, "the README's wheel names follow the package version"
