"""Tiny random-weight Stable Diffusion pipelines built from configs, entirely offline.

They follow the dummy components diffusers uses in its own pipeline tests, shrunk further
so that a 5-step traced run takes well under a second on a laptop CPU. Tests, benchmarks
and documentation examples use them wherever the numbers do not matter, only the shapes
and the plumbing (every attention layer kind, CFG batching, SDXL's added conditioning).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

SchedulerName = Literal["dpm++", "ddim", "euler", "pndm"]

#: Words the tiny tokenizer knows as single tokens (any other word is spelled out in letters).
TINY_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "on", "and", "with", "above", "below", "left", "right",
    "red", "green", "blue", "yellow", "large", "small", "circle", "square", "triangle",
    "photo", "cat", "dog",
)  # fmt: skip
#: Token sequence length; CLIP's own, so that "one padding position" means what it does in SD.
TINY_MAX_LENGTH = 77
#: Latent side of the tiny UNet's default output (image side = this times the VAE factor 2).
TINY_LATENT_SIZE = 16
# Stable Diffusion's training noise schedule, so timesteps and alphas look like the real ones.
_SD_BETAS = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}


def make_scheduler(name: SchedulerName = "dpm++"):
    """A scheduler with Stable Diffusion's noise schedule.

    Parameters
    ----------
    name : {"dpm++", "ddim", "euler", "pndm"}
        DPM-Solver++ (multistep, 2nd order), DDIM, Euler (discrete) or PNDM (PLMS).
    """
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
    )

    if name == "dpm++":
        return DPMSolverMultistepScheduler(**_SD_BETAS, algorithm_type="dpmsolver++")
    if name == "ddim":
        return DDIMScheduler(**_SD_BETAS, clip_sample=False, set_alpha_to_one=False)
    if name == "euler":
        return EulerDiscreteScheduler(**_SD_BETAS)
    if name == "pndm":
        return PNDMScheduler(**_SD_BETAS, skip_prk_steps=True)
    raise ValueError(f"unknown scheduler {name!r}; use one of 'dpm++', 'ddim', 'euler', 'pndm'")


def _tokenizer(directory: Path | None):
    from diffwidget.models.tokenizer import load_word_tokenizer

    return load_word_tokenizer(TINY_WORDS, TINY_MAX_LENGTH, directory)


def _text_config(tokenizer, hidden_size: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=TINY_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        # The pooled output reads the first end token, so the id must be the tokenizer's.
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection_dim or hidden_size,
    )


def _vae(**config: Any) -> Any:
    """The tiny test VAE (8x downsampling of a 32x32 image, 4 latent channels); ``config``
    overrides its settings (latent channels, shift and scaling factors)."""
    from diffusers import AutoencoderKL

    settings: dict[str, Any] = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": TINY_LATENT_SIZE * 2,
    }
    return AutoencoderKL(**(settings | config))


def tiny_sd_pipeline(
    seed: int = 0, scheduler: SchedulerName = "dpm++", tokenizer_dir: str | Path | None = None
) -> StableDiffusionPipeline:
    """A random-weight ``StableDiffusionPipeline`` small enough for unit tests.

    The UNet has cross-attention in both resolution levels and the mid block (seven
    ``attn2`` layers on 16x16 and 8x8 grids for the default 32x32 image).

    Parameters
    ----------
    seed : int
        Seed for the random weights.
    scheduler : {"dpm++", "ddim", "euler", "pndm"}
        See :func:`make_scheduler`.
    tokenizer_dir : str or Path, optional
        Where to write the word-level tokenizer; a temporary folder by default.

    Examples
    --------
    >>> pipe = tiny_sd_pipeline()
    >>> pipe.unet.config.sample_size * pipe.vae_scale_factor
    32
    """
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _tokenizer(Path(tokenizer_dir) if tokenizer_dir else None)
    unet = UNet2DConditionModel(
        sample_size=TINY_LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        norm_num_groups=8,
    )
    vae = _vae()
    text_encoder = CLIPTextModel(_text_config(tokenizer, hidden_size=32))
    pipe: Any = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=make_scheduler(scheduler),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def tiny_sdxl_pipeline(
    seed: int = 0, scheduler: SchedulerName = "dpm++", tokenizer_dir: str | Path | None = None
) -> StableDiffusionXLPipeline:
    """A random-weight ``StableDiffusionXLPipeline`` with two text encoders.

    Like SDXL, the UNet's cross-attention reads the concatenated hidden states of a
    ``CLIPTextModel`` and a ``CLIPTextModelWithProjection`` and its added conditioning
    (``text_embeds``, ``time_ids``) goes through ``added_cond_kwargs``.

    Examples
    --------
    >>> pipe = tiny_sdxl_pipeline()
    >>> pipe.unet.config.addition_embed_type
    'text_time'
    """
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    directory = Path(tokenizer_dir) if tokenizer_dir else None
    torch.manual_seed(seed)
    tokenizer = _tokenizer(directory / "tokenizer" if directory else None)
    tokenizer_2 = _tokenizer(directory / "tokenizer_2" if directory else None)
    hidden, projection, time_dim = 16, 16, 8
    unet = UNet2DConditionModel(
        sample_size=TINY_LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        transformer_layers_per_block=(1, 2),
        # SDXL's six micro-conditioning numbers, each embedded, plus the pooled text.
        projection_class_embeddings_input_dim=6 * time_dim + projection,
        cross_attention_dim=2 * hidden,
        norm_num_groups=8,
    )
    pipe: Any = StableDiffusionXLPipeline(
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_config(tokenizer, hidden_size=hidden)),
        text_encoder_2=CLIPTextModelWithProjection(
            _text_config(tokenizer_2, hidden_size=hidden, projection_dim=projection)
        ),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=make_scheduler(scheduler),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")
