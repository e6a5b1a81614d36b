"""The live page in a notebook: new captions generated in the browser, without the kernel.

:class:`LiveExplorer` shows the page of :mod:`diffwidget.widget.live` as a widget. Its
assets (the exported graphs and onnxruntime-web's WebAssembly binary, about 19 MB) travel
once, as binary buffers of this widget only, when it is created: the explorer's own payloads
are unchanged, and nothing is sent unless you ask for the live view. Once they arrived the
page needs the kernel no more: a Voila page, or a notebook whose kernel died, still
generates. Where the page's Content-Security-Policy forbids WebAssembly the page says so in
one line and the kernel traces the caption instead (``diffwidget.trace`` and an
:class:`~diffwidget.widget.explorer.Explorer` below the message).

Examples
--------
>>> live = LiveExplorer("a small blue square at the top")  # doctest: +SKIP
>>> live  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anywidget
import ipywidgets
import traitlets

from diffwidget.widget.live import LIVE_JS, asset_files, check_models, live_config

_MISSING = "export default { render({ el }) { el.textContent = 'the live bundle is not built'; } };"


def _esm() -> str:
    # The module's text, not its path (see widget/model.py: a path starts a file watcher).
    return LIVE_JS.read_text(encoding="utf-8") if LIVE_JS.is_file() else _MISSING


class LiveWidget(anywidget.AnyWidget):
    """Synced state of the live view: the page's config and its assets as binary buffers."""

    _esm = _esm()
    config = traitlets.Dict().tag(sync=True)
    assets = traitlets.Dict().tag(sync=True)


def live_assets(models: str | Sequence[str] = "unet") -> dict[str, bytes]:
    """Every file the page loads, by name (the graphs and the WebAssembly binary)."""
    return {name: path.read_bytes() for name, path in asset_files(models).items()}


class LiveExplorer:
    """The embedded UNet generating captions in the browser, inside a notebook.

    Parameters
    ----------
    prompt : str
        The caption generated first (default: an example caption).
    compare : str
        A second caption side by side on one slider ("" = off until the reader asks).
    models : {"unet", "dit"} or a sequence of them
        The embedded models, side by side on each caption (``("unet", "dit")``: both).
    pipe : diffusers pipeline, optional
        For the kernel fallback when the page forbids WebAssembly (default: the page's first
        embedded model, loaded on first need).

    Attributes
    ----------
    fallback_reason : str
        Why the browser could not run the model ("" while it can); the kernel then traced
        the caption into :attr:`output`.

    Examples
    --------
    >>> LiveExplorer("a large red circle on the left")  # doctest: +SKIP
    """

    def __init__(
        self,
        prompt: str = "",
        compare: str = "",
        *,
        models: str | Sequence[str] = "unet",
        pipe: Any = None,
    ) -> None:
        config = live_config(prompt, compare, models)
        self.config = config
        self.models = check_models(models)
        self.pipe = pipe
        self.widget = LiveWidget(config=config.to_json(), assets=live_assets(self.models))
        self.output = ipywidgets.Output()
        self.box = ipywidgets.VBox([self.widget, self.output])
        self.fallback_reason = ""
        self.fallback_explorer: Any = None
        self.widget.on_msg(self._on_message)

    def _on_message(self, _widget: Any, content: Any, _buffers: Any) -> None:
        if isinstance(content, dict) and content.get("kind") == "no_wasm":
            self.fallback(str(content.get("reason", ""))[:500])

    def fallback(self, reason: str) -> Any:
        """Trace the first caption in the kernel and show its explorer below the page."""
        from diffwidget.models.loader import load_demo_pipeline
        from diffwidget.tracing.generate import trace
        from diffwidget.widget.explorer import Explorer

        self.fallback_reason = reason or "WebAssembly is not available in this page"
        if self.pipe is None:
            self.pipe = load_demo_pipeline(self.models[0])
        record = trace(self.pipe, self.config.prompt, seed=0)
        self.fallback_explorer = Explorer(record, pipe=self.pipe)
        with self.output:
            print(f"{self.fallback_reason}; traced in the kernel instead:")
            from IPython.display import display

            display(self.fallback_explorer)
        return self.fallback_explorer

    def close(self) -> None:
        """Close the widgets (and the fallback explorer, if any)."""
        if self.fallback_explorer is not None:
            self.fallback_explorer.close()
        self.box.close()
        self.widget.close()
        self.output.close()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.box._repr_mimebundle_(**kwargs)
