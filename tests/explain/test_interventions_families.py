"""The interventions on every denoiser family: deterministic, shaped, nothing left behind.

The tiny pipelines have random weights, so the judge is a deterministic fake (which channel
dominates); what is checked is the plumbing every family shares with the embedded models.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from explain_support import changed_keys, hook_counts, scheduler_state

from diffwidget.explain.activation_patching import ActivationPatching
from diffwidget.explain.judges import Judge
from diffwidget.explain.prompt_switch import PromptSwitch
from diffwidget.explain.word_ablation import WordAblation
from diffwidget.tracing.branch_setup import retrace
from diffwidget.tracing.families import denoiser_family
from tests.family_cases import CASE_FAMILY, FAMILY_CASES

CASES = sorted(FAMILY_CASES)


def _redness(image: np.ndarray) -> str:
    return "red" if float(image[..., 0].mean()) >= float(image[..., 2].mean()) else "blue"


JUDGE = Judge("colour", "red", "blue", _redness)


def _state(pipe: Any) -> tuple[Any, ...]:
    denoiser = denoiser_family(pipe).denoiser
    processors = {n: m.processor for n, m in denoiser.named_modules() if hasattr(m, "processor")}
    return hook_counts(denoiser), processors, "forward" in vars(denoiser)


def _extra(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k not in ("height", "width")}


@pytest.mark.parametrize("case", CASES)
def test_interventions_on_every_family(case: str, family_case: Any, family_trace: Any) -> None:
    pipe, kwargs = family_case(case)
    tr = family_trace(case)
    # Traced first: tracing runs the pipeline, which steps its own scheduler.
    source = retrace(pipe, tr, "a blue circle on the left", **_extra(kwargs))
    before, sched = _state(pipe), scheduler_state(pipe.scheduler)
    switch = PromptSwitch(switch_steps=[0, 2, 3], progress_bar=False)
    first = switch.run(pipe, tr, word="red", replacement="blue", judges=JUDGE, **_extra(kwargs))
    second = switch.run(pipe, tr, word="red", replacement="blue", judges=JUDGE, **_extra(kwargs))
    np.testing.assert_array_equal(first.images, second.images)
    assert first.images is not None
    assert tr.image is not None
    np.testing.assert_array_equal(first.images[-1, 0], tr.image)  # k = n: A's own image
    assert first.outcomes.shape == (1, 3, 1)
    ablation = WordAblation(windows=[[0, 1], [1, 2]], progress_bar=False).run(
        pipe, tr, "red", judges=JUDGE, **_extra(kwargs)
    )
    assert len(ablation.positions) == (
        2 if CASE_FAMILY[case] == "sd3" and case != "sd3_no_t5" else 1
    )
    assert ablation.image_change.shape == (2, 1)
    layer = denoiser_family(pipe).cam_layers()[0]
    grid = ActivationPatching(layers=[layer], steps=[1], progress_bar=False).run(
        pipe, tr, source, judges=JUDGE, **_extra(kwargs)
    )
    assert grid.grid("colour").shape == (1, 1)
    assert _state(pipe) == before
    assert changed_keys(sched, scheduler_state(pipe.scheduler)) == []


@pytest.mark.parametrize("case", ["sd3", "flux"])
def test_masking_a_word_is_refused_where_the_family_has_no_text_mask(
    case: str, family_case: Any, family_trace: Any
) -> None:
    pipe, kwargs = family_case(case)
    with pytest.raises(ValueError, match="takes no text attention mask"):
        WordAblation(windows=[[0, 1]], mode="mask", progress_bar=False).run(
            pipe, family_trace(case), "red", judges=JUDGE, **_extra(kwargs)
        )


def test_masking_a_word_works_on_pixart(family_case: Any, family_trace: Any) -> None:
    pipe, kwargs = family_case("pixart")
    tr = family_trace("pixart")
    result = WordAblation(windows=[[0, 2]], mode="mask", progress_bar=False).run(
        pipe, tr, "red", judges=JUDGE, **_extra(kwargs)
    )
    assert result.image_change[0, 0] > 0


class _Boom(RuntimeError):
    pass


def test_patching_leaves_nothing_behind_when_the_denoiser_raises(
    tiny_sd_pipe_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffwidget.tracing.generate import trace

    pipe = tiny_sd_pipe_factory()
    tr = trace(pipe, "a red circle on the left", num_inference_steps=3, seed=0)
    other = trace(pipe, "a blue circle on the left", num_inference_steps=3, seed=0)
    before, sched = _state(pipe), scheduler_state(pipe.scheduler)
    calls = {"n": 0}
    forward = pipe.unet.up_blocks[-1].forward

    def explode(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] > 3:  # after the source activations were read
            raise _Boom("mid-run failure")
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.unet.up_blocks[-1], "forward", explode)
    with pytest.raises(_Boom):
        ActivationPatching(layers=["mid_block"], progress_bar=False).run(
            pipe, tr, other, judges=JUDGE
        )
    monkeypatch.undo()
    assert _state(pipe) == before
    assert changed_keys(sched, scheduler_state(pipe.scheduler)) == []
