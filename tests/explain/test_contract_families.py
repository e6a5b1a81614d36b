"""The method contract over every denoiser family: methods × families.

Each method on each family: the right shape on the latent grid, finite, deterministic,
nothing left behind (hooks, processors, parameter gradients, scheduler state), also when
the denoiser raises; a method a family cannot support says so and what to use instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from explain_support import FAST, changed_keys, hook_counts, scheduler_state

from diffwidget.explain.faithfulness import InsertionDeletion
from diffwidget.explain.registry import SALIENCY_METHODS, saliency_method
from diffwidget.explain.relevance import TokenRelevance
from diffwidget.tracing.activations import ActivationRecorder
from diffwidget.tracing.families import denoiser_family
from diffwidget.tracing.lock import pipeline_lock
from diffwidget.tracing.trace import Trace
from tests.family_cases import CASE_FAMILY, FAMILY_CASES

CASES = sorted(FAMILY_CASES)
STEP = 1
PROMPTS = ["a red circle on the left", "a blue square on the right"]


def _saliency(method: str, pipe: Any, trace: Trace) -> list[np.ndarray]:
    if method in SALIENCY_METHODS:
        settings = FAST.get(method, {})
        sal = saliency_method(method)(progress_bar=False, **settings).attribute(pipe, trace, STEP)
        if method == "df_cam":
            assert list(sal.layers) == denoiser_family(pipe).cam_layers()
        return [sal.map, sal.raw, *sal.layers_raw.values()]
    if method == "faithfulness":
        result = InsertionDeletion(n_random=1).evaluate(pipe, trace, STEP, trace.latents[0, 0])
        return [result.saliency.deletion, result.saliency.insertion, result.random.deletion]
    if method == "token_relevance":
        rel = TokenRelevance(progress_bar=False).attribute(pipe, trace, steps=[STEP])
        return [rel.relevance, rel.maps]
    raise AssertionError(method)


def _probe(pipe: Any, kwargs: dict[str, Any]) -> list[np.ndarray]:
    record = ActivationRecorder(pooling="grid", progress=False, decode_x0=True).record(
        pipe, PROMPTS, num_inference_steps=2, guidance_scale=3.0, **kwargs
    )
    assert record.blocks == denoiser_family(pipe).probe_blocks()
    assert record.x0_images is not None
    return [*record.activations.values(), record.x0_images.astype(np.float32)]


#: Every registered saliency method, then the other methods.
METHODS = [*SALIENCY_METHODS, "faithfulness", "token_relevance", "probes"]
#: (method, family) pairs refused with a clear error, and the words the error must contain.
REFUSED: dict[tuple[str, str], str] = {}


def _state(pipe: Any) -> dict[str, Any]:
    family = denoiser_family(pipe)
    denoiser = family.denoiser
    encoders = [
        getattr(pipe, n) for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None)
    ]
    return {
        "hooks": hook_counts(denoiser, *encoders),
        "processors": {
            n: m.processor for n, m in denoiser.named_modules() if hasattr(m, "processor")
        },
        "grads": [p.grad is None for p in denoiser.parameters()],
        "forward": "forward" in vars(denoiser),
        "text_attention": [e.config._attn_implementation for e in encoders],
        "lock": pipeline_lock(pipe).holder,
    }


def _run(
    method: str, case: str, family_case: Callable[..., Any], family_trace: Any
) -> list[np.ndarray]:
    pipe, kwargs = family_case(case)
    if method == "probes":
        return _probe(pipe, kwargs)
    return _saliency(method, pipe, family_trace(case))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("method", METHODS)
def test_method_on_family(method: str, case: str, family_case: Any, family_trace: Any) -> None:
    pipe, _ = family_case(case)
    refused = REFUSED.get((method, CASE_FAMILY[case]))
    family_trace(case)  # traced before the snapshot: tracing runs the scheduler
    before, sched = _state(pipe), scheduler_state(pipe.scheduler)
    if refused is not None:
        with pytest.raises(ValueError, match=refused):
            _run(method, case, family_case, family_trace)
        assert _state(pipe) == before
        return
    first = _run(method, case, family_case, family_trace)
    second = _run(method, case, family_case, family_trace)
    assert _state(pipe) == before
    if method != "probes":  # probes run the pipeline, which steps its own scheduler
        assert changed_keys(sched, scheduler_state(pipe.scheduler)) == []
    trace = family_trace(case)
    if method in SALIENCY_METHODS:
        assert first[0].shape == trace.latent_shape
        assert 0.0 <= first[0].min() <= first[0].max() <= 1.0
    for a, b in zip(first, second, strict=True):
        assert np.isfinite(a).all()
        np.testing.assert_array_equal(a, b)


class _Boom(RuntimeError):
    """Raised inside the denoiser while a method runs."""


@pytest.mark.parametrize("case", ["sd3", "flux", "pixart"])
@pytest.mark.parametrize("method", METHODS)
def test_nothing_left_behind_after_an_exception(
    method: str, case: str, family_case: Any, family_trace: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe, _ = family_case(case)
    family_trace(case)
    before = _state(pipe)

    def explode(*_: Any, **__: Any) -> None:
        raise _Boom("mid-method failure")

    # The block is also a probe block: its taps wrap the failing forward and must unwrap it.
    monkeypatch.setattr(pipe.transformer.transformer_blocks[-1], "forward", explode)
    with pytest.raises(_Boom):
        _run(method, case, family_case, family_trace)
    monkeypatch.undo()
    assert _state(pipe) == before
