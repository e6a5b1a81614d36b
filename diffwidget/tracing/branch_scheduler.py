"""The solver state of branches: rebuilt from a trace's recorded outputs, batched over rows.

Multistep solvers (DPM-Solver++, UniPC, PLMS) remember the model outputs of earlier steps;
a branch that starts at step ``k`` needs the history the trace had at ``k``. A
:class:`RecordedSolver` rebuilds it without calling the denoiser: a copy of the scheduler
template is stepped with the trace's recorded guided outputs and latents, and every step is
checked against the recorded next latent (a stochastic sampler, or a scheduler set up
otherwise, fails there with a clear error instead of branching from a wrong state).

All branches of a run share one scheduler object whose per-row state tensors (the history,
``last_sample``...) hold one row per branch: every step the solver applies is elementwise
per sample with scalar coefficients, and its counters (step index, lower-order count)
depend on the step alone, which every row shares. Rows that start at step ``k`` join with
the recorded solver's state at ``k`` (:func:`join_rows`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from diffwidget.tracing.families import DenoiserFamily, LatentLayout
    from diffwidget.tracing.trace import Trace

#: Relative tolerance of the check that a recorded step is reproduced by the rebuilt
#: solver (the same arithmetic on the same device reproduces it exactly).
REPLAY_RTOL = 1e-4


class BranchSchedulerError(ValueError):
    """The scheduler cannot continue a trace's trajectory (stochastic, or set up otherwise)."""


def _rows(tensor: Any, row_shape: tuple[int, ...]) -> bool:
    return (
        isinstance(tensor, torch.Tensor)
        and tensor.ndim == len(row_shape) + 1
        and tuple(tensor.shape[1:]) == row_shape
    )


def step_latents(
    scheduler: Any, output: torch.Tensor, step: int, sample: torch.Tensor
) -> torch.Tensor:
    """``scheduler.step`` at loop index ``step`` as the pipelines call it; the next latents."""
    t = scheduler.timesteps[step]
    return scheduler.step(output, t, sample, return_dict=False)[0]


def model_input(scheduler: Any, sample: torch.Tensor, step: int) -> torch.Tensor:
    """``scale_model_input`` where the scheduler has one (flow-matching schedulers have none)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return sample if scale is None else scale(sample, scheduler.timesteps[step])


class RecordedSolver:
    """A copy of the scheduler template stepped along one trace's recorded trajectory.

    Parameters
    ----------
    template : diffusers scheduler
        Set up for the trace's timesteps, never stepped (copied here).
    trace : Trace
        Supplies the recorded latents and guided outputs.
    family : DenoiserFamily
        Packs latents the way the scheduler sees them (Flux).
    layout : LatentLayout
        The trace's latent layout.
    dtype : torch.dtype
        The dtype the pipeline's latents had (the denoiser's).
    device : torch.device
        Where the denoiser runs.
    """

    def __init__(
        self,
        template: Any,
        trace: Trace,
        family: DenoiserFamily,
        layout: LatentLayout,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        #: The solver before step k, for every k reached so far (small: schedule arrays and
        #: a few history rows), so that runs can start rows at any reached step.
        self.states = [copy.deepcopy(template)]
        self.trace = trace
        self.family = family
        self.layout = layout
        self.dtype = dtype
        self.device = device

    def latent(self, step: int) -> torch.Tensor:
        """The recorded ``x_step`` as the scheduler sees it (``[1, ...]``; ``step = n`` is the
        final latent)."""
        trace = self.trace
        array = trace.final_latent if step == trace.n_steps else trace.latents[step]
        x = torch.as_tensor(np.asarray(array)).unsqueeze(0).to(self.device, self.dtype)
        return self.family.to_model_input(x, self.layout)

    def output(self, step: int) -> torch.Tensor:
        """The recorded guided model output of ``step`` as the scheduler received it."""
        x = torch.as_tensor(np.asarray(self.trace.noise_pred[step])).unsqueeze(0)
        return self.family.to_model_input(x.to(self.device, self.dtype), self.layout)

    def advance_to(self, step: int) -> Any:
        """The solver before ``step`` of the recorded trajectory (not to be stepped: copy it).

        Raises
        ------
        BranchSchedulerError
            When a recorded step is not reproduced (largest deviation in the message).
        """
        while len(self.states) <= step:
            j = len(self.states) - 1
            scheduler = copy.deepcopy(self.states[j])
            sample = self.latent(j)
            # Schedulers that scale the input do so at every step before `step` is called
            # (Euler sets its step index there).
            model_input(scheduler, sample, j)
            prev = step_latents(scheduler, self.output(j), j, sample)
            want = self.latent(j + 1)
            gap = float((prev.double() - want.double()).abs().max())
            scale = float(want.double().abs().max()) + 1.0
            if not bool(torch.isfinite(prev).all()) or gap > REPLAY_RTOL * scale:
                raise BranchSchedulerError(
                    f"{type(scheduler).__name__} does not reproduce the trace's step {j} "
                    f"from its recorded output (largest deviation {gap:.3g}): branches need "
                    "the deterministic sampler the trace was made with (not an ancestral or "
                    "SDE sampler, which draws new noise every step)"
                )
            self.states.append(scheduler)
        return self.states[step]


def _expand(value: torch.Tensor, count: int) -> torch.Tensor:
    return value.expand(count, *value.shape[1:])


def _join_value(
    name: str, mine: Any, theirs: Sequence[tuple[Any, int]], row_shape: tuple[int, ...]
) -> Any:
    if _rows(mine, row_shape):
        parts = [mine]
        for other, count in theirs:
            if not _rows(other, row_shape):
                raise BranchSchedulerError(f"scheduler state {name!r} differs between branches")
            parts.append(_expand(other, count))
        return torch.cat(parts)
    if isinstance(mine, (list, tuple)):
        items = [
            _join_value(
                f"{name}[{i}]", item, [(other[i], count) for other, count in theirs], row_shape
            )
            for i, item in enumerate(mine)
        ]
        return type(mine)(items)
    return mine


def join_rows(
    scheduler: Any | None, sources: Sequence[tuple[Any, int]], row_shape: tuple[int, ...]
) -> Any:
    """The branch scheduler with ``count`` new rows per ``(recorded scheduler, count)``.

    ``scheduler`` holds the running rows (None before the first rows start); every scheduler
    must have made the same number of steps.

    Raises
    ------
    BranchSchedulerError
        When the schedulers are at different steps or their states do not line up.
    """
    if not sources:
        if scheduler is None:
            raise ValueError("no rows to start")
        return scheduler
    if scheduler is None:
        first, count = sources[0]
        scheduler = copy.deepcopy(first)
        for name, value in vars(first).items():
            vars(scheduler)[name] = _join_value(
                name, _shrink(value, row_shape), [(value, count)], row_shape
            )
        sources = sources[1:]
    index = getattr(scheduler, "_step_index", None)
    for other, _ in sources:
        if getattr(other, "_step_index", None) != index:
            raise BranchSchedulerError(
                "branch rows joined a solver at another step; this is a bug in the branch runner"
            )
    for name, value in list(vars(scheduler).items()):
        vars(scheduler)[name] = _join_value(
            name, value, [(vars(other)[name], count) for other, count in sources], row_shape
        )
    return scheduler


def _shrink(value: Any, row_shape: tuple[int, ...]) -> Any:
    """An empty (zero-row) copy of per-row state, so that joining only appends rows."""
    if _rows(value, row_shape):
        return value[:0]
    if isinstance(value, (list, tuple)):
        return type(value)(_shrink(item, row_shape) for item in value)
    return value
