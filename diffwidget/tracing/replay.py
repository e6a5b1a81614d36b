"""Stateless replay of one recorded denoising step.

Explanation methods re-run the UNet at a recorded step hundreds of times (masks, gradients,
insertion/deletion probes). Multistep solvers such as DPM-Solver++ keep a history of model
outputs and a step counter, so calling ``scheduler.step`` for those probes corrupts the
scheduler (the defect of the paper's public code). :class:`StepReplay` therefore only reads
the pipeline: it runs the UNet with classifier-free guidance exactly as the pipeline does and
derives the predicted clean latent and a deterministic DDIM-style ``x_{t-1}`` from
``alphas_cumprod`` itself.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

if TYPE_CHECKING:
    from diffwidget.tracing.trace import Trace

Quantity = Literal["model_output", "eps", "x0", "prev"]

#: Schedulers whose ``init_noise_sigma`` exceeds 1 (Euler, Heun, LMS, ...) keep latents in
#: "sigma space" ``x = x0 + sigma * eps`` instead of ``sqrt(a) x0 + sqrt(1 - a) eps``.
_SIGMA_SPACE_THRESHOLD = 1.0
_CFG_BATCH = 2


@contextmanager
def _grad_mode(enabled: bool) -> Iterator[None]:
    with torch.enable_grad() if enabled else torch.no_grad():
        yield


class StepReplay:
    """Re-run the UNet at a recorded step without touching the pipeline's scheduler.

    Parameters
    ----------
    pipe : DiffusionPipeline
        The pipeline the trace came from (``pipe.unet`` and ``pipe.scheduler`` are read).
    trace : Trace
        The recorded run: ``latents[step]`` is ``x_t``, ``timesteps[step]`` is ``t``,
        ``prompt_embeds`` are in CFG order ``(uncond, cond)``, ``extra`` holds SDXL's added
        conditions (CFG order on axis 0), ``guidance_scale`` is ``w``.
    chunk_size : int, optional
        Largest number of latents per UNet call (each call runs ``2 * chunk_size`` rows
        with CFG). ``None`` sends the whole batch at once.

    Notes
    -----
    * The UNet input is built as the pipeline builds it: ``[x_1..x_B, x_1..x_B]`` with
      embeddings ``[uncond]*B + [cond]*B``, passed through ``scale_model_input`` of a
      private *copy* of the scheduler (sigma-space schedulers advance a step index in
      ``scale_model_input``; the copy's index is reset before every call).
    * CFG is ``uncond + w (cond - uncond)``; with ``w <= 1`` only the conditional half
      runs, as in diffusers pipelines. ``guidance_rescale`` is not applied.
    * ``prev`` is the deterministic DDIM update (eta = 0) to the next recorded timestep
      (to the clean latent after the last step), not the pipeline's own solver: it is what
      a stateless probe can compute, and it is the same for every scheduler.

    Examples
    --------
    >>> replay = StepReplay(pipe, trace)  # doctest: +SKIP
    >>> replay.pred_x0(replay.latent(5), 5).shape  # doctest: +SKIP
    torch.Size([1, 4, 16, 16])
    """

    def __init__(self, pipe: Any, trace: Trace, *, chunk_size: int | None = None) -> None:
        if getattr(pipe, "unet", None) is None:
            raise TypeError(
                f"{type(pipe).__name__} has no `unet`; pass a Stable Diffusion-style "
                "pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline, ...)"
            )
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size}")
        self.unet = pipe.unet
        self.trace = trace
        self.chunk_size = chunk_size
        param = next(self.unet.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.dtype = param.dtype if param is not None else torch.float32
        scheduler = pipe.scheduler
        # A private copy: nothing done here may reach the live scheduler's state.
        self._scheduler = copy.deepcopy(scheduler)
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().to("cpu", torch.float64).clone()
        self.prediction_type: str = scheduler.config.get("prediction_type", "epsilon")
        self.sigma_space = float(getattr(scheduler, "init_noise_sigma", 1.0)) > (
            _SIGMA_SPACE_THRESHOLD
        )
        self.do_cfg = float(trace.guidance_scale) > 1.0
        embeds = torch.as_tensor(trace.prompt_embeds)
        self.uncond_embeds = embeds[0:1].to(self.device, self.dtype)
        self.cond_embeds = embeds[1:2].to(self.device, self.dtype)
        self.extra = {
            key: torch.as_tensor(value).to(self.device) for key, value in trace.extra.items()
        }
        self._scale_fallback = False

    # ------------------------------------------------------------------ inputs
    @property
    def n_steps(self) -> int:
        """Number of recorded steps."""
        return self.trace.n_steps

    def _check_step(self, step: int) -> int:
        if not 0 <= step < self.n_steps:
            raise IndexError(f"step {step} out of range; the trace has steps 0..{self.n_steps - 1}")
        return int(step)

    def timestep(self, step: int) -> int:
        """The scheduler timestep ``t`` recorded at loop index ``step``."""
        return int(self.trace.timesteps[self._check_step(step)])

    def latent(self, step: int) -> torch.Tensor:
        """The recorded ``x_t`` at ``step``: float32 ``[1, C, h, w]`` on the UNet's device."""
        x = torch.as_tensor(self.trace.latents[self._check_step(step)])
        return x.unsqueeze(0).to(self.device, torch.float32)

    def alpha(self, step: int) -> float:
        """``alphas_cumprod`` at the recorded timestep of ``step``."""
        t = min(max(self.timestep(step), 0), len(self.alphas_cumprod) - 1)
        return float(self.alphas_cumprod[t])

    def _alpha_prev(self, step: int) -> float:
        # After the last step the loop ends on the clean latent.
        return 1.0 if step + 1 >= self.n_steps else self.alpha(step + 1)

    def _scale_model_input(self, x: torch.Tensor, t: int) -> torch.Tensor:
        scheduler = self._scheduler
        if not self._scale_fallback:
            # Sigma-space schedulers look the step index up from t when it is unset.
            for name in ("_step_index", "_begin_index"):
                if hasattr(scheduler, name):
                    setattr(scheduler, name, None)
            try:
                return scheduler.scale_model_input(x, torch.tensor(t, device=x.device))
            except (IndexError, ValueError, RuntimeError):
                # The copy's timestep grid does not contain t (e.g. a custom schedule after
                # the pipeline was re-configured): use the closed form instead.
                self._scale_fallback = True
        if self.sigma_space:
            a = self.alphas_cumprod[min(max(t, 0), len(self.alphas_cumprod) - 1)]
            sigma = float(((1 - a) / a) ** 0.5)
            return x / (sigma**2 + 1) ** 0.5
        return x

    def _embeddings(self, batch: int, cond_embeds: torch.Tensor | None) -> torch.Tensor:
        cond = self.cond_embeds if cond_embeds is None else cond_embeds.to(self.dtype)
        cond = cond.expand(batch, *cond.shape[1:])
        if not self.do_cfg:
            return cond
        return torch.cat([self.uncond_embeds.expand(batch, *cond.shape[1:]), cond])

    def _added_conditions(self, batch: int) -> dict[str, torch.Tensor] | None:
        if not self.extra:
            return None
        added = {}
        for key, value in self.extra.items():
            halves = [value[1:2]] if not self.do_cfg else [value[0:1], value[1:2]]
            added[key] = torch.cat([h.expand(batch, *h.shape[1:]) for h in halves]).to(
                self.dtype if value.is_floating_point() else value.dtype
            )
        return added

    # ------------------------------------------------------------------ UNet
    def _unet_call(
        self, x: torch.Tensor, step: int, cond_embeds: torch.Tensor | None
    ) -> torch.Tensor:
        t = self.timestep(step)
        batch = x.shape[0]
        model_in = torch.cat([x] * _CFG_BATCH) if self.do_cfg else x
        model_in = self._scale_model_input(model_in, t).to(self.dtype)
        kwargs: dict[str, Any] = {"encoder_hidden_states": self._embeddings(batch, cond_embeds)}
        added = self._added_conditions(batch)
        if added is not None:
            kwargs["added_cond_kwargs"] = added
        t_in = torch.tensor(t, device=self.device)
        out = self.unet(model_in, t_in, **kwargs)
        out = out.sample if hasattr(out, "sample") else out[0]
        out = out.float()
        if not self.do_cfg:
            return out
        uncond, cond = out.chunk(_CFG_BATCH)
        return uncond + float(self.trace.guidance_scale) * (cond - uncond)

    def model_output(
        self,
        latents: torch.Tensor,
        step: int,
        *,
        grad: bool = False,
        cond_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The CFG-combined UNet output (whatever the prediction type) for a batch of ``x_t``.

        Parameters
        ----------
        latents : Tensor, shape (B, C, h, w) or (C, h, w)
            Latents in the trace's (unscaled) convention.
        step : int
            Loop index whose timestep and conditioning are used.
        grad : bool
            Build the autograd graph (DF-CAM, token relevance).
        cond_embeds : Tensor, shape (1, L, D), optional
            Replaces the recorded conditional embedding (e.g. one computed with gradients).

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
                self._unet_call(x[i : i + size], step, cond_embeds)
                for i in range(0, x.shape[0], size)
            ]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    # ------------------------------------------------------------------ conversions
    def _to_ddpm_space(self, x: torch.Tensor, a: float) -> torch.Tensor:
        return x * a**0.5 if self.sigma_space else x

    def convert(
        self, latents: torch.Tensor, output: torch.Tensor, step: int, quantity: Quantity
    ) -> torch.Tensor:
        """Turn a model output at ``step`` into ``eps``, ``x0`` or ``prev`` (float32).

        Parameters
        ----------
        latents : Tensor, shape (B, C, h, w)
            The ``x_t`` the output was computed from.
        output : Tensor, shape (B, C, h, w)
            The CFG-combined model output (:meth:`model_output`).
        step : int
            Loop index.
        quantity : {"model_output", "eps", "x0", "prev"}
            What to return.
        """
        if quantity == "model_output":
            return output
        x = (latents.unsqueeze(0) if latents.dim() == 3 else latents).to(output.device).float()
        a = self.alpha(step)
        xd = self._to_ddpm_space(x, a)
        sa, sb = a**0.5, (1.0 - a) ** 0.5
        if self.prediction_type == "epsilon":
            eps = output
            x0 = (xd - sb * eps) / sa
        elif self.prediction_type == "v_prediction":
            x0 = sa * xd - sb * output
            eps = sa * output + sb * xd
        elif self.prediction_type == "sample":
            x0 = output
            eps = (xd - sa * x0) / max(sb, 1e-12)
        else:
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not supported; use a scheduler "
                "configured for 'epsilon', 'v_prediction' or 'sample'"
            )
        if quantity == "eps":
            return eps
        if quantity == "x0":
            return x0
        if quantity == "prev":
            ap = self._alpha_prev(step)
            prev = ap**0.5 * x0 + (1.0 - ap) ** 0.5 * eps
            if self.sigma_space:
                prev = prev / ap**0.5
            return prev
        raise ValueError(f"unknown quantity {quantity!r}; use one of {get_args(Quantity)}")

    def predict(
        self,
        latents: torch.Tensor,
        step: int,
        quantity: Quantity = "x0",
        *,
        grad: bool = False,
    ) -> torch.Tensor:
        """Run the UNet on ``latents`` at ``step`` and return ``quantity``."""
        x = latents.unsqueeze(0) if latents.dim() == 3 else latents
        out = self.model_output(x, step, grad=grad)
        with _grad_mode(grad):
            return self.convert(x, out, step, quantity)

    def eps(self, latents: torch.Tensor, step: int, grad: bool = False) -> torch.Tensor:
        """The CFG noise prediction ``eps`` for a batch of latents at ``step``."""
        return self.predict(latents, step, "eps", grad=grad)

    def pred_x0(self, latents: torch.Tensor, step: int, grad: bool = False) -> torch.Tensor:
        """The predicted clean latent ``x0`` for a batch of latents at ``step``."""
        return self.predict(latents, step, "x0", grad=grad)

    def prev(self, latents: torch.Tensor, step: int, grad: bool = False) -> torch.Tensor:
        """The deterministic DDIM ``x_{t-1}`` (in the trace's latent convention) at ``step``."""
        return self.predict(latents, step, "prev", grad=grad)
