"""Typed results of the interventions: commitment curves, word ablations, patching grids.

Each is a :class:`~diffwidget.records.Record` (one JSON form, one ``save``/``load`` to
``.npz``), NumPy only, so the widget and the runs open them without torch. What they share:

* ``attributes``, ``a_values``, ``b_values``, ``judges``, ``exact``: one row per judged
  attribute (:class:`~diffwidget.explain.judges.Judge`), e.g. ``colour``, ``red``, ``blue``;
* ``outcomes``: int8 codes of :data:`~diffwidget.explain.judges.OUTCOMES` (0 keeps A's value,
  1 takes B's, 2 neither), one per attribute, condition and seed;
* shares over seeds with two-sided 95 % Wilson intervals (``keep_a``/``take_b`` and their
  ``_low``/``_high``): :func:`~diffwidget.explain.intervals.wilson_interval`;
* ``image_change``: mean absolute difference of each final image from prompt A's own traced
  image, in [0, 1] (0: the same image, 1: every channel of every pixel flipped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import numpy as np

from diffwidget.explain.intervals import first_crossing, wilson_interval
from diffwidget.explain.judges import OUTCOME_CODE
from diffwidget.explain.results import Meta
from diffwidget.records import Array, MaxLen, Record

_TEXT = MaxLen(100_000)
_NAME = MaxLen(1000)
Names = list[Annotated[str, _NAME]]
Ints1d = Annotated[np.ndarray, Array(ndim=1, kinds="iu")]
Floats = Annotated[np.ndarray, Array(kinds="f")]
Codes = Annotated[np.ndarray, Array(kinds="iu")]
Images = Annotated[np.ndarray, Array(kinds="u")]
#: The commitment level: a switch curve "crosses" when this share of seeds keeps A's value.
COMMITTED_LEVEL = 0.9
#: How the intervals of the shares are computed, stated in every result.
SHARE_INTERVAL = "two-sided 95 % Wilson score interval over seeds"


def shares(outcomes: np.ndarray, code: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Share of the last axis (seeds) equal to ``code``, with its Wilson interval (float32).

    Examples
    --------
    >>> share, low, high = shares(np.array([[0, 0, 1, 2]]), "a")
    >>> share.tolist()
    [0.5]
    """
    hits = (np.asarray(outcomes) == OUTCOME_CODE[code]).sum(axis=-1)
    n = np.full(hits.shape, outcomes.shape[-1])
    low, high = wilson_interval(hits, n)
    return (
        (hits / np.maximum(n, 1)).astype(np.float32),
        low.astype(np.float32),
        high.astype(np.float32),
    )


