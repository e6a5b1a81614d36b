"""The torch thread policy for the embedded model: one thread unless the user chose."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffwidget import _threads
from diffwidget._threads import TINY_MODEL_THREADS, choose_threads, threads_from_env

ROOT = Path(__file__).resolve().parents[1]
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "DIFFWIDGET_THREADS")


def test_default_is_the_tiny_model_count() -> None:
    choice = choose_threads({}, current=2, applied=None, defaults={1, 2})
    assert choice.threads == TINY_MODEL_THREADS == 1


def test_diffwidget_threads_wins() -> None:
    assert choose_threads({"DIFFWIDGET_THREADS": "3"}, 1, None, {2}).threads == 3
    # Even over OpenMP's variable: it is diffwidget's own, more specific setting.
    env = {"DIFFWIDGET_THREADS": "2", "OMP_NUM_THREADS": "4"}
    assert choose_threads(env, 4, None, {2}).threads == 2


@pytest.mark.parametrize("name", ["OMP_NUM_THREADS", "MKL_NUM_THREADS"])
def test_torch_start_up_variables_are_left_alone(name: str) -> None:
    choice = choose_threads({name: "4"}, current=4, applied=None, defaults={2})
    assert choice.threads is None
    assert name in choice.reason


def test_an_explicit_torch_call_is_kept() -> None:
    # Before the first load: a count torch would not pick by itself.
    assert choose_threads({}, current=3, applied=None, defaults={1, 2}).threads is None
    # After a load: anything other than what the policy set.
    later = choose_threads({}, current=2, applied=1, defaults={1, 2})
    assert later.threads is None
    assert "torch.set_num_threads(2)" in later.reason
    # Unchanged since the policy set it: apply again (a no-op).
    assert choose_threads({}, current=1, applied=1, defaults={1, 2}).threads == 1


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_diffwidget_threads_says_how_to_fix(value: str) -> None:
    with pytest.raises(ValueError, match=r"DIFFWIDGET_THREADS=.* not a positive integer.*unset"):
        threads_from_env({"DIFFWIDGET_THREADS": value})


def test_empty_variable_counts_as_unset() -> None:
    assert threads_from_env({"DIFFWIDGET_THREADS": " "}) is None
    assert choose_threads({"OMP_NUM_THREADS": ""}, 2, None, {2}).threads == 1


def test_torch_defaults_include_logical_and_physical_counts() -> None:
    assert _threads.torch_default_threads(cpu_count=8) >= {8, 4}
    assert 1 in _threads.torch_default_threads(cpu_count=1)


LOAD_TWICE = """
import json, torch
import diffwidget
seen = {}
diffwidget.load_demo_pipeline()
seen["after_load"] = torch.get_num_threads()
torch.set_num_threads(2)  # the user's own choice, after loading
diffwidget.load_demo_pipeline()
seen["after_user_call_and_reload"] = torch.get_num_threads()
print(json.dumps(seen))
"""
APPLY = """
import json, torch
from diffwidget._threads import use_tiny_model_threads
print(json.dumps({"returned": use_tiny_model_threads(), "after_load": torch.get_num_threads()}))
"""


def run_fresh(script: str, extra_env: dict[str, str]) -> dict[str, int]:
    """Run ``script`` in a fresh interpreter: torch reads its thread variables only at start."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    env.update(extra_env, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.slow
def test_load_demo_pipeline_applies_the_policy_and_keeps_later_choices() -> None:
    seen = run_fresh(LOAD_TWICE, {})
    assert seen["after_load"] == TINY_MODEL_THREADS
    assert seen["after_user_call_and_reload"] == 2


def test_omp_num_threads_from_start_up_is_kept() -> None:
    seen = run_fresh(APPLY, {"OMP_NUM_THREADS": "2"})
    assert seen == {"returned": 2, "after_load": 2}


def test_diffwidget_threads_is_applied(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    monkeypatch.setenv("DIFFWIDGET_THREADS", "2")
    monkeypatch.setattr(_threads, "_applied", None)
    try:
        assert _threads.use_tiny_model_threads() == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
