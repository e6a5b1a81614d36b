"""Occlusion: how much the step's prediction changes when a window of the latent is zeroed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from diffwidget.explain._common import ProgressCallback, check_int, choose_batch
from diffwidget.explain.base import SaliencyMethodBase, SaliencyParts, StepInputs
from diffwidget.explain.config import MethodConfig
from diffwidget.explain.protocol import describe_saliency
from diffwidget.explain.results import SaliencyMap
from diffwidget.explain.rise import RISE_SIMILARITIES, RISE_TARGETS, RiseSimilarity, RiseTarget
from diffwidget.explain.similarity import SSIM_SIGMA, SSIM_WINDOW, SimilarityName, similarity

#: Windows per latent side: the window is an eighth of the side (8 cells on a 64x64 latent,
#: 2 on the embedded model's 16x16), moved by half its side, so every grid costs about
#: 15 x 15 replays.
WINDOWS_PER_SIDE = 8


@dataclass(frozen=True)
class OcclusionConfig(MethodConfig):
    """Settings of :class:`Occlusion` (each is described there); validated when built.

    Examples
    --------
    >>> OcclusionConfig(windows=4).windows
    4
    """

    windows: int = WINDOWS_PER_SIDE
    similarity: RiseSimilarity = "ssim"
    target: RiseTarget = "x0"
    batch_size: int | None = None

    def __post_init__(self) -> None:
        self._normalise("windows", check_int("windows", self.windows))
        self._normalise("batch_size", check_int("batch_size", self.batch_size, optional=True))
        if self.similarity not in RISE_SIMILARITIES:
            raise ValueError(f"unknown similarity {self.similarity!r}; use 'ssim' or 'cosine'")
        if self.target not in RISE_TARGETS:
            raise ValueError(f"unknown target {self.target!r}; use 'x0' or 'prev'")


def window_plan(size: tuple[int, int], windows: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Window and stride ``(h, w)`` for a latent grid: ``ceil(side / windows)``, half of it.

    Examples
    --------
    >>> window_plan((16, 16), 8), window_plan((64, 48), 8)
    (((2, 2), (1, 1)), ((8, 6), (4, 3)))
    """
    window = tuple(max(1, math.ceil(side / windows)) for side in size)
    stride = tuple(max(1, k // 2) for k in window)
    return (window[0], window[1]), (stride[0], stride[1])


def window_masks(
    size: tuple[int, int], window: tuple[int, int], stride: tuple[int, int]
) -> torch.Tensor:
    """1 inside each window, 0 elsewhere, shape ``(n_windows, h, w)``, row by row.

    Windows start every ``stride`` cells; as in captum's ``Occlusion``, there are
    ``ceil((side - window) / stride) + 1`` per side and the last one is cut at the edge,
    so every cell is covered.
    """
    starts = [
        [i * s for i in range(math.ceil((n - k) / s) + 1)]
        for n, k, s in zip(size, window, stride, strict=True)
    ]
    masks = torch.zeros(len(starts[0]) * len(starts[1]), *size)
    corners = [(top, left) for top in starts[0] for left in starts[1]]
    for k, (top, left) in enumerate(corners):
        masks[k, top : top + window[0], left : left + window[1]] = 1.0
    return masks


class Occlusion(SaliencyMethodBase[OcclusionConfig]):
    """Occlusion sensitivity of the latent ``x_t`` at one step (Zeiler & Fergus 2014).

    A window of the latent grid is zeroed on all channels at a time; the denoiser runs on
    the occluded ``x_t`` at the same ``t``, with the same text embedding and
    classifier-free guidance as the pipeline (stateless replay, like DF-RISE); the drop
    ``f(x_t) - f(x_t occluded)`` of the similarity ``f`` between the prediction and the
    unmasked one is credited to every cell of the window, and each cell's value is the mean
    over the windows that cover it. The map equals captum's ``Occlusion`` with that ``f``,
    a zero baseline and a window spanning all channels (test-checked).

    Not one of the paper's methods: a deterministic baseline beside DF-RISE's random masks.

    Parameters
    ----------
    config : OcclusionConfig, optional
        The settings below as one record; or pass them by name.
    windows : int
        The window is ``ceil(side / windows)`` cells and moves by half its side.
    similarity : {"ssim", "cosine"}
        As DF-RISE's: SSIM's structure term over every latent cell, or cosine.
    target : {"x0", "prev"}
        The predicted quantity compared.
    batch_size : int, optional
        Occluded latents per denoiser call; chosen from free memory when omitted.
    progress_bar : bool
        Show a ``tqdm.auto`` progress bar.

    Examples
    --------
    >>> sal = Occlusion(windows=4).attribute(pipe, trace, step=10)  # doctest: +SKIP
    >>> sal.meta["window"]  # doctest: +SKIP
    [4, 4]
    """

    name = "occlusion"
    config_class = OcclusionConfig
    unit = "window"

    def describe(self, result: SaliencyMap) -> str:
        """The caption of ``result``: window, stride, similarity and target."""
        text = describe_saliency(self.label, result, ("window", "stride", "similarity", "target"))
        if result.meta.get("complete") is False:
            text += f" (partial: {result.meta.get('n_used')} windows)"
        return text

    def _saliency(self, inputs: StepInputs, progress: ProgressCallback | None) -> SaliencyParts:
        config, replay, step, size = self.config, inputs.replay, inputs.step, inputs.size
        kind: SimilarityName = "ssim_structure" if config.similarity == "ssim" else "cosine"

        def score(latents: torch.Tensor) -> torch.Tensor:
            pred = replay.predict(latents, step, config.target)
            return similarity(pred, ref, kind, window=SSIM_WINDOW, sigma=SSIM_SIGMA).double().cpu()

        x = replay.latent(step)
        ref = replay.predict(x, step, config.target)
        unmasked = score(x)[0]
        window, stride = window_plan(size, config.windows)
        masks = window_masks(size, window, stride)
        batch, batch_note = choose_batch(
            config.batch_size,
            lambda n: score(x.expand(n, -1, -1, -1)),
            replay.device,
            len(masks),
            size,
        )
        total = torch.zeros(size, dtype=torch.float64)
        counts = torch.zeros(size, dtype=torch.float64)
        with self.loop(len(masks), batch, progress, start=inputs.start) as loop:
            for begin, end in loop:
                m = masks[begin:end]
                drops = unmasked - score(x * (1 - m.to(replay.device))[:, None])
                total += (drops[:, None, None] * m.double()).sum(0)
                counts += m.double().sum(0)
        meta: dict[str, Any] = {
            **config.to_json(),
            "window": list(window),
            "stride": list(stride),
            "n_windows": len(masks),
            "batch_size": batch,
            "batch_size_source": batch_note,
            **loop.status.to_meta(),
            "device": str(replay.device),
        }
        return SaliencyParts((total / counts.clamp_min(1)).float().numpy(), meta)
