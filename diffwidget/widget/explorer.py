"""``Explorer``: the object users hold; it fills and drives an :class:`ExplorerWidget`.

The façade turns a :class:`~diffwidget.tracing.trace.Trace` into synced payloads (previews,
attention maps, curves), validates values set from Python, and runs heavy overlays
(DF-RISE, DF-CAM) in a background thread with results cached per step. It never imports
torch at module import, so a saved trace opens without it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

import numpy as np

from diffwidget.explain.attention import AttentionMaps, AttentionResult
from diffwidget.widget import schema
from diffwidget.widget.codecs import encode_array, quantise_uint8
from diffwidget.widget.jobs import OverlayJobs, Request
from diffwidget.widget.model import ExplorerWidget
from diffwidget.widget.previews import noisy_previews, shrink_images, x0_previews

if TYPE_CHECKING:
    from diffwidget.tracing.trace import Trace

NoisyDecoder = Literal["linear", "vae"]

#: Method settings named in the overlay caption (what a reader needs to judge the map).
_DESCRIBED_SETTINGS = ("n_masks", "p", "masks", "similarity", "target", "seed", "layers")
#: Longer lists (DF-CAM's default layers) are named by their first and last entries.
_NAMED_LIMIT = 6
#: Human names of overlay kinds, used in captions and errors.
OVERLAY_LABELS: dict[str, str] = {
    "none": "no overlay",
    "attention": "token cross-attention",
    "df_rise": "DF-RISE",
    "df_cam": "DF-CAM",
}


class SaliencyLike(Protocol):
    """What a provider returns (``diffwidget.explain.results.SaliencyMap`` fits)."""

    map: np.ndarray
    meta: dict[str, Any]


Provider = Callable[["Trace", int, Callable[[int, int], bool]], SaliencyLike]


def _registry_provider(kind: str, pipe: Any, options: dict[str, Any]) -> Provider:
    def provide(trace: Trace, step: int, progress: Callable[[int, int], bool]) -> SaliencyLike:
        from diffwidget.explain.registry import saliency_method

        method = saliency_method(kind)(**options)
        return method.attribute(pipe, trace, step, progress=progress)

    return provide


class Explorer:
    """Interactive view of one traced run: image per step, overlays, tokens, curves.

    Parameters
    ----------
    trace : Trace
        The recorded run (may be loaded from disk; torch is not needed to show it).
    pipe : diffusers pipeline, optional
        Needed only to compute DF-RISE / DF-CAM on request (and for ``noisy_decoder="vae"``).
    providers : dict, optional
        Overlay kind -> ``provider(trace, step, progress) -> SaliencyMap``; overrides the
        registry methods (tests, custom methods).
    method_options : dict, optional
        Overlay kind -> keyword arguments for the registry method, e.g.
        ``{"df_rise": {"n_masks": 200}}``.
    attention : AttentionMaps, optional
        How cross-attention is aggregated (default: every layer, every step).
    noisy_decoder : {"linear", "vae"}
        How the noisy latents x_t are shown: a linear latent→RGB map fitted on the trace's
        own x̂0 previews (default: instant, no torch), or the pipeline's VAE (exact, one
        decode per step, needs ``pipe``).

    Examples
    --------
    >>> explorer = Explorer(trace)  # doctest: +SKIP
    >>> explorer.step = 7  # moves the slider  # doctest: +SKIP
    >>> explorer.compute("df_rise")  # doctest: +SKIP
    """

    def __init__(
        self,
        trace: Trace,
        pipe: Any = None,
        *,
        providers: dict[str, Provider] | None = None,
        method_options: dict[str, dict[str, Any]] | None = None,
        attention: AttentionMaps | None = None,
        noisy_decoder: NoisyDecoder = "linear",
    ) -> None:
        if noisy_decoder not in get_args(NoisyDecoder):
            raise ValueError(f"noisy_decoder must be one of {get_args(NoisyDecoder)}")
        if noisy_decoder == "vae" and pipe is None:
            raise ValueError('noisy_decoder="vae" needs the pipeline: Explorer(trace, pipe=pipe)')
        self.trace = trace
        self.pipe = pipe
        self.noisy_decoder = noisy_decoder
        options = method_options or {}
        unknown = sorted(set(options) - set(schema.HEAVY_OVERLAYS))
        if unknown:
            raise ValueError(f"method_options for {unknown}; use keys from {schema.HEAVY_OVERLAYS}")
        self._providers: dict[str, Provider] = {}
        if pipe is not None:
            for kind in schema.HEAVY_OVERLAYS:
                self._providers[kind] = _registry_provider(kind, pipe, options.get(kind, {}))
        for kind, provider in (providers or {}).items():
            if kind not in schema.HEAVY_OVERLAYS:
                raise ValueError(f"providers are for {schema.HEAVY_OVERLAYS}, not {kind!r}")
            self._providers[kind] = provider
        self._cache: dict[str, dict[int, SaliencyLike]] = {k: {} for k in schema.HEAVY_OVERLAYS}
        self._cache_lock = threading.Lock()
        self._curves: list[tuple[dict[str, Any], np.ndarray]] = []
        self.attention_result: AttentionResult | None = None
        if trace.attention:
            self.attention_result = (attention or AttentionMaps()).attribute(trace)
        self.widget = ExplorerWidget()
        self._populate()
        self._jobs = OverlayJobs(
            self._run_provider,
            on_start=self._job_started,
            on_progress=self._job_progress,
            on_done=self._job_done,
            on_cancel=self._job_cancelled,
            on_error=self._job_failed,
        )
        self.widget.on_message("cancel", lambda _content: self.cancel())
        self.widget.observe(self._maybe_request, names=["overlay", "step"])

    # ----------------------------------------------------------------- state set-up
    def _populate(self) -> None:
        trace, widget = self.trace, self.widget
        x0 = shrink_images(x0_previews(trace))
        vae_pipe = self.pipe if self.noisy_decoder == "vae" else None
        noisy, noisy_text = noisy_previews(trace, vae_pipe)
        noisy = shrink_images(noisy)
        x0_text = "Predicted clean image x̂0 at this step, decoded" + (
            " by the VAE" if trace.previews is not None else " by a linear latent→RGB map"
        )
        if trace.previews is not None and trace.meta.get("preview_source") == "cond":
            x0_text += ", from the conditional CFG half's noise prediction (no guidance)"
        elif trace.guidance_scale > 1:
            x0_text += (
                f", from the guided noise prediction (CFG {trace.guidance_scale:g}); in early "
                "steps guidance can push x̂0's colours away from the final image's"
            )
        descriptions = {"x0": x0_text, "noisy": noisy_text}
        attention_payload = None
        if self.attention_result is not None:
            result = self.attention_result
            q, scale = quantise_uint8(result.maps)
            attention_payload = encode_array(q, scale=scale)
            descriptions["attention"] = (
                result.description + "; each map divided by its maximum for display"
            )
            for token, name in enumerate(trace.tokens):
                series = {"name": name, "group": "attention_mass", "token": token}
                self._curves.append((series, result.mass[:, token]))
        first_word = trace.word_indices[0] if trace.word_indices else 0
        with widget.hold_sync():
            widget.prompt = trace.prompt
            widget.tokens = list(trace.tokens)
            widget.token_kinds = list(trace.token_kinds)
            widget.timesteps = [int(t) for t in trace.timesteps]
            widget.previews = encode_array(x0)
            widget.noisy_previews = encode_array(noisy)
            widget.attention = attention_payload
            widget.descriptions = descriptions
            widget.token = first_word
            self._sync_curves()
            self._sync_available()

    def _sync_available(self) -> None:
        available = ["none"]
        if self.attention_result is not None:
            available.append("attention")
        for kind in schema.HEAVY_OVERLAYS:
            if kind in self._providers or self._cache[kind]:
                available.append(kind)
        self.widget.available = available

    def _sync_curves(self) -> None:
        if not self._curves:
            self.widget.curves = None
            return
        values = np.stack([v for _, v in self._curves]).astype(np.float32)
        self.widget.curves = {
            "series": [s for s, _ in self._curves],
            "values": encode_array(values),
        }

    def _sync_overlays(self, kind: str) -> None:
        with self._cache_lock:
            cached = dict(sorted(self._cache[kind].items()))
        overlays = dict(self.widget.overlays)
        if not cached:
            overlays.pop(kind, None)
        else:
            maps = np.stack([np.asarray(r.map, dtype=np.float32) for r in cached.values()])
            maps = np.clip(np.nan_to_num(maps), 0.0, 1.0)
            last = next(reversed(cached.values()))
            overlays[kind] = {
                "steps": list(cached),
                "maps": encode_array(
                    np.rint(maps * 255).astype(np.uint8), scale=np.ones(len(maps))
                ),
                "description": _saliency_description(kind, last),
            }
        self.widget.overlays = overlays

    # ----------------------------------------------------------------- public state
    def _set(self, name: str, value: Any) -> None:
        try:
            value = schema.validate_incoming(
                name, value, n_steps=self.trace.n_steps, n_tokens=len(self.trace.tokens)
            )
        except schema.InvalidInput as exc:
            raise ValueError(str(exc)) from None
        setattr(self.widget, name, value)

    @property
    def step(self) -> int:
        """Loop index shown (0..n_steps-1); setting it moves the slider."""
        return int(self.widget.step)

    @step.setter
    def step(self, value: int) -> None:
        self._set("step", value)

    @property
    def token(self) -> int:
        """Index into ``trace.tokens`` of the token whose overlay is shown.

        Set it with an index or with the token's string (its first occurrence).
        """
        return int(self.widget.token)

    @token.setter
    def token(self, value: int | str) -> None:
        if isinstance(value, str):
            if value not in self.trace.tokens:
                raise ValueError(f"unknown token {value!r}; tokens are {self.trace.tokens}")
            value = self.trace.tokens.index(value)
        self._set("token", value)

    @property
    def overlay(self) -> str:
        """Overlay kind shown: "none", "attention", "df_rise" or "df_cam"."""
        return str(self.widget.overlay)

    @overlay.setter
    def overlay(self, value: str) -> None:
        self._set("overlay", value)

    @property
    def opacity(self) -> float:
        """Overlay opacity in [0, 1]."""
        return float(self.widget.opacity)

    @opacity.setter
    def opacity(self, value: float) -> None:
        self._set("opacity", value)

    @property
    def image_mode(self) -> str:
        """ "x0" (predicted clean image) or "noisy" (decoded x_t)."""
        return str(self.widget.image_mode)

    @image_mode.setter
    def image_mode(self, value: str) -> None:
        self._set("image_mode", value)

    @property
    def status(self) -> str:
        """State of heavy work: idle, running, done, cancelled or error."""
        return str(self.widget.status)

    @property
    def error(self) -> str:
        """Last rejected input or failed computation ('' when none)."""
        return str(self.widget.error)

    # ----------------------------------------------------------------- overlays
    def compute(self, overlay: str, step: int | None = None) -> Future:
        """Request a heavy overlay at ``step`` (default: the current step).

        Returns a future holding the result; a cached result is returned at once. Newer
        requests replace older pending ones and stop stale running ones.
        """
        if overlay not in schema.HEAVY_OVERLAYS:
            raise ValueError(f"compute() takes one of {schema.HEAVY_OVERLAYS}, not {overlay!r}")
        step = self.step if step is None else step
        schema.validate_incoming("step", step, n_steps=self.trace.n_steps, n_tokens=1)
        with self._cache_lock:
            cached = self._cache[overlay].get(step)
        if cached is not None:
            done: Future = Future()
            done.set_result(cached)
            return done
        if overlay not in self._providers:
            raise RuntimeError(
                f"{OVERLAY_LABELS[overlay]} needs the pipeline: create the explorer with "
                "Explorer(trace, pipe=pipe), or pass providers={...}"
            )
        return self._jobs.submit(overlay, step)

    def cancel(self) -> None:
        """Stop the running overlay computation and drop pending ones."""
        if self._jobs.cancel():
            self.widget.status = "cancelled"

    def add_overlay(self, kind: str, step: int, saliency: SaliencyLike) -> None:
        """Store a precomputed heavy overlay (shown and exported like computed ones)."""
        if kind not in schema.HEAVY_OVERLAYS:
            raise ValueError(f"overlay kind must be one of {schema.HEAVY_OVERLAYS}")
        with self._cache_lock:
            self._cache[kind][int(step)] = saliency
        self._sync_overlays(kind)
        self._sync_available()

    def cached(self, kind: str) -> dict[int, SaliencyLike]:
        """Results computed so far for ``kind``, keyed by step."""
        with self._cache_lock:
            return dict(self._cache[kind])

    def add_curve(
        self,
        name: str,
        values: Sequence[float] | np.ndarray,
        group: str = "concept_auc",
        token: int | None = None,
    ) -> None:
        """Add a curve over steps (NaN where not computed), e.g. a concept's ROC-AUC."""
        if group not in schema.CURVE_GROUPS:
            raise ValueError(f"group must be one of {schema.CURVE_GROUPS}, not {group!r}")
        array = np.asarray(values, dtype=np.float32)
        if array.shape != (self.trace.n_steps,):
            raise ValueError(
                f"a curve needs one value per step ({self.trace.n_steps}), got {array.shape}"
            )
        self._curves.append(({"name": name, "group": group, "token": token}, array))
        self._sync_curves()

    def add_token_relevance(self, result: Any) -> None:
        """Add token-relevance curves (one per stored token) from ``TokenRelevance``.

        Uses the result's per-step min–max normalised relevance; steps it did not explain
        are left empty (NaN) in the curves.
        """
        if list(result.tokens) != list(self.trace.tokens):
            raise ValueError("the relevance result belongs to another trace (tokens differ)")
        curves = np.full((len(self.trace.tokens), self.trace.n_steps), np.nan, np.float32)
        curves[:, np.asarray(result.steps, dtype=np.int64)] = np.asarray(result.normalized).T
        for token, name in enumerate(self.trace.tokens):
            series = {"name": name, "group": "token_relevance", "token": token}
            self._curves.append((series, curves[token]))
        self._sync_curves()

    def _maybe_request(self, _change: Any) -> None:
        kind = self.widget.overlay
        if kind not in schema.HEAVY_OVERLAYS:
            return
        with self._cache_lock:
            if self.widget.step in self._cache[kind]:
                return
        if kind not in self._providers:
            self.widget.error = (
                f"{OVERLAY_LABELS[kind]} is not computed for step {self.widget.step} and "
                "the explorer has no pipeline; create it with Explorer(trace, pipe=pipe)"
            )
            return
        self._jobs.submit(kind, int(self.widget.step))

    def _run_provider(self, kind: str, step: int, progress: Callable[[int, int], bool]) -> Any:
        return self._providers[kind](self.trace, step, progress)

    def _job_started(self, request: Request) -> None:
        with self.widget.hold_sync():
            self.widget.status = "running"
            self.widget.progress = 0.0

    def _job_progress(self, request: Request, fraction: float) -> None:
        if not request.cancel.is_set():
            self.widget.progress = float(fraction)

    def _job_done(self, request: Request, result: Any) -> None:
        with self._cache_lock:
            self._cache[request.kind][request.step] = result
        self._sync_overlays(request.kind)
        with self.widget.hold_sync():
            self.widget.progress = 1.0
            if not self._jobs_waiting():
                self.widget.status = "done"

    def _job_cancelled(self, request: Request, _partial: Any) -> None:
        if not self._jobs_waiting():
            self.widget.status = "cancelled"

    def _job_failed(self, request: Request, exc: BaseException) -> None:
        with self.widget.hold_sync():
            self.widget.status = "error"
            self.widget.error = (
                f"{OVERLAY_LABELS[request.kind]} failed at step {request.step}: {exc}"
            )

    def _jobs_waiting(self) -> bool:
        return self._jobs.waiting

    # ----------------------------------------------------------------- output
    def figure(self, kind: str = "attention_mass") -> Any:
        """A bqplot figure of one curve group with a step cursor linked both ways."""
        from diffwidget.widget.figures import explorer_figure

        return explorer_figure(self, kind)

    def to_html(self, path: str | Path, *, title: str | None = None) -> Path:
        """Write a standalone HTML file of this explorer that works offline."""
        from diffwidget.widget.export import export_html

        return export_html(self, path, title=title)

    def close(self) -> None:
        """Stop background work and close the widget."""
        self._jobs.close()
        self.widget.close()

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)


def _saliency_description(kind: str, result: SaliencyLike) -> str:
    meta = dict(getattr(result, "meta", {}) or {})
    settings = []
    for key in _DESCRIBED_SETTINGS:
        value = meta.get(key)
        if isinstance(value, (list, tuple)):
            names = [str(v) for v in value]
            if len(names) > _NAMED_LIMIT:
                names = [names[0], "…", names[-1]]
            settings.append(f"{len(value)} {key} ({', '.join(names)})")
        elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
            settings.append(f"{key} {value}")
    text = f"{OVERLAY_LABELS[kind]} saliency on the latent grid at the shown step"
    if settings:
        text += f" ({', '.join(settings)})"
    if meta.get("cfg_combined"):
        text += ", activations and gradients CFG-combined"
    return text + "; min–max normalised to [0, 1] per step"
