"""The explorer's background work: faithfulness of the shown map, exact decodes, the worker
(prompt switches: :mod:`diffwidget.widget.switch_view`).

:class:`ExplorerWork` is a mixin of :class:`~diffwidget.widget.explorer.Explorer`: the
façade keeps the state; this part runs what the jobs thread computes and reports it back
through the widget's traits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from diffwidget.widget import schema
from diffwidget.widget.codecs import decode_array, encode_array
from diffwidget.widget.concept_overlay import (
    CONCEPT,
    ConceptCache,
    ConceptEntry,
    ConceptRequest,
    compute_concept,
)
from diffwidget.widget.curves import CurveSet
from diffwidget.widget.grid_sources import (
    ConceptGridRequest,
    GridSourceMethods,
    GridSources,
    PatchingRequest,
)
from diffwidget.widget.jobs import Jobs, Request
from diffwidget.widget.layers import on_latent
from diffwidget.widget.previews import preview_text, shrink_images
from diffwidget.widget.reporting import FaithfulnessView, faithfulness_entry
from diffwidget.widget.switch_view import SwitchRequest, SwitchWork

if TYPE_CHECKING:
    from diffwidget.explain.attention import AttentionResult
    from diffwidget.explain.protocol import SaliencyMethod
    from diffwidget.explain.results import SaliencyMap
    from diffwidget.tracing.trace import Trace
    from diffwidget.widget.model import ExplorerWidget

OVERLAY_LABELS = schema.OVERLAY_LABELS


class _Stopped(Exception):
    """Raised inside a computation whose progress callback asked it to stop."""


@dataclass(frozen=True)
class OverlayRequest:
    """Compute the saliency overlay ``overlay`` at loop index ``step``."""

    overlay: str
    step: int

    @property
    def key(self) -> tuple[Any, ...]:
        """``("overlay", overlay, step)``."""
        return ("overlay", self.overlay, self.step)

    @property
    def label(self) -> str:
        """E.g. "DF-RISE at step 3"."""
        return f"{OVERLAY_LABELS[self.overlay]} at step {self.step}"


@dataclass(frozen=True, eq=False)
class FaithfulnessRequest:
    """Insertion/deletion curves of ``saliency``, the map the ``view`` shows."""

    view: FaithfulnessView
    saliency: np.ndarray

    @property
    def key(self) -> tuple[Any, ...]:
        """``("faithfulness", *view.key())``: one request per map shown."""
        return ("faithfulness", *self.view.key())

    @property
    def label(self) -> str:
        """E.g. "faithfulness of DF-RISE at step 3"."""
        return f"faithfulness of {OVERLAY_LABELS[self.view.overlay]} at step {self.view.step}"


class ExplorerWork(SwitchWork, GridSourceMethods):
    """Faithfulness, exact decodes and the worker callbacks of an explorer."""

    trace: Trace
    pipe: Any
    widget: ExplorerWidget
    attention_result: AttentionResult | None
    _jobs: Jobs
    _lock: threading.Lock
    _evaluator: Any
    _faith: dict[tuple[Any, ...], dict[str, Any]]
    _curves: CurveSet
    _concepts: ConceptCache
    _grids: GridSources

    def add_curve(
        self, name: str, values: Any, group: str = "concept_auc", token: int | None = None
    ) -> None:
        raise NotImplementedError

    @property
    def step(self) -> int:
        """Loop index shown."""
        return int(self.widget.step)

    def _method(self, kind: str) -> SaliencyMethod:
        raise NotImplementedError

    def _store(self, kind: str, step: int, result: Any) -> None:
        raise NotImplementedError

    def cached(self, kind: str) -> dict[int, SaliencyMap]:
        """Results computed so far for ``kind``, keyed by step."""
        raise NotImplementedError

    # ----------------------------------------------------------------- faithfulness
    def faithfulness(self, step: int | None = None) -> Future:
        """Insertion/deletion curves of the map shown now (overlay, token, layer) at ``step``.

        Computed in the background beside seeded random orders; the result appears in the
        view's faithfulness panel. Returns a future holding the
        :class:`~diffwidget.explain.results.FaithfulnessResult`.

        Examples
        --------
        >>> explorer.overlay = "df_rise"  # doctest: +SKIP
        >>> result = explorer.faithfulness().result()  # doctest: +SKIP
        >>> result.deletion_gain > 0  # the map beats random orders  # doctest: +SKIP
        True
        """
        return self._submit_faithfulness(step, explicit=True)

    def _request_faithfulness(self) -> None:
        try:
            self._submit_faithfulness(None, explicit=False)
        except (RuntimeError, ValueError) as exc:
            self.widget.error = str(exc)

    def _submit_faithfulness(self, step: int | None, *, explicit: bool) -> Future:
        if self._evaluator is None and self.pipe is None:
            raise RuntimeError(
                "faithfulness needs the pipeline (Explorer(trace, pipe=pipe)) or an evaluator "
                "(faithfulness=InsertionDeletion(...))"
            )
        view = FaithfulnessView.of(self.widget, self.step if step is None else step)
        return self._jobs.submit(
            FaithfulnessRequest(view, self._shown_map(view)), explicit=explicit
        )

    def _shown_map(self, view: FaithfulnessView) -> np.ndarray:
        if view.overlay == "attention":
            if self.attention_result is None:
                raise ValueError("this trace holds no attention maps to evaluate")
            # Kept on its own grid; judged on the latent grid, as the view shows it.
            return on_latent(
                self.attention_result, view.step, view.token or 0, self.trace.latent_shape
            )
        if view.overlay == CONCEPT:
            raise ValueError(
                "faithfulness judges a map of the prediction; a concept map is of a word "
                "(choose attention or a saliency method)"
            )
        if view.overlay not in schema.HEAVY_OVERLAYS:
            raise ValueError("choose an overlay first: faithfulness judges the map shown")
        result = self.cached(view.overlay).get(view.step)
        if result is None:
            raise ValueError(
                f"{OVERLAY_LABELS[view.overlay]} is not computed for step {view.step}; "
                f"compute it first (explorer.compute({view.overlay!r}, {view.step}))"
            )
        chosen = result.layers.get(view.layer) if view.layer else None
        return np.asarray(chosen if chosen is not None else result.raw)

    def _evaluator_or_default(self) -> Any:
        if self._evaluator is None:
            from diffwidget.explain.faithfulness import InsertionDeletion

            self._evaluator = InsertionDeletion()
        return self._evaluator

    # ----------------------------------------------------------------- exact previews
    def decode_exact(self, step: int | None = None) -> None:
        """Replace the x̂0 preview of ``step`` (default: the current one) by a full VAE decode.

        Traces show fast previews from a tiny decoder; this decodes one step exactly.

        Examples
        --------
        >>> explorer.decode_exact(12)  # doctest: +SKIP
        >>> explorer.widget.exact_steps  # doctest: +SKIP
        [12]
        """
        from diffwidget.widget.previews import exact_preview

        step = schema.validate_incoming(
            "step", self.step if step is None else step, self.widget.bounds()
        )
        image = exact_preview(self.trace, self.pipe, step)
        previews = np.array(decode_array(self.widget.previews), copy=True)
        previews[step] = shrink_images(image[None])[0]
        exact = sorted({*self.widget.exact_steps, step})
        with self.widget.hold_sync():
            self.widget.publish("previews", encode_array(previews))
            self.widget.exact_steps = exact
            descriptions = dict(self.widget.descriptions)
            descriptions["x0"] = preview_text(self.trace, exact)
            self.widget.descriptions = descriptions

    def _decode_from_view(self) -> None:
        try:
            self.decode_exact()
        except (RuntimeError, ValueError, TypeError) as exc:
            self.widget.error = str(exc)

    # ----------------------------------------------------------------- concept maps
    @property
    def concept(self) -> str:
        """The word whose concept map the "concept" overlay shows ('' = none).

        Any word or short phrase, in the prompt or not; setting it (and ``overlay =
        "concept"``) computes its map at the step shown, as typing it in the view does.
        """
        return str(self.widget.concept)

    @concept.setter
    def concept(self, value: str) -> None:
        try:
            value = schema.validate_incoming("concept", value, self.widget.bounds())
        except schema.InvalidInput as exc:
            raise ValueError(str(exc)) from None
        self.widget.concept = value

    def compute_concept(self, word: str, step: int | None = None) -> Future:
        """The concept map of ``word`` at ``step`` (default: the current one), in the background.

        ConceptAttention (:class:`~diffwidget.explain.concept_maps.ConceptMaps`): the step is
        replayed with the word and the prompt's content words as concept tokens; the
        future holds the word's :class:`~diffwidget.widget.concept_overlay.ConceptEntry`
        (``None`` if cancelled). Cached per word and step; ``cancel()`` stops it.

        Examples
        --------
        >>> explorer.compute_concept("dog").result().map.shape  # doctest: +SKIP
        (16, 16)
        """
        if self.pipe is None:
            raise RuntimeError(
                "concept maps need the pipeline: create the explorer with "
                "Explorer(trace, pipe=pipe)"
            )
        word = schema.validate_incoming("concept", word, self.widget.bounds())
        if not word:
            raise ValueError("type a concept word, e.g. explorer.compute_concept('dog')")
        step = schema.validate_incoming(
            "step", self.step if step is None else step, self.widget.bounds()
        )
        cached = self._concepts.get(word, step)
        if cached is not None:
            done: Future = Future()
            done.set_result(cached)
            return done
        return self._jobs.submit(ConceptRequest(word, step), explicit=True)

    def _request_concept(self) -> None:
        word = str(self.widget.concept)
        if not word or self._concepts.get(word, self.step) is not None:
            return
        if self.pipe is None:
            self.widget.error = (
                "concept maps are computed by the pipeline; create the explorer with "
                "Explorer(trace, pipe=pipe)"
            )
            return
        self._jobs.submit(ConceptRequest(word, self.step), explicit=False)

    def _sync_concept(self) -> None:
        shown = self._concepts.overlay_set(str(self.widget.concept))
        overlays = dict(self.widget.overlays)
        if shown is None:
            overlays.pop(CONCEPT, None)
        else:
            overlays[CONCEPT] = shown.to_json()
        self.widget.publish("overlays", overlays)

    def _run_concept(
        self, request: Request, work: ConceptRequest, progress: Callable[[int, int], bool]
    ) -> ConceptEntry | None:
        entries = compute_concept(self.pipe, self.trace, work, progress)
        if request.cancel.is_set() or not entries:
            return None
        self._concepts.store(entries)
        self._sync_concept()
        return next(e for e in entries if e.word == work.word)

    # ----------------------------------------------------------------- the worker
    def _run(self, request: Request, progress: Callable[[int, int], bool]) -> Any:
        work = request.work
        if isinstance(work, ConceptRequest):
            return self._run_concept(request, work, progress)
        if isinstance(work, OverlayRequest):
            method = self._method(work.overlay)
            result = method.attribute(self.pipe, self.trace, work.step, progress=progress)
            if not request.cancel.is_set():
                self._store(work.overlay, work.step, result)
            return result
        if isinstance(work, SwitchRequest):
            return self._switch(work, progress)
        if isinstance(work, (PatchingRequest, ConceptGridRequest)):
            return self._grids.run(request, progress)
        assert isinstance(work, FaithfulnessRequest)

        def stop_when_asked(done: int, total: int) -> bool:
            # Raised, not returned: any evaluator stops, also one that ignores False.
            if not progress(done, total):
                raise _Stopped
            return True

        view = work.view
        try:
            result = self._evaluator_or_default().evaluate(
                self.pipe, self.trace, view.step, work.saliency, stop_when_asked
            )
        except _Stopped:
            return None
        entry = faithfulness_entry(view, result)
        with self._lock:
            self._faith[view.key()] = entry
            entries = list(self._faith.values())
        self.widget.publish("faithfulness", entries)
        return result

    def _job_started(self, request: Request) -> None:
        with self.widget.hold_sync():
            self.widget.status = "running"
            self.widget.progress = 0.0

    def _job_progress(self, request: Request, fraction: float) -> None:
        if not request.cancel.is_set():
            self.widget.progress = float(fraction)

    def _job_done(self, request: Request, result: Any) -> None:
        with self.widget.hold_sync():
            self.widget.progress = 1.0
            if not self._jobs.waiting:
                self.widget.status = "done"

    def _job_cancelled(self, request: Request, _partial: Any) -> None:
        if not self._jobs.waiting:
            self.widget.status = "cancelled"

    def _job_failed(self, request: Request, exc: BaseException) -> None:
        with self.widget.hold_sync():
            self.widget.status = "error"
            self.widget.error = f"{request.label} failed: {exc}"
