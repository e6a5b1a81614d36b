"""Concept maps as a typed result: every layer at every step, aggregations and captions.

NumPy only, so a view can open a saved result without torch. The method that makes them
is :class:`~diffwidget.explain.concept_maps.ConceptMaps`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np

from diffwidget.explain.attention import upsample_maps, window_steps
from diffwidget.records import Array, MaxLen, Record

if TYPE_CHECKING:
    from diffwidget.tracing.concept_words import ConceptScores
    from diffwidget.tracing.trace import Trace

Space = Literal["output", "attention"]
SPACES: tuple[str, ...] = ("output", "attention")
#: The longest concept text a result holds (the tracing layer refuses longer ones).
WORD = MaxLen(100)
Maps = Annotated[np.ndarray, Array(ndim=4, kinds="f")]


@dataclass(frozen=True)
class Aggregation:
    """Which layers and steps a default map averages, as fractions of the run.

    Attributes
    ----------
    depth : tuple of float
        ``(start, end)`` fractions of the layers in data-flow order (as
        :func:`~diffwidget.explain.attention.window_steps` takes steps).
    window : tuple of float
        ``(start, end)`` fractions of the steps.
    """

    depth: tuple[float, float]
    window: tuple[float, float]


#: The default map of each kind of denoiser: the candidate with the best mIoU at τ = 0.4 on
#: 12 training-split scene captions of the embedded models, confirmed ahead of every layer at
#: every step on 12 held-out ones (bench/RESULTS_concepts.md; small splits). Joint: the first
#: eighth of the layers (the DiT's first block) over the last quarter of the steps; cross:
#: the first seventh of the layers (the UNet's first attn2), same steps.
DEFAULT_AGGREGATION: dict[str, Aggregation] = {
    "joint": Aggregation(depth=(0.0, 0.125), window=(0.75, 1.0)),
    "cross": Aggregation(depth=(0.0, 1 / 7), window=(0.75, 1.0)),
}


@dataclass(frozen=True, eq=False)
class ConceptMapsResult(Record):
    """Concept maps of one trace: every layer at every recorded step, and their captions.

    Attributes
    ----------
    words : list of str
        The concept words (axis 1 of every map).
    family : str
        The denoiser family.
    kind : {"joint", "cross"}
        Joint attention (DiTs) or cross-attention (UNets, PixArt).
    layers : list of str
        Attention layers in data-flow order.
    steps, timesteps : list of int
        Loop indices recorded (axis 0) and their scheduler timesteps.
    space : {"output", "attention"}
        Where the maps were read.
    projected : list of str
        Layers read after both output projections (the others have none).
    latent_hw : list of int
        The latent grid ``[h, w]`` the aggregated maps are upsampled to.
    maps : dict of str to ndarray of float32, shape (n_steps, n_words, h, w)
        Per layer (on its own token grid): softmax over the words of the image outputs
        projected onto the words' outputs; at every cell the words' values sum to 1.
    depth, window : tuple of float
        The default layers and steps of :meth:`per_step` and :meth:`heat_map`.
    caption : str
        What a default map shows, in one sentence (for a view's caption).
    value : str
        What one value means, for a colour scale (0 to 1, fixed).
    """

    words: list[Annotated[str, WORD]]
    family: str
    kind: Literal["joint", "cross"]
    layers: list[str]
    steps: list[int]
    timesteps: list[int]
    space: Space
    projected: list[str]
    latent_hw: list[int]
    maps: dict[str, Maps]
    depth: tuple[float, float]
    window: tuple[float, float]
    caption: str
    value: str

    # ------------------------------------------------------------ selections
    def method_text(self) -> tuple[str, str]:
        """How the scores were made and in which space, as the captions say it.

        Examples
        --------
        >>> result.method_text()[1]  # doctest: +SKIP
        "after the layers' output projections"
        """
        if self.kind == "joint":
            how = "the image tokens' attention outputs projected onto each word's attention output"
        else:
            how = "the image's cross-attention output projected onto each word's value"
        if self.space == "output" and self.projected:
            return how, "after the layers' output projections"
        return how, "in the attention output space (before any output projection)"

    def default_layers(self) -> list[str]:
        """The layers in the default ``depth`` range (at least one)."""
        return layer_range(self.layers, self.depth)

    def window_steps(self, window: tuple[float, float] | None = None) -> list[int]:
        """Recorded loop indices inside ``window`` (default: :attr:`window`), at least one."""
        rows = window_steps(len(self.steps), window or self.window)
        return [self.steps[i] for i in rows]

    def word_index(self, word: str) -> int:
        """The position of ``word`` among :attr:`words`."""
        if word not in self.words:
            raise KeyError(f"no concept word {word!r}; the maps are of {self.words}")
        return self.words.index(word)

    # ------------------------------------------------------------ aggregations
    def per_step(self, layers: Sequence[str] | None = None) -> np.ndarray:
        """Mean over ``layers`` (default :meth:`default_layers`) of the maps upsampled to
        the latent grid: ``(n_steps, n_words, h, w)``, words summing to 1 at every cell."""
        chosen = list(layers) if layers is not None else self.default_layers()
        unknown = [p for p in chosen if p not in self.maps]
        if unknown or not chosen:
            raise KeyError(f"no maps of layers {unknown or chosen}; recorded: {self.layers}")
        size = (self.latent_hw[0], self.latent_hw[1])
        total = np.zeros((len(self.steps), len(self.words), *size), dtype=np.float32)
        for layer in chosen:
            total += upsample_maps(self.maps[layer], size)
        return total / len(chosen)

    def heat_map(
        self, layers: Sequence[str] | None = None, window: tuple[float, float] | None = None
    ) -> np.ndarray:
        """One map per word ``(n_words, h, w)``: :meth:`per_step` averaged over the steps in
        ``window`` (default :attr:`window`)."""
        rows = [self.steps.index(s) for s in self.window_steps(window)]
        return self.per_step(layers)[rows].mean(axis=0)

    def layer_step_grid(self, word: str) -> np.ndarray:
        """The layer x step grid of one word on the latent grid:
        ``(n_layers, n_steps, h, w)`` (find the layer that grounds it)."""
        index = self.word_index(word)
        size = (self.latent_hw[0], self.latent_hw[1])
        return np.stack([upsample_maps(self.maps[p][:, index], size) for p in self.layers])

    def mass(self, layers: Sequence[str] | None = None) -> np.ndarray:
        """Each word's share of the image per step ``(n_steps, n_words)``: the spatial mean
        of :meth:`per_step` (rows sum to 1)."""
        return self.per_step(layers).mean(axis=(2, 3))


def layer_range(layers: Sequence[str], depth: tuple[float, float]) -> list[str]:
    """The layers inside ``depth``, a ``(start, end)`` pair of fractions of the layer list.

    Examples
    --------
    >>> layer_range(["a", "b", "c", "d"], (0.5, 1.0))
    ['c', 'd']
    """
    rows = window_steps(len(layers), depth)
    return [layers[i] for i in rows]


def softmax_words(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (the words), computed stably in float64.

    Examples
    --------
    >>> softmax_words(np.array([[0.0, np.log(3.0)]])).round(3).tolist()
    [[0.25, 0.75]]
    """
    shifted = scores.astype(np.float64) - scores.max(axis=-1, keepdims=True)
    weights = np.exp(shifted)
    return (weights / weights.sum(axis=-1, keepdims=True)).astype(np.float32)


def result_from_scores(
    scores: ConceptScores,
    trace: Trace | None = None,
    space: Space = "output",
    aggregation: Aggregation | None = None,
) -> ConceptMapsResult:
    """The :class:`ConceptMapsResult` of a tap's scores (softmax over the words).

    Parameters
    ----------
    scores : ConceptScores
        What :class:`~diffwidget.tracing.concepts.ConceptTap` recorded.
    trace : Trace, optional
        The trace of the same run (for the timesteps; else the loop indices are used).
    space : {"output", "attention"}
        Which recorded space.
    aggregation : Aggregation, optional
        The default layers and steps; default the family kind's :data:`DEFAULT_AGGREGATION`.
    """
    cross = scores.family in ("unet", "pixart")
    kind: Literal["joint", "cross"] = "cross" if cross else "joint"
    chosen = aggregation or DEFAULT_AGGREGATION[kind]
    maps = {
        layer: np.moveaxis(softmax_words(scores.layer_scores(layer, space)), -1, 1)
        for layer in scores.layers
    }
    timesteps = (
        [int(trace.timesteps[s]) for s in scores.steps] if trace is not None else list(scores.steps)
    )
    result = ConceptMapsResult(
        words=list(scores.words),
        family=scores.family,
        kind=kind,
        layers=list(scores.layers),
        steps=list(scores.steps),
        timesteps=timesteps,
        space=space,
        projected=list(scores.projected) if space == "output" else [],
        latent_hw=list(scores.latent_hw),
        maps=maps,
        depth=chosen.depth,
        window=chosen.window,
        caption="",
        value=VALUE_TEXT,
    )
    return _with_caption(result)


#: What one value of a concept map means (its colour scale is fixed, 0 to 1).
VALUE_TEXT = "share of the concept words at this cell (softmax over the words): 0 to 1"


def _with_caption(result: ConceptMapsResult) -> ConceptMapsResult:
    layers = result.default_layers()
    steps = result.window_steps()
    how, where = result.method_text()
    step_text = f"step {steps[0]}" if len(steps) == 1 else f"mean of steps {steps[0]}–{steps[-1]}"
    caption = (
        f"ConceptAttention map of {len(result.words)} word"
        f"{'s' if len(result.words) != 1 else ''} ({', '.join(result.words)}): {how}, "
        f"{where}, softmax over the words; mean of {len(layers)} of {len(result.layers)} "
        f"layers ({layers[0]} … {layers[-1]}), {step_text}; upsampled bilinearly to the "
        f"{result.latent_hw[0]}×{result.latent_hw[1]} latent"
    )
    return dataclasses.replace(result, caption=caption)
