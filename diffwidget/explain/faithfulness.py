"""Insertion/deletion curves and AUC for saliency maps on the latent grid."""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F

from diffwidget.explain._common import ProgressCallback, check_int, check_step, choose_batch
from diffwidget.explain.base import Method, StepInputs
from diffwidget.explain.config import MethodConfig
from diffwidget.explain.results import FaithfulnessCurves, FaithfulnessResult, SaliencyMap
from diffwidget.explain.similarity import effective_window, gaussian_window, similarity
from diffwidget.tracing.replay import StepReplay

if TYPE_CHECKING:
    from diffwidget.tracing.trace import Trace

AucSimilarity = Literal["ssim", "cosine"]
AUC_SIMILARITIES: tuple[str, ...] = get_args(AucSimilarity)
AucTarget = Literal["x0", "prev"]
AUC_TARGETS: tuple[str, ...] = get_args(AucTarget)
#: What a deleted cell becomes (and what insertion starts from).
AucOperator = Literal["paper", "zero", "blur", "renoise"]
AUC_OPERATORS: tuple[str, ...] = get_args(AucOperator)
#: The paper's zero-deletion / blur-insertion separated real maps from random orders best on
#: the embedded model (mean d_z over DF-RISE, DF-CAM and attention, re-run on the fixed
#: methods: 1.70 vs zero 1.66, blur 1.30, re-noise 1.08; bench/bench_operators.py,
#: bench/RESULTS_explain.md).
DEFAULT_OPERATOR: AucOperator = "paper"
#: One sentence per operator, shown beside every AUC.
OPERATOR_TEXT: dict[str, str] = {
    "paper": "deletion zeroes cells; insertion restores them into the Gaussian-blurred latent",
    "zero": "deletion zeroes cells; insertion restores them into an all-zero latent",
    "blur": "deletion replaces cells by the Gaussian-blurred latent; insertion restores them "
    "into it",
    "renoise": "deletion replaces cells by fresh Gaussian noise at the step's own noise level; "
    "insertion restores them into such noise",
}

#: The paper's protocol: 65 stages of 64 cells on a 64x64 latent (stage 0 = untouched).
PAPER_CELLS = 64 * 64
PAPER_CELLS_PER_STAGE = 64
#: The paper's insertion start: the latent blurred with an 11x11 Gaussian, sigma 5.
BLUR_KERNEL = 11
BLUR_SIGMA = 5.0


