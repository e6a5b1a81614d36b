"""DF-CAM: Grad-CAM over UNet blocks at one denoising step."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from diffwidget.explain._common import ProgressCallback, check_step
from diffwidget.explain.protocol import METHOD_LABELS, describe_saliency
from diffwidget.explain.results import SaliencyMap, minmax
from diffwidget.tracing.hooks import capture_outputs, layer_paths
from diffwidget.tracing.replay import StepReplay

if TYPE_CHECKING:
    from diffwidget.tracing.trace import Trace

_CFG_BATCH = 2


class DFCam:
    """DF-CAM: Grad-CAM maps of UNet layers at step ``t`` (Park, Ju & Lee 2024, Sec. 3.3).

    One forward and one backward pass of the UNet (with classifier-free guidance, replayed
    at the recorded ``x_t``) give every chosen block's map at once:

    * target ``y = sum`` of the CFG-combined noise prediction (model output);
    * each block's activation ``A`` and gradient ``dy/dA`` are CFG-combined like the
      output, ``u + w (c - u)`` with the pipeline's guidance scale ``w``;
    * ``alpha_k`` = spatial mean of the combined gradient of channel ``k``;
    * ``CAM = ReLU(sum_k alpha_k A_k)``, upsampled bilinearly to the latent grid and
      min-max normalised per block (``layers``);
    * ``map`` is the min-max normalised sum of the per-block maps (``raw`` that sum).

    Parameters
    ----------
    blocks : sequence of str, optional
        Diffusers module paths of the layers, e.g. ``["down_blocks.1", "mid_block"]`` or
        ``["up_blocks.1.attentions.0"]``. Default: every resnet, attention and resampler of
        every block (:func:`~diffwidget.tracing.hooks.layer_paths`), the layers of the
        paper's layer x step grid. ``hooks.block_paths(unet)`` gives the top-level blocks.

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
        if blocks is not None and len(blocks) == 0:
            raise ValueError("blocks is empty; pass None for every block or a list of module paths")
        self.blocks = list(blocks) if blocks is not None else None

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
        paths = self.blocks if self.blocks is not None else layer_paths(pipe.unet)
        if not paths:
            raise ValueError(
                f"{type(pipe.unet).__name__} has no down/mid/up blocks; pass blocks= with "
                "module paths from unet.named_modules()"
            )
        size = trace.latent_shape
        w = float(trace.guidance_scale)
        if progress is not None:
            progress(0, 1)
        # The input requires grad so the graph exists even when the UNet is frozen.
        x = replay.latent(step).requires_grad_(True)
        with capture_outputs(pipe.unet, paths, retain_grad=True) as acts:
            out = replay.model_output(x, step, grad=True)
            y = out.sum()
            missing = [p for p in paths if not acts[p] or not acts[p][0].requires_grad]
            if missing:
                raise RuntimeError(
                    f"blocks {missing} produced no differentiable output in the UNet's forward "
                    "pass; pick blocks that the UNet calls (see hooks.layer_paths(unet))"
                )
            tensors = [acts[p][0] for p in paths]
            grads = torch.autograd.grad(y, tensors, allow_unused=True)
        layers: dict[str, Any] = {}
        peaks: dict[str, float] = {}
        empty: list[str] = []
        with torch.no_grad():
            for path, a, g in zip(paths, tensors, grads, strict=True):
                a = a.detach().float()
                g = torch.zeros_like(a) if g is None else g.float()
                if replay.do_cfg and a.shape[0] == _CFG_BATCH:
                    a = a[0] + w * (a[1] - a[0])
                    g = g[0] + w * (g[1] - g[0])
                else:
                    a, g = a[-1], g[-1]
                if a.dim() != 3:
                    raise ValueError(
                        f"block {path!r} outputs shape {tuple(a.shape)}; DF-CAM needs a spatial "
                        "feature map [C, h, w] (choose a block, resnet or attention module)"
                    )
                alpha = g.mean(dim=(1, 2))
                cam = F.relu((alpha[:, None, None] * a).sum(0))
                peaks[path] = float(cam.max())
                up = F.interpolate(cam[None, None], size=size, mode="bilinear", align_corners=False)
                layer_map = minmax(up[0, 0].cpu().numpy())
                if peaks[path] <= 0:
                    empty.append(path)
                layers[path] = layer_map
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
            meta={
                "layers": list(paths),
                "target": "sum of the CFG noise prediction",
                "cfg_combined": replay.do_cfg,
                "guidance_scale": w,
                "cam_peaks": peaks,
                "empty_layers": empty,
                "seconds": time.perf_counter() - start_time,
            },
        )
