"""Heavy overlay work in one background thread: coalesced, cancellable, with progress.

The kernel's main thread must stay free to answer the slider, so DF-RISE / DF-CAM run in a
worker thread. Only the newest request matters while a user scrubs: a new request replaces
the pending one (coalescing) and asks the running one to stop at its next progress call
(stale cancellation); the method then returns its partial estimate, which is not cached.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

#: Seconds between two progress updates pushed to the view (a trait sync each).
PROGRESS_INTERVAL_S = 0.05

Runner = Callable[[str, int, Callable[[int, int], bool]], Any]


@dataclass
class Request:
    """One requested overlay computation."""

    kind: str
    step: int
    future: Future = field(default_factory=Future)
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> tuple[str, int]:
        """Cache key ``(kind, step)``."""
        return (self.kind, self.step)


class OverlayJobs:
    """Run overlay requests one at a time on a daemon thread.

    Parameters
    ----------
    run : callable
        ``run(kind, step, progress) -> result``; ``progress(done, total)`` returns False
        when the work should stop.
    on_start, on_progress, on_done, on_cancel, on_error : callable
        Notifications, called from the worker thread.
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
    ) -> None:
        self._run = run
        self._on_start = on_start
        self._on_progress = on_progress
        self._on_done = on_done
        self._on_cancel = on_cancel
        self._on_error = on_error
        self._lock = threading.Condition()
        self._pending: Request | None = None
        self._current: Request | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def busy(self) -> bool:
        """Whether a request is running or waiting."""
        with self._lock:
            return self._current is not None or self._pending is not None

    @property
    def waiting(self) -> bool:
        """Whether a request waits behind the running one."""
        with self._lock:
            return self._pending is not None

    def submit(self, kind: str, step: int) -> Future:
        """Queue ``(kind, step)``, replacing any pending request and stopping stale work."""
        with self._lock:
            for live in (self._current, self._pending):
                if live is not None and live.key == (kind, step) and not live.cancel.is_set():
                    return live.future
            if self._pending is not None:
                self._pending.cancel.set()
                self._pending.future.cancel()
            if self._current is not None:
                self._current.cancel.set()
            request = Request(kind, step)
            self._pending = request
            self._ensure_thread()
            self._lock.notify_all()
            return request.future

    def cancel(self) -> bool:
        """Stop the running request and drop the pending one; True if anything was live."""
        with self._lock:
            live = False
            if self._pending is not None:
                self._pending.cancel.set()
                self._pending.future.cancel()
                self._pending = None
                live = True
            if self._current is not None:
                self._current.cancel.set()
                live = True
            return live

    def close(self) -> None:
        """Cancel everything and let the worker thread end."""
        self.cancel()
        with self._lock:
            self._closed = True
            self._lock.notify_all()

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._loop, name="diffwidget-overlays", daemon=True
            )
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._pending is None and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                request = self._pending
                assert request is not None
                self._pending = None
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
            result = self._run(request.kind, request.step, progress)
        except Exception as exc:  # any method failure must reach the view, not kill the thread
            request.future.set_exception(exc)
            self._on_error(request, exc)
            return
        if request.cancel.is_set():
            self._on_cancel(request, result)
        else:
            self._on_done(request, result)
        request.future.set_result(result)
