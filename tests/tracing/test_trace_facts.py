"""The trace's facts: one typed record, and files written by earlier versions still open."""

from __future__ import annotations

import json
from typing import Any, get_args

import numpy as np
import pytest
from safetensors import safe_open

from diffwidget.tracing.facts import (
    LEGACY_FAMILY,
    TEXT_ARGUMENT,
    CfgFacts,
    FamilyName,
    TraceFacts,
)
from diffwidget.tracing.families import FAMILIES
from diffwidget.tracing.trace import Trace
from tests.tracing.trace_data import NAMES, load_trace_data, trace_data_path

#: Pipelines that replay each stored trace: (family case or "sd", its pipeline seed).
REPLAY_CASES = {
    "format1_sd": "sd",
    "format2_sd": "sd",
    "format2_sd3": "sd3",
    "format2_flux": "flux_true_cfg",
}


def raw_meta(name: str) -> dict[str, Any]:
    with safe_open(str(trace_data_path(name)), framework="numpy") as handle:
        return json.loads(handle.metadata()["diffwidget"])["meta"]  # type: ignore[no-any-return]


def test_family_names_are_the_families() -> None:
    assert set(get_args(FamilyName)) == {family.name for family in FAMILIES}
    assert LEGACY_FAMILY == "unet"


def test_format1_file_reads_with_what_format1_meant() -> None:
    trace = load_trace_data("format1_sd")
    facts = trace.facts
    assert "family" not in raw_meta("format1_sd")
    assert facts.family == "unet"
    assert facts.cfg_layout is None
    assert facts.guided
    assert facts.cfg(trace.guidance_scale, len(trace.prompt_embeds)).kind == "batched"
    assert facts.cfg(1.0, 2).kind == "none"  # lowered guidance replays without CFG
    assert [e.name for e in facts.call_layout(list(trace.extra))] == [TEXT_ARGUMENT]
    assert facts.model_timesteps is None
    assert facts.timesteps_in == [999.0, 500.0]  # the exact scheduler timesteps
    assert facts.attention_normalisation == "text_softmax"
    assert facts.scheduler_config["lambda_min_clipped"] == -np.inf  # JSON's -Infinity


@pytest.mark.parametrize("name", NAMES)
def test_every_stored_fact_is_read(name: str) -> None:
    """Each key the earlier version wrote reaches a field with the same value."""
    meta = raw_meta(name)
    facts = load_trace_data(name).facts.to_json()
    for key, value in meta.items():
        if key == "cfg":  # a copy of the CFG layout (format 1: implied by w and the rows)
            assert value is load_trace_data(name).facts.guided
            continue
        if key == "conditioning":
            value = [{**entry, "value": entry.get("value")} for entry in value]
        assert json.dumps(facts[key], sort_keys=True) == json.dumps(value, sort_keys=True), key


def test_new_files_keep_every_key_the_previous_version_read() -> None:
    old = raw_meta("format2_sd")
    new = load_trace_data("format2_sd").facts.to_json()
    assert set(old) - {"cfg"} <= set(new)


@pytest.mark.parametrize("name", NAMES)
def test_stored_trace_replays_its_own_predictions(name: str, family_case: Any) -> None:
    from diffwidget.testing.tiny import tiny_sd_pipeline
    from diffwidget.tracing.replay import StepReplay

    trace = load_trace_data(name)
    case = REPLAY_CASES[name]
    pipe = tiny_sd_pipeline() if case == "sd" else family_case(case)[0]
    replay = StepReplay(pipe, trace)
    for step in range(trace.n_steps):
        x0 = replay.pred_x0(replay.latent(step), step)[0].numpy()
        np.testing.assert_allclose(x0, trace.pred_x0[step], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_stored_trace_saves_and_loads_unchanged(name: str, tmp_path: Any) -> None:
    trace = load_trace_data(name)
    again = Trace.load(trace.save(tmp_path / "again.safetensors"))
    assert again.facts == trace.facts
    for field in ("latents", "pred_x0", "prompt_embeds", "timesteps"):
        assert getattr(again, field).tobytes() == getattr(trace, field).tobytes()


def test_facts_refuse_what_no_trace_holds() -> None:
    from diffwidget.records import RecordError

    for bad, field in (
        ({"family": "dalle"}, "family"),
        ({"model_timestep_dtype": "load"}, "model_timestep_dtype"),
        ({"cfg_layout": {"layout": "twice", "halves": []}}, "cfg_layout.layout"),
        (
            {
                "noise_schedule": {
                    "family": "flow",
                    "alpha": [0.5],
                    "sigma": [],
                    "model_input_scale": [],
                }
            },
            "noise_schedule",
        ),
        ({"seed": True}, "seed"),
        ({"n_text_tokens": 1.5}, "n_text_tokens"),
    ):
        with pytest.raises(RecordError) as info:
            TraceFacts.from_json(bad, where="t.safetensors")
        assert info.value.field == field


def test_facts_are_frozen_and_compare_by_value() -> None:
    a = TraceFacts(family="sd3", cfg_layout=CfgFacts("batched", ["uncond", "cond"]))
    assert a == TraceFacts.from_json(a.to_json())
    with pytest.raises(AttributeError):
        a.family = "flux"  # type: ignore[misc]


#: How each stored format-2 trace was made (see tests/tracing/trace_data.py).
RETRACE = {"format2_sd": ("sd", 0), "format2_sd3": ("sd3", 1), "format2_flux": ("flux_true_cfg", 1)}


@pytest.mark.parametrize("name", sorted(RETRACE))
def test_tracing_again_matches_the_file_the_previous_version_wrote(
    name: str, family_case: Any
) -> None:
    """Same run, same arrays and facts (bit for bit on the machine that wrote the files)."""
    from diffwidget.testing.tiny import tiny_sd_pipeline
    from diffwidget.tracing.generate import trace

    case, seed = RETRACE[name]
    pipe, kwargs = (tiny_sd_pipeline(), {}) if case == "sd" else family_case(case)
    # The previous version decoded the previews with the VAE.
    new = trace(
        pipe,
        "a red circle on the left",
        num_inference_steps=2,
        seed=seed,
        preview_decoder="vae",
        **kwargs,
    )
    old = load_trace_data(name)
    for field in ("latents", "noise_pred", "pred_x0", "final_latent", "prompt_embeds"):
        np.testing.assert_allclose(getattr(new, field), getattr(old, field), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.image, old.image, atol=1)
    assert list(new.attention) == list(old.attention)
    for layer, maps in old.attention.items():
        np.testing.assert_allclose(new.attention[layer], maps, atol=1e-3)
    # Versions and the scheduler's set of defaulted keys (a set: any order) may differ.
    skip = {"versions", "scheduler_config"}
    assert {k: v for k, v in new.facts.to_json().items() if k not in skip} == {
        k: v for k, v in old.facts.to_json().items() if k not in skip
    }
