"""Time-step schedules that spend the denoising steps in chosen noise bands (the paper's R3).

The paper (Park, Ju & Lee 2024, Sec. 3.4) compares generations whose steps crowd at high
noise ("early", semantic) or at low noise ("latter", delicate detail). With
``a = T^(1 / (N + lambda))`` (``T`` = number of training timesteps, 1000 for SD):

* early: ``t = [T - 1] + [T - floor(a^(i + 1 + lambda)) for i in 0..N-2]``
* latter: ``sorted(floor(a^(i + 1 + lambda)) for i in 0..N-1)``, descending

and a window variant places most steps inside one band of ``t``. Every schedule is
validated (integers in ``[0, T)``, unique, strictly decreasing) before it reaches a
scheduler, because diffusers schedulers accept duplicate or rising timesteps silently.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

ScheduleName = Literal["uniform", "early", "latter", "window"]

#: Training timesteps of Stable Diffusion's noise schedule.
TRAIN_TIMESTEPS = 1000
#: The paper's settings: 30 steps, lambda = 60.
PAPER_STEPS = 30
PAPER_LAMBDA = 60
#: Window variant defaults: a 50-wide band, with a few uniform steps outside it.
WINDOW_WIDTH = 50
WINDOW_OUTSIDE = 5


def validate_timesteps(
    timesteps: Sequence[int], num_train_timesteps: int = TRAIN_TIMESTEPS
) -> list[int]:
    """Check a schedule and return it as a list of ints.

    Raises
    ------
    ValueError
        If a timestep is outside ``[0, num_train_timesteps)``, repeats, or the sequence is
        not strictly decreasing; the message names the offending positions.
    """
    ts = [int(t) for t in timesteps]
    if len(ts) == 0:
        raise ValueError("the schedule is empty; ask for at least one step")
    if any(float(t) != float(o) for t, o in zip(ts, timesteps, strict=True)):
        raise ValueError("timesteps must be integers (training-timestep indices)")
    bad = [t for t in ts if not 0 <= t < num_train_timesteps]
    if bad:
        raise ValueError(
            f"timesteps {bad} are outside [0, {num_train_timesteps}); the scheduler was "
            f"trained with {num_train_timesteps} timesteps"
        )
    dupes = sorted({t for t in ts if ts.count(t) > 1})
    if dupes:
        raise ValueError(
            f"timesteps {dupes} repeat; with these settings the exponential spacing rounds "
            "several steps to the same t: use fewer steps or a larger lambda"
        )
    rising = [i for i in range(1, len(ts)) if ts[i] >= ts[i - 1]]
    if rising:
        raise ValueError(
            f"timesteps must be strictly decreasing; positions {rising} are not "
            f"(got {ts[: min(len(ts), 8)]}...)"
        )
    return ts


def uniform_timesteps(n: int, num_train_timesteps: int = TRAIN_TIMESTEPS) -> list[int]:
    """``n`` evenly spaced timesteps from ``T - 1`` down to 0 ("trailing" spacing)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    ts = np.round(np.linspace(num_train_timesteps - 1, 0, n)).astype(int).tolist()
    return validate_timesteps(ts, num_train_timesteps)


