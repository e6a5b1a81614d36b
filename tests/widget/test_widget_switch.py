"""The prompt switch on the page: filmstrip payload, picker traits, commitment curve group."""

from __future__ import annotations

import numpy as np
import pytest

from diffwidget.explain.intervention_results import CommitmentCurves
from diffwidget.explain.judges import OUTCOME_CODE, replace_word
from diffwidget.widget import schema
from diffwidget.widget.codecs import decode_array
from diffwidget.widget.payloads import PayloadError
from diffwidget.widget.switch_view import (
    COMMITMENT,
    FILMSTRIP_SIZE,
    NO_PIPELINE,
    SwitchAsk,
    SwitchFilmstrip,
)

N_SEEDS = 10
#: Seeds (of 10) keeping A's colour when switched at each step of SWITCH_STEPS.
KEEPING = [1, 9, 5, 9, 10]
#: By hand: 0.9 at step 5 dips to 0.5 at step 10; from step 15 on every share is >= 0.9.
COMMITTED_AT = 15
SWITCH_STEPS = [0, 5, 10, 15, 20]  # the synthetic trace has 20 steps: k = 20 is A's own image
IMAGE_SIZE = 128


def _curves(prompt_b: str = "a blue circle on the left") -> CommitmentCurves:
    k = len(SWITCH_STEPS)
    outcomes = np.full((1, k, N_SEEDS), OUTCOME_CODE["b"], np.int8)
    for column, keeping in enumerate(KEEPING):
        outcomes[0, column, :keeping] = OUTCOME_CODE["a"]
    # Image (k, seed) is one flat colour: 10 * column + seed in every channel.
    level = 10 * np.arange(k)[:, None] + np.arange(N_SEEDS)[None, :]
    images = np.broadcast_to(
        level[:, :, None, None, None], (k, N_SEEDS, IMAGE_SIZE, IMAGE_SIZE, 3)
    ).astype(np.uint8)
    return CommitmentCurves(
        attributes=["colour"],
        a_values=["red"],
        b_values=["blue"],
        judges=["scene colour"],
        exact=[True],
        seeds=np.arange(100, 100 + N_SEEDS, dtype=np.int64),
        outcomes=outcomes,
        image_change=np.zeros((k, N_SEEDS), np.float32),
        prompt_a="a red circle on the left",
        prompt_b=prompt_b,
        switch_steps=np.asarray(SWITCH_STEPS, np.int64),
        timesteps=np.asarray([999, 749, 499, 249, -1], np.int64),
        n_steps=20,
        images=images,
    )


def test_filmstrip_holds_the_first_seed_shrunk_and_the_hand_computed_commitment() -> None:
    film = SwitchFilmstrip.of(_curves(), "red", "blue")
    assert film.steps == SWITCH_STEPS
    assert film.images.shape == (len(SWITCH_STEPS), FILMSTRIP_SIZE, FILMSTRIP_SIZE, 3)
    # First seed (index 0): image k is flat 10 * k, and an area resize keeps a flat colour.
    assert film.images[:, 0, 0, 0].tolist() == [0, 10, 20, 30, 40]
    assert (film.seed, film.n_seeds) == (100, N_SEEDS)
    assert film.committed == [COMMITTED_AT]
    back = SwitchFilmstrip.from_json(film.to_json())
    np.testing.assert_array_equal(back.images, film.images)
    assert back.committed == film.committed
    assert back.prompt_b == "a blue circle on the left"


def test_filmstrip_payload_is_checked_before_use() -> None:
    value = SwitchFilmstrip.of(_curves(), "red", "blue").to_json()
    with pytest.raises(PayloadError, match="committed"):
        SwitchFilmstrip.from_json({**value, "committed": [True]})
    with pytest.raises(PayloadError, match="missing"):
        SwitchFilmstrip.from_json({k: v for k, v in value.items() if k != "images"})
    short = {**value, "steps": SWITCH_STEPS[:2]}
    with pytest.raises(PayloadError, match="K = 2"):
        SwitchFilmstrip.from_json(short)


def test_a_file_with_fewer_steps_keeps_their_thumbnails_renumbered() -> None:
    film = SwitchFilmstrip.of(_curves(), "red", "blue")
    kept = film.keep_steps([0, 5, 6, 16])
    # Switch steps 0 and 5 are kept (as 0 and 1), 10 and 15 are not, A's own image stays last.
    assert (kept.n_steps, kept.steps) == (4, [0, 1, 4])
    assert kept.images[:, 0, 0, 0].tolist() == [0, 10, 40]
    # Committed from step 15: from the first kept step at or after it, 16 (the file's 3).
    assert kept.committed == [3]


