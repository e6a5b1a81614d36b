"""Where widgets do not render: PNG + text in the mimebundle, repr, Colab, base64 transport."""

from __future__ import annotations

import base64
import io
import re
import sys
import types

import numpy as np
import pytest
from PIL import Image

from diffwidget.explain.results import SaliencyMap
from diffwidget.widget import schema
from diffwidget.widget.codecs import BASE64_KEY, decode_array, payload_nbytes
from diffwidget.widget.explorer import Explorer
from diffwidget.widget.snapshot import colormap_lut, png_bytes, render_view


@pytest.fixture
def explorer(synthetic_trace):
    made = Explorer(synthetic_trace)
    yield made
    made.close()


def _png(data):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data["image/png"]))).convert("RGB"))


def test_mimebundle_has_the_widget_a_png_and_a_summary(explorer):
    explorer.step = 12
    bundle, _metadata = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    text = bundle["text/plain"]
    assert "'a red circle left'" in text
    assert "20 steps" in text
    assert "step 12 (t = 368)" in text
    assert "Predicted clean image" in text
    picture = _png(bundle)
    # The image part is the step's preview scaled up by a whole factor (64 -> 256).
    preview = explorer.trace.previews[12]
    factor = 256 // preview.shape[0]
    top = 16  # title strip
    region = picture[top : top + 256, 6 : 6 + 256]
    np.testing.assert_array_equal(region[::factor, ::factor], preview)


