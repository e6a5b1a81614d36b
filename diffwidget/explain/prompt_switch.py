"""Prompt switch: when has the model committed? Switch prompt A to B at every step at once.

Branch ``k`` of a trace of prompt A continues from the recorded ``x_k`` with prompt B; every
``k`` of every seed runs in one branch run (:mod:`diffwidget.tracing.branch`), so a whole
curve costs the sum of the remaining steps. A judge reads each final image: did it keep A's
value of the attribute, or take B's? The share of seeds keeping A's value per ``k`` is the
*commitment curve*; where it reaches 0.9 the model has committed.

This is Gorgun et al.'s prompt-conditioned intervention (ICLR 2026: their Concept Insertion
Success curve is ``take_b``) with two departures: the branches reuse the traced prefix
instead of re-running it, and on the scene world the judge is the exact reader, not a VQA
model.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffwidget.explain._common import ProgressCallback, check_int, check_int_list
from diffwidget.explain.config import MethodConfig
from diffwidget.explain.intervention_base import (
    InterventionMethod,
    check_traces,
    default_judges,
    judge_all,
    reference_images,
    seeds_of,
)
from diffwidget.explain.intervention_results import CommitmentCurves
from diffwidget.explain.judges import Judge, replace_word
from diffwidget.tracing.trace import Trace


@dataclass(frozen=True)
class PromptSwitchConfig(MethodConfig):
    """Settings of :class:`PromptSwitch` (each is described there).

    Examples
    --------
    >>> PromptSwitchConfig(switch_steps=[0, 5, 10]).switch_steps
    [0, 5, 10]
    """

    switch_steps: list[int] | None = None
    batch_size: int | None = None
    keep_images: bool = True

    def __post_init__(self) -> None:
        self._normalise("switch_steps", check_int_list("switch_steps", self.switch_steps))
        self._normalise("batch_size", check_int("batch_size", self.batch_size, optional=True))
        if not isinstance(self.keep_images, bool):
            raise TypeError(f"keep_images must be True or False, got {self.keep_images!r}")


class PromptSwitch(InterventionMethod[PromptSwitchConfig]):
    """Commitment curves: switch from prompt A to prompt B at every step ``k``.

    Parameters
    ----------
    config : PromptSwitchConfig, optional
        The settings below as one record; or pass them by name.
    switch_steps : list of int, optional
        The ``k`` to switch at (default every ``k`` in ``0..n_steps``; ``k = n_steps`` is A's
        own image and costs nothing).
    batch_size : int, optional
        Largest number of branches per denoiser call (default: all that run at a step).
    keep_images : bool
        Keep every branch's final image (the filmstrip).
    progress_bar : bool
        Show a ``tqdm.auto`` bar.

    Examples
    --------
    >>> traces = [diffwidget.trace(pipe, "a large red circle on the left", seed=s)
    ...           for s in range(4)]  # doctest: +SKIP
    >>> curves = PromptSwitch().run(pipe, traces, word="red", replacement="blue")  # doctest: +SKIP
    >>> curves.committed_step("colour")  # doctest: +SKIP
    5
    """

    name = "prompt_switch"
    config_class = PromptSwitchConfig

    def run(
        self,
        pipe: Any,
        traces: Trace | Sequence[Trace],
        prompt_b: str | None = None,
        *,
        word: str | None = None,
        replacement: str | None = None,
        judges: Judge | Sequence[Judge] | None = None,
        progress: ProgressCallback | None = None,
        **pipeline_kwargs: Any,
    ) -> CommitmentCurves:
        """Switch every trace from its prompt A to prompt B at every switch step.

        Parameters
        ----------
        pipe : diffusers pipeline
            The pipeline the traces came from.
        traces : Trace or sequence of Trace
            Traces of prompt A, one per seed, with the same settings.
        prompt_b : str, optional
            The prompt after the switch; or give ``word`` and ``replacement``.
        word, replacement : str, optional
            Prompt B is prompt A with the whole word ``word`` replaced ("red" -> "blue").
        judges : Judge or sequence of Judge, optional
            What to read from the final images; on the scene world the exact reader of every
            attribute in which the captions differ
            (:func:`~diffwidget.explain.judges.scene_judges`).
        progress : callable, optional
            ``progress(done, total)`` over branch steps; returning ``False`` cancels
            (:class:`~diffwidget.explain.protocol.Cancelled`).
        **pipeline_kwargs
            Pipeline arguments the traces were made with beyond steps, size, guidance and
            negative prompt (e.g. ``max_sequence_length``).

        Returns
        -------
        CommitmentCurves
        """
        items = check_traces(traces)
        target = _prompt_b(items[0].prompt, prompt_b, word, replacement)
        (curves,) = self.run_many(
            pipe, items, [(target, judges)], progress=progress, **pipeline_kwargs
        )
        return curves

    def run_many(
        self,
        pipe: Any,
        traces: Trace | Sequence[Trace],
        targets: Sequence[tuple[str, Judge | Sequence[Judge] | None]],
        *,
        progress: ProgressCallback | None = None,
        **pipeline_kwargs: Any,
    ) -> list[CommitmentCurves]:
        """Switch to several prompts B in one batched branch run (one result per target).

        Parameters
        ----------
        pipe, traces, progress, pipeline_kwargs
            As for :meth:`run`.
        targets : sequence of (prompt_b, judges)
            Each prompt B with its judges (None: the scene world's).

        Examples
        --------
        >>> from diffwidget.models.scene_pairs import swap_pairs  # doctest: +SKIP
        >>> targets = [(p.caption_b, None) for p in swap_pairs(trace.prompt)]  # doctest: +SKIP
        >>> [c.attributes for c in PromptSwitch().run_many(pipe, trace, targets)]  # doctest: +SKIP
        [['colour'], ['shape'], ['size'], ['position']]
        """
        from diffwidget.tracing.branch import Branch

        start = time.perf_counter()
        items = check_traces(traces)
        prompt_a, n, n_seeds = items[0].prompt, items[0].n_steps, len(items)
        if not targets:
            raise ValueError("give at least one (prompt_b, judges) target")
        prompts = [_prompt_b(prompt_a, b, None, None) for b, _ in targets]
        judges = [
            default_judges(j, prompt_a, b) for b, (_, j) in zip(prompts, targets, strict=True)
        ]
        steps = self._steps(n)
        with self.branches(pipe, items, prompts, pipeline_kwargs) as (runner, setup):
            conds = [setup.conditionings[prompt_a], *(setup.conditionings[b] for b in prompts)]
            branches = [
                Branch(source=s, start=k, conditioning=t + 1)
                for t in range(len(prompts))
                for k in steps
                for s in range(n_seeds)
            ]
            outcome = self.run_branches(runner, branches, conds, progress)
            assert outcome.images is not None
            reference = reference_images(pipe, items)
        meta = {**self.config.to_json(), **self.shared_meta(outcome, runner, start)}
        meta["targets_in_run"] = len(prompts)
        shape = (len(prompts), len(steps), n_seeds, *outcome.images.shape[1:])
        images = outcome.images.reshape(shape)
        timesteps = np.asarray([int(items[0].timesteps[k]) if k < n else -1 for k in steps])
        return [
            CommitmentCurves(
                attributes=[j.attribute for j in chosen],
                a_values=[j.a_value for j in chosen],
                b_values=[j.b_value or "" for j in chosen],
                judges=[j.name for j in chosen],
                exact=[j.exact for j in chosen],
                seeds=seeds_of(items),
                outcomes=judge_all(chosen, images[t]),
                image_change=self.changes(images[t], reference),
                meta=meta,
                prompt_a=prompt_a,
                prompt_b=prompts[t],
                switch_steps=np.asarray(steps, np.int64),
                timesteps=timesteps.astype(np.int64),
                n_steps=n,
                images=images[t] if self.config.keep_images else None,
            )
            for t, chosen in enumerate(judges)
        ]

    def _steps(self, n: int) -> list[int]:
        steps = self.config.switch_steps
        if steps is None:
            return list(range(n + 1))
        bad = [k for k in steps if not 0 <= k <= n]
        if bad:
            raise ValueError(f"switch steps {bad} are outside 0..{n} (n_steps = {n})")
        return sorted(set(steps))


def _prompt_b(
    prompt_a: str, prompt_b: str | None, word: str | None, replacement: str | None
) -> str:
    if prompt_b is not None:
        if word is not None or replacement is not None:
            raise ValueError("give prompt_b, or word and replacement, not both")
        if not isinstance(prompt_b, str) or not prompt_b.strip():
            raise TypeError(f"prompt_b must be a non-empty string, got {prompt_b!r}")
        if prompt_b == prompt_a:
            raise ValueError("prompt_b is prompt A: nothing to switch to")
        return prompt_b
    if word is None or replacement is None:
        raise ValueError(
            "give prompt_b, or word and replacement (e.g. word='red', replacement='blue')"
        )
    return replace_word(prompt_a, word, replacement)
