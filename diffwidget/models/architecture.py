"""Architecture of the embedded model: a small Stable-Diffusion-shaped latent diffusion model.

The components are the standard diffusers/transformers classes (``AutoencoderKL``,
``CLIPTextModel`` with a word-level ``CLIPTokenizer``, ``UNet2DConditionModel``), only
narrower and shallower, so every tool that works on Stable Diffusion works on this model
too: 64x64 RGB images, 4x16x16 latents, a 16-token prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from diffwidget.models.scenes import VOCABULARY
from diffwidget.models.tokenizer import load_word_tokenizer

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

IMAGE_SIZE = 64
LATENT_CHANNELS = 4
LATENT_SIZE = 16  # two 2x downsamplings in the VAE
MAX_TOKENS = 16  # start + at most 12 caption words + end, padded
TEXT_HIDDEN = 64
TRAIN_TIMESTEPS = 1000

SchedulerName = Literal["dpm++", "ddim", "euler", "ddpm"]

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    # Flat-coloured shapes need few channels at full resolution, and the full-resolution
    # convolutions dominate the cost of encoding the training set on a CPU.
    "block_out_channels": (16, 32, 64),
    "layers_per_block": 1,
    "latent_channels": LATENT_CHANNELS,
    "norm_num_groups": 8,
    "sample_size": IMAGE_SIZE,
    "scaling_factor": 1.0,  # replaced by 1 / std of the training latents after stage 1
    "shift_factor": 0.0,  # read by the SD3 pipeline of the DiT, which shares this VAE
}

TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": TEXT_HIDDEN,
    "intermediate_size": 4 * TEXT_HIDDEN,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_TOKENS,
    "hidden_act": "quick_gelu",
    "projection_dim": TEXT_HIDDEN,
}

UNET_CONFIG: dict[str, Any] = {
    "sample_size": LATENT_SIZE,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    # Cross-attention at 16x16 and 8x8 (and in the 4x4 mid-block), like SD's layout: the
    # 16x16 maps are what attention overlays show.
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    # Sized so that training fits a 2-core CPU in about an hour (see train.py).
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 1,
    "attention_head_dim": 4,  # diffusers' name for the number of heads in this class
    "cross_attention_dim": TEXT_HIDDEN,
    "norm_num_groups": 16,
}

SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": TRAIN_TIMESTEPS,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    # Zero terminal SNR with v-prediction and 'trailing' steps (Lin et al., WACV 2024): with
    # SD's schedule, x_999 still holds a trace of the image, and a model this small learns to
    # take each object's place from that trace instead of from the prompt; at sampling time
    # the place then follows the seed. With no signal left at t = 999, only the prompt can
    # decide the layout.
    "rescale_betas_zero_snr": True,
    "prediction_type": "v_prediction",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "trailing",
}


def build_tokenizer(directory: str | Path | None = None) -> Any:
    """The word-level ``CLIPTokenizer`` over the scene grammar's vocabulary.

    Parameters
    ----------
    directory : str or Path, optional
        Where to write the tokenizer files; a temporary folder, removed after loading, when
        omitted.
    """
    return load_word_tokenizer(VOCABULARY, MAX_TOKENS, directory)


def text_config(tokenizer: Any) -> Any:
    """``CLIPTextConfig`` matching ``tokenizer``'s vocabulary and special tokens."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_CONFIG,
    )


def make_scheduler(name: SchedulerName = "dpm++", config: dict[str, Any] | None = None) -> Any:
    """An inference scheduler built from the model's noise schedule.

    Parameters
    ----------
    name : {"dpm++", "ddim", "euler", "ddpm"}
        DPM-Solver++ (2nd order multistep, the paper's choice and the default), DDIM,
        Euler discrete or the ancestral DDPM sampler.
    config : dict, optional
        Scheduler config to start from (e.g. a loaded pipeline's); the model's own otherwise.
    """
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
    )

    classes = {
        "dpm++": DPMSolverMultistepScheduler,
        "ddim": DDIMScheduler,
        "euler": EulerDiscreteScheduler,
        "ddpm": DDPMScheduler,
    }
    if name not in classes:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(classes)}")
    base = dict(SCHEDULER_CONFIG if config is None else config)
    if name == "dpm++":
        base.update(algorithm_type="dpmsolver++", solver_order=2)
    return classes[name].from_config(base)


def build_components(seed: int = 0) -> dict[str, Any]:
    """Random-weight components (vae, text_encoder, tokenizer, unet, scheduler).

    Parameters
    ----------
    seed : int
        Seed for the weight initialisation.
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    return {
        "vae": AutoencoderKL(**VAE_CONFIG),
        "text_encoder": CLIPTextModel(text_config(tokenizer)),
        "tokenizer": tokenizer,
        "unet": UNet2DConditionModel(**UNET_CONFIG),
        "scheduler": make_scheduler("dpm++"),
    }


def assemble_pipeline(components: dict[str, Any]) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` from components, without safety checker."""
    from diffusers import StableDiffusionPipeline

    pipe: Any = StableDiffusionPipeline(
        **components,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_demo_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The embedded model's architecture with random weights (no files needed).

    Parameters
    ----------
    seed : int
        Seed for the weight initialisation; the same seed gives the same weights.

    Returns
    -------
    StableDiffusionPipeline
        On the CPU in float32, DPM-Solver++ scheduler, progress bar disabled.

    Examples
    --------
    >>> pipe = build_demo_pipeline(seed=0)
    >>> pipe.unet.config.sample_size, pipe.tokenizer.model_max_length
    (16, 16)
    """
    return assemble_pipeline(build_components(seed))
