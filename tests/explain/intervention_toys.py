"""An analytic toy pipeline whose commitment step is known by construction.

The toy is a text-to-image "pipeline" with the Stable Diffusion loop (CFG batched, DDIM
predicting the clean sample) that draws one colour, red or blue:

* ``down_blocks.0`` passes the latent through (the latent's features);
* ``mid_block`` reads the prompt: the sum of the first component of every text-embedding row,
  which is +1 for "red", -1 for "blue" and 0 for every other token (the empty prompt, a
  zeroed word), as a map ``(B, 1, h, w)``; it also runs a cross-attention layer (``attn2``,
  so a trace captures attention) whose output is weighted by zero;
* ``up_blocks.0`` predicts the clean latent ``x0 = v * GROWTH**j * PATTERN``: while the
  step ``j`` is *open* (``j < COMMIT_STEP``) ``v`` is the prompt's sign; once it is
  *closed*, ``v`` is the sign of the latent's own channel-0 mean. Every prediction is
  ``GROWTH`` times larger than the one before, so the last open step outweighs every earlier
  one, and a closed step keeps the sign the latent has.

So the final colour is the prompt's colour at step ``COMMIT_STEP - 1``: a prompt switch
from step ``k < COMMIT_STEP`` ends blue, from ``k >= COMMIT_STEP`` red — the commitment
step is ``COMMIT_STEP``. The toy VAE paints the image red or blue by the sign of the final
latent's channel-0 mean, and :func:`fake_colour_judge` (deterministic) reads it back.

Hand-computed answers for the other interventions follow from the same two rules (see the
tests): replacing "red" by "blue" in a window changes the colour iff the window holds
``COMMIT_STEP - 1``; patching ``mid_block`` with the blue prompt's output changes it iff
the step is ``COMMIT_STEP - 1``; patching ``down_blocks.0`` (the latent, read only when
closed) iff the step is ``>= COMMIT_STEP``; patching ``up_blocks.0`` (the prediction
itself) iff the step is ``>= COMMIT_STEP - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import DDIMScheduler
from diffusers.models.attention_processor import Attention
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

CHANNELS = 4
GRID = 8
N_STEPS = 6
COMMIT_STEP = 3
#: Each step's prediction is this many times the previous one's (the last push wins).
GROWTH = 16.0
TEXT_DIM = 8
MAX_LENGTH = 8
WORDS = ("a", "red", "blue", "circle", "square")
#: The first embedding component of each word (every other token: 0).
SIGN = {"red": 1.0, "blue": -1.0}
PROMPT_A = "a red circle"
PROMPT_B = "a blue circle"
GUIDANCE = 3.0


class _Latent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 1.0


class _Text(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn2 = Attention(
            query_dim=CHANNELS, cross_attention_dim=TEXT_DIM, heads=1, dim_head=4
        )

    def forward(self, h: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, _, hh, ww = h.shape
        attended = self.attn2(h.flatten(2).transpose(1, 2), encoder_hidden_states=text)
        sign = text[..., 0].sum(dim=1)
        return sign[:, None, None, None].expand(b, 1, hh, ww) + 0.0 * attended.mean()


class _Head(nn.Module):
    def __init__(self, timesteps: list[int]) -> None:
        super().__init__()
        self.timesteps = [int(t) for t in timesteps]

    def forward(self, latent: torch.Tensor, sign: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        step = self.timesteps.index(int(t.flatten()[0]))
        # Before the commitment step the prompt's sign drives the attribute; from it on,
        # the latent's own sign does, whatever the prompt says.
        v = sign[:, 0, 0, 0] if step < COMMIT_STEP else torch.sign(latent[:, 0].mean(dim=(1, 2)))
        out = torch.zeros_like(latent)
        out[:, 0] = (v * GROWTH**step)[:, None, None]
        return out


class CommitUNet(nn.Module):
    """The toy denoiser (see the module docstring); predicts the clean latent."""

    def __init__(self, timesteps: list[int]) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleList([_Latent()])
        self.mid_block = _Text()
        self.up_blocks = nn.ModuleList([_Head(timesteps)])
        self.config = SimpleNamespace(in_channels=CHANNELS, sample_size=GRID)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(
        self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, **_: Any
    ) -> UNet2DConditionOutput:
        t = torch.as_tensor(timestep).expand(sample.shape[0])
        latent = self.down_blocks[0](sample)
        sign = self.mid_block(latent, encoder_hidden_states)
        return UNet2DConditionOutput(sample=self.up_blocks[0](latent, sign, t))


class SignEncoder(nn.Module):
    """Token ids -> rows whose first component is the word's :data:`SIGN` (others fixed)."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(5)
        table = torch.randn(len(tokenizer), TEXT_DIM, generator=gen)
        table[:, 0] = 0.0
        for word, sign in SIGN.items():
            table[tokenizer.convert_tokens_to_ids(word + "</w>"), 0] = sign
        self.register_buffer("table", table)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.table[ids],)


