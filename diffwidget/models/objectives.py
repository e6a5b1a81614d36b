"""What the denoisers learn in stage 2 of :mod:`diffwidget.models.train`.

* :class:`UNetObjective`: the velocity v (Salimans & Ho 2022) under a noise schedule rescaled
  to zero terminal SNR (see ``SCHEDULER_CONFIG``), Min-SNR loss weighting;
* :class:`FlowObjective`: rectified flow for the DiT (Esser et al. 2024, "Scaling rectified
  flow transformers"): with sigma ~ logit-normal(0, 1), x_sigma = (1 - sigma) x0 + sigma
  noise, the transformer learns the velocity noise - x0 at timestep 1000 sigma, unweighted
  mean squared error.

Both replace 10 % of the captions by the empty prompt (classifier-free guidance).
:func:`init_from_pipeline` starts either from trained weights (fine-tuning).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from diffwidget.models.architecture import TRAIN_TIMESTEPS, assemble_pipeline
from diffwidget.models.dit import assemble_dit_pipeline, tail_tokens, tail_weighted_attention

if TYPE_CHECKING:
    from diffwidget.models.recipes import TrainConfig

MIN_SNR_GAMMA = 5.0  # Hang et al. 2023: clamps the loss weight of low-noise timesteps
LOGIT_MEAN = 0.0  # SD3's logit-normal timestep sampling
LOGIT_STD = 1.0


@dataclass
class LatentSet:
    """Encoded training set: posterior mean/std of each latent, its caption and token ids."""

    mean: Any
    std: Any
    input_ids: Any
    empty_ids: Any
    captions: list[str]


def min_snr_weights(noise_scheduler: Any) -> Any:
    """Per-timestep loss weights: Min-SNR (Hang et al. 2023) with SNR + 1 for v-prediction.

    In terms of the error of the predicted clean latent, an epsilon loss weighs timestep t by
    SNR(t) and a v loss by SNR(t) + 1; both are clamped at :data:`MIN_SNR_GAMMA` so that
    nearly clean timesteps do not dominate. For v-prediction the weight of the noisiest steps
    stays 1: with a zero terminal SNR those are where the prompt alone decides the layout.
    """
    import torch

    alphas = noise_scheduler.alphas_cumprod.to(torch.float64)
    snr = alphas / (1 - alphas).clamp(min=1e-12)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return (snr.clamp(max=MIN_SNR_GAMMA) / snr.clamp(min=1e-12)).float()
    if kind == "v_prediction":
        return ((snr + 1).clamp(max=MIN_SNR_GAMMA) / (snr + 1)).float()
    raise ValueError(f"training supports epsilon and v_prediction, not {kind!r}")


def training_target(noise_scheduler: Any, latents: Any, noise: Any, t: Any) -> Any:
    """What the UNet learns to output: the noise, or the velocity for v-prediction."""
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, t)
    return noise


class Objective(Protocol):
    """The denoiser-specific part of stage 2."""

    #: Modules trained and averaged (denoiser first, then the text encoders) ...
    trained: list[Any]
    #: ... and their names in the pipeline.
    names: tuple[str, ...]

    def loss(self, latents: Any, batch: Any, data: LatentSet, generator: Any) -> Any:
        """Mean training loss on scaled clean ``latents`` of the training items ``batch``."""

    def pipeline(self, modules: list[Any], vae: Any) -> Any:
        """A pipeline holding ``modules`` (in the order of :attr:`trained`) and ``vae``."""


class UNetObjective:
    """v-prediction under a zero-terminal-SNR schedule, Min-SNR weighted, caption dropout."""

    def __init__(self, components: dict[str, Any], config: TrainConfig, device: str) -> None:
        from diffusers import DDPMScheduler

        self.components = components
        self.config = config
        self.noise_scheduler = DDPMScheduler.from_config(components["scheduler"].config)
        self.loss_weight = min_snr_weights(self.noise_scheduler).to(device)
        self.trained = [components["unet"], components["text_encoder"]]
        self.names: tuple[str, ...] = ("unet", "text_encoder")

    def loss(self, latents: Any, batch: Any, data: LatentSet, generator: Any) -> Any:
        """Weighted v loss (see :func:`min_snr_weights`)."""
        import torch

        unet, text_encoder = self.trained
        n, device = latents.shape[0], latents.device
        noise = torch.randn(latents.shape, generator=generator, device=device)
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (n,), generator=generator, device=device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        ids = data.input_ids[batch.cpu()].clone()
        drop = torch.rand(n, generator=generator, device=device) < self.config.caption_dropout
        ids[drop.cpu()] = data.empty_ids
        hidden = text_encoder(ids.to(device))[0]
        pred = unet(noisy, t, hidden).sample
        target = training_target(self.noise_scheduler, latents, noise, t)
        per_sample = (pred - target).pow(2).mean(dim=(1, 2, 3))
        return (per_sample * self.loss_weight[t]).mean()

    def pipeline(self, modules: list[Any], vae: Any) -> Any:
        """A ``StableDiffusionPipeline`` with the given UNet and text encoder."""
        unet, text_encoder = modules
        return assemble_pipeline(
            dict(self.components, unet=unet, text_encoder=text_encoder, vae=vae)
        )


def sample_sigmas(n: int, generator: Any, device: Any = "cpu") -> Any:
    """Noise levels for training: sigma = sigmoid(u), u ~ N(LOGIT_MEAN, LOGIT_STD²)."""
    import torch

    u = torch.randn(n, generator=generator, device=device) * LOGIT_STD + LOGIT_MEAN
    return torch.sigmoid(u)


def flow_noisy(latents: Any, noise: Any, sigmas: Any) -> Any:
    """The rectified-flow interpolation x_sigma = (1 - sigma) x0 + sigma noise."""
    s = sigmas.view(-1, *([1] * (latents.ndim - 1)))
    return (1 - s) * latents + s * noise


def flow_target(latents: Any, noise: Any) -> Any:
    """The velocity d x_sigma / d sigma = noise - x0 the transformer learns."""
    return noise - latents


class FlowObjective:
    """Rectified flow with logit-normal noise levels and caption dropout, for the DiT.

    The text goes through the pipeline's own ``encode_prompt`` (so training embeds captions
    exactly as inference does) with ``max_sequence_length=1``: one zero row that
    :class:`TailWeightedJointAttnProcessor` weighs as the :func:`tail_tokens` rows of
    inference.
    """

    def __init__(self, components: dict[str, Any], config: TrainConfig, device: str) -> None:
        self.components = components
        self.config = config
        self.device = device
        self.copies = tail_tokens()
        self.text_pipe: Any = assemble_dit_pipeline(components)
        self.trained = [
            components["transformer"],
            components["text_encoder"],
            components["text_encoder_2"],
        ]
        self.names: tuple[str, ...] = ("transformer", "text_encoder", "text_encoder_2")

    def loss(self, latents: Any, batch: Any, data: LatentSet, generator: Any) -> Any:
        """Mean squared error of the velocity."""
        import torch

        transformer = self.trained[0]
        n, device = latents.shape[0], latents.device
        noise = torch.randn(latents.shape, generator=generator, device=device)
        sigmas = sample_sigmas(n, generator, device)
        drop = torch.rand(n, generator=generator, device=device) < self.config.caption_dropout
        captions = [
            "" if d else data.captions[int(i)]
            for i, d in zip(batch.tolist(), drop.tolist(), strict=True)
        ]
        embeds, _, pooled, _ = self.text_pipe.encode_prompt(
            prompt=captions,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=1,
        )
        with tail_weighted_attention(transformer, self.copies):
            pred = transformer(
                hidden_states=flow_noisy(latents, noise, sigmas),
                timestep=sigmas * TRAIN_TIMESTEPS,
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
        return (pred - flow_target(latents, noise)).pow(2).mean()

    def pipeline(self, modules: list[Any], vae: Any) -> Any:
        """A ``StableDiffusion3Pipeline`` holding the given transformer and text encoders."""
        transformer, text_encoder, text_encoder_2 = modules
        return assemble_dit_pipeline(
            dict(
                self.components,
                transformer=transformer,
                text_encoder=text_encoder,
                text_encoder_2=text_encoder_2,
                vae=vae,
            )
        )


#: New vocabulary words a fine-tuned text encoder starts from (their synonym's embedding).
NEW_WORD_INIT: dict[str, str] = {"middle": "centre"}


def init_from_pipeline(objective: Objective, components: dict[str, Any], folder: Path) -> None:
    """Start stage 2 from the trained modules of a pipeline folder (fine-tuning).

    Token embeddings are carried over by token string, so a tokenizer whose vocabulary
    grew still starts from the old one; a new word of :data:`NEW_WORD_INIT` starts from its
    synonym's embedding, other new tokens from their fresh initialisation.
    """
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    for name, module in zip(objective.names, objective.trained, strict=True):
        (weights_file,) = sorted((folder / name).glob("*.safetensors"))
        weights = {k: v.float() for k, v in load_file(str(weights_file)).items()}
        if name.startswith("text_encoder"):
            suffix = name.removeprefix("text_encoder")
            old = CLIPTokenizer.from_pretrained(str(folder / f"tokenizer{suffix}")).get_vocab()
            new = components[f"tokenizer{suffix}"].get_vocab()
            key = next(k for k in weights if k.endswith("token_embedding.weight"))
            table = module.state_dict()[key].clone()
            for token, index in new.items():
                word = token.removesuffix("</w>")
                source = (
                    f"{NEW_WORD_INIT[word]}</w>"
                    if token not in old and word in NEW_WORD_INIT
                    else token
                )
                if source in old:
                    table[index] = weights[key][old[source]]
            weights[key] = table
        module.load_state_dict(weights)
