"""The explorer's "when is it decided" view: a prompt switch started from the page.

The user picks a content word of the prompt (``switch_word``, one of ``switch_words``), types
its replacement (``switch_replacement``, checked like the concept word), chooses how many
seeds to judge (``switch_seeds``, 1..``SWITCH_MAX_SEEDS``) and presses *switch*: the view
sends ``prompt_switch`` and the kernel runs
:class:`~diffwidget.explain.prompt_switch.PromptSwitch` in the explorer's job thread, with the
progress bar and cancel button every heavy job has. Seeds the explorer holds no trace of (its
own seed + 1, + 2, ...) are first traced in that job with the explorer trace's settings
(:func:`~diffwidget.tracing.branch_setup.retrace`), on the same progress bar, and kept for the
next switch. When it ends, each judged attribute's commitment curve (the share of seeds
keeping A's value) goes to the curve group :data:`COMMITMENT` (beside the concept probes'
ROC-AUC on the same step axis) and the final image of each switch step, for the first seed,
goes to ``switch`` (:class:`SwitchFilmstrip`), the filmstrip under the curves.
:meth:`SwitchWork.prompt_switch` called from Python sets the same traits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from diffwidget.widget import schema
from diffwidget.widget.codecs import decode_array, encode_array
from diffwidget.widget.concept_overlay import prompt_words
from diffwidget.widget.curves import Curve, CurveSet
from diffwidget.widget.payloads import PayloadError, _field, _ints, _strings
from diffwidget.widget.previews import shrink_images

if TYPE_CHECKING:
    from diffwidget.explain.intervention_results import CommitmentCurves
    from diffwidget.tracing.trace import Trace
    from diffwidget.widget.jobs import Jobs
    from diffwidget.widget.model import ExplorerWidget

#: The curve group of the commitment curves (one of ``schema.CURVE_GROUPS``).
COMMITMENT: schema.CurveGroup = "commitment"
#: Largest side of a filmstrip thumbnail, in pixels (shown at about 56 CSS pixels).
FILMSTRIP_SIZE = 64
#: Why the switch button cannot run without a pipeline (also raised from Python).
NO_PIPELINE = "a prompt switch needs the pipeline: Explorer(trace, pipe=pipe)"


@dataclass(frozen=True)
class SwitchFilmstrip:
    """What the page shows of one prompt switch (``SwitchFilmstrip`` in schema.ts).

    Attributes
    ----------
    word, replacement : str
        The prompt word switched and what it became.
    prompt_b : str
        The prompt after the switch.
    seed : int
        The seed whose final images ``images`` are.
    n_seeds : int
        Seeds the commitment curves were judged over.
    n_steps : int
        Denoising steps of the trace (``k = n_steps``: no switch, prompt A's own image).
    steps : list of int
        The switch step ``k`` of each image.
    images : ndarray of uint8, shape (K, h, w, 3)
        The final image of each switch step, shrunk to :data:`FILMSTRIP_SIZE`.
    attributes : list of str
        The judged attributes.
    a_values : list of str
        Each attribute's value in prompt A (what "kept" means).
    committed : list of int or None
        Per attribute, the first switch step from which the committed share of seeds keeps
        A's value and stays there (:meth:`CommitmentCurves.committed_step`); None: never.
    """

    word: str
    replacement: str
    prompt_b: str
    seed: int
    n_seeds: int
    n_steps: int
    steps: list[int]
    images: np.ndarray
    attributes: list[str]
    a_values: list[str]
    committed: list[int | None]

    def __post_init__(self) -> None:
        k = len(self.steps)
        shape = self.images.shape
        if self.images.dtype != np.uint8 or len(shape) != 4 or shape[0] != k or shape[3] != 3:
            raise PayloadError(f"images must be uint8 [K, h, w, 3] with K = {k}, got {shape}")
        if not len(self.committed) == len(self.a_values) == len(self.attributes):
            raise PayloadError("the filmstrip needs one value and committed step per attribute")

    @classmethod
    def of(cls, curves: CommitmentCurves, word: str, replacement: str) -> SwitchFilmstrip:
        """The filmstrip of ``curves`` (first seed), thumbnails shrunk to FILMSTRIP_SIZE."""
        return cls(
            word=word,
            replacement=replacement,
            prompt_b=curves.prompt_b,
            seed=int(curves.seeds[0]),
            n_seeds=len(curves.seeds),
            n_steps=int(curves.n_steps),
            steps=[int(k) for k in curves.switch_steps],
            images=shrink_images(curves.filmstrip(0), FILMSTRIP_SIZE),
            attributes=list(curves.attributes),
            a_values=list(curves.a_values),
            committed=[curves.committed_step(a) for a in curves.attributes],
        )

    def keep_steps(self, keep: Sequence[int]) -> SwitchFilmstrip:
        """The filmstrip of a file that keeps only the loop indices ``keep``, renumbered.

        Switch steps not kept are dropped; prompt A's own image (``k = n_steps``) stays last.
        A committed step becomes the first kept step at or after it.

        Examples
        --------
        >>> film.keep_steps([0, 10]).steps  # doctest: +SKIP
        [0, 1, 2]
        """
        position = {int(s): i for i, s in enumerate(keep)}
        position[self.n_steps] = len(keep)
        rows = [i for i, k in enumerate(self.steps) if k in position]

        def renumbered(k: int | None) -> int | None:
            if k is None:
                return None
            return next((i for i, s in enumerate(keep) if s >= k), len(keep))

        return replace(
            self,
            n_steps=len(keep),
            steps=[position[self.steps[i]] for i in rows],
            images=self.images[rows],
            committed=[renumbered(k) for k in self.committed],
        )

    def to_json(self) -> dict[str, Any]:
        """The trait value."""
        return {
            "word": self.word,
            "replacement": self.replacement,
            "prompt_b": self.prompt_b,
            "seed": self.seed,
            "n_seeds": self.n_seeds,
            "n_steps": self.n_steps,
            "steps": list(self.steps),
            "images": encode_array(self.images),
            "attributes": list(self.attributes),
            "a_values": list(self.a_values),
            "committed": list(self.committed),
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> SwitchFilmstrip:
        """Read a trait value back, every field checked."""
        committed = _field(value, "committed", (list, tuple))
        if not all(
            c is None or (isinstance(c, int) and not isinstance(c, bool)) for c in committed
        ):
            raise PayloadError("payload field 'committed' must hold integers or null")
        images = decode_array(_field(value, "images", Mapping))
        return cls(
            word=_field(value, "word", str),
            replacement=_field(value, "replacement", str),
            prompt_b=_field(value, "prompt_b", str),
            seed=_field(value, "seed", int),
            n_seeds=_field(value, "n_seeds", int),
            n_steps=_field(value, "n_steps", int),
            steps=_ints(value, "steps"),
            images=images,
            attributes=_strings(value, "attributes"),
            a_values=_strings(value, "a_values"),
            committed=list(committed),
        )


@dataclass(frozen=True)
class SwitchAsk:
    """The view's ``prompt_switch`` message: the picked word, the typed replacement, the seeds.

    The values travel in the message (not only in the traits) so that a refused trait write
    can never start a switch with the value it replaced.
    """

    word: str
    replacement: str
    seeds: int = 1

    @classmethod
    def from_message(cls, content: Mapping[str, Any], bounds: schema.Bounds) -> SwitchAsk:
        """Check the values as the traits ``switch_word``, ``switch_replacement`` and
        ``switch_seeds`` are checked (a message without ``seeds`` asks for one seed).

        Raises
        ------
        ValueError
            Saying what is accepted (:class:`~diffwidget.widget.schema.InvalidInput`).

        Examples
        --------
        >>> bounds = schema.Bounds(2, 2, choices={"switch_word": ["red"]})
        >>> SwitchAsk.from_message({"kind": "prompt_switch", "word": "red",
        ...                         "replacement": " blue ", "seeds": 3}, bounds)
        SwitchAsk(word='red', replacement='blue', seeds=3)
        """
        word = schema.validate_incoming("switch_word", content.get("word", ""), bounds)
        replacement = schema.validate_incoming(
            "switch_replacement", content.get("replacement", ""), bounds
        )
        seeds = schema.validate_incoming("switch_seeds", content.get("seeds", 1), bounds)
        if not word or not replacement:
            raise ValueError("choose a word of the prompt and type its replacement")
        return cls(word, replacement, seeds)


@dataclass(frozen=True, eq=False)
class SwitchRequest:
    """Switch the explorer's prompt to one with ``word`` replaced, from every step.

    Attributes
    ----------
    traces : tuple of Trace
        Traces of prompt A held when asked (the explorer's first).
    to_trace : tuple of int
        Further seeds, traced with the explorer trace's settings before the switch.
    """

    word: str
    replacement: str
    traces: tuple[Trace, ...]
    to_trace: tuple[int, ...]
    switch_steps: tuple[int, ...] | None

    @property
    def seeds(self) -> tuple[int | None, ...]:
        """Every seed judged, in order: the held traces' (None: not recorded), then new ones."""
        return (*(t.facts.seed for t in self.traces), *self.to_trace)

    @property
    def key(self) -> tuple[Any, ...]:
        """``("prompt_switch", word, replacement, seeds, switch steps)``."""
        return ("prompt_switch", self.word, self.replacement, self.seeds, self.switch_steps)

    @property
    def label(self) -> str:
        """E.g. "prompt switch red → blue (3 seeds)"."""
        n = len(self.seeds)
        return f"prompt switch {self.word} → {self.replacement} ({n} seed{'s' * (n > 1)})"


def seeds_to_trace(held: Sequence[int | None], n: int) -> list[int]:
    """The seeds to trace so that a switch judges ``n`` seeds, given the held traces' seeds.

    New seeds follow the first held one (the explorer's): + 1, + 2, ..., skipping held seeds.

    Raises
    ------
    ValueError
        When seeds are missing and the first trace recorded no seed to follow.

    Examples
    --------
    >>> seeds_to_trace([4, 6], 4)
    [5, 7]
    >>> seeds_to_trace([4, 6, 9], 2)
    []
    """
    missing = n - len(held)
    if missing <= 0:
        return []
    if held[0] is None:
        raise ValueError(
            "the explorer's trace recorded no seed, so no new seed can follow it; pass "
            "traces= of more seeds, or ask for one seed"
        )
    taken = set(held)
    seed = int(held[0])
    chosen: list[int] = []
    while len(chosen) < missing:
        seed += 1
        if seed not in taken:
            chosen.append(seed)
    return chosen


def _branch_steps(n_seeds: int, n_steps: int, switch_steps: Sequence[int] | None) -> int:
    """Denoising steps of the switch's branch run: each seed from each switch step ``k``."""
    ks = range(n_steps + 1) if switch_steps is None else set(switch_steps)
    return n_seeds * sum(max(n_steps - k, 0) for k in ks)


def commitment_series(curves: CommitmentCurves, n_steps: int) -> list[Curve]:
    """One curve per judged attribute on the step axis (NaN where not switched).

    ``k = n_steps`` (prompt A's own image) lies past the axis and is left out.

    Examples
    --------
    >>> [c.name for c in commitment_series(curves, 4)]  # doctest: +SKIP
    ['colour']
    """
    series = []
    inside = curves.switch_steps < n_steps
    for attribute in curves.attributes:
        values = np.full(n_steps, np.nan, np.float32)
        keep, _, _ = curves.keep_a(attribute)
        values[curves.switch_steps[inside]] = keep[inside]
        # The attribute alone: the group's title says what is kept, the filmstrip the values.
        series.append(Curve(attribute, COMMITMENT, None, values))
    return series


def _content_word(words: Sequence[str], word: str) -> str:
    for candidate in words:
        if candidate.lower() == word.strip().lower():
            return candidate
    raise ValueError(
        f"{word!r} is not one of the prompt's content words; choose one of {list(words)}"
    )


class SwitchWork:
    """The prompt switch of an explorer: Python API, page button and what it publishes."""

    trace: Trace
    pipe: Any
    widget: ExplorerWidget
    _jobs: Jobs
    _curves: CurveSet
    #: The last prompt switch computed from this explorer (:meth:`prompt_switch`).
    commitment: CommitmentCurves | None
    _switch_setup: tuple[tuple[Trace, ...], tuple[int, ...] | None]
    #: Traces of prompt A made for a switch, by seed (written and read in the job thread).
    _seed_traces: dict[int, Trace]

    def _sync_curves(self) -> None:
        raise NotImplementedError

    def _init_switch(self) -> None:
        self.commitment = None
        self._switch_setup = ((), None)
        self._seed_traces = {}
        self.widget.switch_words = prompt_words(self.trace.prompt)
        self.widget.on_message("prompt_switch", self._switch_from_view)

    def prompt_switch(
        self,
        word: str,
        replacement: str,
        *,
        seeds: int | None = None,
        traces: Sequence[Trace] = (),
        switch_steps: Sequence[int] | None = None,
    ) -> Future:
        """Switch ``word`` to ``replacement`` from every step, in the background.

        Runs :class:`~diffwidget.explain.prompt_switch.PromptSwitch` on the explorer's trace
        (and ``traces``: more seeds of the same prompt) with the view's progress bar and
        cancel button, as the view's *switch* button does (which then reuses these
        ``traces`` and ``switch_steps``). ``seeds`` asks for that many seeds: the first of
        the explorer's trace and ``traces``, then its seed + 1, + 2, ... (skipping seeds
        already held), traced first in the same job with the explorer trace's settings and
        kept for later switches. The picker shows ``word``, ``replacement`` and the seed count.
        When it ends, each judged attribute's commitment curve (share of seeds whose final
        image keeps the value of this prompt when the prompt is switched at that step) is
        drawn in the curve group ``"commitment"``, on the step axis of the concept curves;
        the filmstrip shows the final image of each switch step (first seed), and
        ``explorer.commitment`` holds the full result.

        Parameters
        ----------
        word, replacement : str
            The prompt's word to switch and what it becomes.
        seeds : int, optional
            Seeds to judge, 1..``SWITCH_MAX_SEEDS`` (the view's *seeds* box); by default the
            explorer's trace and every one of ``traces``.
        traces : sequence of Trace
            More traces of the explorer's prompt, made with its settings.
        switch_steps : sequence of int, optional
            Switch steps ``k`` (default every step, and ``n_steps``: no switch).

        Returns
        -------
        Future
            Holding the :class:`~diffwidget.explain.intervention_results.CommitmentCurves`
            (``None`` when cancelled).

        Examples
        --------
        >>> curves = explorer.prompt_switch("red", "blue", seeds=4).result()  # doctest: +SKIP
        >>> curves.seeds  # doctest: +SKIP
        array([0, 1, 2, 3])
        >>> explorer.figure("commitment")  # doctest: +SKIP
        """
        from diffwidget.explain.judges import replace_word

        if self.pipe is None:
            raise RuntimeError(NO_PIPELINE)
        held = (self.trace, *traces)
        try:
            bounds = self.widget.bounds()
            replacement = schema.validate_incoming("switch_replacement", replacement, bounds)
            # The view's bound on traced seeds; by default every trace given, however many.
            n = len(held)
            if seeds is not None:
                # A NumPy integer from Python is a count like any other (a page sends ints).
                plain = int(seeds) if isinstance(seeds, np.integer) else seeds
                n = schema.validate_incoming("switch_seeds", plain, bounds)
        except schema.InvalidInput as exc:
            raise ValueError(str(exc)) from None
        # Clear errors before any work: a word the prompt lacks, not one word, no change.
        if replace_word(self.trace.prompt, word, replacement) == self.trace.prompt:
            raise ValueError(f"{replacement!r} is the word itself: type another replacement")
        word = _content_word(self.widget.switch_words, word)
        new = seeds_to_trace([t.facts.seed for t in held], n)
        steps = None if switch_steps is None else tuple(int(k) for k in switch_steps)
        self._switch_setup = (tuple(traces), steps)
        with self.widget.hold_sync():
            self.widget.switch_word = word
            self.widget.switch_replacement = replacement
            self.widget.switch_seeds = min(n, schema.SWITCH_MAX_SEEDS)
        request = SwitchRequest(word, replacement, held[:n], tuple(new), steps)
        return self._jobs.submit(request, explicit=True)

    def _switch_from_view(self, content: Mapping[str, Any]) -> None:
        traces, steps = self._switch_setup
        try:
            ask = SwitchAsk.from_message(content, self.widget.bounds())
            self.prompt_switch(
                ask.word, ask.replacement, seeds=ask.seeds, traces=traces, switch_steps=steps
            )
        except (RuntimeError, ValueError) as exc:
            self.widget.error = str(exc)

    def _switch(self, work: SwitchRequest, progress: Callable[[int, int], bool]) -> Any:
        from diffwidget.explain.prompt_switch import PromptSwitch
        from diffwidget.explain.protocol import Cancelled

        steps = None if work.switch_steps is None else list(work.switch_steps)
        method = PromptSwitch(switch_steps=steps, progress_bar=False, keep_images=True)
        n = self.trace.n_steps
        # One bar over both stages: the denoising steps of the new traces, then the branches'.
        tracing = n * sum(s not in self._seed_traces for s in work.to_trace)
        total = tracing + _branch_steps(len(work.seeds), n, steps)
        try:
            traces = [*work.traces, *self._traces_of(work.to_trace, progress, total)]
            curves = method.run(
                self.pipe,
                traces,
                word=work.word,
                replacement=work.replacement,
                progress=lambda done, branching: progress(tracing + done, tracing + branching),
            )
        except Cancelled:
            return None
        self._show_switch(curves, work.word, work.replacement)
        return curves

    def _traces_of(
        self, seeds: Sequence[int], progress: Callable[[int, int], bool], total: int
    ) -> list[Trace]:
        """Traces of prompt A for ``seeds``: kept ones, the rest traced like the explorer's.

        Raises :class:`~diffwidget.explain.protocol.Cancelled` when ``progress`` says stop.
        """
        from diffwidget.explain.protocol import Cancelled
        from diffwidget.tracing.branch_setup import retrace
        from diffwidget.tracing.taps import StepCallbackTap

        done = 0

        def step(steps_done: int) -> None:
            if not progress(done + steps_done, total):
                raise Cancelled("cancelled while tracing the switch's seeds")

        for seed in seeds:
            if seed not in self._seed_traces:
                tap = StepCallbackTap(step, name="switch_progress")
                self._seed_traces[seed] = retrace(self.pipe, self.trace, seed=seed, taps=[tap])
                done += self.trace.n_steps
        return [self._seed_traces[s] for s in seeds]

    def _show_switch(self, curves: CommitmentCurves, word: str, replacement: str) -> None:
        """Publish a finished switch: its curves, its filmstrip, ``commitment``."""
        self.commitment = curves
        filmstrip = SwitchFilmstrip.of(curves, word, replacement)
        # A new switch replaces the last one's curves, as it replaces its filmstrip.
        self._curves = self._curves.replacing(
            COMMITMENT, commitment_series(curves, self.trace.n_steps)
        )
        with self.widget.hold_sync():
            self._sync_curves()
            self.widget.publish("switch", filmstrip.to_json())
