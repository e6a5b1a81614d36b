"""What the interventions share: their base class, branch runs with progress, judging.

The interventions (:class:`~diffwidget.explain.prompt_switch.PromptSwitch`,
:class:`~diffwidget.explain.word_ablation.WordAblation`,
:class:`~diffwidget.explain.activation_patching.ActivationPatching`) are methods on the
method base like the saliency methods: a typed config, one verb (``run``), a typed result.
Each builds branches of the recorded traces (:mod:`diffwidget.tracing.branch`); this
module runs them under the pipeline's lock with a progress bar, the caller's ``progress``
and cancel, and judges the final images.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from diffwidget.explain.base import Method
from diffwidget.explain.config import MethodConfig
from diffwidget.explain.intervention_results import SHARE_INTERVAL, image_change
from diffwidget.explain.judges import Judge, check_judges, scene_judges
from diffwidget.explain.protocol import Cancelled, ProgressCallback

if TYPE_CHECKING:
    from diffwidget.tracing.branch import Branch, BranchConditioning, BranchOutcome, BranchRunner
    from diffwidget.tracing.branch_setup import BranchSetup
    from diffwidget.tracing.trace import Trace

C = TypeVar("C", bound=MethodConfig)


def check_traces(traces: Trace | Sequence[Trace]) -> list[Trace]:
    """A non-empty list of traces of one prompt (one per seed), or a clear error."""
    from diffwidget.tracing.trace import Trace

    items = [traces] if isinstance(traces, Trace) else list(traces)
    if not items:
        raise ValueError("give at least one trace of prompt A (one per seed)")
    bad = [type(t).__name__ for t in items if not isinstance(t, Trace)]
    if bad:
        raise TypeError(f"traces must be Trace objects (diffwidget.trace(...)), got {bad}")
    prompts = {t.prompt for t in items}
    if len(prompts) != 1:
        raise ValueError(f"the traces hold different prompts {sorted(prompts)}; give one prompt's")
    return items


def default_judges(
    judges: Judge | Sequence[Judge] | None, prompt_a: str, prompt_b: str
) -> list[Judge]:
    """The judges given, or the scene world's exact ones when both prompts are captions."""
    if judges is not None:
        return check_judges(judges)
    try:
        return scene_judges(prompt_a, prompt_b)
    except ValueError as error:
        raise ValueError(
            f"no judge given, and the scene-world judges do not apply ({error}); pass "
            "judges=[Judge('attribute', 'value under A', 'value under B', read=function)]"
        ) from None


def seeds_of(traces: Sequence[Trace]) -> np.ndarray:
    """The seed of each trace (``-1`` where none was recorded)."""
    return np.array([-1 if t.facts.seed is None else int(t.facts.seed) for t in traces], np.int64)


def reference_images(pipe: Any, traces: Sequence[Trace]) -> np.ndarray:
    """Prompt A's own final image per trace (decoded where the trace holds none)."""
    from diffwidget.tracing.decode import decode_latents

    missing = [i for i, t in enumerate(traces) if t.image is None]
    decoded = (
        decode_latents(pipe, np.stack([traces[i].final_latent for i in missing]))
        if missing
        else None
    )
    images = []
    for i, t in enumerate(traces):
        images.append(t.image if t.image is not None else decoded[missing.index(i)])  # type: ignore[index]
    return np.stack(images)


def judge_all(judges: Sequence[Judge], images: np.ndarray) -> np.ndarray:
    """Outcome codes ``(n_judges, *images.shape[:-3])`` of a stack of images."""
    flat = images.reshape(-1, *images.shape[-3:])
    codes = np.stack([judge.outcomes(flat) for judge in judges])
    return codes.reshape(len(judges), *images.shape[:-3])


class InterventionMethod(Method[C]):
    """Base of the interventions: branch runs with progress and cancel, judged outcomes."""

    unit = "branch step"

    @contextmanager
    def branches(
        self,
        pipe: Any,
        traces: Sequence[Trace],
        prompts: Sequence[str],
        pipeline_kwargs: dict[str, Any],
    ) -> Iterator[tuple[BranchRunner, BranchSetup]]:
        """The pipeline held, its scheduler template and prompts' conditioning prepared."""
        from diffwidget.tracing.branch import BranchRunner
        from diffwidget.tracing.branch_setup import prepare_branches
        from diffwidget.tracing.lock import hold_pipeline

        with hold_pipeline(pipe, f"{self.label} on {traces[0].prompt!r}"):
            setup = prepare_branches(pipe, traces[0], prompts, **pipeline_kwargs)
            batch = getattr(self.config, "batch_size", None)
            yield BranchRunner(pipe, traces, setup, max_batch=batch), setup

    def run_branches(
        self,
        runner: BranchRunner,
        branches: Sequence[Branch],
        conditionings: Sequence[BranchConditioning],
        progress: ProgressCallback | None,
    ) -> BranchOutcome:
        """Run the branches with a bar and ``progress``; a stop raises :class:`Cancelled`
        (a curve with some branches missing would be wrong, not partial)."""
        from tqdm.auto import tqdm

        from diffwidget.tracing.branch import BranchesStopped

        total = sum(runner.n_steps - b.start for b in branches)
        bar = tqdm(total=total, desc=self.label, unit=self.unit, disable=not self.progress_bar)
        seen = [0]

        def report(done: int, _total: int) -> bool | None:
            bar.update(done - seen[0])
            seen[0] = done
            return None if progress is None else progress(done, total)

        try:
            return runner.run(branches, conditionings, progress=report)
        except BranchesStopped as stopped:
            raise Cancelled(str(stopped)) from None
        finally:
            bar.close()

    @staticmethod
    def shared_meta(outcome: BranchOutcome, runner: BranchRunner, start: float) -> dict[str, Any]:
        """Timing and work facts every intervention result carries."""
        return {
            "seconds": time.perf_counter() - start,
            "denoiser_rows": outcome.rows,
            "denoiser_calls": outcome.calls,
            **{k: round(v, 4) for k, v in outcome.timing.items()},
            "interval": SHARE_INTERVAL,
            "device": str(runner.device),
            "scheduler": type(runner.setup.scheduler).__name__,
        }

    @staticmethod
    def changes(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """Image change of ``images`` ``(..., S, H, W, 3)`` from A's images ``(S, H, W, 3)``."""
        return image_change(images, reference)
