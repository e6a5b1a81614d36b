"""A synthetic trace built with NumPy only: a red disc on the left that sharpens over steps.

It has everything the explorer shows (previews, attention of three layers on different grids,
one of them non-square, curves' timesteps) and needs no model and no torch, so the widget,
its export and its real-browser behaviour can be shown, tested and benchmarked on any machine.
Its numbers mean nothing; :mod:`diffwidget.testing.tiny` builds real (random-weight) pipelines.
"""

from __future__ import annotations

import numpy as np

from diffwidget.tracing.trace import Trace, TraceFacts

TOKENS = ["<|startoftext|>", "a", "red", "circle", "left", "<|endoftext|>", "<|endoftext|>"]
KINDS = ["start", "word", "word", "word", "word", "end", "pad"]
#: Attention grids of the fake layers: one coarse, one at latent size, one non-square.
LAYER_GRIDS = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2": (16, 16),
    "mid_block.attentions.0.transformer_blocks.0.attn2": (8, 8),
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2": (8, 16),
}


def _disc(size: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]]
    cy, cx = centre[0] * size[0], centre[1] * size[1]
    return (((yy + 0.5 - cy) ** 2 + (xx + 0.5 - cx) ** 2) <= (radius * size[0]) ** 2).astype(
        np.float32
    )


def synthetic_trace(
    n_steps: int = 20, latent: int = 16, image: int = 64, seed: int = 0, prompt: str | None = None
) -> Trace:
    """A deterministic synthetic :class:`Trace` with previews and attention, without torch.

    Parameters
    ----------
    n_steps : int
        Denoising steps (timesteps spread evenly from 999 to 1).
    latent : int
        Side of the 4-channel latent grid.
    image : int
        Side of the RGB previews and the final image.
    seed : int
        Seed of the noise, the attention logits and the text embeddings.
    prompt : str, optional
        The prompt stored in the trace (default ``"a red circle left"``, matching its tokens).

    Returns
    -------
    Trace
        A red disc on the left that sharpens over the steps; the "red" and "circle" tokens
        attend to it, "left" to the background.

    Examples
    --------
    >>> trace = synthetic_trace(n_steps=5)
    >>> trace.n_steps, trace.latent_shape, trace.previews.shape
    (5, (16, 16), (5, 64, 64, 3))
    >>> trace.tokens[1:5]
    ['a', 'red', 'circle', 'left']
    """
    rng = np.random.default_rng(seed)
    channels = 4
    target = np.stack([_disc((latent, latent), (0.5, 0.3), 0.2)] * channels) * 2.0 - 1.0
    alphas = np.linspace(0.05, 1.0, n_steps, dtype=np.float32)
    noise = rng.standard_normal((n_steps, channels, latent, latent)).astype(np.float32)
    pred_x0 = alphas[:, None, None, None] * target + (1 - alphas[:, None, None, None]) * noise * 0.5
    latents = (
        np.sqrt(1 - alphas[:, None, None, None]) * noise
        + np.sqrt(alphas[:, None, None, None]) * target
    )
    disc_img = _disc((image, image), (0.5, 0.3), 0.2)
    previews = np.zeros((n_steps, image, image, 3), dtype=np.uint8)
    for i, a in enumerate(alphas):
        grey = 128 + 40 * rng.standard_normal((image, image)) * (1 - a)
        red = np.clip(grey * (1 - disc_img) + disc_img * (grey * (1 - a) + 230 * a), 0, 255)
        previews[i, ..., 0] = red.astype(np.uint8)
        previews[i, ..., 1] = np.clip(grey * (1 - disc_img * a), 0, 255).astype(np.uint8)
        previews[i, ..., 2] = np.clip(grey * (1 - disc_img * a), 0, 255).astype(np.uint8)
    attention = {}
    for name, grid in LAYER_GRIDS.items():
        disc = _disc(grid, (0.5, 0.3), 0.2)
        logits = rng.standard_normal((n_steps, *grid, len(TOKENS))).astype(np.float32) * 0.3
        logits[..., 0] += 3.0  # start token soaks up attention, as in real CLIP models
        for t in (2, 3):
            logits[..., t] += disc[None] * 2.5 * alphas[:, None, None]
        logits[..., 4] += (1 - disc[None]) * 1.0
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        attention[name] = (probs * 0.9).astype(np.float16)  # 10 % went to unstored padding
    timesteps = np.linspace(999, 1, n_steps).astype(np.int64)
    return Trace(
        prompt=prompt or "a red circle left",
        tokens=list(TOKENS),
        token_kinds=list(KINDS),  # type: ignore[arg-type]
        timesteps=timesteps,
        latents=latents.astype(np.float32),
        noise_pred=noise,
        pred_x0=pred_x0.astype(np.float32),
        final_latent=pred_x0[-1].astype(np.float32),
        prompt_embeds=rng.standard_normal((2, len(TOKENS), 8)).astype(np.float32),
        attention=attention,
        guidance_scale=7.5,
        previews=previews,
        image=previews[-1].copy(),
        facts=TraceFacts(seed=seed, pipeline="synthetic"),
    )
