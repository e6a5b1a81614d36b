"""Every malformed value from the front end is refused, shown, and the kernel goes on."""

from __future__ import annotations

import pytest

from diffwidget.widget.explorer import Explorer

BAD_WRITES = [
    ({"step": -1}, "step -1 is out of range"),
    ({"step": 10**9}, "out of range; use 0..19"),
    ({"step": "7"}, "step must be an integer"),
    ({"step": 3.5}, "step must be an integer"),
    ({"step": True}, "step must be an integer"),
    ({"step": b"\x00\x01"}, "step must be an integer"),
    ({"token": 99}, "token 99 is out of range"),
    ({"token": None}, "token must be an integer"),
    ({"overlay": "gradcam"}, "unknown overlay 'gradcam'"),
    ({"overlay": 3}, "unknown overlay 3"),
    ({"opacity": 2.0}, "opacity must lie in [0, 1]"),
    ({"opacity": float("nan")}, "opacity must lie in [0, 1]"),
    ({"image_mode": "latent"}, "unknown image_mode"),
    ({"show_special": "yes"}, "show_special must be true or false"),
    ({"status": "done"}, "the view may not set 'status'"),
    ({"previews": {"dtype": "uint8", "shape": [1], "data": b"\x00"}}, "may not set 'previews'"),
    ({"nonsense": 1}, "may not set 'nonsense'"),
]


@pytest.fixture
def explorer(synthetic_trace):
    explorer = Explorer(synthetic_trace)
    yield explorer
    explorer.close()


@pytest.mark.parametrize(("update", "message"), BAD_WRITES)
def test_bad_front_end_write_is_rejected_and_echoed(explorer, monkeypatch, update, message):
    echoed = []
    monkeypatch.setattr(explorer.widget, "send_state", lambda key=None: echoed.append(key))
    before = {name: getattr(explorer.widget, name) for name in ("step", "token", "overlay")}
    explorer.widget.set_state(update)
    assert message in explorer.error
    assert {name: getattr(explorer.widget, name) for name in before} == before
    if next(iter(update)) in {"step", "token", "overlay", "opacity", "image_mode", "status"}:
        assert next(iter(update)) in echoed  # the view gets the kernel's value back
    # The kernel keeps working: a good write goes through and clears the error.
    explorer.widget.set_state({"step": 4})
    assert explorer.step == 4
    assert explorer.error == ""


def test_good_writes_in_one_message_survive_a_bad_neighbour(explorer):
    explorer.widget.set_state({"step": 5, "overlay": "nope", "token": 3})
    assert (explorer.step, explorer.token, explorer.overlay) == (5, 3, "none")
    assert "unknown overlay" in explorer.error


def test_unknown_message_is_reported_not_raised(explorer):
    explorer.widget._dispatch_message(explorer.widget, {"kind": "explode"}, [])
    assert "unknown message" in explorer.error
    explorer.widget._dispatch_message(explorer.widget, "not a dict", [])
    assert "unknown message" in explorer.error


def test_python_side_setters_raise_with_the_fix(explorer):
    with pytest.raises(ValueError, match=r"use 0\.\.19"):
        explorer.step = 20
    with pytest.raises(ValueError, match="tokens are"):
        explorer.token = "square"
    with pytest.raises(ValueError, match="use one of"):
        explorer.overlay = "saliency"
    explorer.token = "circle"
    assert explorer.token == 3
    explorer.step = 7
    assert explorer.widget.step == 7