def exponential_timesteps(
    n: int = PAPER_STEPS,
    lam: float = PAPER_LAMBDA,
    kind: Literal["early", "latter"] = "early",
    num_train_timesteps: int = TRAIN_TIMESTEPS,
) -> list[int]:
    """The paper's exponential schedules.

    Parameters
    ----------
    n : int
        Number of steps ``N``.
    lam : float
        ``lambda``: larger values spread the steps more evenly.
    kind : {"early", "latter"}
        ``"early"`` crowds steps at high noise (large ``t``), ``"latter"`` at low noise.
    num_train_timesteps : int
        ``T``.

    Examples
    --------
    >>> ts = exponential_timesteps(30, 60, "early")
    >>> ts[:3], len(ts)
    ([999, 893, 884], 30)
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if lam < 0:
        raise ValueError(f"lambda must be non-negative, got {lam}")
    big = num_train_timesteps
    a = big ** (1.0 / (n + lam))
    if kind == "early":
        ts = [big - 1] + [big - math.floor(a ** (i + 1 + lam)) for i in range(n - 1)]
    elif kind == "latter":
        # The largest exponent gives a^(N + lambda) = T itself, one past the last index.
        ts = sorted((min(math.floor(a ** (i + 1 + lam)), big - 1) for i in range(n)), reverse=True)
    else:
        raise ValueError(f"unknown kind {kind!r}; use 'early' or 'latter'")
    return validate_timesteps(ts, big)


def window_timesteps(
    n: int,
    center: int,
    width: int = WINDOW_WIDTH,
    n_outside: int = WINDOW_OUTSIDE,
    num_train_timesteps: int = TRAIN_TIMESTEPS,
) -> list[int]:
    """Most steps inside the band ``[center - width/2, center + width/2]``, a few outside.

    ``n_outside`` steps are spread uniformly over the whole range (always including
    ``T - 1`` so generation starts from pure noise); the other ``n - n_outside`` steps
    are spread uniformly inside the band.
    """
    if not 0 <= n_outside < n:
        raise ValueError(f"n_outside must be in [0, n), got {n_outside} for n={n}")
    lo = max(0, center - width // 2)
    hi = min(num_train_timesteps - 1, center + width // 2)
    inside = n - n_outside
    if hi - lo + 1 < inside:
        raise ValueError(
            f"the band [{lo}, {hi}] has {hi - lo + 1} timesteps but {inside} steps should go "
            "inside it: widen the band or use fewer steps"
        )
    band = set(np.round(np.linspace(hi, lo, inside)).astype(int).tolist())
    outside = [
        t
        for t in np.round(np.linspace(num_train_timesteps - 1, 0, n_outside + 2))
        .astype(int)
        .tolist()
        if not lo <= t <= hi
    ]
    ts = sorted(band | set(outside[:n_outside]), reverse=True)
    return validate_timesteps(ts, num_train_timesteps)


def make_schedule(name: ScheduleName, n: int, **kwargs: Any) -> list[int]:
    """Build a schedule by name: ``uniform``, ``early``, ``latter`` or ``window``.

    ``kwargs`` go to the generator (``lam`` for early/latter, ``center``/``width``/
    ``n_outside`` for window, ``num_train_timesteps`` for all).
    """
    if name == "uniform":
        return uniform_timesteps(n, **kwargs)
    if name in ("early", "latter"):
        return exponential_timesteps(n, kind=name, **kwargs)
    if name == "window":
        return window_timesteps(n, **kwargs)
    raise ValueError(f"unknown schedule {name!r}; use 'uniform', 'early', 'latter' or 'window'")


def check_scheduler_accepts(scheduler: Any, timesteps: Sequence[int]) -> list[int]:
    """Validate ``timesteps`` for ``scheduler`` and check it takes custom timesteps.

    Raises
    ------
    TypeError
        If ``scheduler.set_timesteps`` has no ``timesteps`` argument.
    ValueError
        If the schedule is invalid for the scheduler's training range.
    """
    params = inspect.signature(scheduler.set_timesteps).parameters
    if "timesteps" not in params:
        raise TypeError(
            f"{type(scheduler).__name__} does not accept custom timesteps; switch to one that "
            "does, e.g. pipe.scheduler = DPMSolverMultistepScheduler.from_config("
            "pipe.scheduler.config) (or EulerDiscreteScheduler)"
        )
    big = int(scheduler.config.get("num_train_timesteps", TRAIN_TIMESTEPS))
    return validate_timesteps(timesteps, big)


def run_with_timesteps(
    pipe: Any, prompt: str, timesteps: Sequence[int], *, traced: bool = False, **kwargs: Any
) -> Any:
    """Run ``pipe`` on ``prompt`` with a custom schedule, validated for its scheduler.

    Parameters
    ----------
    pipe : DiffusionPipeline
        A pipeline whose scheduler accepts ``timesteps=`` (DPM-Solver++, Euler, ...).
    prompt : str
        The prompt.
    timesteps : sequence of int
        A schedule from this module (or any valid one).
    traced : bool
        Return a :class:`~diffwidget.tracing.trace.Trace` recorded by
        :func:`diffwidget.tracing.generate.trace` instead of the pipeline's output.
    **kwargs
        Passed to the pipeline call or to ``trace`` (``guidance_scale``, ``seed``, ...).

    Returns
    -------
    The pipeline's output, or a ``Trace`` with ``traced=True``.

    Examples
    --------
    >>> early = exponential_timesteps(30, 60, "early")
    >>> tr = run_with_timesteps(pipe, "a red circle", early, traced=True)  # doctest: +SKIP
    >>> tr.timesteps.tolist() == early  # doctest: +SKIP
    True
    """
    ts = check_scheduler_accepts(pipe.scheduler, timesteps)
    if "num_inference_steps" in kwargs:
        raise ValueError("pass either timesteps or num_inference_steps, not both")
    if traced:
        from diffwidget.tracing.generate import trace

        return trace(pipe, prompt, num_inference_steps=len(ts), timesteps=ts, **kwargs)
    return pipe(prompt, timesteps=ts, **kwargs)
