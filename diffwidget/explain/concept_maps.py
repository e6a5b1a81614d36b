"""Concept maps for any words: ConceptAttention (Helbling et al., ICML 2025) on every family.

Where is the *circle* in an image whose prompt says "shape"? Is there a *dog* at all? A
concept map answers for any word, in the prompt or not: the word goes through the model's
own text encoders and every attention layer as an extra token the image never attends to
(the image is untouched), and its map is the image tokens' attention outputs projected onto
the word's output, softmax over the words — per layer and step
(:mod:`diffwidget.tracing.concept_attention` has the definition for joint attention and the
cross-attention analogue of UNets).

:class:`ConceptMaps` is the method (typed config :class:`ConceptMapsConfig`); it computes
the maps of a recorded trace by replaying its steps (:meth:`ConceptMaps.attribute`, one
denoiser call on the prompt's half per step), or during a generation
(:meth:`ConceptMaps.generate`, a few per cent over a plain trace).
:class:`ConceptMapsResult` holds every layer's map at every step; :meth:`~ConceptMapsResult.
per_step` and :meth:`~ConceptMapsResult.heat_map` average the architecture's default layers
and steps (chosen on training scene prompts, :data:`DEFAULT_AGGREGATION`),
:meth:`~ConceptMapsResult.layer_step_grid` gives the layer x step grid of one word, and
:attr:`~ConceptMapsResult.caption` and :attr:`~ConceptMapsResult.value` say what is shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

from diffwidget.explain.base import Method
from diffwidget.explain.concept_results import (
    SPACES,
    WORD,
    ConceptMapsResult,
    Space,
    result_from_scores,
)
from diffwidget.explain.config import MethodConfig
from diffwidget.explain.protocol import ProgressCallback

if TYPE_CHECKING:
    from diffwidget.tracing.concepts import ConceptTap
    from diffwidget.tracing.trace import Trace


@dataclass(frozen=True)
class ConceptMapsConfig(MethodConfig):
    """Settings of :class:`ConceptMaps` (each is described there); checked when built.

    Examples
    --------
    >>> ConceptMapsConfig(words=("circle", "dog")).words
    ('circle', 'dog')
    """

    words: tuple[Annotated[str, WORD], ...] = ()
    layers: tuple[str, ...] | None = None
    steps: tuple[int, ...] | None = None
    space: Space = "output"

    def __post_init__(self) -> None:
        from diffwidget.tracing.concept_words import check_words

        if self.words:
            self._normalise("words", tuple(check_words(list(self.words))))
        if self.layers is not None:
            if isinstance(self.layers, str) or not all(
                isinstance(p, str) and p for p in self.layers
            ):
                raise TypeError(
                    f"layers are attention module paths (a list of strings), got {self.layers!r}"
                )
            self._normalise("layers", tuple(self.layers))
        if self.steps is not None:
            bad = [s for s in self.steps if isinstance(s, bool) or not isinstance(s, int) or s < 0]
            if bad or not self.steps:
                raise ValueError(
                    f"steps are loop indices (integers from 0), got {list(self.steps)}"
                )
            self._normalise("steps", tuple(sorted(set(self.steps))))
        if self.space not in SPACES:
            raise ValueError(f"unknown space {self.space!r}; use 'output' or 'attention'")


class ConceptMaps(Method[ConceptMapsConfig]):
    """Concept maps (ConceptAttention) of any words, per layer and step.

    Parameters
    ----------
    words : tuple of str
        Concept words or short phrases, in the prompt or not (at most 32). The maps are a
        softmax over these words: each cell's values sum to 1, so give the words that should
        compete (e.g. the objects and a word for the background).
    layers : tuple of str, optional
        Attention layers to record (module paths as in ``Trace.attention``); default every
        layer.
    steps : tuple of int, optional
        Loop indices to compute; default every step.
    space : {"output", "attention"}
        ``"output"`` (ConceptAttention's): after the layer's output projections where it has
        both; ``"attention"``: before them.

    Examples
    --------
    >>> result = ConceptMaps(words=("circle", "dog")).attribute(pipe, trace)  # doctest: +SKIP
    >>> result.heat_map().shape  # (n_words, h, w)  # doctest: +SKIP
    (2, 16, 16)
    """

    name = "concept_maps"
    label = "Concept maps"
    config_class = ConceptMapsConfig
    unit = "step"

    def _words(self) -> list[str]:
        if not self.config.words:
            raise ValueError(
                "no concept words: give some, e.g. ConceptMaps(words=('circle', 'dog'))"
            )
        return list(self.config.words)

    def tap(self, pipe: Any, call_kwargs: dict[str, Any] | None = None) -> ConceptTap:
        """A tap recording these maps during a generation (``trace(..., taps=[tap])``)."""
        from diffwidget.tracing.concepts import ConceptTap

        config = self.config
        return ConceptTap(
            pipe,
            self._words(),
            layers=config.layers,
            steps=config.steps,
            spaces=(config.space,),
            call_kwargs=call_kwargs,
        )

    def attribute(
        self, pipe: Any, trace: Trace, progress: ProgressCallback | None = None
    ) -> ConceptMapsResult:
        """The maps of a recorded trace: one denoiser call on the prompt's half per step.

        Parameters
        ----------
        pipe : diffusers pipeline
            The pipeline the trace came from.
        trace : Trace
            The recorded run.
        progress : callable, optional
            ``progress(done, total)`` after every step; returning ``False`` stops early
            and the steps done so far are returned.
        """
        import time

        from diffwidget.tracing.concepts import concept_replay

        steps = list(self.config.steps) if self.config.steps is not None else None
        chosen = steps if steps is not None else list(range(trace.n_steps))
        bad = [s for s in chosen if not 0 <= s < trace.n_steps]
        if bad:
            raise IndexError(f"steps {bad} are outside 0..{trace.n_steps - 1} (loop indices)")
        tap = self.tap(pipe)
        with (
            concept_replay(pipe, trace, tap) as run,
            self.loop(len(chosen), 1, progress, start=time.perf_counter()) as loop,
        ):
            for begin, end in loop:
                for step in chosen[begin:end]:
                    run(step)
        return result_from_scores(tap.result(), trace, self.config.space)

    def generate(
        self, pipe: Any, prompt: str, **trace_kwargs: Any
    ) -> tuple[Trace, ConceptMapsResult]:
        """Trace a generation of ``prompt`` with these maps recorded on the way.

        ``trace_kwargs`` go to :func:`diffwidget.tracing.generate.trace` (seed, steps,
        ``max_sequence_length``...).
        """
        from diffwidget.tracing.generate import trace as trace_run

        call = {k: v for k, v in trace_kwargs.items() if k == "max_sequence_length"}
        tap = self.tap(pipe, call)
        recorded = trace_run(pipe, prompt, taps=[tap], **trace_kwargs)
        return recorded, result_from_scores(tap.result(), recorded, self.config.space)
