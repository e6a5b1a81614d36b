"""Fixtures for the explanation methods: a traced tiny pipeline and analytic toy models.

``sd_trace`` uses the tracing core's ``trace`` when it is importable, and otherwise records
the same quantities by wrapping ``scheduler.step`` of a real pipeline call, so these tests
never depend on anything but diffusers' own loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from explain_toys import TOY_TOKEN, ToyPipe, make_toy_pipe, make_toy_trace

from diffwidget.tracing.trace import Trace

PROMPT = "a red circle on the left"
N_STEPS = 4
GUIDANCE = 7.5


def record_trace(
    pipe: Any, prompt: str, *, n_steps: int = N_STEPS, seed: int = 0, guidance: float = GUIDANCE
) -> Trace:
    """Run ``pipe`` and record x_t, t and the guided output at every ``scheduler.step`` call."""
    scheduler = pipe.scheduler
    records: list[tuple[torch.Tensor, int, torch.Tensor]] = []
    original = scheduler.step

    def step(model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *a: Any, **k: Any):
        records.append((sample.detach().clone(), int(timestep), model_output.detach().clone()))
        return original(model_output, timestep, sample, *a, **k)

    scheduler.step = step
    try:
        out = pipe(
            prompt,
            num_inference_steps=n_steps,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
        )
    finally:
        del scheduler.step
    cond, uncond = pipe.encode_prompt(prompt, torch.device("cpu"), 1, True)
    alphas = scheduler.alphas_cumprod
    latents = torch.cat([r[0] for r in records]).numpy()
    noise = torch.cat([r[2] for r in records]).numpy()
    ts = np.array([r[1] for r in records], dtype=np.int64)
    a = alphas[ts].numpy().reshape(-1, 1, 1, 1)
    pred_x0 = ((latents - np.sqrt(1 - a) * noise) / np.sqrt(a)).astype(np.float32)
    ids = pipe.tokenizer(prompt).input_ids
    n_words = len(ids) - 2
    keep = [*range(len(ids)), len(ids)]
    tokens = pipe.tokenizer.convert_ids_to_tokens(
        pipe.tokenizer(prompt, padding="max_length").input_ids[: len(keep)]
    )
    kinds = ["start"] + ["word"] * n_words + ["end", "pad"]
    return Trace(
        prompt=prompt,
        tokens=[t.replace("</w>", "") for t in tokens],
        token_kinds=kinds,  # type: ignore[arg-type]
        timesteps=ts,
        latents=latents,
        noise_pred=noise,
        pred_x0=pred_x0,
        final_latent=out.images[0].detach().numpy(),
        prompt_embeds=torch.cat([uncond, cond]).detach().numpy(),
        attention={},
        guidance_scale=guidance,
        meta={"token_indices": keep, "scheduler": type(scheduler).__name__},
    )


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
    context = pytest.importorskip("diffwidget.tracing.context")
    return context.trace(tiny_sdxl_pipe, PROMPT, num_inference_steps=2, seed=0)


@pytest.fixture
def toy_pipe() -> ToyPipe:
    """The analytic toy pipeline (fresh per test)."""
    return make_toy_pipe()


@pytest.fixture
def toy_trace(toy_pipe: ToyPipe) -> Trace:
    """A two-step trace for the toy pipeline."""
    return make_toy_trace(toy_pipe)


__all__ = ["GUIDANCE", "N_STEPS", "PROMPT", "TOY_TOKEN", "record_trace"]


def _freeze(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", value.detach().clone())
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [_freeze(v) for v in value])
    if isinstance(value, dict):
        return ("dict", {k: _freeze(v) for k, v in value.items()})
    if isinstance(value, np.ndarray):
        return ("array", value.copy())
    return ("value", value)


def _same(a: Any, b: Any) -> bool:
    if a[0] != b[0]:
        return False
    if a[0] == "tensor":
        return a[1].shape == b[1].shape and torch.equal(a[1], b[1])
    if a[0] == "array":
        return np.array_equal(a[1], b[1])
    if a[0] in ("list", "tuple"):
        return len(a[1]) == len(b[1]) and all(_same(x, y) for x, y in zip(a[1], b[1], strict=True))
    if a[0] == "dict":
        return a[1].keys() == b[1].keys() and all(_same(a[1][k], b[1][k]) for k in a[1])
    return bool(a[1] == b[1])


def scheduler_state(scheduler: Any) -> dict[str, Any]:
    """A deep snapshot of a scheduler's attributes and config for before/after comparisons."""
    state = {k: _freeze(v) for k, v in vars(scheduler).items()}
    state["__config__"] = _freeze(dict(scheduler.config))
    return state


def changed_keys(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Attribute names whose snapshot differs (including added or removed ones)."""
    keys = set(before) | set(after)
    return sorted(
        k for k in keys if k not in before or k not in after or not _same(before[k], after[k])
    )


def hook_counts(*modules: Any) -> int:
    """Total number of forward/backward hooks registered on ``modules`` and their children."""
    total = 0
    for root in modules:
        for m in root.modules():
            total += len(m._forward_hooks) + len(m._forward_pre_hooks)
            total += len(m._backward_hooks) + len(getattr(m, "_backward_pre_hooks", {}))
    return total


def processors(unet: Any) -> dict[str, Any]:
    """Attention processor objects by module path."""
    from diffwidget.explain.relevance import attention_modules

    return {path: m.processor for path, m in attention_modules(unet).items()}
