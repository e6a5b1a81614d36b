"""Analytic toy pipelines whose explanations have known answers.

The toy UNet has the diffusers call signature and module layout (``down_blocks``,
``mid_block``, ``up_blocks``, ``Attention`` layers) but its prediction of the clean latent
depends only on the latent inside ``REGION`` and, through cross-attention, only on the
text token at ``TOY_TOKEN``:

* ``down_blocks.0`` splits the latent into the squared values inside the region (4
  channels) and outside it (4 channels);
* ``mid_block`` self-attends over positions and cross-attends to the prompt with every
  token except ``TOY_TOKEN`` zeroed, so no other token can carry relevance;
* ``up_blocks.0`` returns ``pattern + inside + GAIN * attention`` (a faint fixed
  pattern), and the scheduler predicts ``sample`` (the clean latent) directly.

So DF-RISE and DF-CAM must point into ``REGION`` and token relevance at ``TOY_TOKEN``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import Attention
from torch import nn

from diffwidget.tracing.trace import Trace, TraceFacts

GRID = 8
CHANNELS = 4
#: Rows and columns of the region the toy output depends on.
REGION = (slice(1, 4), slice(4, 7))
TOY_WORDS = ("a", "red", "circle", "left")
TOY_PROMPT = "a red circle left"
#: Position (in the token sequence and the stored tokens) of "red".
TOY_TOKEN = 2
TOY_MAX_LENGTH = 8
TEXT_HIDDEN = 16
GAIN = 0.1
REGION_AMPLITUDE = 3.0
#: Small, so that the region's latent dominates the prediction (RISE needs a large effect).
PATTERN_SCALE = 0.1


def region_mask() -> torch.Tensor:
    """1 inside ``REGION``, 0 elsewhere, shape (GRID, GRID)."""
    m = torch.zeros(GRID, GRID)
    m[REGION] = 1.0
    return m


class _Split(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("region", region_mask()[None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inside = (x * self.region) ** 2
        outside = (x * (1 - self.region)) ** 2
        return torch.cat([inside, outside], dim=1)


class _Mid(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        width = 2 * CHANNELS
        self.attn1 = Attention(query_dim=width, heads=2, dim_head=4)
        self.attn2 = Attention(
            query_dim=width, cross_attention_dim=TEXT_HIDDEN, heads=2, dim_head=4
        )
        gate = torch.zeros(1, TOY_MAX_LENGTH, 1)
        gate[0, TOY_TOKEN] = 1.0
        self.register_buffer("gate", gate)

    def forward(self, h: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = h.shape
        seq = h.flatten(2).transpose(1, 2)
        seq = seq + self.attn1(seq)
        out = self.attn2(seq, encoder_hidden_states=text * self.gate)
        return out.transpose(1, 2).reshape(b, c, hh, ww)


class _Up(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.register_buffer(
            "pattern", PATTERN_SCALE * torch.randn(1, CHANNELS, GRID, GRID, generator=gen)
        )
        self.register_buffer("region", region_mask()[None, None])

    def forward(self, inside: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        return self.pattern + inside + GAIN * attended[:, :CHANNELS] * self.region


class ToyUNet(nn.Module):
    """A UNet stand-in with a known dependence (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.down_blocks = nn.ModuleList([_Split()])
        self.mid_block = _Mid()
        self.up_blocks = nn.ModuleList([_Up()])
        self.config = SimpleNamespace(in_channels=CHANNELS, sample_size=GRID)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor,
        **_: Any,
    ) -> SimpleNamespace:
        h = self.down_blocks[0](sample)
        attended = self.mid_block(h, encoder_hidden_states)
        return SimpleNamespace(sample=self.up_blocks[0](h[:, :CHANNELS], attended))


@dataclass
class ToyPipe:
    """The parts of a pipeline the explanation methods read."""

    unet: ToyUNet
    scheduler: Any
    text_encoder: Any
    tokenizer: Any


def make_toy_pipe(directory: str | Path | None = None) -> ToyPipe:
    """Build the toy pipeline (a tiny random CLIP text encoder and a word tokenizer)."""

    from transformers import CLIPTextConfig, CLIPTextModel

    from diffwidget.models.tokenizer import load_word_tokenizer

    tokenizer = load_word_tokenizer(TOY_WORDS, TOY_MAX_LENGTH, directory)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=TEXT_HIDDEN,
            intermediate_size=32,
            num_attention_heads=2,
            num_hidden_layers=2,
            max_position_embeddings=TOY_MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="sample",
        clip_sample=False,
        set_alpha_to_one=False,
    )
    scheduler.set_timesteps(2)
    return ToyPipe(ToyUNet().eval(), scheduler, text_encoder, tokenizer)


