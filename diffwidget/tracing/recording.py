"""What a :class:`~diffwidget.tracing.context.TraceContext` collects while the pipeline runs.

:class:`StepRecords` holds, per step, the scheduler's view (``x_t``, the guided output,
``t``) and the denoiser's (each call's timestep argument and output); the step-0 calls'
conditioning becomes the trace's replay record (:func:`conditioning_record`), stored with
the CFG halves on axis 0 in ``("uncond", "cond")`` order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, get_args

import numpy as np
import torch

from diffwidget.tracing.cfg import CfgLayout, guide
from diffwidget.tracing.facts import TEXT_ARGUMENT, ConditioningKind
from diffwidget.tracing.families.base import DenoiserCall, DenoiserFamily, LatentLayout

if TYPE_CHECKING:
    from collections.abc import Sequence

#: ``Trace.facts.conditioning`` entry kinds (:data:`~diffwidget.tracing.facts.ConditioningKind`).
CONDITIONING_KINDS: tuple[str, ...] = get_args(ConditioningKind)


@dataclass
class Conditioning:
    """The replay record of a trace: text embeddings, other tensors and how to rebuild the call."""

    prompt_embeds: np.ndarray
    extra: dict[str, np.ndarray]
    layout: list[dict[str, Any]]


def _rows(
    name: str, per_call: list[Any], labels: list[str | None], cfg: CfgLayout, batch_free: bool
) -> np.ndarray:
    """The stored rows of one conditioning tensor (one per CFG half, in stored order) from
    its value in each of the step's calls."""
    if batch_free:
        return cfg.split_calls(per_call, labels)[1].detach().float().cpu().numpy()
    if not all(isinstance(value, torch.Tensor) for value in per_call):
        raise RuntimeError(f"the unconditional call has no tensor {name!r}")
    array = torch.cat(cfg.stored(per_call, labels)).detach().cpu()
    return (array.float() if array.is_floating_point() else array).numpy()


def conditioning_record(
    family: DenoiserFamily, calls: Sequence[DenoiserCall], cfg: CfgLayout
) -> Conditioning:
    """Everything but the latent and the timestep of step 0's calls, for stateless replay.

    Raises
    ------
    RuntimeError
        When the denoiser received no text embeddings.
    """
    labels = [c.label for c in calls]
    extra: dict[str, np.ndarray] = {}
    layout: list[dict[str, Any]] = []
    prompt_embeds: np.ndarray | None = None

    def visit(name: str, per_call: list[Any], parent: str | None) -> None:
        nonlocal prompt_embeds
        # The prompt's call decides what the argument is (the only call unless separate).
        value = cfg.split_calls(per_call, labels)[1]
        entry: dict[str, Any] = {"name": name, "parent": parent}
        if value is None:
            entry["kind"] = "none"
        elif isinstance(value, dict):
            for key in value:
                visit(key, [v.get(key) if isinstance(v, dict) else None for v in per_call], name)
            return
        elif isinstance(value, torch.Tensor):
            free = name in family.batch_free
            entry["kind"] = "batch_free" if free else "rows"
            rows = _rows(name, per_call, labels, cfg, free)
            if name == TEXT_ARGUMENT and parent is None:
                prompt_embeds = rows.astype(np.float32)
            else:
                extra[name] = rows
        elif isinstance(value, (bool, int, float, str)):
            entry["kind"] = "value"
            entry["value"] = value
        else:
            return  # objects a replay cannot rebuild (IP-adapter state, ...) are left out
        layout.append(entry)

    for name in cfg.split_calls([c.conditioning for c in calls], labels)[1]:
        visit(name, [c.conditioning.get(name) for c in calls], None)
    if prompt_embeds is None:
        raise RuntimeError(
            f"{type(family.denoiser).__name__} was called without `{TEXT_ARGUMENT}`; "
            "diffwidget traces text-conditioned denoisers"
        )
    return Conditioning(prompt_embeds, extra, layout)


