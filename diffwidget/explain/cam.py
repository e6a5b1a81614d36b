"""DF-CAM: Grad-CAM over denoiser blocks at one denoising step."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from diffwidget.explain._common import ProgressCallback, check_str_list
from diffwidget.explain.base import SaliencyMethodBase, SaliencyParts, StepInputs
from diffwidget.explain.config import MethodConfig
from diffwidget.explain.protocol import describe_saliency
from diffwidget.explain.results import SaliencyMap, minmax
from diffwidget.tracing.hooks import capture_outputs
from diffwidget.tracing.replay import StepReplay


@dataclass(frozen=True)
class DFCamConfig(MethodConfig):
    """Settings of :class:`DFCam`: the module paths of its layers (``None``: the family's).

    Examples
    --------
    >>> DFCamConfig(blocks=["mid_block"]).to_json()
    {'blocks': ['mid_block']}
    """

    blocks: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        chosen = check_str_list("blocks", self.blocks)
        if chosen is not None and not chosen:
            raise ValueError("blocks is empty; pass None for every block or a list of module paths")
        self._normalise("blocks", None if chosen is None else tuple(chosen))


class DFCam(SaliencyMethodBase[DFCamConfig]):
    """DF-CAM: Grad-CAM maps of denoiser layers at step ``t`` (Park, Ju & Lee 2024, Sec. 3.3).

    One forward and one backward pass of the denoiser (with classifier-free guidance,
    replayed at the recorded ``x_t``) give every chosen block's map at once:

    * target ``y = sum`` of the CFG-guided model output (whatever the model predicts:
      epsilon, v or a flow velocity; ``meta["target"]`` names it);
    * each block's activation is CFG-combined like the output, ``A = A_u + w (A_c - A_u)``
      with the pipeline's guidance scale ``w``;
    * the gradient of the *guided* ``y`` already carries the CFG factors: ``dy/dA_u`` holds
      ``(1 - w)`` and ``dy/dA_c`` holds ``w``, so the combined gradient is their sum
      ``dy/dA_u + dy/dA_c`` (combining them again with ``w`` would apply guidance twice);
    * ``alpha_k`` = spatial mean of the combined gradient of channel ``k``;
    * ``CAM = ReLU(sum_k alpha_k A_k)``; a transformer block's image tokens are laid on
      their patch grid first (channels ``k`` are the hidden features); upsampled
      bilinearly to the latent grid
      (``layers_raw``) and min-max normalised per block (``layers``);
    * ``map`` is the min-max normalised sum of the per-block maps (``raw`` that sum).

    Parameters
    ----------
    config : DFCamConfig, optional
        The setting below as a record (``DFCam(config)``); or pass it by name.
    blocks : sequence of str, optional
        Diffusers module paths of the layers, e.g. ``["down_blocks.1", "mid_block"]``,
        ``["up_blocks.1.attentions.0"]`` or ``["transformer_blocks.3"]``. Default: the
        family's layers (:meth:`~diffwidget.tracing.families.base.DenoiserFamily.cam_layers`):
        for UNets every resnet, attention and resampler of every block, the layers of the
        paper's layer x step grid; for transformers every block.

    Notes
    -----
    Departures from the paper's public code, and why:

    * It re-ran a whole generation per layer; all blocks here share one forward and one
      backward at the recorded ``x_t``, with the scheduler left untouched.
    * Gradients are taken with ``torch.autograd.grad`` on the block outputs only, so the
      UNet parameters' ``.grad`` fields are never written (a user's model stays clean).
    * Layers whose CAM is zero everywhere after the ReLU give an all-zero map; they are
      listed in ``meta["empty_layers"]``.

    The default layer set is the one the paper's code sums over (each resnet, attention and
    resampler, min-max normalised). On the embedded model it beat random deletion on 98 %
    of 50 held-out prompts, the seven top-level blocks summed the same way on 82 %
    (``bench/RESULTS_explain.md``).

    Examples
    --------
    >>> cam = DFCam(blocks=["mid_block"]).attribute(pipe, trace, step=5)  # doctest: +SKIP
    >>> list(cam.layers)  # doctest: +SKIP
    ['mid_block']
    """

    name = "df_cam"
    config_class = DFCamConfig

    def describe(self, result: SaliencyMap) -> str:
        """The caption of ``result``: the layers summed and how they were combined."""
        text = describe_saliency(
            self.label,
            result,
            ("layers",),
            normalisation="each layer min–max normalised, their sum min–max normalised to [0, 1]",
        )
        if result.meta.get("cfg_combined"):
            text += "; activations and gradients CFG-combined"
        return text

    def _saliency(self, inputs: StepInputs, progress: ProgressCallback | None) -> SaliencyParts:
        """One forward and one backward at the recorded ``x_t``: ``progress(0, 1)`` before
        and ``progress(1, 1)`` after; one pass has nothing to cancel."""
        replay, step = inputs.replay, inputs.step
        family = replay.family
        blocks = self.config.blocks
        paths = list(blocks) if blocks is not None else family.cam_layers()
        w = float(inputs.trace.guidance_scale)
        if progress is not None:
            progress(0, 1)
        # The input requires grad so the graph exists even when the model is frozen; grad
        # mode is forced on so DF-CAM also works inside torch.no_grad() (step callbacks).
        x = replay.latent(step).requires_grad_(True)
        with (
            torch.enable_grad(),
            capture_outputs(family, paths, retain_grad=True, cfg=replay.cfg) as acts,
        ):
            out = replay.model_output(x, step, grad=True)
            y = out.sum()
            missing = [p for p in paths if not acts[p] or not acts[p][0].requires_grad]
            if missing:
                raise RuntimeError(
                    f"blocks {missing} produced no differentiable output in the denoiser's "
                    "forward pass; pick blocks that it calls (default: family.cam_layers())"
                )
            tensors = [t for p in paths for t in acts[p]]
            grads = torch.autograd.grad(y, tensors, allow_unused=True)
        grad_of = dict(zip(map(id, tensors), grads, strict=True))
        layers, layers_raw, peaks = _layer_cams(replay, paths, acts, grad_of, inputs.size)
        if progress is not None:
            progress(1, 1)
        return SaliencyParts(
            raw=sum(layers.values()),
            layers=layers,
            layers_raw=layers_raw,
            meta={
                "layers": list(paths),
                "target": f"sum of the guided model output ({replay.prediction_type})",
                "family": family.name,
                "cfg_combined": replay.do_cfg,
                "guidance_scale": w,
                "cam_peaks": peaks,
                "empty_layers": [path for path in paths if peaks[path] <= 0],
            },
        )


def _layer_cams(
    replay: StepReplay,
    paths: list[str],
    acts: Mapping[str, list[torch.Tensor]],
    grad_of: Mapping[int, torch.Tensor | None],
    size: tuple[int, int],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
    """Each block's CAM on the latent grid: normalised, raw, and its peak before upsampling."""
    family = replay.family
    layers: dict[str, Any] = {}
    layers_raw: dict[str, Any] = {}
    peaks: dict[str, float] = {}
    with torch.no_grad():
        for path in paths:
            calls = acts[path]
            a_u, a_c = replay.halves([t.detach().float() for t in calls])
            g_u, g_c = replay.halves([_grad_or_zeros(grad_of[id(t)], t).float() for t in calls])
            # dy/dA_u and dy/dA_c already carry (1 - w) and w: the gradients add up.
            a, g = replay.cfg.combine(a_u, a_c), replay.cfg.combine_gradients(g_u, g_c)
            a = family.spatial(a, replay.layout)[-1]
            g = family.spatial(g, replay.layout)[-1]
            alpha = g.mean(dim=(1, 2))
            cam = F.relu((alpha[:, None, None] * a).sum(0))
            peaks[path] = float(cam.max())
            up = F.interpolate(cam[None, None], size=size, mode="bilinear", align_corners=False)
            layers_raw[path] = up[0, 0].cpu().numpy().astype("float32")
            layers[path] = minmax(layers_raw[path])
    return layers, layers_raw, peaks


def _grad_or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    # A block whose output does not reach y gets no gradient: its CAM is zero.
    return torch.zeros_like(like) if grad is None else grad
