"""The run browser over a hostile run folder: every string reaches the page as text.

The markup each ``ipywidgets.HTML`` would put into the page is parsed with the standard
library's HTML parser (independent of the escaping under test): only the browser's own
``<b>``/``<style>`` elements may appear, with no attributes, and the text the parser reads
back is the hostile string, character for character. The real-browser side (no dialog, no
request) is ``tests/browser/test_browser_hostile.py``.
"""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import ipywidgets
import pytest

from diffwidget.widget.run_browser import RunBrowser, item_message, open_run
from tests import hostile

#: Elements the browser's own templates use.
OWN_TAGS = {"b", "style"}


class _Markup(HTMLParser):
    """Tags, attributes and text as a browser's parser would read them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parsed(markup: str) -> _Markup:
    parser = _Markup()
    parser.feed(markup)
    parser.close()
    return parser


def html_widgets(widget: Any) -> list[ipywidgets.HTML]:
    """Every ``HTML`` widget in a widget tree."""
    found = [widget] if isinstance(widget, ipywidgets.HTML) else []
    for child in getattr(widget, "children", ()):
        found += html_widgets(child)
    return found


def shown_text(browser: RunBrowser) -> str:
    """The text of every HTML widget of the browser, as the page would show it."""
    texts = []
    for widget in html_widgets(browser.widget):
        markup = parsed(widget.value)
        for tag, attrs in markup.tags:
            assert tag in OWN_TAGS, f"<{tag}> from data in {widget.value[:200]!r}"
            assert attrs == [], f"attributes {attrs} in {widget.value[:200]!r}"
        texts.append("".join(markup.text))
    return "\n".join(texts)


@pytest.fixture
def browser(tmp_path: Path) -> Any:
    made = open_run(hostile.write_hostile_run(tmp_path)).browser()
    yield made
    made.close()


def test_header_shows_the_folder_name_as_text(browser):
    assert hostile.RUN_FOLDER in shown_text(browser)


def test_traced_item_shows_key_and_prompt_as_text(browser):
    explorer = browser.select(hostile.OK_KEY)
    assert explorer is not None
    text = shown_text(browser)
    assert hostile.OK_KEY in text
    assert hostile.PROMPT in text
    # The explorer gets the prompt and tokens as plain traits; its views use textContent.
    assert explorer.widget.prompt == hostile.PROMPT
    assert hostile.token_payload("token") in explorer.widget.tokens


def test_failed_item_shows_its_error_as_text(browser):
    browser.select(hostile.FAILED_KEY)
    text = shown_text(browser)
    assert hostile.FAILED_KEY in text
    assert hostile.ERROR in text
    assert browser.explorer is None


def test_item_not_computed_yet_says_so(browser):
    browser.select(hostile.MISSING_KEY)
    text = shown_text(browser)
    assert hostile.MISSING_KEY in text
    assert "not computed yet" in text
    assert "no trace was kept" not in text


def test_list_and_menus_hold_data_as_option_text(browser):
    # Select/Dropdown options are set with textContent by ipywidgets: the raw string is fine.
    assert hostile.OK_KEY in browser.keys
    assert hostile.METRIC in browser._sort.options
    assert hostile.CURVE + " deletion" in browser._curve_choice.options


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"status": "missing"}, "not computed yet (status missing)"),
        ({"status": "corrupt"}, "damaged or incomplete (status corrupt)"),
        (
            {"status": "failed", "error": {"type": "OSError", "message": "disk full"}},
            "failed: OSError: disk full",
        ),
        ({"status": "failed", "error": None}, "failed: error: the run recorded no message"),
        ({"status": "ok", "files": {}}, "kept no trace"),
    ],
)
def test_item_message_names_the_status(record, expected):
    message = item_message(record)
    assert expected in message
    assert "no trace was kept" not in message
