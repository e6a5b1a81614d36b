"""Perturbation operators of insertion/deletion: what each probe latent holds, computed by hand."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from diffwidget.explain.faithfulness import (
    AUC_OPERATORS,
    OPERATOR_TEXT,
    InsertionDeletion,
    blur_latent,
)
from diffwidget.tracing.replay import StepReplay
from diffwidget.tracing.trace import Trace

STEP = 2


def _probes(pipe: Any, trace: Trace, operator: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The latents the evaluator sends for the saliency ordering (deletion then insertion)."""
    seen: list[torch.Tensor] = []
    original = StepReplay.predict

    def record(self: StepReplay, latents: torch.Tensor, step: int, quantity: Any = "x0", **kw: Any):
        seen.append(latents.detach().clone())
        return original(self, latents, step, quantity, **kw)

    monkeypatch.setattr(StepReplay, "predict", record)
    h, w = trace.latent_shape
    ranking = np.arange(h * w, dtype=np.float64)[::-1].reshape(h, w)  # cell 0 first
    evaluator = InsertionDeletion(n_random=1, operator=operator, batch_size=1000, seed=3)
    result = evaluator.evaluate(pipe, trace, STEP, ranking)
    monkeypatch.undo()
    # seen[0] is the reference prediction; seen[1] the saliency ordering's stages.
    stages = seen[1]
    n = len(stages) // 2
    return stages[:n], stages[n:], result


@pytest.mark.parametrize("operator", AUC_OPERATORS)
def test_each_operator_fills_cells_as_documented(
    operator: str, tiny_sd_pipe: Any, tiny_trace: Trace, monkeypatch: pytest.MonkeyPatch
) -> None:
    deleted, inserted, result = _probes(tiny_sd_pipe, tiny_trace, operator, monkeypatch)
    x = torch.as_tensor(tiny_trace.latents[STEP])[None].float()
    h, w = tiny_trace.latent_shape
    if operator == "renoise":
        # Fresh noise at the step's own level: sqrt(1 - alphas_cumprod[t]) for DPM-Solver++.
        a = float(tiny_sd_pipe.scheduler.alphas_cumprod[int(tiny_trace.timesteps[STEP])])
        gen = torch.Generator().manual_seed(3)
        fill = (1.0 - a) ** 0.5 * torch.randn(x.shape, generator=gen)
        removed, start = fill, fill
    else:
        zero, blurred = torch.zeros_like(x), blur_latent(x)
        removed = blurred if operator == "blur" else zero
        start = zero if operator == "zero" else blurred
    # The last stage deletes (and inserts) every cell; stage 0 none.
    torch.testing.assert_close(deleted[0:1], x)
    torch.testing.assert_close(deleted[-1:], removed[0:1].expand_as(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(inserted[0:1], start, atol=1e-6, rtol=0)
    torch.testing.assert_close(inserted[-1:], x)
    # A middle stage: the first k cells (row-major, the ranking's order) are replaced.
    k = 40
    stage = next(i for i in range(len(deleted)) if (deleted[i] != x[0]).any(0).sum() >= k)
    changed = (deleted[stage] != x[0]).any(0).flatten()
    assert changed[: int(changed.sum())].all()  # a prefix of the order, nothing else
    assert result.meta["operator"] == operator
    assert result.meta["operator_text"] == OPERATOR_TEXT[operator]
    assert changed.numel() == h * w


def test_unknown_operator_is_refused() -> None:
    with pytest.raises(ValueError, match="use one of"):
        InsertionDeletion(operator="noise")
