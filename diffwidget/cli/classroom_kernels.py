"""The kernel manager of classroom mode: a cap on kernels, and pages that never connected freed.

Voila starts one kernel per page load, and each kernel of the quickstart holds the model
and a trace (see :data:`diffwidget.cli.classroom.KERNEL_MEMORY_MB`). Two things go wrong on
a classroom network without this class: reloads and link previews start kernels without
bound until the machine swaps, and a page fetched but never opened in a browser (a
crawler, a closed laptop lid during loading, ``curl``) keeps its kernel for the whole idle
timeout. ``diffwidget demo --classroom`` names this class on Voila's command line
(``VoilaConfiguration.multi_kernel_manager_class``, with the cap); its timeouts are in
``jupyter-config/voila.json``. It runs inside the Voila process only, so this module may
import jupyter_server at the top.
"""

from __future__ import annotations

import datetime
from typing import Any

from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager
from tornado import web
from traitlets import Integer

#: Service Unavailable: the standard answer of a server at capacity; browsers show it as is.
HTTP_FULL = 503
#: Environment variables of the Voila process that the notebook kernels must not inherit.
PRIVATE_ENV = ("JUPYTER_TOKEN", "JUPYTER_TOKEN_FILE")


class ClassroomKernelManager(AsyncMappingKernelManager):
    """Jupyter's kernel manager with a kernel cap and a short timeout for unopened pages.

    - At most ``max_kernels`` kernels run or start at once; the next page load is answered
      with HTTP 503 and a message saying the classroom is full. Kernels being started
      count, so concurrent page loads cannot overshoot the cap.
    - A kernel whose page never opened its connection is shut down once it has been idle
      for ``unconnected_timeout`` seconds; a kernel that had a connection keeps the usual
      ``cull_idle_timeout`` after it drops (a laptop that sleeps comes back to its page),
      and one with an open connection is never culled (``cull_connected`` stays off).
    - The server's token is removed from the kernels' environment.
    """

    max_kernels = Integer(
        0,
        config=True,
        help="Kernels allowed at once; a page load beyond them gets HTTP 503 (0: no cap).",
    )
    unconnected_timeout = Integer(
        60,
        config=True,
        help="Seconds a kernel whose page never connected may stay idle before it is shut down "
        "(0: only cull_idle_timeout applies).",
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Ids reserved by start_kernel before its first await: the cap check and the
        # reservation happen in one step of the event loop, so no two loads take one slot.
        self._reserved: set[str] = set()
        self._connected_once: set[str] = set()

    def kernels_in_use(self) -> int:
        """Kernels running or being started."""
        return len(set(self._kernels) | self._reserved)

    async def start_kernel(  # type: ignore[override]
        self, *, kernel_id: str | None = None, **kwargs: Any
    ) -> str:
        """Start a kernel unless the cap is reached (HTTP 503 then)."""
        if kernel_id is not None and kernel_id in self:
            return str(await super().start_kernel(kernel_id=kernel_id, **kwargs))
        if self.max_kernels > 0 and self.kernels_in_use() >= self.max_kernels:
            self.log.warning("Classroom full: %d kernels; page load refused.", self.max_kernels)
            raise web.HTTPError(
                HTTP_FULL,
                reason=f"Classroom full ({self.max_kernels} students). "
                "Close another tab or ask the teacher to raise --max-students.",
            )
        env = kwargs.get("env")
        if isinstance(env, dict):
            kwargs["env"] = {k: v for k, v in env.items() if k not in PRIVATE_ENV}
        kernel_id = kernel_id or self.new_kernel_id()
        self._reserved.add(kernel_id)
        try:
            return str(await super().start_kernel(kernel_id=kernel_id, **kwargs))
        finally:
            self._reserved.discard(kernel_id)

    def notify_connect(self, kernel_id: str) -> None:
        """Record that a page opened its connection to ``kernel_id``."""
        super().notify_connect(kernel_id)
        if kernel_id in self._kernels:
            self._connected_once.add(kernel_id)

    def remove_kernel(self, kernel_id: str) -> Any:
        """Forget ``kernel_id`` (shut down, culled or dead)."""
        self._connected_once.discard(kernel_id)
        return super().remove_kernel(kernel_id)

    async def cull_kernel_if_idle(self, kernel_id: str) -> None:
        """Shut down a never-connected kernel idle past ``unconnected_timeout``, else as Jupyter."""
        kernel = self._kernels.get(kernel_id)
        if (
            kernel is not None
            and self.unconnected_timeout > 0
            and kernel_id not in self._connected_once
            and getattr(kernel, "execution_state", None) not in ("busy", "starting")
            and hasattr(kernel, "last_activity")
        ):
            idle = datetime.datetime.now(datetime.timezone.utc) - kernel.last_activity
            if idle.total_seconds() > self.unconnected_timeout:
                self.log.warning(
                    "Shutting down kernel %s: its page never connected (idle %d s).",
                    kernel_id,
                    idle.total_seconds(),
                )
                await self.shutdown_kernel(kernel_id)
                return
        await super().cull_kernel_if_idle(kernel_id)
