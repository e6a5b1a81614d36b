"""Token relevance for joint-attention (MMDiT) denoisers: Chefer's rule on the joint sequence.

In SD3 and Flux the image and text tokens form one sequence that every layer attends over,
so there is no separate cross-attention to propagate through: the self-attention rule of
Chefer et al. (2021) applies to the whole sequence. Starting from ``R = I`` over the ``S``
joint positions, every joint layer (double- and single-stream blocks alike) updates

    R <- R + A_bar R,    A_bar = mean_h clamp(dy/dA * A, 0)   (the conditional half),

and image-only self-attention (SD3.5's second attention) updates the image rows alone. A
text token's relevance is the mean over image rows of ``R[image, token]``; its spatial map is
that column on the patch grid. The text encoders' own attention is not propagated.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from diffwidget.tracing.replay import StepReplay


def _head_mean(probs: torch.Tensor, grad: torch.Tensor | None) -> torch.Tensor:
    a = probs.float()
    if grad is None:
        return torch.zeros_like(a[0])
    return (grad.float() * a).clamp_min(0).mean(0)


def joint_step(replay: StepReplay, step: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Relevance of every text position and its map at ``step``.

    Returns
    -------
    relevance : Tensor, shape (L,)
    maps : Tensor, shape (L, h, w)
        On the latent grid (upsampled from the patch grid).
    grid : tuple of int
        The patch grid the relevance was computed on.
    """
    family = replay.family
    n_text = int(replay.cond_embeds.shape[1])
    with torch.enable_grad(), family.explicit_attention(n_text) as records:
        x = replay.latent(step).requires_grad_(True)
        y = replay.model_output(x, step, grad=True).sum()
        grads = torch.autograd.grad(y, [r.probs for r in records], allow_unused=True)
    # The records of each denoiser call follow one another; keep the prompt's call, and in
    # it the prompt's rows.
    cfg = replay.cfg
    pairs = list(zip(records, grads, strict=True))
    if not pairs:
        raise ValueError("the denoiser ran no joint attention layer; nothing to attribute")
    per_call = len(pairs) // cfg.calls_per_step
    calls = [pairs[i : i + per_call] for i in range(0, len(pairs), per_call)]
    pairs = cfg.split_calls(calls)[1]
    grid = replay.layout.token_grid
    n_image = grid[0] * grid[1]
    first = next((r for r, _ in pairs if r.n_text), None)
    if first is None:
        raise ValueError("the denoiser ran no joint attention layer; nothing to attribute")
    text_first = first.text_first
    image = slice(n_text, n_text + n_image) if text_first else slice(0, n_image)
    text = slice(0, n_text) if text_first else slice(n_image, n_image + n_text)
    device = replay.device
    with torch.no_grad():
        relevance = torch.eye(n_image + n_text, device=device)
        for record, grad in pairs:
            a_bar = _head_mean(
                cfg.cond_rows(record.probs.detach(), "cond")[-1],
                None if grad is None else cfg.cond_rows(grad, "cond")[-1],
            ).to(device)
            if record.n_text:
                relevance = relevance + a_bar @ relevance
            else:
                relevance[image] = relevance[image] + a_bar @ relevance[image]
        image_text = relevance[image, text]
        maps = image_text.T.reshape(n_text, *grid)
        latent = replay.trace.latent_shape
        if grid != latent:
            maps = F.interpolate(maps[None], size=latent, mode="bilinear", align_corners=False)[0]
    return image_text.mean(0).cpu(), maps.cpu(), grid


def is_joint(family: Any) -> bool:
    """Whether a family's attention is joint (its maps are a joint-softmax share)."""
    return getattr(family, "normalisation", "") == "joint_share"