def test_png_overlay_matches_the_colour_map_and_has_a_scale(explorer):
    h, w = explorer.trace.latent_shape
    value = np.zeros((h, w), np.float32)
    value[:, w // 2 :] = 1.0
    explorer.add_overlay("df_rise", 0, SaliencyMap("df_rise", 0, 999, value, value * 4 - 1))
    explorer.overlay = "df_rise"
    explorer.opacity = 1.0
    picture = render_view(explorer.widget)
    lut = colormap_lut()
    # Opacity 1 at the map's top: the right half is the colour map's brightest colour...
    np.testing.assert_array_equal(picture[16 + 128, 6 + 250], lut[255])
    # ...and the transparent low end leaves the left half as the image was.
    factor = 256 // explorer.trace.previews.shape[1]
    np.testing.assert_array_equal(
        picture[16 + 100, 6 + 8], explorer.trace.previews[0][100 // factor, 8 // factor]
    )
    # The colour bar right of the image runs from the top colour down to the bottom one.
    bar_x = 6 + 256 + 6 + 7
    np.testing.assert_array_equal(picture[16, bar_x], lut[255])
    np.testing.assert_array_equal(picture[16 + 255, bar_x], lut[0])
    assert png_bytes(explorer.widget).startswith(b"\x89PNG")
    assert "DF-RISE at step 0" in repr(explorer)


def test_lut_matches_the_schema_stops():
    lut = colormap_lut()
    assert tuple(lut[0]) == schema.COLORMAP_STOPS[0]
    assert tuple(lut[-1]) == schema.COLORMAP_STOPS[-1]
    # Evenly spaced stops: stop k sits at index k * 255 / 7.
    k = 3
    index = round(k * 255 / (len(schema.COLORMAP_STOPS) - 1))
    assert np.abs(lut[index].astype(int) - schema.COLORMAP_STOPS[k]).max() <= 3


def test_colab_widget_manager_is_switched_on_once(synthetic_trace, monkeypatch):
    from anywidget import _util

    calls = []
    widgets = types.SimpleNamespace(_installed_url="https://colab.example/manager.js")
    output = types.ModuleType("google.colab.output")
    output.enable_custom_widget_manager = lambda: calls.append(1)
    output._widgets = widgets
    monkeypatch.setitem(sys.modules, "google.colab.output", output)
    _util.enable_custom_widget_manager_once.cache_clear()
    try:
        first, second = Explorer(synthetic_trace), Explorer(synthetic_trace)
        data, metadata = first._repr_mimebundle_()
        first.close()
        second.close()
    finally:
        _util.enable_custom_widget_manager_once.cache_clear()
    assert calls == [1]  # switched on by the first widget, once per process
    mime = "application/vnd.jupyter.widget-view+json"
    assert metadata[mime]["colab"]["custom_widget_manager"]["url"] == widgets._installed_url
    assert "image/png" in data


def test_base64_transport_resends_every_payload_as_text(explorer):
    before = {
        name: payload_nbytes(getattr(explorer.widget, name)) for name in schema.PAYLOAD_TRAITS
    }
    previews = decode_array(explorer.widget.previews)
    explorer.widget._dispatch_message(explorer.widget, {"kind": "buffers_missing"}, [])
    assert explorer.widget.transport == "base64"
    data = explorer.widget.previews["data"]
    assert set(data) == {BASE64_KEY}
    assert isinstance(data[BASE64_KEY], str)
    np.testing.assert_array_equal(decode_array(explorer.widget.previews), previews)
    after = {name: payload_nbytes(getattr(explorer.widget, name)) for name in schema.PAYLOAD_TRAITS}
    assert after == before
    # Later payloads go out as base64 too, and the kernel side still reads them.
    explorer.add_curve("auc", np.linspace(0, 1, explorer.trace.n_steps))
    assert BASE64_KEY in explorer.widget.curves["values"]["data"]
    assert explorer.figure("concept_auc").marks[0].labels == ["auc"]
    explorer.image_mode = "noisy"  # sent when first shown: as base64 now
    assert explorer.widget.noisy_previews["data"].keys() == {BASE64_KEY}


def test_base64_fallback_is_bounded(explorer, monkeypatch):
    from diffwidget.widget import model

    total = sum(payload_nbytes(getattr(explorer.widget, n)) for n in schema.PAYLOAD_TRAITS)
    monkeypatch.setattr(model, "BASE64_LIMIT_BYTES", total - 1)
    explorer.widget._dispatch_message(explorer.widget, {"kind": "buffers_missing"}, [])
    # Refused with a message that says what to do instead; nothing resent.
    assert explorer.widget.transport == "binary"
    assert "explorer.to_html(path)" in explorer.error
    assert f"{total / 1e6:.1f} MB" in explorer.error
    # Within the bound it switches; a later payload that would cross it is not sent.
    monkeypatch.setattr(model, "BASE64_LIMIT_BYTES", total + 1000)
    explorer.widget.error = ""
    explorer.widget._dispatch_message(explorer.widget, {"kind": "buffers_missing"}, [])
    assert explorer.widget.transport == "base64"
    explorer.image_mode = "noisy"
    assert explorer.widget.noisy_previews is None
    assert "JSON text" in explorer.error


@pytest.mark.slow
def test_executed_notebook_converted_to_html_shows_the_picture(tmp_path, synthetic_trace):
    """nbconvert (and GitHub, nbviewer) have no widget state: they fall back to the PNG."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nbconvert = pytest.importorskip("nbconvert")
    synthetic_trace.save(tmp_path / "trace.safetensors")
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell(
            "from diffwidget.tracing.trace import Trace\n"
            "from diffwidget.widget import Explorer\n"
            "explorer = Explorer(Trace.load('trace.safetensors'))\n"
            "explorer.step = 12; explorer.token = 2; explorer.overlay = 'attention'\n"
            "explorer"
        )
    ]
    # As a notebook saved from JupyterLab by default: outputs kept, widget state not.
    client = nbclient.NotebookClient(
        notebook, timeout=120, resources={"metadata": {"path": str(tmp_path)}},
        store_widget_state=False,
    )  # fmt: skip
    client.execute()
    output = notebook.cells[0].outputs[0]
    assert {"image/png", "text/plain"} <= set(output["data"])
    html, _ = nbconvert.HTMLExporter().from_notebook_node(notebook)
    assert re.search(r"<img[^>]+src=\"data:image/png;base64,", html)
    assert "step 12 (t = 368)" in output["data"]["text/plain"]  # for text-only viewers