def test_switch_curves_move_to_their_own_group_beside_the_probes(make_explorer) -> None:
    explorer = make_explorer()
    probe = np.linspace(0.5, 1.0, 20)
    explorer.add_curve("red circle probe", probe, group="concept_auc")
    explorer._show_switch(_curves(), "red", "blue")
    series = explorer.widget.curves["series"]
    values = decode_array(explorer.widget.curves["values"])
    groups = {s["name"]: s["group"] for s in series}
    assert groups["red circle probe"] == "concept_auc"
    kept = [i for i, s in enumerate(series) if s["group"] == COMMITMENT]
    assert [series[i]["name"] for i in kept] == ["colour"]
    row = values[kept[0]]
    # The switch steps on the axis carry the shares; k = 20 lies past it; the rest is empty.
    np.testing.assert_allclose(row[SWITCH_STEPS[:-1]], np.asarray(KEEPING[:-1]) / N_SEEDS)
    assert np.isnan(np.delete(row, SWITCH_STEPS[:-1])).all()
    assert explorer.commitment is not None
    assert SwitchFilmstrip.from_json(explorer.widget.switch).committed == [COMMITTED_AT]
    # A second switch replaces the first one's curves (and filmstrip) instead of adding.
    explorer._show_switch(_curves("a green circle on the left"), "red", "green")
    series = explorer.widget.curves["series"]
    assert sum(s["group"] == COMMITMENT for s in series) == 1
    assert explorer.widget.switch["prompt_b"] == "a green circle on the left"
    figure = explorer.figure("commitment")
    assert figure.title == schema.CURVE_GROUP_TITLES["commitment"]
    assert [m.labels for m in figure.marks if m.labels] == [["colour"]]
    plan = explorer.export(steps=[0, 5, 19])
    assert any(part.name == "switch" and part.nbytes > 0 for part in plan.parts)


@pytest.mark.parametrize(
    ("typed", "message"),
    [
        ("blue\x00", "the replacement word has control characters"),
        ("\u202eblue", "the replacement word has control characters"),
        ("b" * (schema.CONCEPT_MAX_CHARS + 1), "too long"),
        (42, "the replacement word must be text"),
    ],
)
def test_hostile_replacements_are_refused_with_a_clear_message(make_explorer, typed, message):
    explorer = make_explorer()
    explorer.widget.set_state({"switch_replacement": typed})
    assert message in explorer.error
    assert explorer.widget.switch_replacement == ""
    # The button's message is checked the same way, and nothing runs.
    content = {"kind": "prompt_switch", "word": "red", "replacement": typed}
    explorer.widget.error = ""
    explorer.widget._dispatch_message(explorer.widget, content, [])
    assert message in explorer.error
    assert explorer.status == "idle"


def test_the_picker_takes_only_prompt_words_and_markup_stays_text(make_explorer) -> None:
    explorer = make_explorer()
    assert explorer.widget.switch_words == ["red", "circle", "left"]
    explorer.widget.set_state({"switch_word": "green"})
    assert "unknown switch_word 'green'" in explorer.error
    markup = "<img src=x onerror=alert(1)>"
    explorer.widget.set_state({"switch_word": "circle", "switch_replacement": markup})
    assert (explorer.widget.switch_word, explorer.widget.switch_replacement) == ("circle", markup)
    bounds = explorer.widget.bounds()
    with pytest.raises(schema.InvalidInput, match="unknown switch_word"):
        SwitchAsk.from_message({"word": "on", "replacement": "blue"}, bounds)
    with pytest.raises(ValueError, match="type its replacement"):
        SwitchAsk.from_message({"word": "red", "replacement": "  "}, bounds)


@pytest.mark.parametrize(
    ("seeds", "message"),
    [
        (0, f"switch_seeds 0 is out of range; use 1..{schema.SWITCH_MAX_SEEDS}"),
        (schema.SWITCH_MAX_SEEDS + 1, "is out of range"),
        (2.5, "switch_seeds must be an integer, got 2.5"),
        ("3", "switch_seeds must be an integer, got str"),
        (True, "switch_seeds must be an integer, got bool"),
    ],
)
def test_a_seed_count_out_of_range_is_refused_in_the_trait_and_the_message(
    make_explorer, seeds, message
) -> None:
    explorer = make_explorer()
    explorer.widget.set_state({"switch_seeds": seeds})
    assert message in explorer.error
    assert explorer.widget.switch_seeds == 1
    bounds = explorer.widget.bounds()
    with pytest.raises(schema.InvalidInput, match=message.replace(".", r"\.")):
        SwitchAsk.from_message({"word": "red", "replacement": "blue", "seeds": seeds}, bounds)
    # A message without seeds (an older page) asks for one; the largest count is accepted.
    assert SwitchAsk.from_message({"word": "red", "replacement": "blue"}, bounds).seeds == 1
    top = {"word": "red", "replacement": "blue", "seeds": float(schema.SWITCH_MAX_SEEDS)}
    assert SwitchAsk.from_message(top, bounds).seeds == schema.SWITCH_MAX_SEEDS
    explorer.widget.set_state({"switch_seeds": 3})
    assert explorer.widget.switch_seeds == 3


def test_without_a_pipeline_the_button_says_why(make_explorer) -> None:
    explorer = make_explorer()
    assert "prompt_switch" not in explorer.widget.actions
    content = {"kind": "prompt_switch", "word": "red", "replacement": "blue"}
    explorer.widget._dispatch_message(explorer.widget, content, [])
    assert explorer.error == NO_PIPELINE
    assert explorer.status == "idle"
    with pytest.raises(RuntimeError, match="needs the pipeline"):
        explorer.prompt_switch("red", "blue")


def test_a_typed_replacement_is_text_not_a_substitution_template() -> None:
    assert replace_word("a red circle", "red", r"\g<0>") == r"a \g<0> circle"
    assert replace_word("a red circle", "red", "x\\n") == "a x\\n circle"
