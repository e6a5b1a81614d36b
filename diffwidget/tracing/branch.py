"""Branches of recorded trajectories: continue a trace from its ``x_k`` with other conditioning.

An intervention over time steps asks what the image would have become had something changed
from step ``k`` on: the prompt (a prompt switch), one word's rows in steps ``[a, b]`` (a word
ablation), one block's output at one step (activation patching). A trace keeps every
``x_k``, so a branch never re-runs the prefix: it starts from the recorded ``x_k``, with the
solver history the trace had there (:mod:`diffwidget.tracing.branch_scheduler`), and calls
the denoiser the way the pipeline does, through the family (every family works).

:class:`BranchRunner` runs many branches together: at every step, all branches that have
started are the rows of **one batched denoiser call** (CFG halves batched as the pipeline
batches them), each row with its own conditioning and, if any, its patch; so a whole switch
curve over ``N`` steps costs the sum of the remaining steps, not ``N`` generations.

Exactness: a branch of one row from step 0 with the trace's own conditioning repeats the
pipeline's arithmetic, so it reproduces the traced latent and image bit for bit. Rows batched
together go through the same arithmetic, but the denoiser's kernels may round differently
for other batch sizes (last-bit differences in float32).

Nothing of the pipeline is changed: the live scheduler is never used (branches step copies of
a template), and patch taps are removed in ``finally``.
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from diffwidget.tracing.branch_scheduler import RecordedSolver, join_rows, model_input, step_latents
from diffwidget.tracing.branch_setup import BranchConditioning, BranchSetup
from diffwidget.tracing.facts import TEXT_ARGUMENT
from diffwidget.tracing.families import LatentLayout, denoiser_family
from diffwidget.tracing.hooks import capture_outputs
from diffwidget.tracing.taps import LoopState, ModuleTap, TapRegistry

if TYPE_CHECKING:
    from diffwidget.tracing.cfg import Half
    from diffwidget.tracing.trace import Trace

#: ``progress(rows_done, rows_total)``; returning ``False`` stops the run.
BranchProgress = Callable[[int, int], "bool | None"]


class BranchesStopped(Exception):
    """The progress callback asked the branch run to stop."""


@dataclass(frozen=True)
class ActivationPatch:
    """Replace one module's output at one step of a branch.

    Attributes
    ----------
    step : int
        Loop index of the patched call (the branch's first step or later).
    path : str
        Diffusers module path of the patched module.
    values : tuple of Tensor
        The replacing activation per CFG half, in ``cfg.halves`` order, each ``(1, ...)``
        as the module emits it for one image; ``None`` entries leave that half alone.
    """

    step: int
    path: str
    values: tuple[torch.Tensor | None, ...]


@dataclass(frozen=True)
class Branch:
    """One row of a branch run.

    Attributes
    ----------
    source : int
        Which of the runner's traces the branch starts from.
    start : int
        The step ``k``: the branch starts from the trace's recorded ``x_k`` (``k = n_steps``
        is the trace's own final latent: nothing runs).
    conditioning : int or tuple of int
        Index into the run's conditionings, for every step; or one index per step
        (``n_steps`` entries; those before ``start`` are not used).
    patch : ActivationPatch, optional
        One module output replaced at one step.
    """

    source: int = 0
    start: int = 0
    conditioning: int | tuple[int, ...] = 0
    patch: ActivationPatch | None = None

    def conditioning_at(self, step: int) -> int:
        """The conditioning index used at ``step``."""
        if isinstance(self.conditioning, int):
            return self.conditioning
        return self.conditioning[step]


@dataclass
class BranchOutcome:
    """The end of every branch of a run, in the order the branches were given.

    Attributes
    ----------
    latents : ndarray of float32, shape (R, C, h, w)
        Each branch's final latent (unpacked).
    images : ndarray of uint8, shape (R, H, W, 3), optional
        Their decoded images (the pipeline's VAE).
    rows : int
        Denoiser rows evaluated (one row = one image through one step, CFG halves together).
    calls : int
        Batched denoiser calls made.
    seconds : float
        Time of the run, decoding included.
    """

    latents: np.ndarray
    images: np.ndarray | None
    rows: int
    calls: int
    seconds: float = 0.0
    timing: dict[str, float] = field(default_factory=dict)


class PatchTap(ModuleTap):
    """Writes given rows of a module's output (the module's image activation, as the family
    selects it) for the calls it is armed for; a plain pass-through otherwise."""

    def __init__(self, path: str) -> None:
        super().__init__(path, f"patch:{path}")
        self.armed: tuple[torch.Tensor, torch.Tensor] | None = None

    def post_forward(self, module: Any, output: Any) -> Any:
        """Replace the armed rows; the module's other outputs pass unchanged."""
        if self.armed is None or self.loop is None:
            return output
        index, values = self.armed
        tensor = self.loop.family.block_tensor(self.path, output)
        patched = tensor.clone()
        patched[index] = values.to(patched)
        return replace_tensor(output, tensor, patched)


def replace_tensor(output: Any, old: torch.Tensor, new: torch.Tensor) -> Any:
    """``output`` with the tensor ``old`` (by identity) replaced by ``new``."""
    if output is old:
        return new
    if isinstance(output, (tuple, list)):
        return type(output)(replace_tensor(item, old, new) for item in output)
    if hasattr(output, "to_tuple") and hasattr(output, "sample") and output.sample is old:
        output.sample = new
        return output
    return output


class BranchRunner:
    """Run branches of recorded traces, batched, without touching the pipeline's state.

    Parameters
    ----------
    pipe : diffusers pipeline
        The pipeline the traces came from.
    traces : sequence of Trace
        Recorded runs with the same settings (steps, guidance, size, call layout), e.g. one
        per seed.
    setup : BranchSetup
        The scheduler template (:func:`~diffwidget.tracing.branch_setup.prepare_branches`).
    max_batch : int, optional
        Largest number of rows per denoiser call (``None``: every started row at once).

    Examples
    --------
    >>> setup = prepare_branches(pipe, trace, ["a blue circle on the left"])  # doctest: +SKIP
    >>> runner = BranchRunner(pipe, [trace], setup)  # doctest: +SKIP
    >>> conds = list(setup.conditionings.values())  # doctest: +SKIP
    >>> branches = [Branch(start=k, conditioning=1) for k in range(20)]  # doctest: +SKIP
    >>> out = runner.run(branches, conds)  # doctest: +SKIP
    """

    def __init__(
        self,
        pipe: Any,
        traces: Sequence[Trace],
        setup: BranchSetup,
        *,
        max_batch: int | None = None,
    ) -> None:
        if not traces:
            raise ValueError("give at least one trace to branch from")
        if max_batch is not None and (isinstance(max_batch, bool) or int(max_batch) < 1):
            raise ValueError(f"max_batch must be a positive integer or None, got {max_batch!r}")
        self.pipe = pipe
        self.family = denoiser_family(pipe)
        self.traces = list(traces)
        first = self.traces[0]
        for trace in self.traces:
            _check_compatible(first, trace, self.family.name)
        facts = first.facts
        self.cfg = facts.cfg(float(first.guidance_scale), len(first.prompt_embeds))
        self.entries = facts.call_layout(list(first.extra))
        self.n_steps = first.n_steps
        param = next(self.family.denoiser.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.dtype = param.dtype if param is not None else torch.float32
        times = facts.timesteps_in
        self.model_t = [float(t) for t in (times if times is not None else first.timesteps)]
        from diffwidget.tracing.replay import timestep_dtype

        self.t_dtype = timestep_dtype(facts.model_timestep_dtype)
        hw = facts.latent_layout
        self.layout = (
            LatentLayout(hw.latent_hw, hw.patch) if hw else LatentLayout(first.latent_shape, 1)
        )
        self.setup = setup
        self.max_batch = max_batch
        self.solvers = [
            RecordedSolver(setup.scheduler, t, self.family, self.layout, self.dtype, self.device)
            for t in self.traces
        ]

    # ------------------------------------------------------------------ the call
    def _kwargs(self, half: Half, conds: Sequence[BranchConditioning]) -> dict[str, Any]:
        """The conditioning keywords of one CFG half for rows with ``conds``."""
        kwargs: dict[str, Any] = {}
        first = conds[0]
        row = first.half(self.cfg, half)
        for entry in self.entries:
            name, parent, kind = entry.name, entry.parent, entry.kind
            value: Any
            if kind == "none":
                value = None
            elif kind == "value":
                value = entry.value
            elif name == TEXT_ARGUMENT and parent is None:
                value = torch.stack([c.embeds[row] for c in conds])
            elif kind == "batch_free" or name in self.family.batch_free:
                value = first.extra[name]
            else:
                value = torch.stack([c.extra[name][row] for c in conds])
            if parent is None:
                kwargs[name] = value
            else:
                kwargs.setdefault(parent, {})[name] = value
        masks = [c.key_mask for c in conds]
        if any(m is not None for m in masks):
            kwargs = self._with_mask(kwargs, half, conds)
        return kwargs

    def _with_mask(
        self, kwargs: dict[str, Any], half: Half, conds: Sequence[BranchConditioning]
    ) -> dict[str, Any]:
        name = self.family.text_mask_argument
        if name is None:
            raise ValueError(
                f"the {self.family.label} family's denoiser takes no text attention mask; "
                "mask a word by its text-embedding rows instead (mode='zero' or 'replace')"
            )
        row = conds[0].half(self.cfg, half)
        length = conds[0].embeds.shape[1]
        ones = torch.ones(length, device=self.device, dtype=self.dtype)
        mask = torch.stack([ones if c.key_mask is None else c.key_mask[row] for c in conds])
        present = kwargs.get(name)
        kwargs[name] = mask if present is None else present * mask.to(present)
        return kwargs

    def _join(self, parts: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in parts[0].items():
            if isinstance(value, dict):
                out[key] = self._join([p[key] for p in parts])
            elif isinstance(value, torch.Tensor) and key not in self.family.batch_free:
                out[key] = torch.cat([p[key] for p in parts])
            else:
                out[key] = value
        return out

    def _denoise_halves(
        self,
        x: torch.Tensor,
        step: int,
        conds: Sequence[BranchConditioning],
        patches: Sequence[ActivationPatch | None],
        taps: dict[str, PatchTap],
        halves: tuple[Half, ...],
    ) -> torch.Tensor:
        """:meth:`_denoise` with the CFG ``halves`` last (what ``cfg.run`` passes)."""
        return self._denoise(x, step, halves, conds, patches, taps)

    def _denoise(
        self,
        x: torch.Tensor,
        step: int,
        halves: tuple[Half, ...],
        conds: Sequence[BranchConditioning],
        patches: Sequence[ActivationPatch | None],
        taps: dict[str, PatchTap],
    ) -> torch.Tensor:
        """One denoiser call on the rows ``x`` (scheduler space) for the CFG ``halves``."""
        scheduler = self._scheduler
        sample = model_input(scheduler, torch.cat([x] * len(halves)), step)
        kwargs = self._join([self._kwargs(h, conds) for h in halves])
        t = torch.full((sample.shape[0],), self.model_t[step], dtype=self.t_dtype)
        self._arm(taps, halves, patches, len(x))
        try:
            out = self.family.run(sample, t.to(self.device), kwargs)
        finally:
            for tap in taps.values():
                tap.armed = None
        return self.family.from_model_output(out, self.layout)

    def _arm(
        self,
        taps: dict[str, PatchTap],
        halves: tuple[Half, ...],
        patches: Sequence[ActivationPatch | None],
        n_rows: int,
    ) -> None:
        stored = self.cfg.halves
        for path, tap in taps.items():
            index, values = [], []
            for h, half in enumerate(halves):
                for i, patch in enumerate(patches):
                    if patch is None or patch.path != path:
                        continue
                    value = patch.values[stored.index(half)]
                    if value is not None:
                        index.append(h * n_rows + i)
                        values.append(value[0])
            if index:
                tap.armed = (torch.as_tensor(index, device=self.device), torch.stack(values))

    def _guided(
        self,
        x: torch.Tensor,
        step: int,
        conds: Sequence[BranchConditioning],
        patches: Sequence[ActivationPatch | None],
        taps: dict[str, PatchTap],
    ) -> torch.Tensor:
        size = self.max_batch or len(x)
        outs = []
        for begin in range(0, len(x), size):
            end = begin + size
            call = functools.partial(
                self._denoise_halves, x[begin:end], step, conds[begin:end], patches[begin:end], taps
            )
            outs.append(self.cfg.run(call))
        guided = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.family.to_model_input(guided, self.layout)

    # ------------------------------------------------------------------ the run
    def run(
        self,
        branches: Sequence[Branch],
        conditionings: Sequence[BranchConditioning],
        *,
        decode: bool = True,
        progress: BranchProgress | None = None,
    ) -> BranchOutcome:
        """Run ``branches`` to the end of the trajectory.

        Parameters
        ----------
        branches : sequence of Branch
            The rows; all branches that have started are batched at every step.
        conditionings : sequence of BranchConditioning
            The conditionings the branches index.
        decode : bool
            Decode every final latent with the pipeline's VAE.
        progress : callable, optional
            ``progress(rows_done, rows_total)`` after every step; ``False`` stops the run
            (:class:`BranchesStopped`).

        Returns
        -------
        BranchOutcome
        """
        begin = time.perf_counter()
        _check_branches(branches, conditionings, len(self.traces), self.n_steps)
        latents, rows, calls = self._steps(branches, conditionings, progress)
        stepped = time.perf_counter()
        images = self._decode(branches, latents) if decode else None
        end = time.perf_counter()
        timing = {"denoise_seconds": stepped - begin, "decode_seconds": end - stepped}
        return BranchOutcome(latents, images, rows, calls, end - begin, timing)

    def _decode(self, branches: Sequence[Branch], latents: np.ndarray) -> np.ndarray:
        """The final images; a branch that never ran keeps its trace's own image exactly."""
        from diffwidget.tracing.decode import decode_latents

        own = [
            i
            for i, b in enumerate(branches)
            if b.start == self.n_steps and self.traces[b.source].image is not None
        ]
        rest = [i for i in range(len(branches)) if i not in set(own)]
        shape = self.traces[0].image.shape if own else None  # type: ignore[union-attr]
        decoded = decode_latents(self.pipe, torch.as_tensor(latents[rest])) if rest else None
        if decoded is not None:
            shape = decoded.shape[1:]
        assert shape is not None
        images = np.zeros((len(branches), *shape), np.uint8)
        if decoded is not None:
            images[rest] = decoded
        for i in own:
            images[i] = self.traces[branches[i].source].image
        return images

    def _steps(
        self,
        branches: Sequence[Branch],
        conditionings: Sequence[BranchConditioning],
        progress: BranchProgress | None,
    ) -> tuple[np.ndarray, int, int]:
        total = sum(self.n_steps - b.start for b in branches)
        paths = sorted({b.patch.path for b in branches if b.patch is not None})
        taps = {path: PatchTap(path) for path in paths}
        order: list[int] = []  # branch index of each running row
        x: torch.Tensor | None = None
        self._scheduler = None
        done = calls = 0
        loop = LoopState(self.family, self.cfg)
        with TapRegistry(list(taps.values())).installed(loop), torch.no_grad():
            for step in range(min((b.start for b in branches), default=self.n_steps), self.n_steps):
                joining = [i for i, b in enumerate(branches) if b.start == step]
                if joining:
                    x = self._join_rows(x, step, [branches[i] for i in joining])
                    order += joining
                if x is None:
                    continue
                loop.step = step
                conds = [conditionings[branches[i].conditioning_at(step)] for i in order]
                patches = [_patch_at(branches[i].patch, step) for i in order]
                guided = self._guided(x, step, conds, patches, taps)
                x = step_latents(self._scheduler, guided, step, x)
                done += len(order)
                calls += 1
                if progress is not None and progress(done, total) is False and done < total:
                    raise BranchesStopped(f"stopped after {done} of {total} branch steps")
        finals = np.zeros((len(branches), *self.traces[0].final_latent.shape), np.float32)
        if x is not None:
            unpacked = self.family.to_latents(x, self.layout).float().cpu().numpy()
            finals[order] = unpacked
        for i, b in enumerate(branches):
            if b.start == self.n_steps:
                finals[i] = self.traces[b.source].final_latent
        return finals, done, calls

    def _join_rows(
        self, x: torch.Tensor | None, step: int, joining: Sequence[Branch]
    ) -> torch.Tensor:
        new = torch.cat([self.solvers[b.source].latent(step) for b in joining])
        counts: dict[int, int] = {}
        for b in joining:
            counts[b.source] = counts.get(b.source, 0) + 1
        # Rows are appended in the order of `joining`: group them by source first.
        sources = [(self.solvers[s].advance_to(step), n) for s, n in counts.items()]
        grouped = torch.cat(
            [new[[i for i, b in enumerate(joining) if b.source == s]] for s in counts]
        )
        self._scheduler = join_rows(self._scheduler, sources, tuple(new.shape[1:]))
        return grouped if x is None else torch.cat([x, grouped])

    # ------------------------------------------------------------------ sources
    def block_outputs(
        self,
        source: int,
        conditioning: BranchConditioning,
        paths: Sequence[str],
        steps: Sequence[int],
    ) -> dict[tuple[int, str], tuple[torch.Tensor | None, ...]]:
        """Each module's output at each step of trace ``source``'s recorded trajectory.

        The denoiser runs once per step on the recorded ``x_step`` with ``conditioning``
        (e.g. the trace's own), as in the pipeline; the outputs are split into CFG halves.

        Returns
        -------
        dict of (step, path) to tuple of Tensor
            One ``(1, ...)`` activation per CFG half, in ``cfg.halves`` order.
        """
        solver = self.solvers[source]
        out: dict[tuple[int, str], tuple[torch.Tensor | None, ...]] = {}
        self._scheduler = None
        with torch.no_grad():
            for step in steps:
                # A copy: scaling the input may set the solver's step index.
                self._scheduler = copy.deepcopy(solver.advance_to(step))
                with capture_outputs(self.family, paths, cfg=self.cfg) as acts:
                    self.cfg.run(
                        functools.partial(
                            self._denoise_halves,
                            solver.latent(step),
                            step,
                            [conditioning],
                            [None],
                            {},
                        )
                    )
                for path in paths:
                    uncond, cond = self.cfg.step_halves(acts[path])
                    halves = (cond,) if uncond is None else (uncond, cond)
                    out[(step, path)] = tuple(h.detach().clone() for h in halves)
        self._scheduler = None
        return out


def _check_compatible(first: Trace, trace: Trace, family: str) -> None:
    if trace.facts.family != family:
        raise ValueError(
            f"a trace was recorded with a {trace.facts.family} pipeline, but the pipeline is a "
            f"{family} pipeline; pass the pipeline the traces came from"
        )
    same = (
        trace.n_steps == first.n_steps
        and np.array_equal(trace.timesteps, first.timesteps)
        and trace.latents.shape == first.latents.shape
        and float(trace.guidance_scale) == float(first.guidance_scale)
        and trace.prompt_embeds.shape == first.prompt_embeds.shape
        and sorted(trace.extra) == sorted(first.extra)
    )
    if not same:
        raise ValueError(
            "the traces differ in their settings (steps, timesteps, size, guidance or text "
            "length); branch runs batch traces made with the same settings (seeds may differ)"
        )


def _check_branches(
    branches: Sequence[Branch], conditionings: Sequence[BranchConditioning], n_traces: int, n: int
) -> None:
    if not branches:
        raise ValueError("give at least one branch")
    for b in branches:
        if not isinstance(b, Branch):
            raise TypeError(f"branches must be Branch objects, got {type(b).__name__}")
        if not 0 <= b.source < n_traces:
            raise IndexError(f"branch source {b.source} out of range (0..{n_traces - 1})")
        if not 0 <= b.start <= n:
            raise IndexError(f"branch start {b.start} out of range (0..{n})")
        indices = [b.conditioning] if isinstance(b.conditioning, int) else list(b.conditioning)
        if not isinstance(b.conditioning, int) and len(indices) != n:
            raise ValueError(f"a per-step conditioning needs {n} entries, got {len(indices)}")
        if any(not 0 <= i < len(conditionings) for i in indices):
            raise IndexError(f"conditioning index out of range (0..{len(conditionings) - 1})")
        if b.patch is not None and not b.start <= b.patch.step < n:
            raise ValueError(
                f"a patch at step {b.patch.step} is outside its branch (steps {b.start}..{n - 1})"
            )


def _patch_at(patch: ActivationPatch | None, step: int) -> ActivationPatch | None:
    """The branch's patch when it applies at ``step``."""
    return patch if patch is not None and patch.step == step else None
