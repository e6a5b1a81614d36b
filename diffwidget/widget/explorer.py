"""``Explorer``: the object users hold; it fills and drives an :class:`ExplorerWidget`.

The façade turns a :class:`~diffwidget.tracing.trace.Trace` into synced payloads (previews,
attention maps, curves), validates values set from Python, and runs heavy work (DF-RISE,
DF-CAM, faithfulness curves) in a background thread with results cached per step. It never
imports torch at module import, so a saved trace opens without it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import numpy as np

from diffwidget.explain.attention import AttentionMaps, AttentionResult
from diffwidget.explain.protocol import SaliencyMethod
from diffwidget.tracing.trace import Trace
from diffwidget.widget import layers, schema
from diffwidget.widget.attention_views import AttentionViews, filter_values, mass_curves
from diffwidget.widget.codecs import encode_array, to_transport
from diffwidget.widget.concept_overlay import CONCEPT, ConceptCache
from diffwidget.widget.curves import Curve, CurveSet
from diffwidget.widget.explorer_setup import check_inputs, first_content_token
from diffwidget.widget.explorer_work import ExplorerWork, OverlayRequest
from diffwidget.widget.export import ExportOptions, ExportPlan, ExportSource, export_plan
from diffwidget.widget.grid_sources import GridSources
from diffwidget.widget.jobs import Jobs
from diffwidget.widget.model import ExplorerWidget
from diffwidget.widget.overlay_methods import resolve_methods
from diffwidget.widget.previews import noisy_previews, preview_text, x0_previews
from diffwidget.widget.reporting import (
    close_widget_tree,
    scale_infos,
)
from diffwidget.widget.snapshot import mimebundle, summary_line

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from diffwidget.explain.results import SaliencyMap

NoisyDecoder = Literal["linear", "vae"]
#: Seconds ``close()`` waits for the worker thread to stop.
CLOSE_TIMEOUT_S = 5.0
OVERLAY_LABELS = schema.OVERLAY_LABELS


class Explorer(ExplorerWork):
    """Interactive view of one traced run: image per step, overlays, tokens, curves.

    Parameters
    ----------
    trace : Trace
        The recorded run (may be loaded from disk; torch is not needed to show it).
    pipe : diffusers pipeline, optional
        Needed to compute the saliency methods, faithfulness and exact VAE decodes on request.
    methods : dict, optional
        Overlay name -> saliency method object (see
        :class:`~diffwidget.explain.protocol.SaliencyMethod`), e.g.
        ``{"df_rise": DFRise(n_masks=200)}``. With ``pipe``, methods not given use their
        defaults. Methods are called with ``pipe`` (``None`` without one).
    faithfulness : object, optional
        Evaluator with ``evaluate(pipe, trace, step, saliency, progress)`` returning a
        :class:`~diffwidget.explain.results.FaithfulnessResult`; default
        :class:`~diffwidget.explain.faithfulness.InsertionDeletion` when ``pipe`` is given.
    attention : AttentionMaps, optional
        How cross-attention is aggregated (default: every layer, every step).
    noisy_decoder : {"linear", "vae"}
        How the noisy latents x_t are shown: a linear latent→RGB map fitted on the trace's
        own x̂0 previews (default: instant, no torch), or the pipeline's VAE.
    method_options : dict, optional
        Deprecated: keyword arguments per registry method; pass ``methods`` instead.

    Examples
    --------
    >>> explorer = Explorer(trace, pipe, methods={"df_rise": DFRise(n_masks=200)})  # doctest: +SKIP
    >>> explorer.step = 7  # moves the slider  # doctest: +SKIP
    >>> explorer.compute("df_rise").result().map.shape  # doctest: +SKIP
    (16, 16)
    """

    def __init__(
        self,
        trace: Trace,
        pipe: Any = None,
        *,
        methods: Mapping[str, Any] | None = None,
        faithfulness: Any = None,
        attention: AttentionMaps | None = None,
        noisy_decoder: NoisyDecoder = "linear",
        method_options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        check_inputs(trace, pipe)
        if noisy_decoder not in get_args(NoisyDecoder):
            raise ValueError(f"noisy_decoder must be one of {get_args(NoisyDecoder)}")
        if noisy_decoder == "vae" and pipe is None:
            raise ValueError('noisy_decoder="vae" needs the pipeline: Explorer(trace, pipe=pipe)')
        self.trace = trace
        self.pipe = pipe
        self.noisy_decoder = noisy_decoder
        self._methods = resolve_methods(pipe, methods, method_options)
        self._evaluator = faithfulness
        if faithfulness is not None and not callable(getattr(faithfulness, "evaluate", None)):
            raise TypeError(
                f"faithfulness must have evaluate(pipe, trace, step, saliency, progress); got "
                f"{type(faithfulness).__name__} (use diffwidget.explain.InsertionDeletion(...))"
            )
        self._cache: dict[str, dict[int, SaliencyMap]] = {k: {} for k in schema.HEAVY_OVERLAYS}
        self._lock = threading.Lock()
        self._curves = CurveSet()
        self._faith: dict[tuple[Any, ...], dict[str, Any]] = {}
        self._figures: list[Any] = []
        self._links: list[Any] = []  # ExplorerLinks this explorer is in (figures.py)
        self._closed = False
        self._concepts = ConceptCache()
        self.widget = ExplorerWidget()
        self._views = AttentionViews(trace, attention, self.widget)
        #: The attention shown under the current filter, on its own grid (``None`` without).
        self.attention_result: AttentionResult | None = self._views.shown
        self._noisy: dict[str, Any] | None = None
        self._populate()
        self._jobs = Jobs(
            self._run,
            on_start=self._job_started,
            on_progress=self._job_progress,
            on_done=self._job_done,
            on_cancel=self._job_cancelled,
            on_error=self._job_failed,
            pipeline=pipe,
        )
        self._grids = GridSources(self.widget, trace, pipe, self._jobs)
        self.widget.on_message("cancel", lambda _content: self.cancel())
        self.widget.on_message("faithfulness", lambda _content: self._request_faithfulness())
        self.widget.on_message("decode_step", lambda _content: self._decode_from_view())
        self.widget.on_message("buffers_missing", lambda _content: self.widget.use_base64())
        self._init_switch()
        self.widget.observe(self._maybe_request, names=["overlay", "step", "concept"])
        self.widget.observe(self._refresh_attention, names=["attention_layer", "attention_head"])
        self.widget.observe(self._refresh_saliency_layer, names=["saliency_layer"])
        self.widget.observe(self._refresh_grid, names=["grid"])
        self.widget.observe(self._refresh_grid_token, names=["token"])
        self.widget.observe(self._show_noisy, names=["image_mode"])

    def _method(self, kind: str) -> SaliencyMethod:
        method = self._methods[kind]
        if method is None:
            from diffwidget.explain.registry import saliency_method

            method = saliency_method(kind)()
            self._methods[kind] = method
        return method

    # ----------------------------------------------------------------- state set-up
    def _populate(self) -> None:
        trace, widget = self.trace, self.widget
        vae_pipe = self.pipe if self.noisy_decoder == "vae" else None
        x0 = x0_previews(trace)
        noisy, noisy_text = noisy_previews(trace, vae_pipe, x0=x0)
        self._noisy = encode_array(noisy)  # built now (display size, cheap), sent when shown
        descriptions = {"x0": preview_text(trace), "noisy": noisy_text}
        with widget.hold_sync():
            widget.prompt = trace.prompt
            widget.tokens = list(trace.tokens)
            widget.token_kinds = list(trace.token_kinds)
            widget.timesteps = [int(t) for t in trace.timesteps]
            widget.publish("previews", encode_array(x0))
            widget.descriptions = descriptions
            widget.token = first_content_token(trace)
            widget.scales = scale_infos(trace.facts.attention_value)
            self._views.publish_default()
            self._sync_attention()
            self._sync_options()
            self._sync_available()

    def _show_noisy(self, _change: Any = None) -> None:  # sent when first shown
        if self.widget.image_mode == "noisy" and self.widget.noisy_previews is None:
            self.widget.publish("noisy_previews", self._noisy)

    def _sync_attention(self) -> None:
        """The attention-mass curves of the filter shown (its maps are sent by the views)."""
        mass = mass_curves(self.trace, self.attention_result)
        self._curves = self._curves.replacing("attention_mass", mass, first=True)
        self._sync_curves()

    def _sync_options(self) -> None:
        with self._lock:
            saliency = {
                kind: layers.saliency_layer_options(kind, self._cache[kind])
                for kind in schema.HEAVY_OVERLAYS
            }
        self.widget.layer_options = {
            "attention": layers.attention_options(self.trace, self._views.default_layers),
            "saliency": {kind: options for kind, options in saliency.items() if options},
            "heads": layers.n_heads(self.trace),
        }

    def _sync_available(self) -> None:
        available = ["none"]
        if self.attention_result is not None:
            available.append("attention")
        for kind in schema.HEAVY_OVERLAYS:
            if kind in self._methods or self._cache[kind]:
                available.append(kind)
        if self.pipe is not None:
            available.append(CONCEPT)
        self.widget.available = available
        actions = ["cancel", "buffers_missing"]
        if self._evaluator is not None or self.pipe is not None:
            actions.append("faithfulness")
        if self.pipe is not None and getattr(self.pipe, "vae", None) is not None:
            actions += ["decode_step", "prompt_switch"]
        self.widget.actions = actions

    def _sync_curves(self) -> None:
        self.widget.publish("curves", self._curves.to_json())

    def _sync_overlays(self, kind: str) -> None:
        with self._lock:
            cached = dict(sorted(self._cache[kind].items()))
        overlays = dict(self.widget.overlays)
        layer = str(self.widget.saliency_layer)  # applies to every method that has the layer
        if not cached:
            overlays.pop(kind, None)
        else:
            maps, ranges, texts = [], [], []
            method = self._methods.get(kind)
            if method is None and self.pipe is not None:
                method = self._method(kind)
            for result in cached.values():
                chosen = result.layers.get(layer) if layer else None
                raw = np.asarray(chosen if chosen is not None else result.raw, np.float32)
                shown = np.asarray(chosen if chosen is not None else result.map, np.float32)
                maps.append(np.clip(np.nan_to_num(shown), 0.0, 1.0))
                ranges.append([float(np.nanmin(raw)), float(np.nanmax(raw))])
                text = method.describe(result) if method is not None else _generic(kind, result)
                if chosen is not None:
                    text += f"; showing layer {layer} only"
                texts.append(text)
            overlays[kind] = {
                "steps": list(cached),
                "maps": encode_array(
                    np.rint(np.stack(maps) * 255).astype(np.uint8), scale=np.ones(len(maps))
                ),
                "ranges": ranges,
                "layer": layer if any(layer in r.layers for r in cached.values()) else "",
                "descriptions": texts,
            }
        self.widget.publish("overlays", overlays)

    # ----------------------------------------------------------------- public state
    def _set(self, name: str, value: Any) -> None:
        try:
            value = schema.validate_incoming(name, value, self.widget.bounds())
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
    def attention_layer(self) -> str:
        """Attention filter: "" (all layers), a grid such as "16x16", or one layer path."""
        return str(self.widget.attention_layer)

    @attention_layer.setter
    def attention_layer(self, value: str) -> None:
        self._set("attention_layer", value)

    @property
    def grid(self) -> str:
        """Source of the layer × step grid ("none", "attention", "df_cam")."""
        return str(self.widget.grid)

    @grid.setter
    def grid(self, value: str) -> None:
        self._set("grid", value)

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
        """Request a saliency overlay at ``step`` (default: the current step).

        Returns a future holding the result; a cached result is returned at once. Requests
        made in code run in order and are never replaced by what the view asks for while
        the user scrubs; ``cancel()`` stops them.
        """
        if overlay not in schema.HEAVY_OVERLAYS:
            raise ValueError(f"compute() takes one of {schema.HEAVY_OVERLAYS}, not {overlay!r}")
        step = self.step if step is None else step
        step = schema.validate_incoming("step", step, self.widget.bounds())
        with self._lock:
            cached = self._cache[overlay].get(step)
        if cached is not None:
            done: Future = Future()
            done.set_result(cached)
            return done
        if overlay not in self._methods:
            raise RuntimeError(
                f"{OVERLAY_LABELS[overlay]} needs the pipeline: create the explorer with "
                "Explorer(trace, pipe=pipe), or pass methods={...}"
            )
        return self._submit_overlay(overlay, step, explicit=True)

    def _submit_overlay(self, kind: str, step: int, *, explicit: bool) -> Future:
        return self._jobs.submit(OverlayRequest(kind, step), explicit=explicit)

    def cancel(self) -> None:
        """Stop the running computation and drop waiting ones (also those made in code)."""
        if self._jobs.cancel():
            self.widget.status = "cancelled"

    def add_overlay(self, kind: str, step: int, saliency: SaliencyMap) -> None:
        """Store a precomputed saliency map (shown and exported like computed ones)."""
        if kind not in schema.HEAVY_OVERLAYS:
            raise ValueError(f"overlay kind must be one of {schema.HEAVY_OVERLAYS}")
        self._store(kind, int(step), saliency)
        self._sync_available()

    def cached(self, kind: str) -> dict[int, SaliencyMap]:
        """Results computed so far for ``kind``, keyed by step."""
        with self._lock:
            return dict(self._cache[kind])

    def _store(self, kind: str, step: int, result: Any) -> None:
        shape = self.trace.latent_shape
        if getattr(getattr(result, "map", None), "shape", None) != shape:
            raise TypeError(
                f"{OVERLAY_LABELS[kind]} returned {type(result).__name__}; a saliency method "
                f"must return a SaliencyMap whose map has the latent shape {shape}"
            )
        with self._lock:
            self._cache[kind][step] = result
        self._sync_overlays(kind)
        self._sync_options()
        self.widget.scales = scale_infos(self.trace.facts.attention_value)
        if self.widget.grid == kind:
            self._refresh_grid()

    def add_curve(
        self,
        name: str,
        values: Sequence[float] | np.ndarray,
        group: str = "concept_auc",
        token: int | None = None,
    ) -> None:
        """Add a curve over steps (NaN where not computed), e.g. a concept's ROC-AUC."""
        array = np.asarray(values, dtype=np.float32)
        curve = Curve(name, cast(schema.CurveGroup, group), token, array)  # checks the group
        if array.shape != (self.trace.n_steps,):
            raise ValueError(
                f"a curve needs one value per step ({self.trace.n_steps}), got {array.shape}"
            )
        self._curves = self._curves.adding([curve])
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
        relevance = [
            Curve(name, "token_relevance", token, curves[token])
            for token, name in enumerate(self.trace.tokens)
        ]
        self._curves = self._curves.adding(relevance)
        self._sync_curves()

    def _maybe_request(self, _change: Any) -> None:
        kind = self.widget.overlay
        if getattr(_change, "name", "") == "concept":
            self._sync_concept()
        if kind == CONCEPT:
            self._request_concept()
            return
        if kind not in schema.HEAVY_OVERLAYS:
            return
        step = int(self.widget.step)
        with self._lock:
            if step in self._cache[kind]:
                return
        if kind not in self._methods:
            self.widget.error = (
                f"{OVERLAY_LABELS[kind]} is not computed for step {step} and the explorer has "
                "no pipeline; create it with Explorer(trace, pipe=pipe)"
            )
            return
        self._submit_overlay(kind, step, explicit=False)

    # ----------------------------------------------------------------- filters and grid
    def _refresh_attention(self, change: Any = None) -> None:
        with self.widget.hold_sync():
            try:
                self.attention_result = self._views.refresh()
            except (ValueError, KeyError) as exc:
                self.widget.error = str(exc)
                return
            self._sync_attention()
            # The grid shows every layer: only a new head changes its cells.
            if self.widget.grid == "attention" and getattr(change, "name", "") != "attention_layer":
                self._refresh_grid()

    def _refresh_saliency_layer(self, _change: Any = None) -> None:
        for kind in schema.HEAVY_OVERLAYS:
            if kind in self.widget.overlays:
                self._sync_overlays(kind)

    def _refresh_grid(self, _change: Any = None) -> None:
        try:
            if not self._grids.publish():  # the concept and causal grids are sent there
                self._views.publish_grid(self.cached)
        except (ValueError, RuntimeError) as exc:
            self.widget.error = str(exc)

    def _refresh_grid_token(self, _change: Any = None) -> None:
        grid = self.widget.grid_data
        if grid is not None and grid.get("per_token"):
            self._views.publish_grid_token()

    # ----------------------------------------------------------------- output
    def figure(self, kind: str = "attention_mass") -> Any:
        """A bqplot figure of one curve group with a step cursor linked both ways."""
        from diffwidget.widget.figures import explorer_figure

        figure = explorer_figure(self, kind)
        self._figures.append(figure)
        return figure

    def export(self, **options: Unpack[ExportOptions]) -> ExportPlan:
        """A standalone HTML file in memory: its size part by part, before writing.

        Options (``steps``, ``layers``, ``compress``, ``title``): see
        :func:`~diffwidget.widget.export.export_plan`.

        Examples
        --------
        >>> plan = explorer.export(steps=range(0, 50, 5))  # doctest: +SKIP
        >>> print(plan.summary())  # doctest: +SKIP
        >>> plan.write("explorer.html")  # doctest: +SKIP
        """
        return export_plan(self, **options)

    def to_html(self, path: str | Path, **options: Unpack[ExportOptions]) -> Path:
        """Write a standalone HTML file of this explorer that works offline.

        Takes the options of :meth:`export`, whose ``summary()`` says the size first.
        """
        return self.export(**options).write(path)

    def export_source(self) -> ExportSource:
        """What an export reads: the synced state plus the parts the view gets on request."""
        state = {
            spec.name: to_transport(getattr(self.widget, spec.name), "binary")
            for spec in schema.TRAITS
        }
        state["noisy_previews"] = self._noisy
        options = dict(state["layer_options"])
        options["attention"] = filter_values(options, state["attention_layer"])
        state["layer_options"] = options
        grid = self._grids.export_grid(self._views.export_grid)
        return ExportSource(state, self.trace.prompt, grid)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Stop background work, leave every link and close every widget it created."""
        self._closed = True
        for link in list(self._links):
            link.remove(self)
        self._jobs.close(timeout=CLOSE_TIMEOUT_S)
        for figure in self._figures:
            figure.unlink()
            close_widget_tree(figure)
        self._figures = []
        close_widget_tree(self.widget)

    def __repr__(self) -> str:
        return summary_line(self.widget)

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return mimebundle(self.widget, **kwargs)


def _generic(kind: str, result: Any) -> str:
    from diffwidget.explain.protocol import describe_saliency

    return describe_saliency(OVERLAY_LABELS[kind], result)
