"""Stateless replay of one recorded denoising step, for every denoiser family.

Explanation methods re-run the denoiser at a recorded step hundreds of times (masks,
gradients, insertion/deletion probes). Multistep solvers such as DPM-Solver++ keep a
history of model outputs and a step counter, so calling ``scheduler.step`` for those
probes corrupts the scheduler (the defect of the paper's public code). :class:`StepReplay`
never touches the scheduler: a trace records everything a replay needs —

* the exact arguments of the step-0 denoiser calls (text embeddings, pooled projections,
  ``txt_ids``/``img_ids``, ``guidance``, added conditioning; ``Trace.facts.conditioning``)
  and the timestep argument of every step (``facts.model_timesteps``);
* each step's coefficients ``x_t = alpha x0 + sigma eps`` and the model-input scale
  (``facts.noise_schedule``) and the CFG layout (``facts.cfg_layout``);

and the denoiser family (:mod:`diffwidget.tracing.families`) builds the call exactly as the
pipeline did: latent scaled, packed (Flux) and CFG-batched (or called per half), output
unpacked and reduced to the predicted quantity (PixArt's learned sigma dropped).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import numpy as np
import torch

from diffwidget.tracing.cfg import Half
from diffwidget.tracing.facts import TEXT_ARGUMENT, NoiseSchedule, TimestepDtype
from diffwidget.tracing.families import DenoiserCall, LatentLayout, denoiser_family
from diffwidget.tracing.noise import (
    predict_eps,
    predict_x0,
    prediction_type,
    scheduler_family,
    step_coefficients,
)

if TYPE_CHECKING:
    from diffwidget.tracing.trace import Trace

Quantity = Literal["model_output", "eps", "x0", "prev"]


@contextmanager
def _grad_mode(enabled: bool) -> Iterator[None]:
    with torch.enable_grad() if enabled else torch.no_grad():
        yield


#: The torch dtype of each timestep dtype a trace may name (an allow-list, never getattr).
_TIMESTEP_DTYPES: dict[TimestepDtype, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int32": torch.int32,
    "int64": torch.int64,
}


def timestep_dtype(name: TimestepDtype) -> torch.dtype:
    """The torch dtype of the timestep dtype a trace names (``facts.model_timestep_dtype``)."""
    return _TIMESTEP_DTYPES[name]


def _schedule_from(scheduler: Any, trace: Trace) -> NoiseSchedule:
    """Coefficients read from the pipeline's scheduler, for traces that do not carry them."""
    family = scheduler_family(scheduler)
    coefficients = [
        step_coefficients(scheduler, family, float(t), i) for i, t in enumerate(trace.timesteps)
    ]
    return NoiseSchedule(
        family,
        [c.alpha for c in coefficients],
        [c.sigma for c in coefficients],
        [c.input_scale for c in coefficients],
    )


