"""One lock per pipeline: a trace, an explorer's DF-RISE and a run never interleave on it.

Tracing installs hooks on the denoiser and wraps the scheduler; DF-RISE, DF-CAM and the
faithfulness curves call the same denoiser from the explorer's worker thread. Two of them at
once see each other's calls (a trace counted DF-RISE's 500-mask batch as its own and failed
with advice about ``num_images_per_prompt``). Everything that drives a pipeline therefore
holds its lock: :func:`~diffwidget.tracing.generate.trace` and ``TraceContext`` (from
``__enter__`` to exit), each explorer job, each item of a run.

The lock belongs to the denoiser module when the pipeline has one (``unet`` or
``transformer``), else to the pipeline object: two pipeline objects built from one set of
components (``Pipeline(**pipe.components)``) share the modules the hooks go on, so they share
the lock. Locks are kept weakly: a pipeline that is dropped takes its lock with it. The lock is
reentrant, so code that already holds it (a run item that traces, then computes DF-RISE) may
take it again on the same thread.

Whoever waits does so for at most ``timeout`` seconds, then gets :class:`PipelineBusyError`
naming what holds the pipeline; a cancellable waiter (an explorer job) stops waiting as soon
as it is cancelled.
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

#: Seconds ``trace()`` / ``TraceContext`` wait for a pipeline another thread is using.
DEFAULT_WAIT_S = 60.0
#: Seconds between two checks of a waiter's cancellation.
POLL_S = 0.05
#: Characters of a prompt shown in a busy message.
_PROMPT_SHOWN = 40
#: Attributes that hold the denoiser the hooks attach to (diffusers' names).
_DENOISER_ATTRIBUTES = ("unet", "transformer")


class PipelineBusyError(RuntimeError):
    """Another thread holds the pipeline; the message names what runs and what to do."""


class PipelineLock:
    """A reentrant lock that knows what holds it (for the busy message)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._state = threading.Lock()  # guards the holder's description
        self._tasks: list[str] = []
        self._thread = ""
        self._how_to_stop = ""

    @property
    def holder(self) -> str | None:
        """What holds the lock now (its outermost task), or ``None``."""
        with self._state:
            return self._tasks[0] if self._tasks else None

    def acquire(
        self,
        task: str,
        timeout: float | None,
        cancelled: Callable[[], bool] | None = None,
        how_to_stop: str = "",
    ) -> bool:
        """Take the lock for ``task``; ``False`` if ``cancelled()`` turned true first.

        ``how_to_stop`` is what the busy message tells others waiting for this task.

        Raises
        ------
        PipelineBusyError
            When the lock is still held by another thread after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = POLL_S if cancelled is not None else -1
            if deadline is not None:
                left = max(deadline - time.monotonic(), 0.0)
                wait = left if wait < 0 else min(wait, left)
            if self._lock.acquire(timeout=wait):
                with self._state:
                    if not self._tasks:
                        self._thread = threading.current_thread().name
                        self._how_to_stop = how_to_stop
                    self._tasks.append(task)
                return True
            if cancelled is not None and cancelled():
                return False
            if deadline is not None and time.monotonic() >= deadline:
                raise PipelineBusyError(self._busy_message(task, timeout))

    def release(self) -> None:
        """Release one level of the lock (the thread must hold it)."""
        with self._state:
            self._tasks.pop()
        self._lock.release()

    def _busy_message(self, task: str, timeout: float | None) -> str:
        with self._state:
            holder = self._tasks[0] if self._tasks else "other work"
            thread, hint = self._thread, self._how_to_stop
        stop = f"cancel the {holder} ({hint}) or " if hint else ""
        return (
            f"pipeline busy: {holder} is running on it (thread {thread!r}); {stop}wait for it "
            f"to finish, then try again ({task} waited {timeout:g} s)"
        )


_registry_lock = threading.Lock()
#: id(owner) -> (weak reference to the owner, its lock).
_locks: dict[int, tuple[Callable[[], Any], PipelineLock]] = {}


def _owner(pipe: Any) -> Any:
    for name in _DENOISER_ATTRIBUTES:
        module = getattr(pipe, name, None)
        if module is not None:
            return module
    return pipe


def pipeline_lock(pipe: Any) -> PipelineLock:
    """The lock of ``pipe`` (created on first use, dropped with the pipeline).

    Examples
    --------
    >>> class Pipe: ...
    >>> pipe = Pipe()
    >>> pipeline_lock(pipe) is pipeline_lock(pipe)
    True
    """
    owner = _owner(pipe)
    key = id(owner)
    with _registry_lock:
        entry = _locks.get(key)
        if entry is not None and entry[0]() is owner:
            return entry[1]
        lock = PipelineLock()
        ref: Callable[[], Any]
        try:
            ref = weakref.ref(owner, _forgetter(key))
        except TypeError:  # not weakly referable: keep it alive, so its id is never reused
            ref = _Strong(owner)
        _locks[key] = (ref, lock)
        return lock


class _Strong:
    """A strong reference with ``weakref.ref``'s call interface."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner

    def __call__(self) -> Any:
        return self.owner


def _forgetter(key: int) -> Callable[[Any], None]:
    """The callback that drops ``key``'s lock once its owner is collected."""

    def forget(dead: Any) -> None:
        with _registry_lock:
            entry = _locks.get(key)
            if entry is not None and entry[0] is dead:
                del _locks[key]

    return forget


def trace_task(prompt: str | None) -> str:
    """How a busy message names a trace of ``prompt``.

    Examples
    --------
    >>> trace_task("a red circle")
    "the trace of 'a red circle'"
    """
    if prompt is None:
        return "a TraceContext"
    shown = prompt if len(prompt) <= _PROMPT_SHOWN else prompt[: _PROMPT_SHOWN - 1] + "…"
    return f"the trace of {shown!r}"


@contextlib.contextmanager
def hold_pipeline(
    pipe: Any,
    task: str,
    *,
    timeout: float | None = None,
    cancelled: Callable[[], bool] | None = None,
    how_to_stop: str = "",
) -> Iterator[bool]:
    """Hold ``pipe``'s lock for ``task`` inside the block; yields ``False`` if cancelled.

    Parameters
    ----------
    pipe : diffusers pipeline or None
        ``None`` holds nothing (an explorer without a pipeline).
    task : str
        What runs, as the busy message names it ("DF-RISE at step 3", "trace('a cat')").
    timeout : float, optional
        Seconds to wait for another thread's work; default :data:`DEFAULT_WAIT_S`.
    cancelled : callable, optional
        Polled while waiting; when it returns True the block runs without the lock and
        gets ``False`` (it should return at once).
    how_to_stop : str
        How others can stop ``task`` ("explorer.cancel() or the cancel button"), for their
        busy message.

    Raises
    ------
    PipelineBusyError
        When the pipeline stays busy for ``timeout`` seconds.

    Examples
    --------
    >>> from diffwidget.testing.tiny import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> with hold_pipeline(pipe, "my experiment") as held:
    ...     held, pipeline_lock(pipe).holder
    (True, 'my experiment')
    """
    if pipe is None:
        yield True
        return
    lock = pipeline_lock(pipe)
    wait = DEFAULT_WAIT_S if timeout is None else timeout
    if not lock.acquire(task, wait, cancelled, how_to_stop):
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


__all__ = [
    "DEFAULT_WAIT_S",
    "PipelineBusyError",
    "PipelineLock",
    "hold_pipeline",
    "pipeline_lock",
    "trace_task",
]
