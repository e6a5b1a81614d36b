"""The explorer's concept-map overlay: where a typed word is, at the step shown.

The user types any word, in the prompt or not; the kernel replays that step of the trace with
:class:`~diffwidget.explain.concept_maps.ConceptMaps` (ConceptAttention, one denoiser call on
the prompt's half) in the explorer's job thread, and the word's map, its caption and its
fixed 0–1 colour scale are sent in ``overlays["concept"]``. A concept map is a softmax over
words, so the typed word competes with the prompt's content words; maps are cached per word
and step (a prompt word's request fills the cache of every prompt word).
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from diffwidget.widget.payloads import OverlaySet

if TYPE_CHECKING:
    from diffwidget.explain.concept_results import ConceptMapsResult
    from diffwidget.tracing.trace import Trace

#: The overlay kind of concept maps (``schema.OverlayKind``).
CONCEPT = "concept"
#: Words that carry no content of their own: not default tokens, not competing concepts.
FUNCTION_WORDS = frozenset(
    {"a", "an", "the", "of", "on", "in", "at", "to", "and", "or", "with", "by", "for", "from"}
    | {"is", "are", "its", "it", "this", "that"}
)
#: At most this many prompt words compete (the concept maps take 32 words, one is typed).
MAX_PROMPT_WORDS = 31
#: What the colour scale of a concept map means and how it is normalised.
CONCEPT_SCALE = {
    "meaning": "the word's share of the cell (ConceptAttention, softmax over the words): 0 to 1",
    "normalisation": "not normalised: a fixed 0–1 scale, comparable across steps and words",
}
_PUNCTUATION = re.compile(r"^[^\w]+|[^\w]+$")


@dataclass(frozen=True)
class ConceptRequest:
    """Compute the concept map of ``word`` at loop index ``step``."""

    word: str
    step: int

    @property
    def key(self) -> tuple[Any, ...]:
        """``("concept", word, step)``."""
        return (CONCEPT, self.word, self.step)

    @property
    def label(self) -> str:
        """E.g. 'concept map of "dog" at step 3'."""
        return f"concept map of {self.word!r} at step {self.step}"


@dataclass(frozen=True)
class ConceptEntry:
    """One word's map at one step: ``map`` (h, w) in [0, 1] and what it shows."""

    word: str
    step: int
    map: np.ndarray
    caption: str


def prompt_words(prompt: str) -> list[str]:
    """The prompt's content words, each once, in order (punctuation and stop words dropped).

    Examples
    --------
    >>> prompt_words("a red circle, on a blue square.")
    ['red', 'circle', 'blue', 'square']
    """
    words: list[str] = []
    for piece in prompt.split():
        word = _PUNCTUATION.sub("", piece)
        if word and word.lower() not in FUNCTION_WORDS and word not in words:
            words.append(word)
    return words[:MAX_PROMPT_WORDS]


def competing_words(prompt: str, word: str) -> list[str]:
    """The words of one concept-map run: the prompt's content words, and ``word`` if new.

    Raises
    ------
    ValueError
        When nothing competes (a softmax over one word is 1 everywhere).

    Examples
    --------
    >>> competing_words("a red circle", "dog")
    ['red', 'circle', 'dog']
    """
    base = prompt_words(prompt)
    words = base if word in base else [*base[: MAX_PROMPT_WORDS - 1], word]
    if len(words) < 2:
        raise ValueError(
            "a concept map is a softmax over words, and this prompt has no content word to "
            f"compete with {word!r}; use ConceptMaps(words=(...)) with several words instead"
        )
    return words


def compute_concept(
    pipe: Any, trace: Trace, request: ConceptRequest, progress: Callable[[int, int], bool]
) -> list[ConceptEntry]:
    """Replay ``request.step`` with the concept tap; the maps it answers for.

    The typed word's map, and when the word is one of the prompt's, every prompt word's (the
    same softmax). A tokenizer warning (a word it cannot read) ends up in the caption.
    Returns ``[]`` when ``progress`` asked to stop.

    Examples
    --------
    >>> request = ConceptRequest("dog", 3)
    >>> entries = compute_concept(pipe, trace, request, lambda d, t: True)  # doctest: +SKIP
    >>> entries[0].map.shape  # the latent grid  # doctest: +SKIP
    (16, 16)
    """
    from diffwidget.explain.concept_maps import ConceptMaps

    words = competing_words(trace.prompt, request.word)
    method = ConceptMaps(words=tuple(words), steps=(request.step,), progress_bar=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        result = method.attribute(pipe, trace, progress=progress)
    if result.steps != [request.step]:
        return []
    notes = "".join(f" (note: {w.message})" for w in caught)
    per_step = result.per_step()[0]
    kept = result.words if request.word in prompt_words(trace.prompt) else [request.word]
    return [
        ConceptEntry(
            word,
            request.step,
            per_step[result.words.index(word)],
            concept_caption(result, word, trace) + notes,
        )
        for word in kept
    ]


def concept_caption(result: ConceptMapsResult, word: str, trace: Trace) -> str:
    """What one word's map at one step shows: scores, words, layers, step, normalisation.

    Examples
    --------
    >>> concept_caption(result, "dog", trace)  # doctest: +SKIP
    'concept map of “dog” at step 3 (t = 501): ConceptAttention output-space scores (...'
    """
    step = result.steps[0]
    layers = result.default_layers()
    others = ", ".join(w for w in result.words if w != word)
    how, where = result.method_text()
    h, w = result.latent_hw
    return (
        f"concept map of “{word}” at step {step} (t = {int(trace.timesteps[step])}): "
        f"ConceptAttention output-space scores ({how}, {where}), softmax over “{word}” and "
        f"the prompt's words ({others}); mean of {len(layers)} of {len(result.layers)} "
        f"layers ({layers[0]} … {layers[-1]}) at this step, upsampled to the {h}×{w} latent; "
        "fixed 0–1 scale: the word's share of each cell"
    )


class ConceptCache:
    """Concept maps computed so far, per word and step (thread-safe)."""

    def __init__(self) -> None:
        self._maps: dict[str, dict[int, ConceptEntry]] = {}
        self._lock = threading.Lock()

    def get(self, word: str, step: int) -> ConceptEntry | None:
        """The map of ``word`` at ``step``, if computed."""
        with self._lock:
            return self._maps.get(word, {}).get(step)

    def store(self, entries: list[ConceptEntry]) -> None:
        """Keep computed maps."""
        with self._lock:
            for entry in entries:
                self._maps.setdefault(entry.word, {})[entry.step] = entry

    def overlay_set(self, word: str) -> OverlaySet | None:
        """The payload of ``word``'s maps (``None`` when none is computed)."""
        with self._lock:
            entries = sorted(self._maps.get(word, {}).values(), key=lambda e: e.step)
        if not entries:
            return None
        return OverlaySet(
            steps=[e.step for e in entries],
            maps=np.stack([e.map for e in entries]).astype(np.float32),
            ranges=[(0.0, 1.0)] * len(entries),
            layer="",
            descriptions=[e.caption for e in entries],
        )
