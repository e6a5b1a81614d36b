"""Helpers shared by the explanation tests (imported by name; fixtures live in conftest)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diffwidget.tracing.trace import Trace

PROMPT = "a red circle on the left"
N_STEPS = 4
GUIDANCE = 7.5

#: Settings that keep a method quick on the tiny pipeline where its defaults are slow; the
#: others run with their defaults, so a newly registered method is covered unedited.
FAST: dict[str, dict[str, Any]] = {
    "df_rise": {"n_masks": 6, "batch_size": 4},
    "concept_maps": {"words": ["circle", "square"], "steps": [1]},
}


def record_trace(
    pipe: Any, prompt: str, *, n_steps: int = N_STEPS, seed: int = 0, guidance: float = GUIDANCE
) -> Trace:
    """A traced run of ``pipe`` without decoded previews (the methods never need them)."""
    from diffwidget.tracing.generate import trace

    return trace(
        pipe,
        prompt,
        num_inference_steps=n_steps,
        guidance_scale=guidance,
        seed=seed,
        decode_previews=False,
    )


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
    """Total number of hooks on ``modules`` and their children: torch's forward/backward
    hooks, diffusers ``HookRegistry`` entries (and empty registries) and patched ``forward``
    attributes."""
    total = 0
    for root in modules:
        for m in root.modules():
            total += len(m._forward_hooks) + len(m._forward_pre_hooks)
            total += len(m._backward_hooks) + len(getattr(m, "_backward_pre_hooks", {}))
            registry = getattr(m, "_diffusers_hook", None)
            if registry is not None:
                total += max(1, len(registry.hooks))
            total += "forward" in vars(m)
    return total


def processors(unet: Any) -> dict[str, Any]:
    """Attention processor objects by module path."""
    return {path: m.processor for path, m in unet.named_modules() if hasattr(m, "set_processor")}
