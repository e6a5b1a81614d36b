"""The run browser over a hostile run folder: every string reaches the page as text.

The markup each ``ipywidgets.HTML`` would put into the page is parsed with the standard
library's HTML parser (independent of the escaping under test): only the browser's own
``<b>``/``<style>`` elements may appear, with no attributes, and the text the parser reads
back is the hostile string, character for character. The real-browser side (no dialog, no
request) is ``tests/browser/test_browser_hostile.py``.
"""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import ipywidgets
import pytest

from diffwidget.runs.item_records import ItemError
from diffwidget.runs.manifest import Work
from diffwidget.runs.prompts import PromptItem
from diffwidget.runs.store import ManifestError, RunItem
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


def _item(status: str, error: ItemError | None = None) -> RunItem:
    """A run item of ``status`` (a failed one holding ``error``)."""
    work = Work(PromptItem("a", "a red circle"), offset=0, seed=1, key="a__seed1", digest="d")
    if error is None:
        return RunItem(work, status)
    record = work.record(status="failed", error=error)
    return RunItem(work, "failed", record)


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (_item("missing"), "not computed yet (status missing)"),
        (_item("corrupt"), "damaged or incomplete (status corrupt)"),
        (_item("stale"), "other settings or for another prompt (status stale)"),
        (_item("failed", ItemError("OSError", "disk full")), "failed: OSError: disk full"),
        (_item("failed", ItemError("", "")), "failed: error: the run recorded no message"),
        (_item("ok"), "kept no trace"),
    ],
)
def test_item_message_names_the_status(item, expected):
    message = item_message(item)
    assert expected in message
    assert "no trace was kept" not in message


def test_a_run_naming_a_hostile_item_id_is_refused_when_read(tmp_path: Path):
    run = hostile.write_hostile_run(tmp_path)
    manifest = json.loads((run / "run.json").read_text())
    manifest["items"][0]["id"] = hostile.HOSTILE_ID
    (run / "run.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="not file-safe") as error:
        open_run(run)
    assert error.value.field.startswith("items[0]")
