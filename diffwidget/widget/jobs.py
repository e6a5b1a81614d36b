"""Heavy work in one background thread: coalesced, cancellable, with progress.

The kernel's main thread must stay free to answer the slider, so DF-RISE, DF-CAM and
faithfulness curves run in a worker thread. Two kinds of requests share it:

* **view requests** follow what the view shows (the overlay at the slider's step). Only the
  newest matters while a user scrubs: a new one replaces the pending one (coalescing) and
  asks a running *view* request to stop at its next progress call (stale cancellation);
  the method then returns its partial estimate, which is not cached.
* **explicit requests** come from code (``explorer.compute(...)``). They queue in order and
  run before pending view requests; view requests never replace or stop them. Only
  :meth:`Jobs.cancel` (the cancel button, ``explorer.cancel()``) stops them.

Each request holds its pipeline's lock (:mod:`diffwidget.tracing.lock`) while it runs, so a
``trace()`` in a cell and the slider's DF-RISE wait for each other instead of interleaving.
A request waiting for the lock stops waiting when it is cancelled.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from diffwidget.tracing.lock import hold_pipeline

#: Seconds between two progress updates pushed to the view (a trait sync each).
PROGRESS_INTERVAL_S = 0.05
#: Seconds a request waits for a pipeline another thread uses (a trace in a cell, another
#: explorer's job) before it fails with "pipeline busy"; cancelling stops the wait at once.
PIPELINE_WAIT_S = 600.0
#: How a busy message tells others to stop a running request.
HOW_TO_CANCEL = "explorer.cancel() or the cancel button"

Runner = Callable[["Request", Callable[[int, int], bool]], Any]


class Work(Protocol):
    """A typed record of one computation (an overlay at a step, faithfulness of a map)."""

    @property
    def key(self) -> tuple[Any, ...]:
        """What is computed, e.g. ``("overlay", "df_rise", 3)``; equal keys are one request."""
        ...

    @property
    def label(self) -> str:
        """How status lines and errors name it ("DF-RISE at step 3")."""
        ...


@dataclass
class Request:
    """One queued computation: its typed work record and the queue's bookkeeping.

    Attributes
    ----------
    work : Work
        What to compute, with everything the runner needs.
    explicit : bool
        Made in code: never replaced or stopped by view requests.
    """

    work: Work
    explicit: bool = False
    future: Future = field(default_factory=Future)
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> tuple[Any, ...]:
        """The work's identity."""
        return self.work.key

    @property
    def label(self) -> str:
        """The work's name in status lines."""
        return self.work.label


class Jobs:
    """Run requests one at a time on a daemon thread.

    Parameters
    ----------
    run : callable
        ``run(request, progress) -> result``; ``progress(done, total)`` returns False when
        the work should stop.
    on_start, on_progress, on_done, on_cancel, on_error : callable
        Notifications, called from the worker thread.
    pipeline : diffusers pipeline, optional
        Whose lock each request holds while it runs (none without a pipeline).
    """

    def __init__(
        self,
        run: Runner,
        *,
        on_start: Callable[[Request], None],
        on_progress: Callable[[Request, float], None],
        on_done: Callable[[Request, Any], None],
        on_cancel: Callable[[Request, Any], None],
        on_error: Callable[[Request, BaseException], None],
        pipeline: Any = None,
    ) -> None:
        self._run = run
        self._pipeline = pipeline
        self._on_start = on_start
        self._on_progress = on_progress
        self._on_done = on_done
        self._on_cancel = on_cancel
        self._on_error = on_error
        self._lock = threading.Condition()
        self._explicit: deque[Request] = deque()
        self._pending: Request | None = None
        self._current: Request | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        """Whether a request is running or waiting."""
        with self._lock:
            return self._current is not None or self._pending is not None or bool(self._explicit)

    @property
    def waiting(self) -> bool:
        """Whether a request waits behind the running one."""
        with self._lock:
            return self._pending is not None or bool(self._explicit)

    def _live(self) -> list[Request]:
        live = [*self._explicit, self._pending, self._current]
        return [r for r in live if r is not None and not r.cancel.is_set()]

    def submit(self, work: Work, *, explicit: bool = False) -> Future:
        """Queue ``work``; see the module docstring for how view and code requests differ."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this explorer was closed; create a new one")
            for live in self._live():
                if live.key == work.key:
                    if explicit and not live.explicit:
                        live.explicit = True  # now protected from later view requests
                        if live is self._pending:
                            self._pending = None
                            self._explicit.append(live)
                    return live.future
            request = Request(work, explicit)
            if explicit:
                self._explicit.append(request)
            else:
                if self._pending is not None:
                    self._pending.cancel.set()
                    self._pending.future.cancel()
                if self._current is not None and not self._current.explicit:
                    self._current.cancel.set()
                self._pending = request
            self._ensure_thread()
            self._lock.notify_all()
            return request.future

    def cancel(self) -> bool:
        """Stop the running request and drop every waiting one; True if anything was live."""
        with self._lock:
            dropped = [*self._explicit, self._pending]
            self._explicit.clear()
            self._pending = None
            live = False
            for request in dropped:
                if request is not None:
                    request.cancel.set()
                    request.future.cancel()
                    live = True
            if self._current is not None:
                self._current.cancel.set()
                live = True
            return live

    def close(self, timeout: float | None = None) -> None:
        """Cancel everything and end the worker thread (waiting up to ``timeout`` seconds)."""
        self.cancel()
        with self._lock:
            self._closed = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None and timeout is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._loop, name="diffwidget-overlays", daemon=True
            )
            self._thread.start()

    def _next(self) -> Request | None:
        if self._explicit:
            return self._explicit.popleft()
        request, self._pending = self._pending, None
        return request

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._pending is None and not self._explicit and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                request = self._next()
                assert request is not None
                self._current = request
            if request.future.set_running_or_notify_cancel():
                self._execute(request)
            with self._lock:
                self._current = None

    def _execute(self, request: Request) -> None:
        last = 0.0

        def progress(done: int, total: int) -> bool:
            nonlocal last
            now = time.monotonic()
            if now - last >= PROGRESS_INTERVAL_S or done >= total:
                last = now
                self._on_progress(request, done / max(total, 1))
            return not request.cancel.is_set()

        self._on_start(request)
        try:
            with hold_pipeline(
                self._pipeline,
                request.label,
                timeout=PIPELINE_WAIT_S,
                cancelled=request.cancel.is_set,
                how_to_stop=HOW_TO_CANCEL,
            ) as held:
                result = self._run(request, progress) if held else None
            if request.cancel.is_set():
                self._on_cancel(request, result)
            else:
                self._on_done(request, result)
        except Exception as exc:  # any failure must reach the view, not kill the thread
            request.future.set_exception(exc)
            self._on_error(request, exc)
            return
        request.future.set_result(result)
