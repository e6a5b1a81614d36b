"""One contract for every registered explanation method.

Right shape, finite, deterministic under a seed, nothing left behind (hooks, attention
processors, text-encoder attention implementation, scheduler state, parameter gradients),
also when the UNet raises in the middle of the method.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from explain_support import FAST, changed_keys, hook_counts, processors, scheduler_state

from diffwidget.explain.concept_results import ConceptMapsResult
from diffwidget.explain.registry import (
    CONCEPT_METHODS,
    SALIENCY_METHODS,
    TOKEN_METHODS,
    saliency_method,
)
from diffwidget.explain.results import SaliencyMap, TokenRelevanceResult
from diffwidget.tracing.trace import Trace

ALL_METHODS = {**SALIENCY_METHODS, **TOKEN_METHODS, **CONCEPT_METHODS}
STEP = 1


def _method(name: str) -> Any:
    return ALL_METHODS[name](progress_bar=False, **FAST.get(name, {}))


def _run(name: str, pipe: Any, trace: Trace) -> Any:
    method = _method(name)
    if name in TOKEN_METHODS:
        return method.attribute(pipe, trace, steps=[STEP])
    if name in CONCEPT_METHODS:
        return method.attribute(pipe, trace)
    return method.attribute(pipe, trace, STEP)


def _arrays(result: Any) -> list[np.ndarray]:
    if isinstance(result, SaliencyMap):
        return [result.map, result.raw, *result.layers.values()]
    if isinstance(result, ConceptMapsResult):
        return list(result.maps.values())
    return [result.relevance, result.normalized, result.maps]


def _state(pipe: Any) -> dict[str, Any]:
    return {
        "hooks": hook_counts(pipe.unet, pipe.text_encoder),
        "processors": processors(pipe.unet),
        "attn_implementation": pipe.text_encoder.config._attn_implementation,
        "grads": [p.grad is None for p in pipe.unet.parameters()],
        "training": pipe.unet.training,
    }


def test_fast_settings_name_registered_methods_and_valid_settings() -> None:
    assert set(FAST) <= set(ALL_METHODS)
    for name, settings in FAST.items():
        assert ALL_METHODS[name].config_class(**settings).to_json().items() >= settings.items()


@pytest.mark.parametrize("name", sorted(ALL_METHODS))
def test_config_round_trip_and_registry(name: str) -> None:
    """Every method has a typed config: defaults written once, a stable JSON form, rebuilt
    into the same method by the registry (what runs store and replay)."""
    import json

    from diffwidget.explain.registry import build, config_class, method_name

    cls = ALL_METHODS[name]
    config = _method(name).config
    assert config_class(name) is cls.config_class
    assert type(config) is cls.config_class
    text = json.dumps(config.to_json())
    assert json.dumps(cls.config_class.from_json(json.loads(text)).to_json()) == text
    assert cls.config_class.from_json(json.loads(text)) == config
    assert list(config.to_json()) == list(cls.config_class.setting_names())
    assert method_name(config) == name
    rebuilt = build(config, progress_bar=False)
    assert type(rebuilt) is cls
    assert rebuilt.config == config
    with pytest.raises(TypeError, match="no setting 'bogus'"):
        cls(bogus=1)
    with pytest.raises(ValueError, match="unknown keys 'bogus'"):
        cls.config_class.from_json({"bogus": 1})


@pytest.mark.parametrize("name", sorted(ALL_METHODS))
def test_contract(name: str, sd_pipe: Any, sd_trace: Trace) -> None:
    before, sched = _state(sd_pipe), scheduler_state(sd_pipe.scheduler)
    first = _run(name, sd_pipe, sd_trace)
    second = _run(name, sd_pipe, sd_trace)
    assert _state(sd_pipe) == before
    assert changed_keys(sched, scheduler_state(sd_pipe.scheduler)) == []
    if isinstance(first, SaliencyMap):
        assert first.method == name
        assert first.step == STEP
        assert first.timestep == int(sd_trace.timesteps[STEP])
        assert first.map.shape == first.raw.shape == sd_trace.latent_shape
        assert first.map.dtype == np.float32
        assert first.raw.dtype == np.float32
        assert first.map.min() >= 0.0
        assert first.map.max() <= 1.0
        assert all(layer.shape == sd_trace.latent_shape for layer in first.layers.values())
    elif isinstance(first, ConceptMapsResult):
        assert first.steps == [STEP]
        assert first.timesteps == [int(sd_trace.timesteps[STEP])]
        assert first.heat_map().shape == (2, *sd_trace.latent_shape)
    else:
        assert isinstance(first, TokenRelevanceResult)
        assert first.relevance.shape == (1, len(sd_trace.tokens))
    for a, b in zip(_arrays(first), _arrays(second), strict=True):
        assert np.isfinite(a).all()
        np.testing.assert_array_equal(a, b)


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("name", sorted(ALL_METHODS))
def test_nothing_left_behind_after_an_exception(
    name: str, sd_pipe: Any, sd_trace: Trace, monkeypatch: pytest.MonkeyPatch
) -> None:
    before, sched = _state(sd_pipe), scheduler_state(sd_pipe.scheduler)

    def explode(*_: Any, **__: Any) -> None:
        raise _Boom("mid-method failure")

    # Raise deep inside the UNet: after every hook and processor has been installed.
    monkeypatch.setattr(sd_pipe.unet.mid_block, "forward", explode)
    with pytest.raises(_Boom):
        _run(name, sd_pipe, sd_trace)
    monkeypatch.undo()
    assert _state(sd_pipe) == before
    assert changed_keys(sched, scheduler_state(sd_pipe.scheduler)) == []


def test_registry_names() -> None:
    assert saliency_method("df_rise").__name__ == "DFRise"
    with pytest.raises(KeyError, match="Did you mean 'df_cam'"):
        saliency_method("df-cam")


@pytest.mark.parametrize("name", sorted(SALIENCY_METHODS))
def test_widget_call_reports_progress(name: str, sd_pipe: Any, sd_trace: Trace) -> None:
    """The widget calls saliency_method(name)().attribute(pipe, trace, step, progress=cb)."""
    seen: list[tuple[int, int]] = []
    method = saliency_method(name)(progress_bar=False, **FAST.get(name, {}))
    result = method.attribute(sd_pipe, sd_trace, STEP, progress=lambda d, t: seen.append((d, t)))
    assert isinstance(result, SaliencyMap)
    assert seen
    assert seen[-1][0] == seen[-1][1]
    assert all(done <= total for done, total in seen)
