"""DF-CAM: Grad-CAM over denoiser blocks at one denoising step."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from diffwidget.explain._common import ProgressCallback, check_step, check_str_list
from diffwidget.explain.protocol import METHOD_LABELS, describe_saliency
from diffwidget.explain.results import SaliencyMap, minmax
from diffwidget.tracing.hooks import capture_outputs
from diffwidget.tracing.replay import StepReplay

if TYPE_CHECKING:
    from diffwidget.tracing.trace import Trace


class DFCam:
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
    label = METHOD_LABELS[name]

    def __init__(self, blocks: Sequence[str] | None = None) -> None:
        chosen = check_str_list("blocks", blocks)
        if chosen is not None and not chosen:
            raise ValueError("blocks is empty; pass None for every block or a list of module paths")
        self.blocks = chosen

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

    def attribute(
        self,
        pipe: Any,
        trace: Trace,
        step: int,
        progress: ProgressCallback | None = None,
    ) -> SaliencyMap:
        """Compute the DF-CAM maps at loop index ``step``.

        Parameters
        ----------
        pipe : DiffusionPipeline
            The pipeline the trace came from.
        trace : Trace
            The recorded run.
        step : int
            Loop index (not the scheduler timestep).
        progress : callable, optional
            Called as ``progress(0, 1)`` before and ``progress(1, 1)`` after the pass; the
            work is one pass, so returning ``False`` has nothing to cancel.

        Returns
        -------
        SaliencyMap
            ``layers`` maps block path -> ``(h, w)`` map in [0, 1].
        """
        step = check_step(trace, step)
        start_time = time.perf_counter()
        replay = StepReplay(pipe, trace)
        family = replay.family
        paths = self.blocks if self.blocks is not None else family.cam_layers()
        size = trace.latent_shape
        w = float(trace.guidance_scale)
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
        layers: dict[str, Any] = {}
        layers_raw: dict[str, Any] = {}
        peaks: dict[str, float] = {}
        empty: list[str] = []
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
                if peaks[path] <= 0:
                    empty.append(path)
                layers[path] = minmax(layers_raw[path])
        raw = sum(layers.values())
        if progress is not None:
            progress(1, 1)
        return SaliencyMap(
            method=self.name,
            step=step,
            timestep=int(trace.timesteps[step]),
            map=minmax(raw),
            raw=raw.astype("float32"),
            layers=layers,
            layers_raw=layers_raw,
            meta={
                "layers": list(paths),
                "target": f"sum of the guided model output ({replay.prediction_type})",
                "family": family.name,
                "cfg_combined": replay.do_cfg,
                "guidance_scale": w,
                "cam_peaks": peaks,
                "empty_layers": empty,
                "seconds": time.perf_counter() - start_time,
            },
        )


def _grad_or_zeros(grad: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    # A block whose output does not reach y gets no gradient: its CAM is zero.
    return torch.zeros_like(like) if grad is None else grad
