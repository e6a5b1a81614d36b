"""``summary.md`` of a hostile run: Markdown viewers show every string from the run as text.

Markdown passes raw HTML through, so a prompt or an error in a table cell could put an
``<img onerror>`` into whatever renders the summary (JupyterLab, VS Code, a forge). The
summary is rendered with markdown-it (CommonMark, raw HTML allowed) and the result parsed
with the standard library's HTML parser: only the elements Markdown itself makes appear,
without event handlers or links, and the hostile strings come back as text.
"""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

from markdown_it import MarkdownIt

from diffwidget.runs.report import aggregate
from tests import hostile

#: What the summary's own Markdown (headings, tables, lists, inline code) renders to.
MARKDOWN_TAGS = {"h1", "h2", "p", "table", "thead", "tbody", "tr", "th", "td", "ul", "li", "code"}


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_summary_of_a_hostile_run_renders_its_strings_as_text(tmp_path: Path) -> None:
    summary = aggregate(hostile.write_hostile_run(tmp_path), plots=False).read_text()
    page = _Page()
    page.feed(MarkdownIt("commonmark", {"html": True}).enable("table").render(summary))
    unexpected = [(tag, attrs) for tag, attrs in page.tags if tag not in MARKDOWN_TAGS or attrs]
    assert unexpected == []
    text = " ".join("".join(page.text).split())
    for shown in (hostile.PROMPT, hostile.ERROR, hostile.OK_KEY, hostile.FAILED_KEY):
        assert " ".join(shown.split()) in text
    assert "seeds = [0]" in text  # escaped punctuation renders as itself