def make_toy_trace(pipe: ToyPipe, guidance: float = 3.0) -> Trace:
    """A two-step trace of random latents at the scheduler's timesteps."""
    gen = torch.Generator().manual_seed(2)
    latents = torch.randn(2, CHANNELS, GRID, GRID, generator=gen)
    # Equal, large magnitudes inside the region: every region cell matters the same.
    latents[:, :, REGION[0], REGION[1]] = REGION_AMPLITUDE * torch.sign(
        latents[:, :, REGION[0], REGION[1]]
    )
    ids = pipe.tokenizer(TOY_PROMPT, padding="max_length", return_tensors="pt").input_ids
    empty = pipe.tokenizer("", padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        embeds = torch.cat([pipe.text_encoder(empty)[0], pipe.text_encoder(ids)[0]])
    tokens = pipe.tokenizer.convert_ids_to_tokens(ids[0, : len(TOY_WORDS) + 3].tolist())
    zeros = np.zeros((2, CHANNELS, GRID, GRID), np.float32)
    return Trace(
        prompt=TOY_PROMPT,
        tokens=[t.replace("</w>", "") for t in tokens],
        token_kinds=["start", "word", "word", "word", "word", "end", "pad"],
        timesteps=pipe.scheduler.timesteps.numpy().astype(np.int64),
        latents=latents.numpy(),
        noise_pred=zeros,
        pred_x0=zeros,
        final_latent=zeros[0],
        prompt_embeds=embeds.numpy(),
        attention={},
        guidance_scale=guidance,
        facts=TraceFacts(token_indices=list(range(len(TOY_WORDS) + 3))),
    )


#: The corner toy: a 16x16 latent (the embedded model's grid) whose prediction depends only
#: on the top-left ``CORNER`` x ``CORNER`` cells.
CORNER_GRID = 16
CORNER = 4


def corner_mask() -> torch.Tensor:
    """1 on the top-left ``CORNER`` x ``CORNER`` cells of the corner toy, 0 elsewhere."""
    m = torch.zeros(CORNER_GRID, CORNER_GRID)
    m[:CORNER, :CORNER] = 1.0
    return m


class CornerUNet(nn.Module):
    """Predicts ``pattern + corner * x``: only the top-left cells of ``x`` matter."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        pattern = PATTERN_SCALE * torch.randn(1, CHANNELS, CORNER_GRID, CORNER_GRID, generator=gen)
        self.register_buffer("pattern", pattern)
        self.register_buffer("corner", corner_mask()[None, None])
        self.config = SimpleNamespace(in_channels=CHANNELS, sample_size=CORNER_GRID)

    def forward(self, sample: torch.Tensor, timestep: Any, **_: Any) -> SimpleNamespace:
        return SimpleNamespace(sample=self.pattern + self.corner * sample)


def make_corner_pipe() -> ToyPipe:
    """The corner toy with the toy pipeline's scheduler and text side."""
    pipe = make_toy_pipe()
    pipe.unet = CornerUNet().eval()  # type: ignore[assignment]
    return pipe


def make_corner_trace(pipe: ToyPipe) -> Trace:
    """A two-step trace of random latents on the corner toy's 16x16 grid."""
    base = make_toy_trace(pipe)
    gen = torch.Generator().manual_seed(4)
    latents = torch.randn(2, CHANNELS, CORNER_GRID, CORNER_GRID, generator=gen)
    # Equal magnitudes in the corner: every corner cell matters the same.
    corner = latents[:, :, :CORNER, :CORNER]
    latents[:, :, :CORNER, :CORNER] = REGION_AMPLITUDE * torch.sign(corner)
    latents = latents.numpy()
    zeros = np.zeros_like(latents)
    return Trace(
        prompt=base.prompt,
        tokens=base.tokens,
        token_kinds=base.token_kinds,
        timesteps=base.timesteps,
        latents=latents,
        noise_pred=zeros,
        pred_x0=zeros,
        final_latent=zeros[0],
        prompt_embeds=base.prompt_embeds,
        attention={},
        guidance_scale=base.guidance_scale,
        facts=base.facts,
    )
