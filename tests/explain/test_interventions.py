"""The interventions on an analytic toy with hand-computed answers, and their contract.

The toy (:mod:`intervention_toys`) commits to its colour at step ``COMMIT_STEP``: the prompt's
colour at step ``COMMIT_STEP - 1`` decides the image. See its docstring for the rules the
expected answers below follow from.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from explain_support import changed_keys, hook_counts, scheduler_state
from intervention_toys import (
    COMMIT_STEP,
    GUIDANCE,
    N_STEPS,
    PROMPT_A,
    PROMPT_B,
    fake_colour_judge,
    make_commit_pipe,
)

from diffwidget.explain.activation_patching import ActivationPatching
from diffwidget.explain.intervention_results import (
    CommitmentCurves,
    PatchingGrid,
    WordAblationResult,
)
from diffwidget.explain.judges import Judge, JudgeError
from diffwidget.explain.prompt_switch import PromptSwitch
from diffwidget.explain.protocol import Cancelled
from diffwidget.explain.registry import (
    INTERVENTION_METHODS,
    build,
    config_class,
    intervention_method,
)
from diffwidget.explain.word_ablation import WordAblation
from diffwidget.tracing.generate import trace
from diffwidget.tracing.trace import Trace

SEEDS = (0, 1, 2)
JUDGE = Judge("colour", "red", "blue", fake_colour_judge)


@pytest.fixture(scope="module")
def toy() -> Any:
    return make_commit_pipe()


def _traces(pipe: Any, prompt: str) -> list[Trace]:
    return [
        trace(
            pipe,
            prompt,
            num_inference_steps=N_STEPS,
            guidance_scale=GUIDANCE,
            seed=s,
            decode_previews=False,
        )
        for s in SEEDS
    ]


@pytest.fixture(scope="module")
def red(toy: Any) -> list[Trace]:
    return _traces(toy, PROMPT_A)


@pytest.fixture(scope="module")
def blue(toy: Any) -> list[Trace]:
    return _traces(toy, PROMPT_B)


def test_the_toy_draws_its_prompt(red: list[Trace], blue: list[Trace]) -> None:
    assert [fake_colour_judge(t.image) for t in red] == ["red"] * len(SEEDS)
    assert [fake_colour_judge(t.image) for t in blue] == ["blue"] * len(SEEDS)


def test_commitment_step_known_by_construction(toy: Any, red: list[Trace]) -> None:
    curves = PromptSwitch(progress_bar=False).run(
        toy, red, word="red", replacement="blue", judges=JUDGE
    )
    assert curves.prompt_b == PROMPT_B
    assert curves.switch_steps.tolist() == list(range(N_STEPS + 1))
    keep, low, high = curves.keep_a("colour")
    expected = [0.0 if k < COMMIT_STEP else 1.0 for k in range(N_STEPS + 1)]
    assert keep.tolist() == expected
    assert curves.take_b("colour")[0].tolist() == [1.0 - e for e in expected]
    assert curves.committed_step("colour") == COMMIT_STEP
    assert (low <= keep).all()
    assert (keep <= high).all()
    # Three seeds all keeping A: Wilson's lower bound is 3 / (3 + z^2) = 0.438.
    assert low[-1] == pytest.approx(3 / (3 + 1.959963984540054**2), abs=1e-6)
    assert curves.images is not None
    assert curves.images.shape[:2] == (N_STEPS + 1, len(SEEDS))
    assert (curves.image_change[COMMIT_STEP:] == 0).all()
    assert (curves.image_change[:COMMIT_STEP] > 0.5).all()
    assert curves.meta["denoiser_rows"] == len(SEEDS) * sum(N_STEPS - k for k in range(N_STEPS))
    assert curves.meta["denoiser_calls"] == N_STEPS


def test_word_replacement_matters_only_in_windows_holding_the_last_open_step(
    toy: Any, red: list[Trace]
) -> None:
    windows = [
        [0, COMMIT_STEP - 2],
        [COMMIT_STEP - 1, COMMIT_STEP - 1],
        [0, N_STEPS - 1],
        [COMMIT_STEP, N_STEPS - 1],
    ]
    result = WordAblation(windows=windows, mode="replace", progress_bar=False).run(
        toy, red, "red", replacement="blue", judges=JUDGE
    )
    assert result.positions == [2]
    take_b = result.take_b("colour")[0].tolist()
    assert take_b == [0.0, 1.0, 1.0, 0.0]


def test_a_zeroed_word_gives_way_to_the_last_open_step_outside_the_window(
    toy: Any, red: list[Trace]
) -> None:
    # Zeroed rows push nothing; the latest open step left pushes red.
    windows = [[COMMIT_STEP - 1, COMMIT_STEP - 1], [1, N_STEPS - 1]]
    result = WordAblation(windows=windows, progress_bar=False).run(toy, red, "red", judges=JUDGE)
    assert result.keep_a("colour")[0].tolist() == [1.0, 1.0]
    # Without the last open push the latent is smaller, so the image is the same colour.
    assert (result.image_change == 0).all()


def test_patching_grid_matches_the_hand_computed_answer(
    toy: Any, red: list[Trace], blue: list[Trace]
) -> None:
    layers = ["down_blocks.0", "mid_block", "up_blocks.0"]
    grid = ActivationPatching(layers=layers, progress_bar=False).run(toy, red, blue, judges=JUDGE)
    steps = range(N_STEPS)
    expected = np.array(
        [
            [s >= COMMIT_STEP for s in steps],  # the latent is read once the step is closed
            [s == COMMIT_STEP - 1 for s in steps],  # the prompt is read while open
            [s >= COMMIT_STEP - 1 for s in steps],  # the prediction itself
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(grid.grid("colour"), expected)
    np.testing.assert_array_equal(grid.grid("colour", "a"), 1 - expected)
    assert grid.change_grid().shape == (3, N_STEPS)


def test_results_round_trip(tmp_path: Any, toy: Any, red: list[Trace], blue: list[Trace]) -> None:
    curves = PromptSwitch(switch_steps=[0, N_STEPS], progress_bar=False).run(
        toy, red[:1], PROMPT_B, judges=JUDGE
    )
    again = CommitmentCurves.load(curves.save(tmp_path / "switch.npz"))
    np.testing.assert_array_equal(again.outcomes, curves.outcomes)
    np.testing.assert_array_equal(again.images, curves.images)
    assert again.meta == curves.meta
    assert again.committed_step("colour") == N_STEPS
    ablation = WordAblation(windows=[[0, 1]], progress_bar=False).run(
        toy, red[:1], "red", judges=JUDGE
    )
    assert WordAblationResult.load(ablation.save(tmp_path / "w.npz")).windows.tolist() == [[0, 1]]
    grid = ActivationPatching(layers=["mid_block"], steps=[2], progress_bar=False).run(
        toy, red[:1], blue[:1], judges=JUDGE
    )
    assert PatchingGrid.load(grid.save(tmp_path / "g.npz")).layers == ["mid_block"]


def test_a_score_judge_and_the_judge_protocol(toy: Any, red: list[Trace]) -> None:
    def blueness(image: np.ndarray) -> float:
        return float(image[..., 2].mean() > image[..., 0].mean())

    score = Judge("colour", "red", "blue", blueness, threshold=0.5)
    curves = PromptSwitch(switch_steps=[0, N_STEPS], progress_bar=False).run(
        toy, red[:1], PROMPT_B, judges=score
    )
    assert curves.take_b("colour")[0].tolist() == [1.0, 0.0]
    with pytest.raises(JudgeError, match="needs a threshold"):
        Judge("colour", "red", "blue", blueness).outcome(red[0].image)
    with pytest.raises(JudgeError, match="returned a list"):
        Judge("colour", "red", "blue", lambda image: ["red"]).outcome(red[0].image)
    assert Judge("colour", "red", "blue", lambda image: None).outcome(red[0].image) == "other"
    assert Judge("colour", "red", "blue", lambda image: "green").outcome(red[0].image) == "other"
    with pytest.raises(ValueError, match="same value"):
        Judge("colour", "red", "red", fake_colour_judge)
    with pytest.raises(TypeError, match="callable"):
        Judge("colour", "red", "blue", "not a function")  # type: ignore[arg-type]


def test_cancel_stops_and_leaves_nothing(toy: Any, red: list[Trace]) -> None:
    before = scheduler_state(toy.scheduler), hook_counts(toy.unet)
    with pytest.raises(Cancelled):
        PromptSwitch(progress_bar=False).run(
            toy, red, PROMPT_B, judges=JUDGE, progress=lambda done, total: False
        )
    assert changed_keys(before[0], scheduler_state(toy.scheduler)) == []
    assert hook_counts(toy.unet) == before[1]
    assert not hasattr(toy.unet.mid_block, "_diffusers_hook")


def test_bad_inputs_get_clear_errors(toy: Any, red: list[Trace], blue: list[Trace]) -> None:
    switch = PromptSwitch(progress_bar=False)
    with pytest.raises(ValueError, match="nothing to switch"):
        switch.run(toy, red, PROMPT_A, judges=JUDGE)
    with pytest.raises(ValueError, match="not both"):
        switch.run(toy, red, PROMPT_B, word="red", replacement="blue", judges=JUDGE)
    with pytest.raises(ValueError, match="has no word 'green'"):
        switch.run(toy, red, word="green", replacement="blue", judges=JUDGE)
    with pytest.raises(ValueError, match="scene-world judges do not apply"):
        switch.run(toy, red, PROMPT_B)
    with pytest.raises(ValueError, match="different prompts"):
        switch.run(toy, [red[0], blue[0]], PROMPT_B, judges=JUDGE)
    with pytest.raises(TypeError, match="Trace objects"):
        switch.run(toy, ["not a trace"], PROMPT_B, judges=JUDGE)  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"outside 0\.\.6"):
        PromptSwitch(switch_steps=[9], progress_bar=False).run(toy, red, PROMPT_B, judges=JUDGE)
    with pytest.raises(TypeError, match="integer"):
        PromptSwitch(switch_steps=["a"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="needs a replacement"):
        WordAblation(mode="replace", progress_bar=False).run(toy, red, "red", judges=JUDGE)
    with pytest.raises(ValueError, match="a <= b"):
        WordAblation(windows=[[3, 1]])
    with pytest.raises(ValueError, match="within steps"):
        WordAblation(windows=[[0, 9]], progress_bar=False).run(toy, red, "red", judges=JUDGE)
    with pytest.raises(ValueError, match="unknown mode"):
        WordAblation(mode="erase")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one per seed"):
        ActivationPatching(progress_bar=False).run(toy, red, blue[:1], judges=JUDGE)
    with pytest.raises(KeyError, match="no module"):
        ActivationPatching(layers=["nowhere"], steps=[0], progress_bar=False).run(
            toy, red[:1], blue[:1], judges=JUDGE
        )
    with pytest.raises(ValueError, match="at least one judge"):
        switch.run(toy, red, PROMPT_B, judges=[])


def test_registry_knows_the_interventions() -> None:
    assert sorted(INTERVENTION_METHODS) == ["activation_patching", "prompt_switch", "word_ablation"]
    for name, cls in INTERVENTION_METHODS.items():
        config = cls(progress_bar=False).config
        assert config_class(name) is cls.config_class
        assert type(build(config, progress_bar=False)) is cls
        assert cls.config_class.from_json(config.to_json()) == config
        assert cls.label
        assert cls.label != name
    assert intervention_method("prompt_switch") is PromptSwitch
    with pytest.raises(KeyError, match="Did you mean 'word_ablation'"):
        intervention_method("word-ablation")
