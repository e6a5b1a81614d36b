"""PixArt family: PixArt-α and PixArt-Σ (``PixArtTransformer2DModel``).

* Attention sites: each transformer block's ``attn2``, a cross-attention from the image
  tokens to the T5 text; the pipeline's text mask reaches it as an additive bias, so masked
  padding gets probability 0 (``"text_softmax"``).
* CFG: batched ``[uncond, cond]`` like Stable Diffusion.
* Text: T5 only, ``max_sequence_length`` positions (300 for PixArt-Σ, 120 for PixArt-α).
* Call: ``transformer(hidden_states, encoder_hidden_states, encoder_attention_mask, timestep,
  added_cond_kwargs)``; with learned sigma (``out_channels = 2 x in_channels``) the pipeline
  keeps the first half of the output channels, and so does a replay.
* Grids: the latent divided by ``patch_size``.
* Token relevance: explicit attention on every ``Attention`` layer, as for UNets
  (:class:`~diffwidget.tracing.families.unet.CrossAttentionFamily`).
"""

from __future__ import annotations

from typing import Any

from diffwidget.tracing.attention import (
    CaptureAttnProcessor,
    ProcessorFactory,
    cross_attention_layers,
)
from diffwidget.tracing.families.base import LatentLayout
from diffwidget.tracing.families.unet import CrossAttentionFamily
from diffwidget.tracing.tokens import PromptTokens, t5_tokens

#: diffusers' PixArt-Σ default ``max_sequence_length``.
PIXART_SIGMA_TEXT_LENGTH = 300


class PixArtFamily(CrossAttentionFamily):
    """PixArt-α/Σ transformers with ``attn2`` cross-attention."""

    name = "pixart"
    label = "PixArt (PixArt-α, PixArt-Σ)"
    pipelines = ("PixArtSigmaPipeline", "PixArtAlphaPipeline")
    models = ("PixArtTransformer2DModel",)
    denoiser_attr = "transformer"
    sample_arg = "hidden_states"
    normalisation = "text_softmax"
    max_sequence_arg = "max_sequence_length"
    #: The pipeline already passes the T5 padding mask; a masked word multiplies into it.
    text_mask_argument = "encoder_attention_mask"

    def attention_sites(self) -> dict[str, ProcessorFactory]:
        """Every block's ``attn2``."""
        return dict.fromkeys(cross_attention_layers(self.denoiser), CaptureAttnProcessor)

    def concept_embedder(self) -> Any:
        """The caption projection the text passes before every ``attn2``."""
        return getattr(self.denoiser, "caption_projection", None)

    def text_length(self, call_kwargs: dict[str, Any]) -> int:
        """``max_sequence_length`` as the pipeline will use it."""
        return self._max_sequence_length(call_kwargs, PIXART_SIGMA_TEXT_LENGTH)

    def prompt_tokens(self, prompt: str, call_kwargs: dict[str, Any]) -> PromptTokens:
        """T5's positions (no start token; the end token, then masked padding)."""
        return t5_tokens(self.pipe.tokenizer, prompt, self.text_length(call_kwargs))

    def from_model_output(self, output: Any, layout: LatentLayout) -> Any:
        """The predicted noise: with learned sigma, the first half of the channels."""
        config = self.denoiser.config
        if config.out_channels // 2 == config.in_channels:
            return output.chunk(2, dim=1)[0]
        return output

    def cam_layers(self) -> list[str]:
        """Every transformer block."""
        return [f"transformer_blocks.{i}" for i in range(len(self.denoiser.transformer_blocks))]
