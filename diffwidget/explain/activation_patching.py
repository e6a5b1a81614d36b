"""Activation patching between two prompts at (layer, step): the causal layer × step grid.

Cell ``(l, s)``: prompt A's run continues from its recorded ``x_s``; at step ``s`` the output
of layer ``l`` is replaced by prompt B's (read by running the denoiser once on B's recorded
``x_s`` with B's conditioning, a block tap per layer); every other activation and every
later step is A's own. A judge reads the final image: did the patch carry B's value of the
attribute into A's picture? All cells of all seeds run as one batched branch run
(:mod:`diffwidget.tracing.branch`): at each step every started cell is one row, and a patch
tap per layer writes B's activation into the rows it belongs to. The taps are removed in
``finally``.

This is the standard causal tool of interpretability (activation patching, as with
TransformerLens' hooks), laid over denoising steps: the causal twin of the attention grid
and of DF-CAM's layer × step grid. B's traces should start from A's noise (the same seeds)
so that the two runs differ by the prompt alone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from diffwidget.explain._common import ProgressCallback, check_int, check_int_list, check_str_list
from diffwidget.explain.config import MethodConfig
from diffwidget.explain.intervention_base import (
    InterventionMethod,
    check_traces,
    default_judges,
    judge_all,
    reference_images,
    seeds_of,
)
from diffwidget.explain.intervention_results import PatchingGrid
from diffwidget.explain.judges import Judge
from diffwidget.tracing.trace import Trace

PatchHalves = Literal["both", "cond"]
PATCH_HALVES: tuple[str, ...] = get_args(PatchHalves)


@dataclass(frozen=True)
class ActivationPatchingConfig(MethodConfig):
    """Settings of :class:`ActivationPatching` (each is described there).

    Examples
    --------
    >>> ActivationPatchingConfig(layers=["mid_block"], steps=[0, 4]).steps
    [0, 4]
    """

    layers: list[str] | None = None
    steps: list[int] | None = None
    halves: PatchHalves = "both"
    batch_size: int | None = None

    def __post_init__(self) -> None:
        self._normalise("layers", check_str_list("layers", self.layers))
        self._normalise("steps", check_int_list("steps", self.steps))
        self._normalise("batch_size", check_int("batch_size", self.batch_size, optional=True))
        if self.halves not in PATCH_HALVES:
            raise ValueError(f"unknown halves {self.halves!r}; use one of {PATCH_HALVES}")
        if self.layers is not None and not self.layers:
            raise ValueError("give at least one layer, or None for the family's blocks")


class ActivationPatching(InterventionMethod[ActivationPatchingConfig]):
    """Patch prompt B's activation into prompt A's run at each (layer, step).

    Parameters
    ----------
    config : ActivationPatchingConfig, optional
        The settings below as one record; or pass them by name.
    layers : list of str, optional
        Diffusers module paths (default: the family's blocks, as DF-CAM's grid).
    steps : list of int, optional
        Steps patched (default every step).
    halves : {"both", "cond"}
        Patch both CFG halves (default: the whole activation) or the prompt's half only.
    batch_size : int, optional
        Largest number of branches per denoiser call.
    progress_bar : bool
        Show a ``tqdm.auto`` bar.

    Examples
    --------
    >>> grid = ActivationPatching(steps=[0, 5, 10]).run(
    ...     pipe, trace, "a large blue circle on the left")  # doctest: +SKIP
    >>> grid.grid("colour").shape  # doctest: +SKIP
    (7, 3)
    """

    name = "activation_patching"
    config_class = ActivationPatchingConfig

    def run(
        self,
        pipe: Any,
        traces: Trace | Sequence[Trace],
        source: str | Trace | Sequence[Trace],
        *,
        judges: Judge | Sequence[Judge] | None = None,
        progress: ProgressCallback | None = None,
        **pipeline_kwargs: Any,
    ) -> PatchingGrid:
        """The layer × step grid of patching B's activations into A's runs.

        Parameters
        ----------
        pipe : diffusers pipeline
            The pipeline the traces came from.
        traces : Trace or sequence of Trace
            Traces of prompt A, one per seed.
        source : str, Trace or sequence of Trace
            Prompt B's traces, one per trace of A (same settings; the same seeds), or prompt
            B itself (then traced with each A trace's settings and seed).
        judges : Judge or sequence of Judge, optional
            Default on the scene world: the exact reader of each attribute A and B differ in.
        progress : callable, optional
            ``progress(done, total)`` over branch steps; ``False`` cancels.
        **pipeline_kwargs
            Pipeline arguments the traces were made with (e.g. ``max_sequence_length``).

        Returns
        -------
        PatchingGrid
        """
        from diffwidget.tracing.branch import ActivationPatch, Branch
        from diffwidget.tracing.branch_setup import BranchConditioning
        from diffwidget.tracing.families import denoiser_family

        start = time.perf_counter()
        items = check_traces(traces)
        sources = self._sources(pipe, items, source, pipeline_kwargs)
        prompt_a, prompt_b = items[0].prompt, sources[0].prompt
        chosen = default_judges(judges, prompt_a, prompt_b)
        n, n_seeds = items[0].n_steps, len(items)
        layers = self.config.layers or denoiser_family(pipe).cam_layers()
        steps = sorted(set(self.config.steps if self.config.steps is not None else range(n)))
        if any(not 0 <= s < n for s in steps):
            raise ValueError(f"steps must lie within 0..{n - 1}, got {steps}")
        with self.branches(pipe, [*items, *sources], [], pipeline_kwargs) as (runner, setup):
            cond_a = setup.conditionings[prompt_a]
            branches = []
            for i, trace_b in enumerate(sources):
                cond_b = BranchConditioning.of_trace(trace_b, runner.device, runner.dtype)
                acts = runner.block_outputs(n_seeds + i, cond_b, layers, steps)
                for layer in layers:
                    for step in steps:
                        values = acts[(step, layer)]
                        if self.config.halves == "cond":
                            values = (*([None] * (len(values) - 1)), values[-1])
                        patch = ActivationPatch(step, layer, values)
                        branches.append(Branch(source=i, start=step, conditioning=0, patch=patch))
            outcome = self.run_branches(runner, branches, [cond_a], progress)
            assert outcome.images is not None
            reference = reference_images(pipe, items)
        # Branches were made seed-major; results are (layer * step, seed).
        images = outcome.images.reshape(
            n_seeds, len(layers) * len(steps), *outcome.images.shape[1:]
        )
        images = images.swapaxes(0, 1)
        return PatchingGrid(
            attributes=[j.attribute for j in chosen],
            a_values=[j.a_value for j in chosen],
            b_values=[j.b_value or "" for j in chosen],
            judges=[j.name for j in chosen],
            exact=[j.exact for j in chosen],
            seeds=seeds_of(items),
            outcomes=judge_all(chosen, images),
            image_change=self.changes(images, reference),
            meta={**self.config.to_json(), **self.shared_meta(outcome, runner, start)},
            prompt_a=prompt_a,
            prompt_b=prompt_b,
            layers=list(layers),
            steps=np.asarray(steps, np.int64),
            halves=self.config.halves,
        )

    @staticmethod
    def _sources(
        pipe: Any, items: list[Trace], source: str | Trace | Sequence[Trace], kwargs: dict[str, Any]
    ) -> list[Trace]:
        if isinstance(source, str):
            from diffwidget.tracing.branch_setup import retrace

            if source == items[0].prompt:
                raise ValueError("prompt B is prompt A: nothing to patch in")
            return [retrace(pipe, t, source, **kwargs) for t in items]
        sources = check_traces(source)
        if len(sources) != len(items):
            raise ValueError(
                f"{len(sources)} traces of prompt B for {len(items)} of prompt A; give one per seed"
            )
        return sources
