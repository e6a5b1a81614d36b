"""bqplot figures linked to the step, explorer linking, standalone HTML export."""

from __future__ import annotations

import base64
import gzip
import json
import re

import numpy as np
import pytest

from diffwidget.explain.results import SaliencyMap
from diffwidget.testing.synthetic import synthetic_trace
from diffwidget.widget.codecs import decode_array, payload_nbytes
from diffwidget.widget.explorer import Explorer
from diffwidget.widget.figures import link_explorers
from diffwidget.widget.payloads import AttentionSet, GridData
from diffwidget.widget.previews import x0_previews


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


def read_page(text: str) -> dict:
    """The state of an exported page with every ``$buf`` reference turned into its bytes."""
    state = json.loads(re.search(r'id="diffwidget-state">(.*?)</script>', text, re.S).group(1))
    block = re.search(r'id="diffwidget-data" data-encoding="(\w+)">(.*?)</script>', text, re.S)
    data = base64.b64decode(block.group(2).strip())
    if block.group(1) == "gzip":
        data = gzip.decompress(data)

    def resolve(value):
        if isinstance(value, dict):
            if set(value) == {"$buf"}:
                offset, length = value["$buf"]
                assert offset % 4 == 0  # float32 buffers viewed in place
                return data[offset : offset + length]
            return {k: resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v) for v in value]
        return value

    return resolve(state)


def test_html_export_inlines_module_and_state(explorer, tmp_path):
    value = np.eye(16, dtype=np.float32)
    explorer.add_overlay("df_rise", 4, SaliencyMap("df_rise", 4, 0, value, value))
    explorer.overlay = "df_rise"
    path = explorer.to_html(tmp_path / "view")
    assert path.suffix == ".html"
    text = path.read_text()
    assert "http://" not in text.split("<script", 1)[0]  # nothing fetched from the network
    state = read_page(text)
    assert state["available"] == ["none", "attention", "df_rise"]
    assert state["overlay"] == "df_rise"
    np.testing.assert_array_equal(decode_array(state["previews"]), x0_previews(explorer.trace))
    # The noisy view goes in the file although the live view never asked for it.
    assert explorer.widget.noisy_previews is None
    assert decode_array(state["noisy_previews"]).shape == decode_array(state["previews"]).shape
    module = re.search(r'id="diffwidget-module">(.*?)</script>', text, re.S).group(1)
    assert b"renderStandalone" in base64.b64decode(module)


def test_export_is_compressed_and_says_its_size_before_writing(explorer, tmp_path):
    explorer.grid = "attention"
    plan = explorer.export()
    assert not list(tmp_path.iterdir())  # nothing written yet
    text = plan.summary()
    assert f"{plan.nbytes / 1e6:.2f} MB" in text
    assert "gzip + base64" in text
    sizes = {p.name: p.nbytes for p in plan.parts}
    assert sizes["previews"] == payload_nbytes(explorer.widget.previews)
    # The file holds the grid of every token; the live view holds one token's.
    state = read_page(plan.page)
    grid = GridData.from_json(state["grid_data"])
    assert grid.tokens == list(range(len(explorer.trace.tokens)))
    assert sizes["grid_data"] == payload_nbytes(state["grid_data"])
    plain = explorer.export(compress=False)
    assert plain.nbytes > plan.nbytes
    assert read_page(plain.page)["timesteps"] == state["timesteps"]
    path = plan.write(tmp_path / "out.html")
    assert path.stat().st_size == plan.nbytes


def test_export_keeps_a_subset_of_steps_and_layers(explorer):
    value = np.eye(16, dtype=np.float32)
    for step in (4, 9):
        explorer.add_overlay("df_rise", step, SaliencyMap("df_rise", step, 0, value, value))
    explorer.step = 9
    explorer.attention_layer = "8x8"
    explorer.grid = "attention"
    full = read_page(explorer.export().page)
    keep = [0, 5, 10, 15]
    plan = explorer.export(steps=keep, layers=["mid_block", "16x16"])
    state = read_page(plan.page)
    assert state["timesteps"] == [int(explorer.trace.timesteps[s]) for s in keep]
    assert decode_array(state["previews"]).shape[0] == 4
    np.testing.assert_array_equal(
        decode_array(state["previews"]), decode_array(full["previews"])[keep]
    )
    for name in ("attention", "attention_filtered"):
        kept, whole = AttentionSet.from_json(state[name]), AttentionSet.from_json(full[name])
        assert kept.steps == [0, 1, 2, 3]
        np.testing.assert_array_equal(kept.codes, whole.codes[keep])
    # DF-RISE was computed at steps 4 and 9 only: none kept, so the file does not offer it.
    assert "df_rise" not in state["overlays"]
    assert "df_rise" not in state["available"]
    grid = GridData.from_json(state["grid_data"])
    assert grid.steps == [0, 1, 2, 3]
    assert grid.layers == [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
        "mid_block.attentions.0.transformer_blocks.0.attn2",
    ]
    assert decode_array(state["curves"]["values"]).shape[1] == 4
    assert state["step"] == 2  # loop index 9 -> the nearest kept one, 10, is the third
    assert "keeps 4 of the run's steps" in state["descriptions"]["x0"]
    assert plan.nbytes < explorer.export().nbytes
    with pytest.raises(ValueError, match=r"loop indices in 0\.\.19"):
        explorer.export(steps=[3, 20])
    with pytest.raises(ValueError, match="no grid row matches"):
        explorer.export(layers=["down_blocks.7"])


def test_export_keeps_overlays_of_kept_steps(explorer):
    value = np.eye(16, dtype=np.float32)
    for step in (4, 10):
        explorer.add_overlay("df_rise", step, SaliencyMap("df_rise", step, 0, value, value))
    state = read_page(explorer.export(steps=[0, 10]).page)
    overlay = state["overlays"]["df_rise"]
    assert overlay["steps"] == [1]  # loop index 10 is the file's step 1; step 4 is dropped
    assert decode_array(overlay["maps"]).shape == (1, 16, 16)
    assert len(overlay["ranges"]) == len(overlay["descriptions"]) == 1


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
    state = read_page(explorer.export().page)
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
    assert text.count("<script") == 4  # state, data, module, loader: nothing injected


def test_export_and_snapshot_do_not_import_the_explorer():
    """One direction: the explorer uses the export and the snapshot, never the reverse (not
    even for type checking: they read a protocol and the widget's state)."""
    from pathlib import Path

    from tests.test_imports import imported_modules

    widget = Path(__file__).resolve().parents[2] / "diffwidget" / "widget"
    for name in ("export.py", "snapshot.py", "payloads.py", "grid.py", "attention_views.py"):
        modules = [module for _, module in imported_modules(widget / name)]
        assert not [m for m in modules if m.startswith("diffwidget.widget.explorer")], name
