"""How many CPU threads torch uses for the embedded model, and how a user changes it.

The embedded model is tiny: its matrix products are too small to split across threads,
so extra threads only add synchronisation, and on a busy machine OpenMP's waiting
threads compete with everything else. On a busy 2-core machine (load average 5 to 10) one
20-step generation took 7 to 16 s with torch's default of 2 threads and 1.2 to 1.9 s with
one. So
:func:`~diffwidget.load_demo_pipeline` and the kernels that ``diffwidget demo`` starts
use one thread, unless the user chose otherwise:

- ``DIFFWIDGET_THREADS=N`` sets diffwidget's choice (for the library and the demo kernels);
- ``OMP_NUM_THREADS`` or ``MKL_NUM_THREADS``, read by torch at start-up, are left alone;
- ``torch.set_num_threads(n)`` is kept when called after loading, and when called before
  loading with any ``n`` other than torch's own default (for that one, set the variable).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

#: diffwidget's own setting: the torch thread count for the embedded model.
THREADS_ENV = "DIFFWIDGET_THREADS"
#: Variables torch reads once at start-up; a user who set one has chosen.
TORCH_THREAD_ENVS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: Threads for the embedded model: one (see the module docstring for the measurement).
TINY_MODEL_THREADS = 1
HOW_TO_CHANGE = (
    f"set {THREADS_ENV}=N (or OMP_NUM_THREADS=N) before starting Python, or call "
    "torch.set_num_threads(N) after loading the model"
)

_log = logging.getLogger("diffwidget")
#: The count this process's policy last set, to tell a later user call from our own.
_applied: int | None = None


@dataclass(frozen=True)
class ThreadChoice:
    """What the policy decided: a thread count to set, or ``None`` to leave torch alone."""

    threads: int | None
    reason: str


def threads_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """The count in ``DIFFWIDGET_THREADS``, or ``None`` if it is unset or empty.

    Raises
    ------
    ValueError
        If the variable is set to anything but a positive integer.

    Examples
    --------
    >>> threads_from_env({"DIFFWIDGET_THREADS": "2"})
    2
    >>> threads_from_env({}) is None
    True
    """
    environ = os.environ if environ is None else environ
    text = environ.get(THREADS_ENV, "").strip()
    if not text:
        return None
    try:
        threads = int(text)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(
            f"{THREADS_ENV}={text!r} is not a positive integer; set it to the number of torch "
            f"threads to use (e.g. {THREADS_ENV}=1), or unset it"
        )
    return threads


def torch_default_threads(cpu_count: int | None = None) -> set[int]:
    """Counts torch may pick on its own: all logical CPUs, or the physical cores (MKL)."""
    if cpu_count is None:
        try:
            cpu_count = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cpu_count = os.cpu_count() or 1
    counts = {cpu_count, max(cpu_count // 2, 1)}
    counts.add(os.cpu_count() or cpu_count)
    return counts


def choose_threads(
    environ: Mapping[str, str], current: int, applied: int | None, defaults: set[int]
) -> ThreadChoice:
    """The policy, without side effects.

    Parameters
    ----------
    environ : mapping
        The process environment.
    current : int
        ``torch.get_num_threads()`` now.
    applied : int or None
        What this policy set earlier in the process, if anything.
    defaults : set of int
        Counts torch may have picked on its own (:func:`torch_default_threads`).

    Examples
    --------
    >>> choose_threads({}, current=2, applied=None, defaults={2}).threads
    1
    >>> choose_threads({"OMP_NUM_THREADS": "4"}, 4, None, {2}).threads is None
    True
    """
    chosen = threads_from_env(environ)
    if chosen is not None:
        return ThreadChoice(chosen, f"{THREADS_ENV}={chosen}")
    for name in TORCH_THREAD_ENVS:
        if environ.get(name, "").strip():
            return ThreadChoice(None, f"{name}={environ[name]} is set")
    if applied is not None and current != applied:
        return ThreadChoice(None, f"torch.set_num_threads({current}) was called")
    if applied is None and current not in defaults:
        return ThreadChoice(None, f"torch.set_num_threads({current}) was called")
    return ThreadChoice(TINY_MODEL_THREADS, "the embedded model runs fastest on one thread")


def use_tiny_model_threads() -> int:
    """Apply the policy to torch in this process; returns the thread count in effect.

    Examples
    --------
    >>> use_tiny_model_threads()  # doctest: +SKIP
    1
    """
    global _applied
    import torch

    current = torch.get_num_threads()
    choice = choose_threads(os.environ, current, _applied, torch_default_threads())
    if choice.threads is None:
        return current
    if choice.threads != current:
        torch.set_num_threads(choice.threads)
        _log.info(
            "torch uses %d thread(s) (%s); to change: %s",
            choice.threads,
            choice.reason,
            HOW_TO_CHANGE,
        )
    _applied = choice.threads
    return choice.threads


def kernel_thread_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Variables to add to a notebook kernel's environment so its torch starts right.

    Kernels started by ``diffwidget demo`` run the bundled notebooks on the embedded model;
    ``OMP_NUM_THREADS`` makes every OpenMP library in them (torch, scikit-learn's BLAS)
    start with the policy's count. Nothing is added when the user set a thread variable.

    Examples
    --------
    >>> kernel_thread_env({})
    {'OMP_NUM_THREADS': '1'}
    >>> kernel_thread_env({"OMP_NUM_THREADS": "4"})
    {}
    """
    if any(environ.get(name, "").strip() for name in TORCH_THREAD_ENVS):
        return {}
    threads = threads_from_env(environ) or TINY_MODEL_THREADS
    return {"OMP_NUM_THREADS": str(threads)}
