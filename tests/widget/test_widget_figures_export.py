"""bqplot figures linked to the step, explorer linking, standalone HTML export."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest

from diffwidget.explain.results import SaliencyMap
from diffwidget.testing.synthetic import synthetic_trace
from diffwidget.widget.explorer import Explorer
from diffwidget.widget.export import standalone_state
from diffwidget.widget.figures import link_explorers


@pytest.fixture
def explorer(synthetic_trace):
    explorer = Explorer(synthetic_trace)
    yield explorer
    explorer.close()


def test_figure_cursor_follows_step_and_click_sets_step(explorer):
    figure = explorer.figure("attention_mass")
    lines, points, labels, cursor = figure.marks
    assert list(lines.labels) == ["a", "red", "circle", "left"]  # word tokens only
    assert list(labels.text) == ["a", "red", "circle", "left"]  # labelled at the curves' ends
    assert not lines.display_legend  # no legend box over the data
    assert len(set(lines.colors)) == 4  # one distinct colour per curve
    # The selected token's curve is drawn fully, the others dimmed; it follows the token.
    assert list(lines.opacities) == [0.35, 1.0, 0.35, 0.35]
    explorer.token = 3
    assert list(lines.opacities) == [0.35, 0.35, 1.0, 0.35]
    explorer.step = 6
    assert list(cursor.x) == [6, 6]
    n = explorer.trace.n_steps
    points.selected = [2 * n + 11]  # a click on step 11 of the third curve
    assert explorer.step == 11
    assert list(cursor.x) == [11, 11]
    figure.unlink()
    explorer.step = 2
    assert list(cursor.x) == [11, 11]


def test_figure_for_missing_group_says_how_to_add_it(explorer):
    with pytest.raises(ValueError, match="add_curve"):
        explorer.figure("concept_auc")
    explorer.add_curve("red", np.linspace(0.4, 0.9, explorer.trace.n_steps))
    assert explorer.figure("concept_auc").marks[0].labels == ["red"]


def test_link_explorers_same_and_different_lengths():
    a, b, c = (
        Explorer(synthetic_trace()),
        Explorer(synthetic_trace(seed=1)),
        Explorer(synthetic_trace(n_steps=10)),
    )
    link = link_explorers(a, b, c)
    a.step = 19
    assert (b.step, c.step) == (19, 9)
    c.step = 0
    assert (a.step, b.step) == (0, 0)
    link.unlink()
    a.step = 5
    assert b.step == 0
    for e in (a, b, c):
        e.close()


class _InstantRise:
    """A DF-RISE stand-in: the same blob at every step, at once."""

    name, label = "df_rise", "DF-RISE"

    def attribute(self, pipe, trace, step, progress=None):
        value = np.eye(trace.latent_shape[0], dtype=np.float32)
        return SaliencyMap("df_rise", step, int(trace.timesteps[step]), value, value)

    def describe(self, result):
        return "instant DF-RISE"


def test_closing_an_explorer_takes_it_out_of_its_links():
    a = Explorer(synthetic_trace(), methods={"df_rise": _InstantRise()})
    b, c = Explorer(synthetic_trace(seed=1)), Explorer(synthetic_trace(n_steps=10))
    d = Explorer(synthetic_trace(seed=2))
    try:
        link = link_explorers(a, b, c)
        other = link_explorers(a, d)
        a.overlay = "df_rise"  # moving a would now request DF-RISE from its worker
        a.close()
        b.step = 19  # reached the closed explorer before: "this explorer was closed"
        assert c.step == 9
        assert a.step == 0
        assert link.explorers == [b, c]
        assert all(a not in pair for *pair, _link in link._jslinks)
        assert other.explorers == []  # d has nothing left to follow
        d.step = 4
        assert b.step == 19
        with pytest.raises(ValueError, match="this explorer was closed"):
            link_explorers(a, b)
    finally:
        for explorer in (a, b, c, d):
            explorer.close()


def test_html_export_inlines_module_and_state(explorer, tmp_path):
    value = np.eye(16, dtype=np.float32)
    explorer.add_overlay("df_rise", 4, SaliencyMap("df_rise", 4, 0, value, value))
    explorer.overlay = "df_rise"
    path = explorer.to_html(tmp_path / "view")
    assert path.suffix == ".html"
    text = path.read_text()
    assert "http://" not in text.split("<script", 1)[0]  # nothing fetched from the network
    state_json = re.search(r'id="diffwidget-state">(.*?)</script>', text, re.S).group(1)
    state = json.loads(state_json)
    assert state["available"] == ["none", "attention", "df_rise"]
    assert state["overlay"] == "df_rise"
    previews = state["previews"]
    assert len(base64.b64decode(previews["data"]["$b64"])) == np.prod(previews["shape"])
    module = re.search(r'id="diffwidget-module">(.*?)</script>', text, re.S).group(1)
    assert b"renderStandalone" in base64.b64decode(module)


class _NoMap:
    """A method that returns nothing usable (its result must be refused, not cached)."""

    name, label = "df_cam", "DF-CAM"

    def attribute(self, pipe, trace, step, progress=None):
        return None

    def describe(self, result):
        return "nothing"


def test_export_drops_overlays_that_need_a_kernel(synthetic_trace):
    explorer = Explorer(synthetic_trace, methods={"df_cam": _NoMap()})
    explorer.widget.overlay = "df_cam"
    explorer.widget.status = "running"
    state = standalone_state(explorer)
    assert state["available"] == ["none", "attention"]
    assert (state["overlay"], state["status"]) == ("none", "idle")
    explorer.close()


#: Prompts that end, comment out or re-open the page's script if JSON is embedded raw.
HOSTILE_PROMPTS = [
    "a red circle <!--<script>",
    "</script><script>window.pwned = 1</script>",
    "a & b > c <!-- </SCRIPT >",
    "line\u2028separator\u2029paragraph",
]


@pytest.mark.parametrize("prompt", HOSTILE_PROMPTS)
def test_export_escapes_script_breaking_text(tmp_path, prompt):
    explorer = Explorer(synthetic_trace(prompt=prompt))
    try:
        text = explorer.to_html(tmp_path / "hostile").read_text(encoding="utf-8")
    finally:
        explorer.close()
    state_json = re.search(r'id="diffwidget-state">(.*?)</script>', text, re.S).group(1)
    for raw in ("<", ">", "&", "\u2028", "\u2029"):
        assert raw not in state_json
    assert json.loads(state_json)["prompt"] == prompt  # the same JSON value
    assert text.count("<script") == 3  # state, module, loader: nothing injected