class StepReplay:
    """Re-run the denoiser at a recorded step without touching the pipeline's scheduler.

    Parameters
    ----------
    pipe : diffusers pipeline
        The pipeline the trace came from (its denoiser is read, never its scheduler).
    trace : Trace
        The recorded run.
    chunk_size : int, optional
        Largest number of latents per denoiser call (a call runs ``2 * chunk_size`` rows
        with batched CFG). ``None`` sends the whole batch at once.
    denoiser : callable, optional
        Called instead of the pipeline's denoiser, with the same arguments (for example a
        ``torch.compile`` wrapper of it). Device, dtype and :attr:`unet` still come from
        the pipeline's own module.

    Notes
    -----
    * CFG is ``uncond + w (cond - uncond)`` with the recorded layout; ``guidance_rescale``
      is not applied (tracing refuses pipelines whose combination differs).
    * ``prev`` is the deterministic update ``alpha' x0 + sigma' eps`` to the next recorded
      step's coefficients (to the clean latent after the last step): DDIM with eta = 0 for
      VP schedules, Euler for sigma and flow schedules. It is what a stateless probe can
      compute, and the same for every solver.

    Examples
    --------
    >>> replay = StepReplay(pipe, trace)  # doctest: +SKIP
    >>> replay.pred_x0(replay.latent(5), 5).shape  # doctest: +SKIP
    torch.Size([1, 4, 16, 16])
    """

    def __init__(
        self,
        pipe: Any,
        trace: Trace,
        *,
        chunk_size: int | None = None,
        denoiser: Any = None,
    ) -> None:
        if chunk_size is not None and (isinstance(chunk_size, bool) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
        self.family = denoiser_family(pipe)
        facts = trace.facts
        if facts.family != self.family.name:
            raise ValueError(
                f"this trace was recorded with a {facts.family} pipeline, but "
                f"{type(pipe).__name__} is a {self.family.name} pipeline; pass the pipeline "
                "the trace came from"
            )
        self.unet = self.family.denoiser
        if denoiser is not None:
            # This family object belongs to this replay alone: only its calls are redirected.
            self.family.denoiser = denoiser
        self.trace = trace
        self.chunk_size = chunk_size
        param = next(self.unet.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.dtype = param.dtype if param is not None else torch.float32
        self.cfg = facts.cfg(float(trace.guidance_scale), len(trace.prompt_embeds))
        self.prediction_type = str(facts.prediction_type or prediction_type(pipe.scheduler))
        schedule = facts.noise_schedule or _schedule_from(pipe.scheduler, trace)
        n = trace.n_steps
        self._alpha = np.asarray(schedule.alpha, dtype=np.float64)
        self._sigma = np.asarray(schedule.sigma, dtype=np.float64)
        self._scale = np.asarray(schedule.model_input_scale, dtype=np.float64)
        if len(self._alpha) != n:
            raise ValueError(
                f"the trace's noise schedule has {len(self._alpha)} steps for {n} recorded "
                "steps; the file is inconsistent, record it again"
            )
        times = facts.timesteps_in
        self._model_t = [float(t) for t in (times if times is not None else trace.timesteps)]
        self._t_dtype = _TIMESTEP_DTYPES[facts.model_timestep_dtype]
        latent_layout = facts.latent_layout
        self.layout = (
            LatentLayout(latent_layout.latent_hw, latent_layout.patch)
            if latent_layout is not None
            else LatentLayout(trace.latent_shape, 1)
        )
        self._entries = facts.call_layout(list(trace.extra))
        embeds = torch.as_tensor(trace.prompt_embeds)
        self.cond_embeds = self._stored(embeds, "cond").to(self.device, self.dtype)
        uncond = self._stored(embeds, "uncond") if self.cfg.guided else None
        self.uncond_embeds = None if uncond is None else uncond.to(self.device, self.dtype)
        self._tensors = {k: torch.as_tensor(v).to(self.device) for k, v in trace.extra.items()}

    # ------------------------------------------------------------------ inputs
    @property
    def n_steps(self) -> int:
        """Number of recorded steps."""
        return self.trace.n_steps

    @property
    def do_cfg(self) -> bool:
        """Whether the recorded run had an unconditional half."""
        return self.cfg.guided

    def _check_step(self, step: int) -> int:
        if not 0 <= step < self.n_steps:
            raise IndexError(f"step {step} out of range; the trace has steps 0..{self.n_steps - 1}")
        return int(step)

    def timestep(self, step: int) -> int:
        """The scheduler timestep ``t`` recorded at loop index ``step``."""
        return int(self.trace.timesteps[self._check_step(step)])

    def latent(self, step: int) -> torch.Tensor:
        """The recorded ``x_t`` at ``step``: float32 ``[1, C, h, w]`` on the denoiser's device."""
        x = torch.as_tensor(self.trace.latents[self._check_step(step)])
        if not bool(torch.isfinite(x).all()):
            raise ValueError(
                f"the recorded latent of step {step} is NaN or infinite; record the trace again"
            )
        return x.unsqueeze(0).to(self.device, torch.float32)

    def coefficients(self, step: int) -> tuple[float, float, float]:
        """``(alpha, sigma, input_scale)`` of ``step`` (``x_t = alpha x0 + sigma eps``)."""
        step = self._check_step(step)
        return float(self._alpha[step]), float(self._sigma[step]), float(self._scale[step])

    def _next(self, step: int) -> tuple[float, float]:
        # After the last step the loop ends on the clean latent.
        if step + 1 >= self.n_steps:
            return 1.0, 0.0
        return float(self._alpha[step + 1]), float(self._sigma[step + 1])

    # ------------------------------------------------------------------ the call
    def _stored(self, stored: torch.Tensor, half: Half) -> torch.Tensor:
        """The row of ``half`` in a stored CFG record, with its batch axis."""
        row = self.cfg.stored_row(half)
        return stored[row:] if row == -1 else stored[row : row + 1]

    def _half(self, half: Half, batch: int, cond_embeds: torch.Tensor | None) -> dict[str, Any]:
        """The conditioning keywords of one CFG half, batched."""
        kwargs: dict[str, Any] = {}
        for entry in self._entries:
            name, parent, kind = entry.name, entry.parent, entry.kind
            value: Any
            if kind == "none":
                value = None
            elif kind == "value":
                value = entry.value
            elif name == TEXT_ARGUMENT and parent is None:
                if half == "cond":
                    embeds = self.cond_embeds if cond_embeds is None else cond_embeds.to(self.dtype)
                elif self.uncond_embeds is None:
                    raise RuntimeError("the trace holds no unconditional text embedding")
                else:
                    embeds = self.uncond_embeds
                value = embeds.expand(batch, *embeds.shape[1:])
            elif kind == "batch_free":
                value = self._tensors[name].to(self.dtype)
            else:
                one = self._stored(self._tensors[name], half)
                one = one.to(self.dtype) if one.is_floating_point() else one
                value = one.expand(batch, *one.shape[1:])
            if parent is None:
                kwargs[name] = value
            else:
                kwargs.setdefault(parent, {})[name] = value
        return kwargs

    @staticmethod
    def _join(a: dict[str, Any], b: dict[str, Any], batch_free: frozenset[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in a.items():
            other = b[key]
            if isinstance(value, dict):
                out[key] = StepReplay._join(value, other, batch_free)
            elif isinstance(value, torch.Tensor) and key not in batch_free:
                out[key] = torch.cat([value, other])
            else:
                out[key] = value
        return out

    def _call(
        self,
        x: torch.Tensor,
        step: int,
        halves: tuple[Half, ...],
        cond_embeds: torch.Tensor | None,
        *,
        on_call: Callable[[DenoiserCall], None] | None = None,
    ) -> torch.Tensor:
        """One denoiser call on ``x`` for the CFG ``halves`` (batched in that order)."""
        batch = x.shape[0]
        _, _, scale = self.coefficients(step)
        kwargs_per_half = [self._half(h, batch, cond_embeds) for h in halves]
        kwargs = kwargs_per_half[0]
        for half in kwargs_per_half[1:]:
            kwargs = self._join(kwargs, half, self.family.batch_free)
        model_in = torch.cat([x * scale] * len(halves)).to(self.dtype)
        sample = self.family.to_model_input(model_in, self.layout)
        t = torch.full((sample.shape[0],), self._model_t[step], dtype=self._t_dtype)
        if on_call is not None:
            on_call(DenoiserCall(sample, t, kwargs))
        out = self.family.run(sample, t.to(self.device), kwargs)
        return self.family.from_model_output(out, self.layout).float()

    def run_half(
        self,
        latents: torch.Tensor,
        step: int,
        half: Half = "cond",
        *,
        on_call: Callable[[DenoiserCall], None] | None = None,
    ) -> torch.Tensor:
        """One denoiser call on one CFG half at ``step`` (no guidance): what a tap reading
        the prompt's half of a recorded step needs. ``on_call`` sees the call first.

        Returns
        -------
        Tensor of float32, shape (B, C, h, w)
            That half's model output.
        """
        step = self._check_step(step)
        x = (latents.unsqueeze(0) if latents.dim() == 3 else latents).to(self.device)
        with torch.no_grad():
            return self._call(x, step, (half,), None, on_call=on_call)

    def _guided(self, x: torch.Tensor, step: int, cond_embeds: torch.Tensor | None) -> torch.Tensor:
        return self.cfg.run(lambda halves: self._call(x, step, halves, cond_embeds))

    def halves(self, per_call: list[torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(uncond, cond)`` of a module's outputs over one :meth:`model_output` call.

        ``per_call`` holds one tensor per denoiser call, as block taps record them (the
        layout's :meth:`~diffwidget.tracing.cfg.CfgLayout.step_halves`).
        """
        return self.cfg.step_halves(per_call)

    def model_output(
        self,
        latents: torch.Tensor,
        step: int,
        *,
        grad: bool = False,
        cond_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The CFG-guided model output (whatever the prediction type) for a batch of ``x_t``.

        Parameters
        ----------
        latents : Tensor, shape (B, C, h, w) or (C, h, w)
            Latents in the trace's (unscaled, unpacked) convention.
        step : int
            Loop index whose timestep and conditioning are used.
        grad : bool
            Build the autograd graph (DF-CAM, token relevance).
        cond_embeds : Tensor, shape (1, L, D), optional
            Replaces the recorded conditional text embedding (e.g. one with gradients).

        Returns
        -------
        Tensor of float32, shape (B, C, h, w)
        """
        step = self._check_step(step)
        x = latents.unsqueeze(0) if latents.dim() == 3 else latents
        x = x.to(self.device)
        size = self.chunk_size or x.shape[0]
        with _grad_mode(grad):
            outs = [
                self._guided(x[i : i + size], step, cond_embeds) for i in range(0, len(x), size)
            ]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    # ------------------------------------------------------------------ conversions
    def convert(
        self, latents: torch.Tensor, output: torch.Tensor, step: int, quantity: Quantity
    ) -> torch.Tensor:
        """Turn a model output at ``step`` into ``eps``, ``x0`` or ``prev`` (float32).

        Parameters
        ----------
        latents : Tensor, shape (B, C, h, w)
            The ``x_t`` the output was computed from.
        output : Tensor, shape (B, C, h, w)
            The CFG-guided model output (:meth:`model_output`).
        step : int
            Loop index.
        quantity : {"model_output", "eps", "x0", "prev"}
            What to return.
        """
        if quantity not in get_args(Quantity):
            raise ValueError(f"unknown quantity {quantity!r}; use one of {get_args(Quantity)}")
        if quantity == "model_output":
            return output
        x = (latents.unsqueeze(0) if latents.dim() == 3 else latents).to(output.device).float()
        alpha, sigma, scale = self.coefficients(step)
        kind: Any = self.prediction_type
        # The formulas are array-generic: tensors go through them unchanged.
        x0: Any = predict_x0(x, output, alpha, sigma, scale, kind)  # type: ignore[arg-type]
        if quantity == "x0":
            return cast(torch.Tensor, x0)
        eps: Any = predict_eps(x, x0, alpha, sigma)  # type: ignore[arg-type]
        if quantity == "eps":
            return cast(torch.Tensor, eps)
        next_alpha, next_sigma = self._next(step)
        return cast(torch.Tensor, next_alpha * x0 + next_sigma * eps)

    def predict(
        self,
        latents: torch.Tensor,
        step: int,
        quantity: Quantity = "x0",
        *,
        grad: bool = False,
    ) -> torch.Tensor:
        """Run the denoiser on ``latents`` at ``step`` and return ``quantity``."""
        x = latents.unsqueeze(0) if latents.dim() == 3 else latents
        out = self.model_output(x, step, grad=grad)
        with _grad_mode(grad):
            return self.convert(x, out, step, quantity)

    def eps(self, latents: torch.Tensor, step: int, grad: bool = False) -> torch.Tensor:
        """The noise ``eps`` implied by the guided prediction for a batch of latents."""
        return self.predict(latents, step, "eps", grad=grad)

    def pred_x0(self, latents: torch.Tensor, step: int, grad: bool = False) -> torch.Tensor:
        """The predicted clean latent ``x0`` for a batch of latents at ``step``."""
        return self.predict(latents, step, "x0", grad=grad)

    def prev(self, latents: torch.Tensor, step: int, grad: bool = False) -> torch.Tensor:
        """The deterministic ``x_{t-1}`` (in the trace's latent convention) at ``step``."""
        return self.predict(latents, step, "prev", grad=grad)
