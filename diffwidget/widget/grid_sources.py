"""Two layer × step grids computed on request: the causal grid and the concept grid.

* **Causal grid** (``grid = "patching"``): :class:`~diffwidget.explain.activation_patching.
  ActivationPatching` between the trace's prompt (A) and the same prompt with one word
  replaced (B, :func:`~diffwidget.explain.judges.replace_word`), from the trace's seed. Each
  cell is one number: the effect of patching B's output of that layer at that step into A's
  run — on the judged attribute where the scene world's exact judge applies, else the final
  image's change from A's own.
* **Concept grid** (``grid = "concept"``): :class:`~diffwidget.explain.concept_maps.
  ConceptMaps` of the typed word at every step, the word's map per layer and step (find the
  layer that grounds it), on a fixed 0–1 scale.

Both run in the explorer's job thread (progress bar, cancel button) and are cached: the
causal grid per (word, replacement), the concept grid per word. A cancelled or failed run
caches nothing. :class:`GridSources` keeps the caches and publishes the grid the view asks
for; :class:`GridSourceMethods` is the explorer's public side (a mixin).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from diffwidget.widget import schema
from diffwidget.widget.grid import (
    GRID_CELL_MAX,
    block_of,
    cell_size,
    grouped_rows,
    not_computed,
    row_label,
    shrink_maps,
)
from diffwidget.widget.payloads import CellScale, GridData, GridGroup

if TYPE_CHECKING:
    from diffwidget.explain.concept_results import ConceptMapsResult
    from diffwidget.explain.intervention_results import PatchingGrid
    from diffwidget.explain.judges import Judge
    from diffwidget.tracing.trace import Trace
    from diffwidget.widget.jobs import Jobs, Request
    from diffwidget.widget.model import ExplorerWidget

#: The grid sources computed here (``schema.GridSource``).
PATCHING = "patching"
CONCEPT_GRID = "concept"
#: Default stride between the causal grid's steps. Patching a site at step s re-runs the
#: steps s..N-1 for every layer, so the cost grows with the sum of the remaining steps: on
#: the embedded UNet (22 blocks, 20 steps, one CPU thread) every 4th step took 58 s on a
#: shared 2-core machine under a load of 5.6 (every 5th: 19 s under a load of 2.2); every
#: step costs 3.5× every 4th (210 against 60 denoiser steps per layer).
DEFAULT_PATCH_STRIDE = 4
#: What the cells of the causal grid show.
Measure = Literal["attribute", "image_change"]


def patch_steps(n_steps: int, stride: int = DEFAULT_PATCH_STRIDE) -> tuple[int, ...]:
    """The causal grid's default steps: every ``stride``-th loop index from 0.

    Examples
    --------
    >>> patch_steps(20)
    (0, 4, 8, 12, 16)
    """
    return tuple(range(0, n_steps, stride))


@dataclass(frozen=True, eq=False)
class PatchingRequest:
    """The causal grid of replacing ``word`` by ``replacement`` (a job's work record)."""

    word: str
    replacement: str
    layers: tuple[str, ...] | None
    steps: tuple[int, ...]

    @property
    def key(self) -> tuple[Any, ...]:
        """``("patching_grid", word, replacement, layers, steps)``."""
        return ("patching_grid", self.word, self.replacement, self.layers, self.steps)

    @property
    def label(self) -> str:
        """E.g. "causal grid red → blue"."""
        return f"causal grid {self.word} → {self.replacement}"


@dataclass(frozen=True)
class ConceptGridRequest:
    """The concept grid of ``word`` at every step (a job's work record)."""

    word: str

    @property
    def key(self) -> tuple[Any, ...]:
        """``("concept_grid", word)``."""
        return ("concept_grid", self.word)

    @property
    def label(self) -> str:
        """E.g. 'concept grid of "dog"'."""
        return f"concept grid of {self.word!r}"


def _no_reading(_image: np.ndarray) -> None:
    """A judge function that never answers (outside the scene world: image change only)."""
    return None


def patching_judges(prompt_a: str, prompt_b: str) -> tuple[list[Judge], Measure]:
    """The scene world's exact judges of the two prompts, or (outside it) a silent one.

    :class:`~diffwidget.explain.activation_patching.ActivationPatching` needs a judge; where
    none applies it gets one that never answers, and the grid shows the image change.

    Examples
    --------
    >>> judges, measure = patching_judges("a red circle on the left", "a blue circle on the left")
    >>> [j.attribute for j in judges], measure
    (['colour'], 'attribute')
    >>> patching_judges("a photo of a cat", "a photo of a dog")[1]
    'image_change'
    """
    from diffwidget.explain.judges import Judge, scene_judges

    try:
        return scene_judges(prompt_a, prompt_b), "attribute"
    except ValueError:
        silent = Judge("image", "prompt A", "prompt B", _no_reading, name="no judge")
        return [silent], "image_change"


def run_patching(
    pipe: Any, trace: Trace, work: PatchingRequest, progress: Callable[[int, int], bool]
) -> PatchingGrid | None:
    """Run the patching of ``work`` on the trace's seed; ``None`` when ``progress`` stopped it.

    Examples
    --------
    >>> request = PatchingRequest("red", "blue", None, (0, 4))
    >>> result = run_patching(pipe, trace, request, lambda d, t: True)  # doctest: +SKIP
    """
    from diffwidget.explain.activation_patching import ActivationPatching
    from diffwidget.explain.judges import replace_word
    from diffwidget.explain.protocol import Cancelled

    prompt_b = replace_word(trace.prompt, work.word, work.replacement)
    judges, _ = patching_judges(trace.prompt, prompt_b)
    layers = None if work.layers is None else list(work.layers)
    method = ActivationPatching(layers=layers, steps=list(work.steps), progress_bar=False)
    try:
        return method.run(pipe, trace, prompt_b, judges=judges, progress=progress)
    except Cancelled:
        return None


def _cell_measure(result: PatchingGrid, measure: Measure) -> tuple[np.ndarray, str, CellScale]:
    """Each cell's number ``(layers, steps)``, what it is, and its colour scale."""
    n_seeds = len(result.seeds)
    if measure == "attribute":
        # The first attribute the prompts differ in (one, for a replaced scene-world word).
        attribute, a_value, b_value = result.attributes[0], result.a_values[0], result.b_values[0]
        values = result.grid(attribute)
        what = (
            f"the share of {n_seeds} seed{'' if n_seeds == 1 else 's'} whose final image takes "
            f"B's {attribute} ({b_value}) instead of A's ({a_value}), read by the "
            f"{result.judges[0]} judge"
        )
        scale = CellScale(
            0.0, 1.0, f"share of seeds whose final image takes B's {attribute} ({b_value}): 0 to 1"
        )
    else:
        values = result.change_grid()
        what = (
            "the mean absolute change of the final image from A's own (0–1 of the pixel range, "
            f"mean over {n_seeds} seed{'' if n_seeds == 1 else 's'}); no scene-world judge "
            "applies to these prompts"
        )
        top = float(np.nanmax(values)) if np.isfinite(values).any() else 0.0
        if top > 0:
            scale = CellScale(0.0, top, f"image change, 0 to the grid's largest ({top:.3g})")
        else:  # no patch changed the image: the scale's top is one pixel range
            scale = CellScale(0.0, 1.0, "image change, 0 to 1 (no patch changed the image)")
    return values, what, scale


def patching_grid_data(result: PatchingGrid, measure: Measure) -> GridData:
    """The causal grid as scalar cells: rows the patched layers (grouped by block), columns
    the patched steps.

    ``"attribute"``: share of seeds whose final image takes B's value of the first judged
    attribute (fixed 0–1 scale); ``"image_change"``: mean absolute change of the final image
    from A's own, 0–1 of the pixel range (scale 0 to the grid's largest change).

    Examples
    --------
    >>> data = patching_grid_data(result, "attribute")  # doctest: +SKIP
    >>> data.cells.meaning  # doctest: +SKIP
    "share of seeds whose final image takes B's colour (blue): 0 to 1"
    """
    values, what, scale = _cell_measure(result, measure)
    halves = "both CFG halves" if result.halves == "both" else "the prompt's CFG half only"
    description = (
        f"Causal grid (activation patching): the run of “{result.prompt_a}” with one layer's "
        f"output (rows, grouped by block) at one step (columns) replaced by that of "
        f"“{result.prompt_b}” from the same noise ({halves}), every other activation and step "
        f"its own; each cell is {what}"
    )
    groups = []
    layers = list(result.layers)
    for rows in grouped_rows(layers, dict.fromkeys(layers, (1, 1))):
        block = block_of(rows[0])
        cells = np.stack([values[layers.index(name)] for name in rows]).astype(np.float32)
        codes = scale.position(cells)[:, :, None, None, None]
        ones = np.ones((*cells.shape, 1), np.float32)
        labels = [row_label(name, block) for name in rows]
        groups.append(GridGroup(block, rows, labels, (1, 1), codes, ones, cells))
    steps = [int(s) for s in result.steps]
    return GridData(PATCHING, groups, steps, [], description, scale)


def run_concept_grid(
    pipe: Any, trace: Trace, word: str, progress: Callable[[int, int], bool]
) -> ConceptMapsResult | None:
    """ConceptMaps of ``word`` (against the prompt's words) at every step; ``None`` if stopped.

    Examples
    --------
    >>> result = run_concept_grid(pipe, trace, "dog", lambda d, t: True)  # doctest: +SKIP
    >>> result.layer_step_grid("dog").shape  # doctest: +SKIP
    (7, 20, 16, 16)
    """
    from diffwidget.explain.concept_maps import ConceptMaps
    from diffwidget.widget.concept_overlay import competing_words

    words = competing_words(trace.prompt, word)
    method = ConceptMaps(words=tuple(words), progress_bar=False)
    result = method.attribute(pipe, trace, progress=progress)
    # A stopped run returns the steps done so far: a partial grid is never kept.
    return result if result.steps == list(range(trace.n_steps)) else None


def concept_grid_data(result: ConceptMapsResult, word: str) -> GridData:
    """The word's map per layer (rows, grouped by block) and step, on a fixed 0–1 scale.

    Each cell is :meth:`~diffwidget.explain.concept_results.ConceptMapsResult.layer_step_grid`
    (the layer's map upsampled to the latent), area-averaged to at most
    :data:`~diffwidget.widget.grid.GRID_CELL_MAX` a side; codes are ``value × 255``.

    Examples
    --------
    >>> concept_grid_data(result, "dog").groups[0].codes.shape  # doctest: +SKIP
    (2, 20, 1, 16, 16)
    """
    latent = (int(result.latent_hw[0]), int(result.latent_hw[1]))
    maps = shrink_maps(result.layer_step_grid(word), cell_size(latent))
    codes_all = np.rint(np.clip(np.nan_to_num(maps), 0.0, 1.0) * 255).astype(np.uint8)
    groups = []
    for rows in grouped_rows(list(result.layers), dict.fromkeys(result.layers, latent)):
        block = block_of(rows[0])
        index = [result.layers.index(name) for name in rows]
        codes = codes_all[index][:, :, None]
        ones = np.ones(codes.shape[:3], np.float32)
        labels = [row_label(name, block) for name in rows]
        groups.append(GridGroup(block, rows, labels, latent, codes, ones))
    how, where = result.method_text()
    others = ", ".join(w for w in result.words if w != word)
    description = (
        f"Concept map of “{word}” per attention layer (rows, grouped by block) and step "
        f"(columns): ConceptAttention scores ({how}, {where}), softmax over “{word}” and the "
        f"prompt's words ({others}); each layer's map upsampled to the {latent[0]}×{latent[1]} "
        f"latent, area-averaged to at most {GRID_CELL_MAX}×{GRID_CELL_MAX}; fixed 0–1 scale, "
        "not normalised: the word's share of each cell"
    )
    return GridData(CONCEPT_GRID, groups, list(result.steps), [], description)


class GridSources:
    """The computed grids of one explorer: caches, the view's requests, publishing.

    Parameters
    ----------
    widget : ExplorerWidget
        Where grids and errors are published.
    trace : Trace
        The explorer's trace.
    pipe : diffusers pipeline or None
        Computes the grids (without it only cached ones show: none).
    jobs : Jobs
        The explorer's job thread.
    """

    def __init__(self, widget: ExplorerWidget, trace: Trace, pipe: Any, jobs: Jobs) -> None:
        self.widget = widget
        self.trace = trace
        self.pipe = pipe
        self.jobs = jobs
        self._lock = threading.Lock()
        self._patching: dict[tuple[str, str], GridData] = {}
        self._concepts: dict[str, GridData] = {}
        #: The finished runs' results by their request's key (what a repeated call returns).
        self.results: dict[tuple[Any, ...], Any] = {}
        self.quiet = False  # True while code sets the traits (its own request is queued)
        widget.observe(self._words_changed, names=["concept", "patch_word", "patch_replacement"])

    # ----------------------------------------------------------------- requests
    def patching(
        self,
        word: str,
        replacement: str,
        layers: Sequence[str] | None,
        steps: Sequence[int] | None,
    ) -> Future:
        """Queue the causal grid (a clear error before any work)."""
        from diffwidget.explain.judges import replace_word

        if self.pipe is None:
            raise RuntimeError(
                "the causal grid runs the pipeline: create the explorer with "
                "Explorer(trace, pipe=pipe)"
            )
        word = schema.validate_concept(word, "the patched word")
        replacement = schema.validate_concept(replacement, "the replacement word")
        replace_word(self.trace.prompt, word, replacement)
        chosen = patch_steps(self.trace.n_steps) if steps is None else tuple(int(s) for s in steps)
        bad = [s for s in chosen if not 0 <= s < self.trace.n_steps]
        if bad or not chosen:
            raise ValueError(
                f"steps must be loop indices in 0..{self.trace.n_steps - 1}, got {list(chosen)}"
            )
        kept = None if layers is None else tuple(str(name) for name in layers)
        work = PatchingRequest(word, replacement, kept, tuple(sorted(set(chosen))))
        with self._lock:
            computed = self.results.get(work.key)
        if computed is not None:
            done: Future = Future()
            done.set_result(computed)
            return done
        return self.jobs.submit(work, explicit=True)

    def concept(self, word: str) -> Future:
        """Queue the concept grid of ``word`` (at once done when cached)."""
        if self.pipe is None:
            raise RuntimeError(
                "the concept grid runs the pipeline: create the explorer with "
                "Explorer(trace, pipe=pipe)"
            )
        word = schema.validate_concept(word)
        if not word:
            raise ValueError("type a concept word, e.g. explorer.concept_grid('dog')")
        with self._lock:
            cached = self._concepts.get(word)
        if cached is not None:
            done: Future = Future()
            done.set_result(self.results.get(ConceptGridRequest(word).key))
            return done
        return self.jobs.submit(ConceptGridRequest(word), explicit=True)

    def run(self, request: Request, progress: Callable[[int, int], bool]) -> Any:
        """The job thread's side: compute, and cache only a run that finished."""
        work = request.work
        result: Any
        if isinstance(work, PatchingRequest):
            result = run_patching(self.pipe, self.trace, work, progress)
            if result is None or request.cancel.is_set():
                return None
            _, measure = patching_judges(result.prompt_a, result.prompt_b)
            data = patching_grid_data(result, measure)
            with self._lock:
                self._patching[(work.word, work.replacement)] = data
                self.results[work.key] = result
        else:
            assert isinstance(work, ConceptGridRequest)
            result = run_concept_grid(self.pipe, self.trace, work.word, progress)
            if result is None or request.cancel.is_set():
                return None
            data = concept_grid_data(result, work.word)
            with self._lock:
                self._concepts[work.word] = data
                self.results[work.key] = result
        if self.shown() is data:  # the view waits for this grid
            self.widget.publish("grid_data", data.to_json())
        return result

    # ----------------------------------------------------------------- the view
    def shown(self) -> GridData | None:
        """The cached grid the view asks for now (``None``: not computed, or another source)."""
        source = str(self.widget.grid)
        with self._lock:
            if source == PATCHING:
                pair = (str(self.widget.patch_word), str(self.widget.patch_replacement))
                return self._patching.get(pair)
            if source == CONCEPT_GRID:
                return self._concepts.get(str(self.widget.concept))
        return None

    def publish(self) -> bool:
        """Send the grid of a source computed here; False for the other sources.

        Raises
        ------
        ValueError
            When it is not computed yet: the message says how to compute it.
        """
        source = str(self.widget.grid)
        if source not in (PATCHING, CONCEPT_GRID):
            return False
        data = self.shown()
        self.widget.publish("grid_data", None if data is None else data.to_json())
        if data is None:
            self._missing(source)
        return True

    def export_grid(self, other: Callable[[], GridData | None]) -> GridData | None:
        """The open grid for an export: a source of this module's, else ``other()``."""
        if str(self.widget.grid) in (PATCHING, CONCEPT_GRID):
            return self.shown()
        return other()

    def _missing(self, source: str) -> None:
        if source == CONCEPT_GRID:
            word = str(self.widget.concept)
            if not word or self.pipe is None:
                raise not_computed(
                    "the concept grid",
                    "for a word: type it in the concept box (or explorer.concept_grid('dog'); "
                    "both need Explorer(trace, pipe=pipe))",
                )
            if not self.quiet:
                self.jobs.submit(ConceptGridRequest(word), explicit=True)
            return
        word, replacement = str(self.widget.patch_word), str(self.widget.patch_replacement)
        if not word or not replacement or self.pipe is None:
            raise not_computed(
                "the causal grid",
                "for a word of the prompt and its replacement: type both in the grid's boxes "
                "(or explorer.patching_grid('red', 'blue'); both need "
                "Explorer(trace, pipe=pipe))",
            )
        if not self.quiet:
            self.patching(word, replacement, None, None)

    def _words_changed(self, _change: Any) -> None:
        try:
            self.publish()
        except (ValueError, RuntimeError) as exc:
            self.widget.error = str(exc)


class GridSourceMethods:
    """The explorer's calls for the computed grids (a mixin of the explorer)."""

    widget: ExplorerWidget
    _grids: GridSources

    def patching_grid(
        self,
        word: str,
        replacement: str,
        layers: Sequence[str] | None = None,
        steps: Sequence[int] | None = None,
    ) -> Future:
        """The causal layer × step grid of replacing ``word`` by ``replacement``, in the background.

        :class:`~diffwidget.explain.activation_patching.ActivationPatching` patches prompt B's
        (the prompt with ``word`` replaced, traced from the same seed) output of one layer
        at one step into this trace's run, for every (layer, step). A cell is the share of
        seeds whose final image takes B's value of the judged attribute (scene-world
        prompts: the exact reader), else the final image's change from this trace's.
        The view shows it with ``explorer.grid = "patching"`` once its boxes hold the same
        two words (this call fills them). Cached per (word, replacement); ``cancel()`` stops it.

        Cost: each patched site re-runs the steps after it, so a column at step ``s`` costs
        ``N - s`` denoiser steps per layer. The default steps, every 4th
        (:data:`DEFAULT_PATCH_STRIDE`), with the family's blocks as layers took 58 s on the
        embedded UNet (22 blocks, 20 steps) on one CPU thread of a loaded machine (load 5.6
        on 2 cores; every 5th step: 19 s under load 2.2); every step costs 3.5× as much.

        Parameters
        ----------
        word, replacement : str
            A word of the prompt and the word prompt B has instead.
        layers : sequence of str, optional
            Module paths to patch (default: the family's blocks, as DF-CAM's grid).
        steps : sequence of int, optional
            Steps to patch (default: every 4th from 0).

        Returns
        -------
        Future
            Holding the :class:`~diffwidget.explain.intervention_results.PatchingGrid`
            (``None`` when cancelled).

        Examples
        --------
        >>> grid = explorer.patching_grid("red", "blue").result()  # doctest: +SKIP
        >>> grid.grid("colour").shape  # (layers, steps)  # doctest: +SKIP
        (22, 5)
        """
        future = self._grids.patching(word, replacement, layers, steps)
        self._grids.quiet = True
        try:
            with self.widget.hold_sync():
                self.widget.patch_word = schema.validate_concept(word)
                self.widget.patch_replacement = schema.validate_concept(replacement)
        finally:
            self._grids.quiet = False
        return future

    def concept_grid(self, word: str) -> Future:
        """The layer × step grid of ``word``'s concept map, in the background.

        :class:`~diffwidget.explain.concept_maps.ConceptMaps` at every step, ``word``
        against the prompt's content words; one denoiser call per step (the embedded UNet's
        20 steps: 0.6 s on one thread under a load of 2, 1.2 s under 5.6 on 2 cores).
        Shown with ``explorer.grid = "concept"`` when ``explorer.concept`` is the same word.
        Cached per word; ``cancel()`` stops it.

        Returns
        -------
        Future
            Holding the :class:`~diffwidget.explain.concept_results.ConceptMapsResult`
            (``None`` when cancelled).

        Examples
        --------
        >>> result = explorer.concept_grid("circle").result()  # doctest: +SKIP
        >>> result.layer_step_grid("circle").shape  # doctest: +SKIP
        (7, 20, 16, 16)
        """
        return self._grids.concept(word)