def blur_latent(
    x: torch.Tensor, kernel: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA
) -> torch.Tensor:
    """Gaussian-blur each channel of ``x`` ``[B, C, h, w]`` (reflect borders, same size)."""
    size = effective_window((x.shape[-2], x.shape[-1]), kernel)
    g = gaussian_window(size, sigma, device=x.device)
    pad = size // 2
    channels = x.shape[1]
    out = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect")
    out = F.conv2d(out, g.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(out, g.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def trapezoid_auc(fractions: np.ndarray, scores: np.ndarray) -> float:
    """Area under ``scores`` over ``fractions`` in [0, 1] by the trapezoid rule."""
    x = np.asarray(fractions, dtype=np.float64)
    y = np.asarray(scores, dtype=np.float64)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def stage_plan(size: tuple[int, int], cells_per_stage: int | None = None) -> tuple[int, int]:
    """Cells per stage and number of stages (including stage 0) for a latent grid.

    The paper's 64 cells per stage on 4096 cells is scaled with the grid (1/64 of the
    cells per stage), so every grid gets about 65 stages.
    """
    n = size[0] * size[1]
    cps = cells_per_stage or max(1, round(n * PAPER_CELLS_PER_STAGE / PAPER_CELLS))
    return cps, math.ceil(n / cps) + 1


@dataclass(frozen=True)
class InsertionDeletionConfig(MethodConfig):
    """Settings of :class:`InsertionDeletion` (each is described there); validated when built.

    Examples
    --------
    >>> InsertionDeletionConfig(n_random=1).n_random
    1
    """

    similarity: AucSimilarity = "ssim"
    cells_per_stage: int | None = None
    blur_kernel: int = BLUR_KERNEL
    blur_sigma: float = BLUR_SIGMA
    n_random: int = 3
    seed: int = 0
    target: AucTarget = "x0"
    batch_size: int | None = None
    operator: AucOperator = DEFAULT_OPERATOR

    def __post_init__(self) -> None:
        if self.operator not in AUC_OPERATORS:
            raise ValueError(f"unknown operator {self.operator!r}; use one of {AUC_OPERATORS}")
        if self.similarity not in AUC_SIMILARITIES:
            raise ValueError(f"unknown similarity {self.similarity!r}; use 'ssim' or 'cosine'")
        if self.target not in AUC_TARGETS:
            raise ValueError(f"unknown target {self.target!r}; use 'x0' or 'prev'")
        self._normalise("n_random", check_int("n_random", self.n_random))
        self._normalise(
            "cells_per_stage", check_int("cells_per_stage", self.cells_per_stage, optional=True)
        )
        self._normalise("batch_size", check_int("batch_size", self.batch_size, optional=True))
        self._normalise("seed", check_int("seed", self.seed, 0))
        self._normalise("blur_kernel", check_int("blur_kernel", self.blur_kernel))


class InsertionDeletion(Method[InsertionDeletionConfig]):
    """Insertion and deletion curves for a saliency map at one step, beside random orders.

    Latent cells are ordered by decreasing saliency. *Deletion* zeroes them (all channels)
    stage by stage; *insertion* starts from a Gaussian-blurred latent and puts the original
    cells back in the same order. At each stage the one-step prediction (``x0`` by default)
    is scored against the prediction from the unmodified latent with a per-image similarity.
    AUCs use the trapezoid rule over the fraction of cells (0 to 1). A faithful map gives a
    *lower* deletion and a *higher* insertion AUC than random orders (seeded).

    Parameters
    ----------
    config : InsertionDeletionConfig, optional
        The settings below as one record; or pass them by name.
    similarity : {"ssim", "cosine"}
        Full SSIM (Gaussian window shrunk to fit the grid, data range of the reference) or
        cosine similarity, both in latent space.
    cells_per_stage : int, optional
        Default: the paper's 64 of 4096 cells, scaled to the grid.
    blur_kernel, blur_sigma : int, float
        Insertion start blur (paper: 11, 5); the kernel shrinks to fit small grids
        (``meta["blur_kernel"]`` says what was used).
    n_random : int
        Random orders averaged for the baseline.
    seed : int
        Seed of the random orders.
    target : {"x0", "prev"}
        The predicted quantity compared.
    batch_size : int, optional
        Latents per UNet call; automatic when omitted.
    operator : {"paper", "zero", "blur", "renoise"}
        What deletion puts in place of a cell and what insertion starts from: the paper's
        zeros / blurred latent, zeros for both, the blurred latent for both, or fresh noise
        at the step's own noise level for both (``sqrt(1 - alpha_t) * eps`` in the
        latent's convention, ``sigma_t * eps`` for sigma-space schedulers; seeded with
        ``seed``): ``x_t`` is already noisy, so this keeps the probes on the model's input
        distribution.

    Notes
    -----
    The paper scored each stage with FID between single images; FID needs Inception
    weights and is not a per-image measure, so we use SSIM or cosine in latent space.
    The paper's code also stepped the live scheduler for each probe; we replay statelessly.

    The random orders do not depend on the map, so an evaluator keeps their curves for the
    (pipeline, trace, step) it last saw at each step: judging several maps of one step
    costs one set of random curves (``meta["random_reused"]`` says when they were reused).
    Change the pipeline's weights in place and you need a new evaluator.
    """

    name = "faithfulness"
    label = "insertion/deletion"
    config_class = InsertionDeletionConfig
    unit = "ordering"
    progress_bar_default = False

    def __init__(
        self,
        config: InsertionDeletionConfig | None = None,
        /,
        *,
        progress_bar: bool | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(config, progress_bar=progress_bar, **settings)
        # step -> (weakref to pipe, weakref to trace, deletion curves, insertion curves)
        self._random: dict[int, tuple[Any, Any, list[np.ndarray], list[np.ndarray]]] = {}

    def _cached_random(
        self, pipe: Any, trace: Trace, step: int
    ) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
        entry = self._random.get(step)
        if entry is None or entry[0]() is not pipe or entry[1]() is not trace:
            return None
        return entry[2], entry[3]

    def _remember_random(
        self, pipe: Any, trace: Trace, step: int, curves: tuple[list[np.ndarray], list[np.ndarray]]
    ) -> None:
        # An object without weak references: nothing is kept.
        with contextlib.suppress(TypeError):
            self._random[step] = (weakref.ref(pipe), weakref.ref(trace), *curves)

    def _baselines(
        self, replay: StepReplay, step: int, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What deletion puts in place of a cell, and what insertion starts from."""
        if self.config.operator == "renoise":
            # x_t = alpha x0 + sigma eps in the scheduler's own scale: sigma is the step's
            # noise level (VP, sigma-space and flow schedules alike).
            _, std, _ = replay.coefficients(step)
            gen = torch.Generator().manual_seed(self.config.seed)
            noise = std * torch.randn(x.shape, generator=gen).to(x.device, x.dtype)
            return noise, noise
        blurred = blur_latent(x, self.config.blur_kernel, self.config.blur_sigma)
        zero = torch.zeros_like(x)
        if self.config.operator == "zero":
            return zero, zero
        if self.config.operator == "blur":
            return blurred, blurred
        return zero, blurred

    def _curves(
        self,
        replay: StepReplay,
        step: int,
        order: torch.Tensor,
        x: torch.Tensor,
        baselines: tuple[torch.Tensor, torch.Tensor],
        ref: torch.Tensor,
        batch: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        h, w = x.shape[-2:]
        n = h * w
        cps, n_stages = stage_plan((h, w), self.config.cells_per_stage)
        counts = torch.clamp(torch.arange(n_stages) * cps, max=n)
        rank = torch.empty(n, dtype=torch.long)
        rank[order] = torch.arange(n)
        # chosen[k, c] = 1 when cell c is among the first counts[k] cells of the order.
        chosen = (rank[None, :] < counts[:, None]).float().view(n_stages, 1, h, w).to(x.device)
        removed, start = baselines
        deleted = x * (1 - chosen) + removed * chosen
        inserted = start * (1 - chosen) + x * chosen
        latents = torch.cat([deleted, inserted])
        scores = []
        for begin in range(0, len(latents), batch):
            pred = replay.predict(latents[begin : begin + batch], step, self.config.target)
            scores.append(similarity(pred, ref, self.config.similarity).cpu())
        s = torch.cat(scores).numpy().astype(np.float32)
        return (counts.numpy() / n).astype(np.float32), s[:n_stages], s[n_stages:]

    def evaluate(
        self,
        pipe: Any,
        trace: Trace,
        step: int,
        saliency: SaliencyMap | np.ndarray,
        progress: ProgressCallback | None = None,
    ) -> FaithfulnessResult:
        """Insertion/deletion curves of ``saliency`` at loop index ``step``.

        Parameters
        ----------
        pipe : DiffusionPipeline
            The pipeline the trace came from.
        trace : Trace
            The recorded run.
        step : int
            Loop index.
        saliency : SaliencyMap or ndarray of shape (h, w)
            Higher means more important; ties are broken by cell index.
        progress : callable, optional
            ``progress(done, total)`` after each ordering (saliency, then random ones);
            returning ``False`` before the last one raises
            :class:`~diffwidget.explain.protocol.Cancelled` (curves have no partial form).

        Returns
        -------
        FaithfulnessResult
        """
        step = check_step(trace, step)
        values = saliency.raw if isinstance(saliency, SaliencyMap) else np.asarray(saliency)
        size = trace.latent_shape
        if values.shape != size:
            raise ValueError(
                f"saliency has shape {values.shape} but the latent grid is {size}; pass a map "
                "on the latent grid (SaliencyMap.raw or .map)"
            )
        inputs = self.step_inputs(pipe, trace, step)
        config, replay = self.config, inputs.replay
        x = replay.latent(step)
        ref = replay.predict(x, step, config.target)
        baselines = self._baselines(replay, step, x)
        batch, _ = choose_batch(
            config.batch_size,
            lambda k: replay.predict(x.expand(k, -1, -1, -1), step, config.target),
            replay.device,
            2 * stage_plan(size, config.cells_per_stage)[1],  # deleted and inserted latents
            size,
        )
        cached = self._cached_random(pipe, trace, step)
        orders = self._orders(values, with_random=cached is None)
        curves = []
        with self.loop(1 + config.n_random, 1, progress, start=inputs.start, partial=False) as loop:
            for k, _ in loop:
                if k < len(orders):  # the random curves are computed unless cached
                    curves.append(self._curves(replay, step, orders[k], x, baselines, ref, batch))
        random = cached or ([c[1] for c in curves[1:]], [c[2] for c in curves[1:]])
        if cached is None:
            self._remember_random(pipe, trace, step, random)
        return self._result(inputs, curves[0], random, reused=cached is not None)

    def _orders(self, values: np.ndarray, *, with_random: bool) -> list[torch.Tensor]:
        """The map's order of the cells (decreasing, ties by index), then the random ones."""
        flat = torch.as_tensor(np.nan_to_num(values.astype(np.float64)).ravel())
        orders = [torch.argsort(-flat, stable=True)]
        if with_random:
            gen = torch.Generator().manual_seed(self.config.seed)
            orders += [
                torch.randperm(len(flat), generator=gen) for _ in range(self.config.n_random)
            ]
        return orders

    def _result(
        self,
        inputs: StepInputs,
        own: tuple[np.ndarray, np.ndarray, np.ndarray],
        random: tuple[list[np.ndarray], list[np.ndarray]],
        *,
        reused: bool,
    ) -> FaithfulnessResult:
        """The map's curves beside the mean random curves, with the settings used."""
        config, size = self.config, inputs.size
        frac, sal_del, sal_ins = own
        rand_del, rand_ins = random
        cps, n_stages = stage_plan(size, config.cells_per_stage)
        mean_del = np.mean(rand_del, axis=0).astype(np.float32)
        mean_ins = np.mean(rand_ins, axis=0).astype(np.float32)
        kernel = effective_window(size, config.blur_kernel)
        meta: dict[str, Any] = {
            "operator": config.operator,
            "operator_text": OPERATOR_TEXT[config.operator],
            "similarity": config.similarity,
            "target": config.target,
            "cells_per_stage": cps,
            "n_stages": n_stages,
            "blur_kernel": kernel,
            "blur_sigma": config.blur_sigma,
            "n_random": config.n_random,
            "seed": config.seed,
            "random_deletion_auc_sd": float(np.std([trapezoid_auc(frac, d) for d in rand_del])),
            "random_insertion_auc_sd": float(np.std([trapezoid_auc(frac, i) for i in rand_ins])),
            "random_reused": reused,
        }
        if kernel != config.blur_kernel:
            meta["blur_note"] = (
                f"latent grid {size[0]}x{size[1]} is too small for a {config.blur_kernel}x"
                f"{config.blur_kernel} blur; used {kernel}x{kernel}"
            )
        return FaithfulnessResult(
            step=inputs.step,
            saliency=FaithfulnessCurves(
                frac, sal_del, sal_ins, trapezoid_auc(frac, sal_del), trapezoid_auc(frac, sal_ins)
            ),
            random=FaithfulnessCurves(
                frac,
                mean_del,
                mean_ins,
                trapezoid_auc(frac, mean_del),
                trapezoid_auc(frac, mean_ins),
            ),
            meta=meta,
        )


def _minmax_curve(curve: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(curve)), float(np.max(curve))
    return np.zeros_like(curve) if hi - lo <= 0 else (curve - lo) / (hi - lo)


def summarize(results: Sequence[FaithfulnessResult]) -> dict[str, dict[str, float]]:
    """Aggregate per-prompt results two ways.

    * ``per_prompt``: mean and sample standard deviation of the per-prompt AUCs, and the
      share of prompts whose map beats its random baseline (deletion, insertion);
    * ``paper``: the paper's aggregation: the mean curve over prompts, min-max normalised,
      then the trapezoid AUC.

    Parameters
    ----------
    results : sequence of FaithfulnessResult
        One per prompt, all on the same latent grid and stage plan.

    Returns
    -------
    dict
        ``{"per_prompt": {...}, "paper": {...}}`` with keys such as
        ``"saliency_deletion_mean"``, ``"random_insertion_sd"``, ``"deletion_beats_random"``.
    """
    if not results:
        raise ValueError("no results to summarize; pass one FaithfulnessResult per prompt")
    frac = results[0].saliency.fractions
    if any(r.saliency.fractions.shape != frac.shape for r in results):
        raise ValueError("results use different stage plans; evaluate all prompts on one grid")
    per_prompt: dict[str, float] = {}
    paper: dict[str, float] = {}
    for who in ("saliency", "random"):
        for kind in ("deletion", "insertion"):
            curves: list[FaithfulnessCurves] = [getattr(r, who) for r in results]
            aucs = np.array([getattr(c, f"{kind}_auc") for c in curves])
            per_prompt[f"{who}_{kind}_mean"] = float(aucs.mean())
            per_prompt[f"{who}_{kind}_sd"] = float(aucs.std(ddof=1)) if len(aucs) > 1 else 0.0
            mean_curve = np.mean([getattr(c, kind) for c in curves], axis=0)
            paper[f"{who}_{kind}_auc"] = trapezoid_auc(frac, _minmax_curve(mean_curve))
    per_prompt["deletion_beats_random"] = float(np.mean([r.deletion_gain > 0 for r in results]))
    per_prompt["insertion_beats_random"] = float(np.mean([r.insertion_gain > 0 for r in results]))
    per_prompt["n_prompts"] = float(len(results))
    return {"per_prompt": per_prompt, "paper": paper}
