"""Predicted clean latents from a noise prediction, without touching the scheduler.

Every supported scheduler writes the latent it steps as ``x_t = alpha_t * x0 + sigma_t * eps``
in its own scale, and feeds the UNet ``input_scale_t * x_t``:

=================  ===============================================  ==========================
family             schedulers                                       coefficients of step i
=================  ===============================================  ==========================
``vp_alphas``      DDIM, DDPM, PNDM                                 ``alphas_cumprod[t_i]``
``vp_sigmas``      DPM-Solver++ (multi/single step), UniPC, DEIS    ``sigmas[step_index]``
``ve_sigmas``      Euler, Euler ancestral, LMS                      ``sigmas[step_index]``
=================  ===============================================  ==========================

Sigma-based schedulers may evaluate the UNet at a rounded timestep (Karras sigmas); reading
``sigmas[step_index]`` gives the coefficients the solver itself uses. Schedulers that call
the UNet several times per step (Heun, KDPM2) and flow-matching schedulers are not supported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

NoiseFamily = Literal["vp_alphas", "vp_sigmas", "ve_sigmas"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
#: Which noise prediction an x̂0 is computed from: the guided one the sampler steps with, or
#: the conditional classifier-free-guidance half alone.
PredictionSource = Literal["guided", "cond"]
PREDICTION_SOURCES: tuple[str, ...] = ("guided", "cond")

SCHEDULER_FAMILIES: dict[str, NoiseFamily] = {
    "DDIMScheduler": "vp_alphas",
    "DDPMScheduler": "vp_alphas",
    "PNDMScheduler": "vp_alphas",
    "DPMSolverMultistepScheduler": "vp_sigmas",
    "DPMSolverSinglestepScheduler": "vp_sigmas",
    "UniPCMultistepScheduler": "vp_sigmas",
    "DEISMultistepScheduler": "vp_sigmas",
    "EulerDiscreteScheduler": "ve_sigmas",
    "EulerAncestralDiscreteScheduler": "ve_sigmas",
    "LMSDiscreteScheduler": "ve_sigmas",
}
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")


def scheduler_family(scheduler: Any) -> NoiseFamily:
    """The noise parametrisation of ``scheduler``, or a clear error if unsupported."""
    for cls in type(scheduler).__mro__:
        if cls.__name__ in SCHEDULER_FAMILIES:
            family = SCHEDULER_FAMILIES[cls.__name__]
            break
    else:
        raise ValueError(
            f"diffwidget cannot compute x0 for {type(scheduler).__name__}; supported: "
            f"{', '.join(SCHEDULER_FAMILIES)}. Swap it, e.g. pipe.scheduler = "
            "DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)"
        )
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type {prediction!r} is not supported; diffwidget handles "
            f"{PREDICTION_TYPES}"
        )
    if scheduler.config.get("use_flow_sigmas", False):
        raise ValueError(
            "flow-matching sigmas are not supported; use the scheduler's default sigmas"
        )
    return family


@dataclass(frozen=True)
class StepCoefficients:
    """Coefficients of one step.

    ``x_t = alpha * x0 + sigma * eps`` in the scale of the latent the scheduler steps;
    the UNet is fed ``input_scale * x_t``.
    """

    alpha: float
    sigma: float
    input_scale: float


def step_coefficients(
    scheduler: Any, family: NoiseFamily, timestep: float, step_index: int | None
) -> StepCoefficients:
    """Coefficients of one step, read from the scheduler's tables (never mutating it).

    Parameters
    ----------
    scheduler : diffusers scheduler
        After ``set_timesteps``.
    family : {"vp_alphas", "vp_sigmas", "ve_sigmas"}
        From :func:`scheduler_family`.
    timestep : float
        ``t_i``.
    step_index : int, optional
        Index into ``scheduler.sigmas`` used at this step (sigma families only).
    """
    if family == "vp_alphas":
        alpha_bar = float(scheduler.alphas_cumprod[round(timestep)])
        return StepCoefficients(math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar), 1.0)
    if step_index is None:
        raise ValueError(f"{type(scheduler).__name__} needs the step index to read its sigmas")
    s = float(scheduler.sigmas[step_index])
    scale = 1.0 / math.sqrt(s * s + 1.0)
    if family == "vp_sigmas":
        return StepCoefficients(scale, s * scale, 1.0)
    return StepCoefficients(1.0, s, scale)


def predict_x0(
    sample: np.ndarray,
    model_output: np.ndarray,
    alpha: np.ndarray | float,
    sigma: np.ndarray | float,
    input_scale: np.ndarray | float,
    prediction_type: PredictionType,
) -> np.ndarray:
    """Predicted clean latent from ``model_output`` (no clipping or thresholding).

    Works on NumPy arrays or torch tensors; coefficients broadcast against ``sample``
    (pass arrays shaped ``(N, 1, 1, 1)`` for a batch of steps).

    Examples
    --------
    >>> import numpy as np
    >>> x0, eps = np.ones(4), np.zeros(4)
    >>> predict_x0(0.8 * x0 + 0.6 * eps, eps, 0.8, 0.6, 1.0, "epsilon")
    array([1., 1., 1., 1.])
    """
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha
    if prediction_type == "v_prediction":
        # In the UNet's (variance-preserving) scale the coefficients are alpha*c, sigma*c.
        return (alpha * input_scale) * (input_scale * sample) - (sigma * input_scale) * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}; use one of {PREDICTION_TYPES}")
