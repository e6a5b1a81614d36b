"""The embedded DiT: a small MMDiT in the standard ``StableDiffusion3Pipeline`` layout.

The twin of the embedded UNet, trained on the same scene world and sharing its VAE: an
``SD3Transformer2DModel`` (joint attention over image and text tokens, adaLN-zero blocks),
two small ``CLIPTextModelWithProjection`` encoders with the UNet's word-level tokenizer, no
T5 (``text_encoder_3 = None``), and a ``FlowMatchEulerDiscreteScheduler``. 64x64 images,
4x16x16 latents, 2x2 patches: 64 image tokens.

The text the transformer sees at inference is laid out by the pipeline: the two CLIP
encoders' penultimate hidden states, concatenated on the feature axis and zero-padded to
``joint_attention_dim`` (16 tokens), followed by ``max_sequence_length`` (256 by default)
all-zero rows standing in for the absent T5. Those 256 rows are identical at every layer,
so in attention they act like a single key whose logit is raised by log 256. Training uses
exactly that: one zero row and :class:`TailWeightedJointAttnProcessor`, which adds
log 256 to that key's logit, so training sees what ``pipe(prompt)`` computes at a fraction
of the cost (``tests/models/test_dit.py`` checks the equivalence against diffusers'
processor). The training objective is :class:`diffwidget.models.objectives.FlowObjective`.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from diffwidget.models.architecture import (
    LATENT_CHANNELS,
    LATENT_SIZE,
    MAX_TOKENS,
    TRAIN_TIMESTEPS,
    VAE_CONFIG,
    build_tokenizer,
)
from diffwidget.models.sd3_attention import joint_outputs, joint_qkv

if TYPE_CHECKING:
    from diffusers import StableDiffusion3Pipeline

DIT_TEXT_HIDDEN = 64
PATCH_SIZE = 2  # 8x8 = 64 image tokens; 1 (256 tokens) was 2-4x slower (bench/RESULTS_model.md)

#: Both CLIP encoders (different initial weights). Three layers, because the pipeline reads
#: the penultimate hidden states: two layers shape the token features, all three the pooled.
DIT_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": DIT_TEXT_HIDDEN,
    "intermediate_size": 4 * DIT_TEXT_HIDDEN,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_TOKENS,
    "hidden_act": "quick_gelu",
    "projection_dim": DIT_TEXT_HIDDEN,
}

TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": LATENT_SIZE,
    "patch_size": PATCH_SIZE,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,
    "num_layers": 8,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    # The two encoders' features side by side; the pipeline pads CLIP features to this width.
    "joint_attention_dim": 2 * DIT_TEXT_HIDDEN,
    "caption_projection_dim": 128,  # must equal heads x head dim (joint attention)
    "pooled_projection_dim": 2 * DIT_TEXT_HIDDEN,
    "pos_embed_max_size": LATENT_SIZE // PATCH_SIZE,
    # RMS-normalised queries and keys (as in SD3.5) keep the logits bounded in training.
    "qk_norm": "rms_norm",
}

FLOW_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": TRAIN_TIMESTEPS,
    # No resolution shift: 16x16 latents hold few values, so moderate noise already hides the
    # layout (SD3's shift of 3 is for 128x128 latents); training samples sigma unshifted.
    "shift": 1.0,
}


def tail_tokens() -> int:
    """How many all-zero text rows ``StableDiffusion3Pipeline.__call__`` appends by default."""
    from diffusers import StableDiffusion3Pipeline

    signature = inspect.signature(StableDiffusion3Pipeline.__call__)
    return int(signature.parameters["max_sequence_length"].default)


def dit_text_config(tokenizer: Any) -> Any:
    """``CLIPTextConfig`` of one DiT text encoder, matching ``tokenizer``."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **DIT_TEXT_CONFIG,
    )


def build_dit_components(seed: int = 0) -> dict[str, Any]:
    """Random-weight components of ``StableDiffusion3Pipeline`` (no T5).

    Parameters
    ----------
    seed : int
        Seed for the weight initialisation.
    """
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer()
    return {
        "transformer": SD3Transformer2DModel(**TRANSFORMER_CONFIG),
        "scheduler": FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER_CONFIG),
        "vae": AutoencoderKL(**VAE_CONFIG),
        "text_encoder": CLIPTextModelWithProjection(dit_text_config(tokenizer)),
        "tokenizer": tokenizer,
        "text_encoder_2": CLIPTextModelWithProjection(dit_text_config(tokenizer_2)),
        "tokenizer_2": tokenizer_2,
        "text_encoder_3": None,
        "tokenizer_3": None,
    }


def assemble_dit_pipeline(components: dict[str, Any]) -> StableDiffusion3Pipeline:
    """A ``StableDiffusion3Pipeline`` from components, progress bar disabled."""
    from diffusers import StableDiffusion3Pipeline

    pipe: Any = StableDiffusion3Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_dit_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """The embedded DiT's architecture with random weights (no files needed).

    Parameters
    ----------
    seed : int
        Seed for the weight initialisation; the same seed gives the same weights.

    Examples
    --------
    >>> pipe = build_dit_pipeline(seed=0)
    >>> pipe.transformer.config.patch_size, pipe.tokenizer_2.model_max_length
    (2, 16)
    """
    return assemble_dit_pipeline(build_dit_components(seed))


class TailWeightedJointAttnProcessor:
    """SD3 joint attention in which the last text token stands for ``copies`` identical ones.

    Used only in training. It computes what diffusers' ``JointAttnProcessor2_0`` computes
    on a sequence whose last text token is repeated ``copies`` times: those keys share one
    logit and one value, so softmax gives them ``copies`` times the weight of one, which is
    adding log(copies) to that key's logit. Queries of the repeated tokens are identical too,
    so one row gives all their outputs.

    Parameters
    ----------
    copies : int
        How many identical tokens the last one stands for (256 for the pipeline's default).
    """

    def __init__(self, copies: int) -> None:
        if copies < 1:
            raise ValueError(f"copies must be at least 1, got {copies}")
        self.copies = copies

    def __call__(
        self,
        attn: Any,
        hidden_states: Any,
        encoder_hidden_states: Any = None,
        attention_mask: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """Joint attention of image and text tokens (image first), as in SD3."""
        import torch
        import torch.nn.functional as F

        if encoder_hidden_states is None:
            raise ValueError("TailWeightedJointAttnProcessor needs the text tokens")
        query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states)
        bias = torch.zeros(1, 1, 1, key.shape[2], dtype=query.dtype, device=query.device)
        bias[..., -1] = math.log(self.copies)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        return joint_outputs(attn, out.to(query.dtype), hidden_states.shape[1])


@contextlib.contextmanager
def tail_weighted_attention(transformer: Any, copies: int) -> Iterator[None]:
    """Run ``transformer`` with :class:`TailWeightedJointAttnProcessor`; always restored."""
    original = dict(transformer.attn_processors)
    processor = TailWeightedJointAttnProcessor(copies)
    transformer.set_attn_processor(dict.fromkeys(original, processor))
    try:
        yield
    finally:
        # set_attn_processor empties the dict it is given: pass a copy.
        transformer.set_attn_processor(dict(original))
