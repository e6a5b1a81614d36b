"""Fixtures for the explanation methods: a traced tiny pipeline and analytic toy models.

``sd_trace`` is a real traced run of a tiny random-weight pipeline; the toys have answers
known by construction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from explain_support import GUIDANCE, N_STEPS, PROMPT, record_trace
from explain_toys import TOY_TOKEN, ToyPipe, make_toy_pipe, make_toy_trace

from diffwidget.tracing.trace import Trace


@pytest.fixture(scope="session")
def sd_pipe(tiny_sd_pipe_factory: Callable[..., Any]) -> Any:
    """A private tiny SD pipeline (DPM-Solver++); tests here may install processors on it."""
    return tiny_sd_pipe_factory(seed=0)


@pytest.fixture(scope="session")
def sd_trace(sd_pipe: Any) -> Trace:
    """A recorded 4-step run of ``sd_pipe``."""
    return record_trace(sd_pipe, PROMPT)


@pytest.fixture(scope="session")
def sdxl_trace(tiny_sdxl_pipe: Any) -> Trace:
    """A 2-step run of the tiny SDXL pipeline traced by the tracing core (skips without it)."""
    generate = pytest.importorskip("diffwidget.tracing.generate")
    return generate.trace(tiny_sdxl_pipe, PROMPT, num_inference_steps=2, seed=0)


@pytest.fixture
def toy_pipe() -> ToyPipe:
    """The analytic toy pipeline (fresh per test)."""
    return make_toy_pipe()


@pytest.fixture
def toy_trace(toy_pipe: ToyPipe) -> Trace:
    """A two-step trace for the toy pipeline."""
    return make_toy_trace(toy_pipe)


__all__ = ["GUIDANCE", "N_STEPS", "PROMPT", "TOY_TOKEN", "record_trace"]