@dataclass
class StepRecords:
    """Per-step records of one traced run (device tensors until the trace is built)."""

    timesteps: list[torch.Tensor] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    cond_outputs: list[torch.Tensor] = field(default_factory=list)
    sigma_indices: list[int | None] = field(default_factory=list)
    model_timesteps: list[float] = field(default_factory=list)
    model_timestep_dtype: str = "float32"
    final_latent: torch.Tensor | None = None
    #: Calls (and their raw outputs) since the last scheduler step.
    step_calls: list[DenoiserCall] = field(default_factory=list)
    step_outputs: list[tuple[DenoiserCall, torch.Tensor]] = field(default_factory=list)
    #: Step 0's calls and outputs, kept for the CFG check after the first step.
    first_outputs: list[tuple[DenoiserCall, torch.Tensor]] = field(default_factory=list)
    layout: LatentLayout = field(default_factory=lambda: LatentLayout((0, 0)))
    cfg: CfgLayout = field(default_factory=lambda: CfgLayout("none", 1.0))
    conditioning: Conditioning | None = None

    @property
    def n_steps(self) -> int:
        """Scheduler steps recorded so far."""
        return len(self.timesteps)

    def add_call(self, call: DenoiserCall) -> None:
        """A denoiser call of the current step."""
        if not self.step_calls:
            t = torch.as_tensor(call.timestep).detach().flatten()
            self.model_timesteps.append(float(t[0]))
            self.model_timestep_dtype = str(t.dtype).replace("torch.", "")
        self.step_calls.append(call)

    def add_output(self, call: DenoiserCall, output: torch.Tensor) -> None:
        """A denoiser call's raw output."""
        self.step_outputs.append((call, output.detach()))

    def _halves_of_outputs(
        self, family: DenoiserFamily, outputs: list[tuple[DenoiserCall, torch.Tensor]]
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        uncond, cond = self.cfg.step_halves([o for _, o in outputs], [c.label for c, _ in outputs])
        layout = self.layout
        return (
            None if uncond is None else family.from_model_output(uncond, layout),
            family.from_model_output(cond, layout),
        )

    def observed_cfg(
        self, family: DenoiserFamily, guided: torch.Tensor, claimed: float | None, pipe: Any
    ) -> CfgLayout:
        """The CFG layout the pipeline used, read off the calls of step 0.

        ``w`` is the claimed one, else the pipeline's attribute of the family's guidance
        argument (``guidance_scale``), else read off the step-0 outputs by least squares.
        """
        calls = [(c.label, int(c.sample.shape[0])) for c in self.step_calls]
        observed = CfgLayout.observe(calls, 1.0)
        w = claimed
        if w is None and observed.guided:
            w = getattr(pipe, family.guidance_argument(), None)
        self.cfg = CfgLayout(observed.kind, 1.0 if w is None else float(w))
        if w is None and observed.guided:
            w = self.estimate_guidance(family, guided)
        return CfgLayout(observed.kind, 1.0 if w is None else float(w))

    def estimate_guidance(self, family: DenoiserFamily, guided: torch.Tensor) -> float:
        """The ``w`` with ``guided = u + w (c - u)``, by least squares over step 0's output."""
        uncond, cond = self._halves_of_outputs(family, self.step_outputs)
        if uncond is None:
            return 1.0
        diff = (cond - uncond).double().flatten()
        denom = float(diff @ diff)
        return (
            1.0
            if denom == 0
            else float((guided.double().flatten() - uncond.double().flatten()) @ diff) / denom
        )

    def add_step(
        self, family: DenoiserFamily, timestep: Any, latent: torch.Tensor, output: torch.Tensor
    ) -> None:
        """The scheduler's view of one step (unpacked latent and guided output)."""
        if self.outputs == [] and not self.first_outputs:
            self.first_outputs = list(self.step_outputs)
        self.timesteps.append(torch.as_tensor(timestep).detach().reshape(()).clone())
        self.latents.append(latent.detach().clone())
        self.outputs.append(output.detach().clone())
        if self.step_outputs:
            _, cond = self._halves_of_outputs(family, self.step_outputs)
            self.cond_outputs.append(cond[-1].detach().clone())
        self.step_calls = []
        self.step_outputs = []

    def finish_step(self, sigma_index: int | None, prev: torch.Tensor) -> None:
        """After ``scheduler.step``: the sigma index it used and the latent it returned."""
        self.sigma_indices.append(sigma_index)
        self.final_latent = prev.detach().clone()

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Latents and guided outputs as float32 arrays ``[n_steps, C, h, w]``.

        Raises
        ------
        RuntimeError
            When either became NaN or infinite (the message names the first such step).
        """
        latents = torch.stack(self.latents).float().cpu().numpy()
        outputs = torch.stack(self.outputs).float().cpu().numpy()
        for name, values in (("latent x_t", latents), ("model output", outputs)):
            bad = ~np.isfinite(values).reshape(len(values), -1).all(axis=1)
            if bad.any():
                step = int(np.flatnonzero(bad)[0])
                raise RuntimeError(
                    f"the {name} is NaN or infinite from step {step} on; nothing was kept. "
                    "Check the latents you passed, the model's dtype (float16 on a CPU "
                    "overflows) and its weights"
                )
        return latents, outputs

    def coefficients(
        self, scheduler: Any, noise_family: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each step's ``(alpha, sigma, input_scale)``, shaped ``(n_steps, 1, 1, 1)``."""
        from diffwidget.tracing.noise import step_coefficients

        steps = [
            step_coefficients(scheduler, noise_family, float(t), self.sigma_index(i))
            for i, t in enumerate(torch.stack(self.timesteps).double().cpu().numpy())
        ]
        shape = (len(steps), 1, 1, 1)
        alpha = np.array([c.alpha for c in steps]).reshape(shape)
        sigma = np.array([c.sigma for c in steps]).reshape(shape)
        return alpha, sigma, np.array([c.input_scale for c in steps]).reshape(shape)

    def sigma_index(self, step: int) -> int | None:
        """Index into the scheduler's sigmas used at ``step``."""
        return self.sigma_indices[step]

    def check_guidance(self, family: DenoiserFamily, rtol: float) -> None:
        """Raise when step 0's guided output is not ``u + w (c - u)`` of its halves."""
        if not self.cfg.guided or not self.first_outputs:
            return
        uncond, cond = self._halves_of_outputs(family, self.first_outputs)
        if uncond is None:
            return
        expected = guide(uncond, cond, self.cfg.guidance_scale)[-1].float()
        guided = self.outputs[0].float()
        error = float((expected - guided).abs().max())
        scale = float(guided.abs().max()) or 1.0
        if error > rtol * scale:
            raise RuntimeError(
                f"the pipeline combined the CFG halves differently from uncond + w (cond - "
                f"uncond) with w = {self.cfg.guidance_scale:g} (largest difference "
                f"{error:.3g} of {scale:.3g}); replays would not match the trace. Pass the "
                "guidance scale the pipeline uses (guidance_scale=...) and trace without "
                "guidance_rescale or other guidance variants"
            )
