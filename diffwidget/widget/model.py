"""The anywidget model: synced state only, with every front-end write validated.

Users talk to :class:`~diffwidget.widget.explorer.Explorer`; this class holds the traits
declared in :mod:`diffwidget.widget.schema` and nothing else, so a saved notebook re-renders
from its widget state without a kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anywidget

from diffwidget.widget import schema
from diffwidget.widget.codecs import payload_nbytes, to_transport

STATIC = Path(__file__).parent / "static"
ESM_PATH = STATIC / "widget.js"

#: Most binary bytes the base64 fallback sends as JSON text (a third more once encoded):
#: above it, hosts that drop binary buffers get a message saying how to see the explorer.
BASE64_LIMIT_BYTES = 16_000_000

_BUILD_HINT = (
    "the widget's front end is not built; run `npm install && npm run build` in js/ "
    "(or reinstall the package with `pip install -e .`)"
)


def _esm() -> str:
    if ESM_PATH.exists():
        # The module's text, not its path: for a path anywidget connects every widget
        # instance to a class-level file watcher (hot reload), which keeps each closed
        # explorer, its trace payloads included, alive for the whole session.
        return ESM_PATH.read_text(encoding="utf-8")
    # A readable failure in the notebook instead of a blank output area.
    return f"export default {{ render({{ el }}) {{ el.textContent = {_BUILD_HINT!r}; }} }};"


# Traits come from the schema (single source of truth); the dynamic base keeps them
# declared at class level, where traitlets expects them.
_SyncedState: type[anywidget.AnyWidget] = type(
    "_SyncedState", (anywidget.AnyWidget,), dict(schema.build_traits())
)


class ExplorerWidget(_SyncedState):  # type: ignore[misc, valid-type]
    """Synced state of one explorer view (see :data:`diffwidget.widget.schema.TRAITS`).

    Writes from the front end go through :meth:`set_state`, which validates each value
    against the current trace; a rejected value sets ``error``, is echoed back so the
    view reverts, and never raises inside the kernel's comm handler.
    """

    _esm = _esm()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._message_handlers: dict[str, Callable[[dict[str, Any]], None]] = {}
        self.on_msg(self._dispatch_message)

    @property
    def n_steps(self) -> int:
        """Number of steps in the shown trace."""
        return len(self.timesteps)

    def bounds(self) -> schema.Bounds:
        """What front-end writes may contain for the trace shown now."""
        options = self.layer_options or {}
        saliency = [o["value"] for values in options.get("saliency", {}).values() for o in values]
        return schema.Bounds(
            n_steps=self.n_steps,
            n_tokens=len(self.tokens),
            n_heads=int(options.get("heads", 0)),
            choices={
                "attention_layer": [o["value"] for o in options.get("attention", [])],
                "saliency_layer": saliency,
                "switch_word": list(self.switch_words),
            },
        )

    def publish(self, name: str, value: Any) -> None:
        """Set a payload trait, its buffers encoded for the current ``transport``.

        Under the base64 fallback a payload that would take the state above
        :data:`BASE64_LIMIT_BYTES` is not sent; ``error`` says why and what to do instead.
        """
        if name not in schema.PAYLOAD_TRAITS:
            raise KeyError(f"{name!r} is not a payload trait; payloads are {schema.PAYLOAD_TRAITS}")
        transport = str(getattr(self, "transport", "binary"))
        if transport == "base64" and value is not None:
            total = self._payload_bytes(replacing=name) + payload_nbytes(value)
            if total > BASE64_LIMIT_BYTES:
                self.error = _base64_refusal(total)
                value = None
        setattr(self, name, to_transport(value, transport))

    def _payload_bytes(self, replacing: str | None = None) -> int:
        """Binary bytes of every payload trait (leaving out ``replacing``)."""
        names = [n for n in schema.PAYLOAD_TRAITS if n != replacing]
        return sum(payload_nbytes(getattr(self, n)) for n in names)

    def use_base64(self) -> None:
        """Re-send every payload as base64 text (for front ends that lose binary buffers).

        Refused, with a message in ``error``, when that text would exceed
        :data:`BASE64_LIMIT_BYTES` of data.
        """
        if getattr(self, "transport", "binary") == "base64":
            return
        total = self._payload_bytes()
        if total > BASE64_LIMIT_BYTES:
            self.error = _base64_refusal(total)
            return
        with self.hold_sync():
            self.transport = "base64"
            for name in schema.PAYLOAD_TRAITS:
                setattr(self, name, to_transport(getattr(self, name), "base64"))

    def set_state(self, sync_data: dict[str, Any]) -> None:
        """Apply a state update from the front end after validating each key."""
        accepted: dict[str, Any] = {}
        rejected: list[str] = []
        bounds = self.bounds()
        for name, value in sync_data.items():
            try:
                accepted[name] = schema.validate_incoming(name, value, bounds)
            except schema.InvalidInput as exc:
                rejected.append(name)
                self.error = str(exc)
        if accepted:
            if not rejected and self.error and self.status != "error":
                self.error = ""
            super().set_state(accepted)
        for name in rejected:
            if name in schema.TRAITS_BY_NAME:
                # Echo the kernel's value so the view drops the rejected one.
                self.send_state(name)

    def on_message(self, kind: str, handler: Callable[[dict[str, Any]], None]) -> None:
        """Register ``handler(content)`` for front-end messages ``{"kind": kind, ...}``."""
        if kind not in schema.FRONTEND_MESSAGES:
            raise ValueError(
                f"unknown message kind {kind!r}; use one of {schema.FRONTEND_MESSAGES}"
            )
        self._message_handlers[kind] = handler

    def _dispatch_message(self, _widget: Any, content: Any, _buffers: Any) -> None:
        kind = content.get("kind") if isinstance(content, dict) else None
        handler = self._message_handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            self.error = (
                f"unknown message {content!r} from the view; expected one of "
                f"{[{'kind': k} for k in schema.FRONTEND_MESSAGES]}"
            )
            return
        handler(content)


def _base64_refusal(nbytes: int) -> str:
    return (
        f"this front end drops binary buffers, and resending the explorer's "
        f"{nbytes / 1e6:.1f} MB of data as JSON text is more than the "
        f"{BASE64_LIMIT_BYTES / 1e6:.0f} MB it may send that way; open the notebook in "
        "JupyterLab, Notebook 7 or VS Code, or write a file that works anywhere with "
        "explorer.to_html(path) (steps=... keeps fewer steps)"
    )
