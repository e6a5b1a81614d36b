"""A synthetic trace built with NumPy only: a red disc on the left that sharpens over steps.

It has everything the explorer shows (previews, attention of three layers on different grids,
one of them non-square, curves' timesteps) and needs no model and no torch, so the widget,
its export and its real-browser behaviour can be shown, tested and benchmarked on any machine.
Its numbers mean nothing; :mod:`diffwidget.testing.tiny` builds real (random-weight) pipelines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from diffwidget.tracing.facts import TokenKind
from diffwidget.tracing.trace import Normalisation, Trace, TraceFacts

TOKENS = ["<|startoftext|>", "a", "red", "circle", "left", "<|endoftext|>", "<|endoftext|>"]
KINDS: list[TokenKind] = ["start", "word", "word", "word", "word", "end", "pad"]
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
        token_kinds=list(KINDS),
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


ShapeName = Literal["sd15", "sdxl", "flux"]

_WORDS = ("a", "large", "red", "circle", "on", "the", "left", "of", "a", "small", "blue", "square")
_CLIP_TOKENS = ("<|startoftext|>", *_WORDS, "<|endoftext|>", "<|endoftext|>")
_WORD: TokenKind = "word"
_WORD_KINDS: tuple[TokenKind, ...] = (_WORD,) * len(_WORDS)
_CLIP_KINDS: tuple[TokenKind, ...] = ("start", *_WORD_KINDS, "end", "pad")
_T5_TOKENS = (*_WORDS, "</s>", "<pad>")
_T5_KINDS: tuple[TokenKind, ...] = (*_WORD_KINDS, "end", "pad")


def _unet_layers(blocks: list[tuple[str, int, int, int]]) -> dict[str, tuple[int, int]]:
    """``attn2`` paths of UNet blocks given as (block, attentions, transformer depth, grid)."""
    layers: dict[str, tuple[int, int]] = {}
    for block, attentions, depth, grid in blocks:
        for a in range(attentions):
            for d in range(depth):
                path = f"{block}.attentions.{a}.transformer_blocks.{d}.attn2"
                layers[path] = (grid, grid)
    return layers


@dataclass(frozen=True)
class TraceShape:
    """The stored shapes of a real model's trace (what a user's trace file holds).

    Attributes
    ----------
    image, latent : int
        Side of the decoded previews and of the latent grid.
    channels : int
        Latent channels.
    n_steps : int
        Denoising steps users typically run.
    tokens, kinds : tuple of str
        The stored token positions and their kinds.
    layers : dict of str to (int, int)
        Attention module path (diffusers' own) -> the layer's spatial grid.
    normalisation : {"text_softmax", "joint_share"}
        What a patch's attention row sums to (``facts.attention_normalisation``).
    """

    image: int
    latent: int
    channels: int
    n_steps: int
    tokens: tuple[str, ...]
    kinds: tuple[TokenKind, ...]
    layers: dict[str, tuple[int, int]]
    normalisation: Normalisation = "text_softmax"


#: SD 1.5 at 512², SDXL-base at 1024² and FLUX.1-dev at 1024²: every attention layer with its
#: real path and grid, 15 stored tokens (14 for Flux's T5 text: no start token).
SHAPES: dict[str, TraceShape] = {
    "sd15": TraceShape(
        512, 64, 4, 50, _CLIP_TOKENS, _CLIP_KINDS,
        _unet_layers([
            ("down_blocks.0", 2, 1, 64), ("down_blocks.1", 2, 1, 32),
            ("down_blocks.2", 2, 1, 16), ("mid_block", 1, 1, 8), ("up_blocks.1", 3, 1, 16),
            ("up_blocks.2", 3, 1, 32), ("up_blocks.3", 3, 1, 64),
        ]),
    ),
    "sdxl": TraceShape(
        1024, 128, 4, 50, _CLIP_TOKENS, _CLIP_KINDS,
        _unet_layers([
            ("down_blocks.1", 2, 2, 64), ("down_blocks.2", 2, 10, 32), ("mid_block", 1, 10, 32),
            ("up_blocks.0", 3, 10, 32), ("up_blocks.1", 3, 2, 64),
        ]),
    ),
    "flux": TraceShape(
        1024, 128, 16, 28, _T5_TOKENS, _T5_KINDS,
        {
            **{f"transformer_blocks.{k}.attn": (64, 64) for k in range(19)},
            **{f"single_transformer_blocks.{k}.attn": (64, 64) for k in range(38)},
        },
        normalisation="joint_share",
    ),
}  # fmt: skip


def _token_patterns(grid: tuple[int, int], kinds: tuple[str, ...]) -> np.ndarray:
    """Logit templates ``[h, w, T]``: objects for words, a sink for the start token."""
    red = _disc(grid, (0.5, 0.3), 0.2)
    blue = _disc(grid, (0.5, 0.75), 0.12)
    background = 1.0 - np.maximum(red, blue)
    pattern = np.zeros((*grid, len(kinds)), dtype=np.float32)
    words = [i for i, k in enumerate(kinds) if k == "word"]
    for n, index in enumerate(words):
        pattern[..., index] = (red, blue, background)[n % 3] * 2.5
    for index, kind in enumerate(kinds):
        if kind == "start":
            pattern[..., index] = 3.0
    return pattern


def shaped_trace(shape: ShapeName, n_steps: int | None = None, seed: int = 0) -> Trace:
    """A synthetic :class:`Trace` with the stored shapes of a real model (no torch, no model).

    Previews at the model's image size, latents with its channels, one attention array per
    real attention layer on that layer's grid: what the explorer receives from a real trace,
    with content that sharpens over the steps (a red and a blue object).

    Parameters
    ----------
    shape : {"sd15", "sdxl", "flux"}
        SD 1.5 at 512², SDXL-base at 1024², FLUX.1-dev at 1024² (see :data:`SHAPES`).
    n_steps : int, optional
        Steps to record (default the shape's usual count: 50, 50, 28).
    seed : int
        Seed of every random part.

    Examples
    --------
    >>> trace = shaped_trace("sdxl", n_steps=2)
    >>> trace.previews.shape, len(trace.attention), trace.latent_shape
    ((2, 1024, 1024, 3), 70, (128, 128))
    """
    spec = SHAPES[shape]
    steps = spec.n_steps if n_steps is None else n_steps
    rng = np.random.default_rng(seed)
    alphas = np.linspace(0.05, 1.0, steps, dtype=np.float32)
    fade = alphas[:, None, None, None]
    latent = (spec.latent, spec.latent)
    target = np.stack([_disc(latent, (0.5, 0.3), 0.2) - _disc(latent, (0.5, 0.75), 0.12)] * 2)
    target = np.resize(target, (spec.channels, *latent)).astype(np.float32)
    noise = rng.standard_normal((steps, spec.channels, *latent), dtype=np.float32)
    latents = np.sqrt(1 - fade) * noise + np.sqrt(fade) * target
    pred_x0 = fade * target + (1 - fade) * noise * 0.5
    side = (spec.image, spec.image)
    red, blue = _disc(side, (0.5, 0.3), 0.2), _disc(side, (0.5, 0.75), 0.12)
    ramp = np.broadcast_to(np.linspace(90.0, 200.0, spec.image, dtype=np.float32)[:, None], side)
    clean = np.stack([ramp, ramp * 0.9, ramp * 0.8], axis=-1)
    clean = clean * (1 - red - blue)[..., None] + red[..., None] * [220, 40, 30]
    clean = clean + blue[..., None] * [30, 60, 210]
    previews = np.empty((steps, *side, 3), dtype=np.uint8)
    for i, a in enumerate(alphas):  # one step at a time: no full-size float copy of the run
        grey = 128 + 40 * rng.standard_normal(side, dtype=np.float32)
        previews[i] = np.clip(clean * a + grey[..., None] * (1 - a), 0, 255).astype(np.uint8)
    attention = {}
    patterns = {g: _token_patterns(g, spec.kinds) for g in set(spec.layers.values())}
    for name, grid in spec.layers.items():
        logits = rng.standard_normal((steps, *grid, len(spec.tokens)), dtype=np.float32) * 0.3
        logits += patterns[grid][None] * alphas[:, None, None, None]
        probs = np.exp(logits)
        probs /= probs.sum(-1, keepdims=True)
        attention[name] = (probs * 0.9).astype(np.float16)  # 10 % went to unstored padding
    halves = 1 if spec.normalisation == "joint_share" else 2
    return Trace(
        prompt=" ".join(_WORDS),
        tokens=list(spec.tokens),
        token_kinds=list(spec.kinds),
        timesteps=np.linspace(999, 1, steps).astype(np.int64),
        latents=latents.astype(np.float32),
        noise_pred=noise,
        pred_x0=pred_x0.astype(np.float32),
        final_latent=pred_x0[-1].astype(np.float32),
        prompt_embeds=rng.standard_normal((halves, len(spec.tokens), 8)).astype(np.float32),
        attention=attention,
        guidance_scale=7.5 if halves == 2 else 3.5,
        previews=previews,
        image=previews[-1].copy(),
        facts=TraceFacts(
            seed=seed,
            pipeline=f"synthetic {shape}",
            attention_normalisation=spec.normalisation,
        ),
    )