def image_change(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Mean absolute difference of uint8 images from their reference, in [0, 1] (float32).

    ``images`` has shape ``(..., S, H, W, 3)``, ``reference`` ``(S, H, W, 3)`` (one per seed).

    Examples
    --------
    >>> a = np.zeros((1, 2, 2, 3), np.uint8)
    >>> image_change(np.full((1, 2, 2, 3), 255, np.uint8)[None], a).tolist()
    [[1.0]]
    """
    diff = np.abs(images.astype(np.int16) - reference.astype(np.int16))
    return (diff.mean(axis=(-3, -2, -1)) / 255.0).astype(np.float32)


@dataclass(frozen=True, eq=False)
class JudgedOutcomes(Record):
    """What every intervention result holds: judged attributes and their outcomes.

    Attributes
    ----------
    attributes, a_values, b_values, judges : list of str
        One entry per judged attribute (``b_values`` entry ``""`` when only A's value is
        asked about, e.g. a removed word).
    exact : list of bool
        Whether each judge is exact by construction (the scene-world reader).
    seeds : ndarray of int64, shape (S,)
        The seed of each trace of prompt A.
    outcomes : ndarray of int8, shape (n_attributes, n_conditions, S)
        Outcome codes (0 A, 1 B, 2 neither) per attribute, condition (switch step, window,
        patched site) and seed.
    image_change : ndarray of float32, shape (n_conditions, S)
        Mean absolute difference of each final image from prompt A's own image, in [0, 1].
    meta : dict
        Settings, timing and the interval used.
    """

    attributes: Names
    a_values: Names
    b_values: Names
    judges: Names
    exact: list[bool]
    seeds: Ints1d
    outcomes: Codes
    image_change: Floats
    meta: Meta = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.attributes)
        for name in ("a_values", "b_values", "judges", "exact"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} needs one entry per attribute ({n})")
        if self.outcomes.ndim < 2 or self.outcomes.shape[0] != n:
            raise ValueError(f"outcomes need one row per attribute, got {self.outcomes.shape}")
        if self.outcomes.shape[-1] != len(self.seeds):
            raise ValueError(f"outcomes need one column per seed ({len(self.seeds)})")
        if self.image_change.shape != self.outcomes.shape[1:]:
            raise ValueError(
                f"image_change has shape {self.image_change.shape}, expected "
                f"{self.outcomes.shape[1:]}"
            )

    def _row(self, attribute: str) -> int:
        if attribute not in self.attributes:
            raise KeyError(f"no judged attribute {attribute!r}; judged: {self.attributes}")
        return self.attributes.index(attribute)

    def keep_a(self, attribute: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Share of seeds keeping A's value per condition, with its Wilson interval."""
        return shares(self.outcomes[self._row(attribute)], "a")

    def take_b(self, attribute: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Share of seeds taking B's value per condition, with its Wilson interval."""
        return shares(self.outcomes[self._row(attribute)], "b")


@dataclass(frozen=True, eq=False)
class CommitmentCurves(JudgedOutcomes):
    """A prompt switch A → B from every step: which value each attribute ends up with.

    Branch ``k`` follows prompt A's recorded trajectory up to ``x_k`` and prompt B from step
    ``k`` on. ``k = 0`` is prompt B's own generation from A's noise, ``k = n_steps`` prompt
    A's own image. The *commitment curve* of an attribute is the share of seeds whose final
    image keeps A's value, per ``k`` (Gorgun et al. 2026's Concept Insertion Success is its
    complement ``take_b``).

    Attributes
    ----------
    prompt_a, prompt_b : str
        The prompts before and after the switch.
    switch_steps : ndarray of int64, shape (K,)
        The switch steps ``k`` (conditions of ``outcomes``).
    timesteps : ndarray of int64, shape (K,)
        The scheduler timestep at each ``k`` (``-1`` for ``k = n_steps``).
    n_steps : int
        Denoising steps of the traces.
    images : ndarray of uint8, shape (K, S, H, W, 3), optional
        The final image of every branch (the filmstrip); ``None`` when not kept.

    Examples
    --------
    >>> curves = CommitmentCurves.load("switch.npz")  # doctest: +SKIP
    >>> curves.committed_step("colour")  # doctest: +SKIP
    6
    """

    prompt_a: Annotated[str, _TEXT] = ""
    prompt_b: Annotated[str, _TEXT] = ""
    switch_steps: Ints1d = field(default_factory=lambda: np.zeros(0, np.int64))
    timesteps: Ints1d = field(default_factory=lambda: np.zeros(0, np.int64))
    n_steps: int = 0
    images: Images | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.outcomes.ndim != 3 or self.outcomes.shape[1] != len(self.switch_steps):
            raise ValueError("outcomes need the shape (n_attributes, n_switch_steps, n_seeds)")
        if len(self.timesteps) != len(self.switch_steps):
            raise ValueError("timesteps need one entry per switch step")
        if self.images is not None and self.images.shape[:2] != self.outcomes.shape[1:]:
            raise ValueError(f"images have shape {self.images.shape[:2]}, expected (K, S)")

    def committed_step(self, attribute: str, level: float = COMMITTED_LEVEL) -> int | None:
        """The first switch step from which at least ``level`` of the seeds keep A's value
        (and keep doing so for every later step); None if it never does."""
        keep, _, _ = self.keep_a(attribute)
        index = first_crossing(keep, level)
        return None if index is None else int(self.switch_steps[index])

    def filmstrip(self, seed_index: int = 0) -> np.ndarray:
        """The final image of each switch step for one seed, ``(K, H, W, 3)`` uint8."""
        if self.images is None:
            raise ValueError("the images were not kept (PromptSwitch(keep_images=True))")
        return self.images[:, seed_index]


@dataclass(frozen=True, eq=False)
class WordAblationResult(JudgedOutcomes):
    """One word's contribution removed or replaced only in windows of steps ``[a, b]``.

    Attributes
    ----------
    prompt : str
        Prompt A (the traced one).
    word : str
        The word acted on.
    replacement : str
        The word put in its place (``mode="replace"``), else ``""``.
    mode : str
        ``"zero"`` (its text-embedding rows zeroed), ``"replace"`` (rows of the prompt with
        ``replacement``) or ``"mask"`` (its attention column masked out; families whose
        denoiser takes a text attention mask).
    positions : list of int
        Positions of the word's rows in the text sequence (a word appears once per text
        encoder segment: twice in SD3's CLIP and T5 parts).
    windows : ndarray of int64, shape (W, 2)
        Inclusive step windows ``[a, b]`` (conditions of ``outcomes``).
    images : ndarray of uint8, shape (W, S, H, W, 3), optional
        Final images.
    """

    prompt: Annotated[str, _TEXT] = ""
    word: Annotated[str, _NAME] = ""
    replacement: Annotated[str, _NAME] = ""
    mode: Annotated[str, _NAME] = "zero"
    positions: list[int] = field(default_factory=list)
    windows: Annotated[np.ndarray, Array(ndim=2, kinds="iu")] = field(
        default_factory=lambda: np.zeros((0, 2), np.int64)
    )
    images: Images | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.outcomes.ndim != 3 or self.outcomes.shape[1] != len(self.windows):
            raise ValueError("outcomes need the shape (n_attributes, n_windows, n_seeds)")


@dataclass(frozen=True, eq=False)
class PatchingGrid(JudgedOutcomes):
    """Activation patching B → A at each (layer, step): the causal layer × step grid.

    Cell ``(l, s)``: prompt A's run from its recorded ``x_s``, with the output of layer ``l``
    at step ``s`` replaced by prompt B's (read at B's recorded ``x_s``), every other
    activation and step A's own. ``take_b`` is the effect on the judged attribute.

    Attributes
    ----------
    prompt_a, prompt_b : str
        The patched run's prompt and the prompt the activation comes from.
    layers : list of str
        Diffusers module paths patched (rows of the grid).
    steps : ndarray of int64, shape (T,)
        Steps patched (columns).
    halves : str
        ``"both"`` CFG halves patched, or ``"cond"`` only.

    ``outcomes`` has shape ``(n_attributes, n_layers * T, S)``: cell ``(l, s)`` is
    condition ``l * T + s``; :meth:`grid` reshapes a share to ``(n_layers, T)``.
    """

    prompt_a: Annotated[str, _TEXT] = ""
    prompt_b: Annotated[str, _TEXT] = ""
    layers: Names = field(default_factory=list)
    steps: Ints1d = field(default_factory=lambda: np.zeros(0, np.int64))
    halves: Annotated[str, _NAME] = "both"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.outcomes.ndim != 3 or self.outcomes.shape[1] != len(self.layers) * len(self.steps):
            raise ValueError("outcomes need the shape (n_attributes, n_layers * n_steps, n_seeds)")

    def grid(self, attribute: str, code: str = "b") -> np.ndarray:
        """Share of seeds with outcome ``code`` per (layer, step), ``(n_layers, T)`` float32."""
        share, _, _ = shares(self.outcomes[self._row(attribute)], code)
        return share.reshape(len(self.layers), len(self.steps))

    def change_grid(self) -> np.ndarray:
        """Mean image change over seeds per (layer, step), ``(n_layers, T)`` float32."""
        return self.image_change.mean(axis=-1).reshape(len(self.layers), len(self.steps))
