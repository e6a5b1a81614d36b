"""Word ablation over a window of steps: which steps need the word "red"?

One word's contribution is removed (or replaced) only in the steps ``[a, b]``; every other
step sees the prompt as traced. Branch ``[a, b]`` starts from the trace's recorded ``x_a``
(the steps before ``a`` are the trace's own), so every window of every seed runs in one
batched branch run (:mod:`diffwidget.tracing.branch`). A judge reads the final images; the
image change says how much the picture moved.

What "the word's contribution" is, per ``mode``:

* ``"zero"``: the word's rows of the text embedding are zeroed, in every text segment (SD3
  reads each word twice, in its CLIP and its T5 part);
* ``"replace"``: its rows are those of the prompt with ``replacement`` in its place (the
  same token count is required; the other words' rows stay A's, although a contextual text
  encoder let them see the word);
* ``"mask"``: its attention column is masked out of every cross-attention layer (families
  whose denoiser takes a text attention mask: UNets and PixArt). Unlike zeroed rows, a
  masked key takes no softmax share at all.

Only the prompt's CFG half is changed; the unconditional half is the trace's.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np

from diffwidget.explain._common import ProgressCallback, check_int
from diffwidget.explain.config import MethodConfig
from diffwidget.explain.intervention_base import (
    InterventionMethod,
    check_traces,
    judge_all,
    reference_images,
    seeds_of,
)
from diffwidget.explain.intervention_results import WordAblationResult
from diffwidget.explain.judges import Judge, check_judges, replace_word, scene_word_judges
from diffwidget.tracing.trace import Trace

if TYPE_CHECKING:
    from diffwidget.tracing.branch import Branch
    from diffwidget.tracing.branch_setup import BranchConditioning, BranchSetup

AblationMode = Literal["zero", "replace", "mask"]
ABLATION_MODES: tuple[str, ...] = get_args(AblationMode)


def default_windows(n_steps: int) -> list[list[int]]:
    """Every window that starts at step 0 (``[0, b]``), then every one that ends at the last
    step (``[a, n - 1]``, ``a > 0``): when does the word stop mattering, and from when on?

    Examples
    --------
    >>> default_windows(3)
    [[0, 0], [0, 1], [0, 2], [1, 2], [2, 2]]
    """
    prefix = [[0, b] for b in range(n_steps)]
    return prefix + [[a, n_steps - 1] for a in range(1, n_steps)]


@dataclass(frozen=True)
class WordAblationConfig(MethodConfig):
    """Settings of :class:`WordAblation` (each is described there).

    Examples
    --------
    >>> WordAblationConfig(windows=[[0, 4]], mode="mask").windows
    [[0, 4]]
    """

    windows: list[list[int]] | None = None
    mode: AblationMode = "zero"
    occurrence: int = 0
    batch_size: int | None = None
    keep_images: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ABLATION_MODES:
            raise ValueError(f"unknown mode {self.mode!r}; use one of {ABLATION_MODES}")
        self._normalise("occurrence", check_int("occurrence", self.occurrence, 0))
        self._normalise("batch_size", check_int("batch_size", self.batch_size, optional=True))
        if self.windows is not None:
            windows = []
            for window in self.windows:
                if isinstance(window, (str, bytes)) or len(window) != 2:
                    raise ValueError(f"a window is [first step, last step], got {window!r}")
                a, b = (int(check_int("window step", v, 0)) for v in window)  # type: ignore[arg-type]
                if b < a:
                    raise ValueError(f"a window [a, b] needs a <= b, got {[a, b]}")
                windows.append([a, b])
            if not windows:
                raise ValueError("give at least one window, or None for the default windows")
            self._normalise("windows", windows)
        if not isinstance(self.keep_images, bool):
            raise TypeError(f"keep_images must be True or False, got {self.keep_images!r}")


class WordAblation(InterventionMethod[WordAblationConfig]):
    """Remove or replace one word's contribution only in windows of steps ``[a, b]``.

    Parameters
    ----------
    config : WordAblationConfig, optional
        The settings below as one record; or pass them by name.
    windows : list of [a, b], optional
        Inclusive step windows (default :func:`default_windows`).
    mode : {"zero", "replace", "mask"}
        How the word's contribution is removed (module docstring).
    occurrence : int
        Which occurrence of the word, when the prompt holds it more than once.
    batch_size : int, optional
        Largest number of branches per denoiser call.
    keep_images : bool
        Keep every branch's final image.
    progress_bar : bool
        Show a ``tqdm.auto`` bar.

    Examples
    --------
    >>> result = WordAblation(windows=[[0, 5], [6, 19]]).run(pipe, trace, "red")  # doctest: +SKIP
    >>> result.keep_a("colour")[0]  # doctest: +SKIP
    array([0., 1.], dtype=float32)
    """

    name = "word_ablation"
    config_class = WordAblationConfig

    def run(
        self,
        pipe: Any,
        traces: Trace | Sequence[Trace],
        word: str,
        *,
        replacement: str | None = None,
        judges: Judge | Sequence[Judge] | None = None,
        progress: ProgressCallback | None = None,
        **pipeline_kwargs: Any,
    ) -> WordAblationResult:
        """Ablate ``word`` of the traces' prompt in every window.

        Parameters
        ----------
        pipe : diffusers pipeline
            The pipeline the traces came from.
        traces : Trace or sequence of Trace
            Traces of one prompt, one per seed.
        word : str
            A word of the prompt.
        replacement : str, optional
            The word put in its place (``mode="replace"``; also what a scene judge tells
            apart in the other modes).
        judges : Judge or sequence of Judge, optional
            Default on the scene world: the attribute the word names
            (:func:`~diffwidget.explain.judges.scene_word_judges`).
        progress : callable, optional
            ``progress(done, total)`` over branch steps; ``False`` cancels.
        **pipeline_kwargs
            Pipeline arguments the traces were made with (e.g. ``max_sequence_length``).

        Returns
        -------
        WordAblationResult
        """
        start = time.perf_counter()
        items = check_traces(traces)
        plan = self._plan(pipe, items[0], word, replacement, judges, pipeline_kwargs)
        others = [plan.other] if plan.other else []
        with self.branches(pipe, items, others, pipeline_kwargs) as (runner, setup):
            base = setup.conditionings[plan.prompt]
            ablated = self._ablated(pipe, plan, base, setup, pipeline_kwargs)
            branches = _window_branches(plan.windows, len(items), plan.n_steps)
            outcome = self.run_branches(runner, branches, [base, ablated], progress)
            assert outcome.images is not None
            reference = reference_images(pipe, items)
        images = outcome.images.reshape(len(plan.windows), len(items), *outcome.images.shape[1:])
        chosen = plan.judges
        return WordAblationResult(
            attributes=[j.attribute for j in chosen],
            a_values=[j.a_value for j in chosen],
            b_values=[j.b_value or "" for j in chosen],
            judges=[j.name for j in chosen],
            exact=[j.exact for j in chosen],
            seeds=seeds_of(items),
            outcomes=judge_all(chosen, images),
            image_change=self.changes(images, reference),
            meta={**self.config.to_json(), **self.shared_meta(outcome, runner, start)},
            prompt=plan.prompt,
            word=word,
            replacement=replacement or "",
            mode=self.config.mode,
            positions=list(plan.positions),
            windows=np.asarray(plan.windows, np.int64).reshape(-1, 2),
            images=images if self.config.keep_images else None,
        )

    def _plan(
        self,
        pipe: Any,
        first: Trace,
        word: str,
        replacement: str | None,
        judges: Judge | Sequence[Judge] | None,
        pipeline_kwargs: dict[str, Any],
    ) -> _AblationPlan:
        """Check the settings against the traced prompt, before anything runs."""
        from diffwidget.tracing.branch_setup import word_positions

        prompt, n, mode = first.prompt, first.n_steps, self.config.mode
        if mode == "replace" and replacement is None:
            raise ValueError("mode='replace' needs a replacement word (replacement='blue')")
        windows = self.config.windows or default_windows(n)
        if any(b >= n for _, b in windows):
            raise ValueError(f"windows must lie within steps 0..{n - 1}, got {windows}")
        positions = word_positions(
            pipe, prompt, word, occurrence=self.config.occurrence, **pipeline_kwargs
        )
        chosen = (
            check_judges(judges)
            if judges is not None
            else scene_word_judges(prompt, word, replacement)
        )
        other = (
            replace_word(prompt, word, replacement) if mode == "replace" and replacement else None
        )
        return _AblationPlan(prompt, n, word, replacement, windows, positions, chosen, other)

    def _ablated(
        self,
        pipe: Any,
        plan: _AblationPlan,
        base: BranchConditioning,
        setup: BranchSetup,
        pipeline_kwargs: dict[str, Any],
    ) -> BranchConditioning:
        """The prompt's conditioning without the word's contribution, per ``mode``."""
        from diffwidget.tracing.branch_setup import word_positions

        positions = plan.positions
        if self.config.mode == "zero":
            return base.with_cond_rows(positions, None)
        if self.config.mode == "mask":
            return base.with_masked_keys(positions)
        assert plan.other is not None
        assert plan.replacement is not None
        moved = word_positions(
            pipe,
            plan.other,
            plan.replacement,
            occurrence=self.config.occurrence,
            **pipeline_kwargs,
        )
        if moved != positions:
            raise ValueError(
                f"{plan.replacement!r} takes text positions {moved} where {plan.word!r} takes "
                f"{positions}; replace a word by one of the same token count"
            )
        return base.with_cond_rows(positions, setup.conditionings[plan.other].embeds[-1, positions])


@dataclass(frozen=True)
class _AblationPlan:
    """What :meth:`WordAblation.run` checked before running: the prompt and its step count,
    the word and its replacement, the windows, the word's text positions, the judges, and the
    prompt with the replacement in the word's place (``mode="replace"``; None otherwise)."""

    prompt: str
    n_steps: int
    word: str
    replacement: str | None
    windows: list[list[int]]
    positions: list[int]
    judges: list[Judge]
    other: str | None


def _window_branches(windows: list[list[int]], n_sources: int, n_steps: int) -> list[Branch]:
    """One branch per window and trace: from the trace's ``x_a``, the ablated conditioning
    (index 1) at steps ``a..b`` and the prompt's own (index 0) elsewhere; window-major."""
    from diffwidget.tracing.branch import Branch

    return [
        Branch(source=s, start=a, conditioning=tuple(int(a <= j <= b) for j in range(n_steps)))
        for a, b in windows
        for s in range(n_sources)
    ]
