"""Predicted clean latents from a model output, without touching the scheduler.

Every supported scheduler writes the latent it steps as ``x_t = alpha_t * x0 + sigma_t * eps``
in its own scale, and feeds the denoiser ``input_scale_t * x_t``:

=================  ===============================================  ==========================
family             schedulers                                       coefficients of step i
=================  ===============================================  ==========================
``vp_alphas``      DDIM, DDPM, PNDM                                 ``alphas_cumprod[t_i]``
``vp_sigmas``      DPM-Solver++ (multi/single step), UniPC, DEIS    ``sigmas[step_index]``
``ve_sigmas``      Euler, Euler ancestral, LMS                      ``sigmas[step_index]``
``flow``           flow matching: FlowMatchEuler (SD3, Flux), and   ``alpha = 1 - sigma``,
                   DPM-Solver++/UniPC with ``use_flow_sigmas``      ``sigma = sigmas[i]``
=================  ===============================================  ==========================

The model output is converted by its prediction type, the one home of the x̂0 formula:
``epsilon`` (x0 = (x - sigma eps) / alpha), ``v_prediction`` (in the model's VP scale),
``sample`` (x0 itself) and ``flow_prediction`` (a velocity ``v = eps - x0``, so
``x0 = x_t - sigma_t v``). Sigma-based schedulers may evaluate the model at a rounded
timestep (Karras sigmas); reading ``sigmas[step_index]`` gives the coefficients the solver
itself uses. Schedulers that call the model several times per step (Heun, KDPM2,
FlowMatchHeun) are not supported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np

NoiseFamily = Literal["vp_alphas", "vp_sigmas", "ve_sigmas", "flow"]
PredictionType = Literal["epsilon", "v_prediction", "sample", "flow_prediction"]
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
    "FlowMatchEulerDiscreteScheduler": "flow",
}
#: Flow-matching schedulers predict a velocity; their config has no ``prediction_type``.
FLOW_PREDICTION = "flow_prediction"
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample", FLOW_PREDICTION)
#: Schedulers whose names say they evaluate the model several times per step.
_MULTI_CALL = ("Heun", "KDPM2")


def prediction_type(scheduler: Any) -> PredictionType:
    """What the denoiser predicts under ``scheduler``: flow schedulers predict a velocity."""
    for cls in type(scheduler).__mro__:
        if SCHEDULER_FAMILIES.get(cls.__name__) == "flow":
            return "flow_prediction"
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type {kind!r} is not supported; diffwidget handles {PREDICTION_TYPES}"
        )
    return cast(PredictionType, kind)


def scheduler_family(scheduler: Any) -> NoiseFamily:
    """The noise parametrisation of ``scheduler``, or a clear error if unsupported."""
    name = type(scheduler).__name__
    for cls in type(scheduler).__mro__:
        if cls.__name__ in SCHEDULER_FAMILIES:
            family = SCHEDULER_FAMILIES[cls.__name__]
            break
    else:
        why = (
            " (it evaluates the model several times per step)"
            if any(m in name for m in _MULTI_CALL)
            else ""
        )
        raise ValueError(
            f"diffwidget cannot compute x0 for {name}{why}; supported: "
            f"{', '.join(SCHEDULER_FAMILIES)}. Swap it, e.g. pipe.scheduler = "
            "DPMSolverMultistepScheduler.from_config(pipe.scheduler.config) (or "
            "FlowMatchEulerDiscreteScheduler for SD3 and Flux)"
        )
    kind = prediction_type(scheduler)
    if scheduler.config.get("use_flow_sigmas", False):
        if family != "vp_sigmas" or kind != FLOW_PREDICTION:
            raise ValueError(
                f"{name} with use_flow_sigmas needs prediction_type='flow_prediction'; got {kind!r}"
            )
        return "flow"
    if family == "flow" and kind != FLOW_PREDICTION:
        raise ValueError(f"{name} is a flow-matching scheduler; it predicts a velocity")
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
    family : {"vp_alphas", "vp_sigmas", "ve_sigmas", "flow"}
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
    if family == "flow":
        return StepCoefficients(1.0 - s, s, 1.0)
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
    if prediction_type == FLOW_PREDICTION:
        return sample - sigma * model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r}; use one of {PREDICTION_TYPES}")


#: Below this sigma a latent holds no noise to recover (the clean end of a schedule).
_MIN_SIGMA = 1e-12


def predict_eps(
    sample: np.ndarray,
    x0: np.ndarray,
    alpha: np.ndarray | float,
    sigma: np.ndarray | float,
) -> np.ndarray:
    """The noise ``eps`` that ``x_t = alpha x0 + sigma eps`` implies (arrays or tensors).

    Examples
    --------
    >>> predict_eps(np.array([1.4]), np.array([1.0]), 0.8, 0.6)
    array([1.])
    """
    floor = max(float(sigma), _MIN_SIGMA) if np.ndim(sigma) == 0 else np.maximum(sigma, _MIN_SIGMA)
    return (sample - alpha * x0) / floor