class ToyVae(nn.Module):
    """Paints the whole image red (mean of channel 0 > 0) or blue (otherwise)."""

    config: ClassVar[dict[str, float]] = {"scaling_factor": 1.0}

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def decode(self, z: torch.Tensor, return_dict: bool = False, **_: Any) -> tuple[torch.Tensor]:
        red = (z[:, 0].mean(dim=(1, 2)) > 0).float()[:, None, None, None]
        colour = torch.stack([2 * red - 1, -torch.ones_like(red), 1 - 2 * red], dim=1)[..., 0]
        return (colour.expand(-1, 3, z.shape[2], z.shape[3]),)


@dataclass
class CommitPipe:
    """A Stable Diffusion-style loop around the toy (what ``diffwidget.trace`` calls)."""

    unet: CommitUNet
    scheduler: Any
    text_encoder: SignEncoder
    tokenizer: Any
    vae: ToyVae
    vae_scale_factor: int = 1

    def _encode(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer(prompt, padding="max_length", return_tensors="pt").input_ids
        return self.text_encoder(ids)[0]

    def __call__(
        self,
        prompt: str,
        *,
        num_inference_steps: int = N_STEPS,
        guidance_scale: float = GUIDANCE,
        generator: torch.Generator | None = None,
        output_type: str = "np",
        **_: Any,
    ) -> SimpleNamespace:
        embeds = torch.cat([self._encode(""), self._encode(prompt)])
        latents = torch.randn(1, CHANNELS, GRID, GRID, generator=generator)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.scheduler.timesteps:
            model_in = self.scheduler.scale_model_input(torch.cat([latents] * 2), t)
            out = self.unet(model_in, t, encoder_hidden_states=embeds).sample
            uncond, cond = out.chunk(2)
            guided = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(guided, t, latents, return_dict=False)[0]
        image = self.vae.decode(latents)[0]
        return SimpleNamespace(images=(image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())


def make_commit_pipe() -> CommitPipe:
    """The toy pipeline (a word tokenizer of :data:`WORDS`, DDIM predicting the sample)."""
    from diffwidget.models.tokenizer import load_word_tokenizer

    tokenizer = load_word_tokenizer(WORDS, MAX_LENGTH)
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="sample",
        clip_sample=False,
        # The last step lands on its prediction (alpha 1), so that step weighs too.
        set_alpha_to_one=True,
    )
    scheduler.set_timesteps(N_STEPS)
    timesteps = scheduler.timesteps.tolist()
    return CommitPipe(
        CommitUNet(timesteps).eval(), scheduler, SignEncoder(tokenizer), tokenizer, ToyVae()
    )


def fake_colour_judge(image: np.ndarray) -> str:
    """A deterministic fake judge: "red" when the red channel outweighs the blue one."""
    return "red" if float(image[..., 0].mean()) > float(image[..., 2].mean()) else "blue"
