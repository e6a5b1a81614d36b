"""Shared fixtures: tiny random-weight pipelines built from configs, offline, in seconds.

Session-scoped pipelines are shared by many tests: a test that changes a pipeline
(scheduler, attention slicing, processors) must build its own with the ``*_factory``
fixtures instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP's
# spinning threads made the tracing tests ten times slower (287 s vs 30 s for the same
# two tests). Set before torch is first imported; an explicit OMP_NUM_THREADS wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Nothing in the tests may reach the model hub; make any accidental attempt fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from diffwidget.tracing.trace import Trace

from tests.family_cases import build_family_case

#: The prompt of ``tiny_trace``; every word is one token of the tiny tokenizer.
TINY_PROMPT = "a red circle on the left"
#: Steps of ``tiny_trace`` (enough for DPM-Solver++ to reach its second-order updates).
TINY_STEPS = 5


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for the tiny word-level tokenizers."""
    return tmp_path_factory.mktemp("tokenizer")


@pytest.fixture(scope="session")
def tiny_sd_pipe_factory(tiny_tokenizer_dir: Path) -> Callable[..., StableDiffusionPipeline]:
    """Builds a fresh tiny ``StableDiffusionPipeline``: ``factory(seed=0, scheduler="dpm++")``."""
    from diffwidget.testing.tiny import tiny_sd_pipeline

    def build(**kwargs: Any) -> StableDiffusionPipeline:
        kwargs.setdefault("tokenizer_dir", tiny_tokenizer_dir / "sd")
        return tiny_sd_pipeline(**kwargs)

    return build


@pytest.fixture(scope="session")
def tiny_sdxl_pipe_factory(tiny_tokenizer_dir: Path) -> Callable[..., StableDiffusionXLPipeline]:
    """Builds a fresh tiny ``StableDiffusionXLPipeline``: ``factory(seed=0, scheduler="dpm++")``."""
    from diffwidget.testing.tiny import tiny_sdxl_pipeline

    def build(**kwargs: Any) -> StableDiffusionXLPipeline:
        kwargs.setdefault("tokenizer_dir", tiny_tokenizer_dir / "sdxl")
        return tiny_sdxl_pipeline(**kwargs)

    return build


@pytest.fixture(scope="session")
def tiny_sd_pipe(
    tiny_sd_pipe_factory: Callable[..., StableDiffusionPipeline],
) -> StableDiffusionPipeline:
    """Tiny random-weight SD pipeline (DPM-Solver++, 32x32 images, 16x16 latents). Do not mutate."""
    return tiny_sd_pipe_factory()


@pytest.fixture(scope="session")
def tiny_sdxl_pipe(
    tiny_sdxl_pipe_factory: Callable[..., StableDiffusionXLPipeline],
) -> StableDiffusionXLPipeline:
    """Tiny random-weight SDXL pipeline (two text encoders, added conditioning). Do not mutate."""
    return tiny_sdxl_pipe_factory()


@pytest.fixture(scope="session")
def tiny_trace(tiny_sd_pipe: StableDiffusionPipeline) -> Trace:
    """A traced 5-step run of ``tiny_sd_pipe`` (prompt ``TINY_PROMPT``, seed 0, CFG 7.5)."""
    from diffwidget.tracing.generate import trace

    return trace(tiny_sd_pipe, TINY_PROMPT, num_inference_steps=TINY_STEPS, seed=0)


@pytest.fixture(scope="session")
def family_case() -> Callable[[str], tuple[Any, dict[str, Any]]]:
    """``family_case(name) -> (pipe, kwargs)``, one shared pipeline per case. Do not mutate."""
    cache: dict[str, tuple[Any, dict[str, Any]]] = {}

    def get(name: str) -> tuple[Any, dict[str, Any]]:
        if name not in cache:
            cache[name] = build_family_case(name)
        pipe, kwargs = cache[name]
        return pipe, dict(kwargs)

    return get


@pytest.fixture(scope="session")
def family_trace(
    family_case: Callable[[str], tuple[Any, dict[str, Any]]],
) -> Callable[[str], Trace]:
    """``family_trace(name)``: a 3-step trace of the case's shared pipeline (cached)."""
    from diffwidget.tracing.generate import trace

    cache: dict[str, Trace] = {}

    def get(name: str) -> Trace:
        if name not in cache:
            pipe, kwargs = family_case(name)
            cache[name] = trace(pipe, TINY_PROMPT, num_inference_steps=3, seed=1, **kwargs)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    """Headless Debian chromium driven by playwright, shared by every browser test.

    One instance for the whole session: playwright's sync API refuses to start a second
    instance in a thread whose first one is still open.
    """
    playwright_api = pytest.importorskip("playwright.sync_api")
    from bench.browserlib import CHROMIUM_ARGS

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        pytest.skip("chromium is not installed (make browser)")
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
