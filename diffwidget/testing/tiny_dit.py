"""Tiny random-weight SD3, SD3.5, Flux and PixArt-Σ pipelines built from configs, offline.

The transformer and text-encoder configs follow the dummy components of diffusers' own
pipeline tests (``tests/pipelines/stable_diffusion_3/``, ``flux/``, ``pixart_sigma/``),
with two blocks of each kind so that a trace shows more than one layer, and tokenizers
built locally (those tests download theirs): CLIP as :mod:`diffwidget.testing.tiny` builds
it, T5 as a SentencePiece-style ``T5Tokenizer`` over the same words.
"""

from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING, Any

from diffwidget.testing.tiny import TINY_WORDS, _text_config, _tokenizer, _vae

if TYPE_CHECKING:
    from diffusers import FluxPipeline, PixArtSigmaPipeline, StableDiffusion3Pipeline

#: SentencePiece marks the start of a word with this.
WORD_START = "▁"
#: Spelling fallback for words the tiny T5 vocabulary does not know.
_LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789,.'-!?"
#: T5 positions of the tiny pipelines (the real ones use 256, 512 and 300).
TINY_T5_LENGTH = 24
#: Width of the tiny T5 and of the transformers' text input.
T5_DIM = 32


def tiny_t5_tokenizer() -> Any:
    """A ``T5Tokenizer`` where each of :data:`TINY_WORDS` is one piece (built, not downloaded).

    Examples
    --------
    >>> tok = tiny_t5_tokenizer()
    >>> tok.convert_ids_to_tokens(tok("a red circle")["input_ids"])
    ['▁a', '▁red', '▁circle', '</s>']
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(WORD_START + word, -1.0) for word in TINY_WORDS]
    vocab += [(WORD_START, -2.0)] + [(c, -5.0) for c in _LETTERS]
    model = Tokenizer(models.Unigram(vocab, unk_id=2))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = pre_tokenizers.Metaspace(replacement=WORD_START, prepend_scheme="always")
    model.decoder = decoders.Metaspace(replacement=WORD_START, prepend_scheme="always")
    model.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    built = T5Tokenizer(
        tokenizer_object=model, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0
    )
    # Round-trip through files, as a pipeline folder would load it.
    with tempfile.TemporaryDirectory(prefix="diffwidget-t5-") as tmp:
        built.save_pretrained(tmp)
        return T5Tokenizer.from_pretrained(tmp)


def _t5(tokenizer: Any) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_DIM,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config).eval()


def _flow_vae(latent_channels: int = 4) -> Any:
    # SD3 and Flux VAEs shift latents; the pipelines add it back before decoding.
    return _vae(latent_channels=latent_channels, shift_factor=0.0609, scaling_factor=1.5035)


def tiny_sd3_pipeline(
    seed: int = 0, *, t5: bool = True, sd35: bool = False
) -> StableDiffusion3Pipeline:
    """A random-weight ``StableDiffusion3Pipeline`` (two joint blocks, the last context-pre-only).

    Parameters
    ----------
    seed : int
        Seed for the random weights.
    t5 : bool
        With the T5 encoder (its positions follow CLIP's); without it the pipeline fills
        them with zeros, as SD3 does.
    sd35 : bool
        SD3.5-style blocks: qk-RMSNorm and a dual-attention first block (its ``attn2`` is
        image-only self-attention).

    Examples
    --------
    >>> pipe = tiny_sd3_pipeline()
    >>> len(pipe.transformer.transformer_blocks)
    2
    """
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    hidden = 16
    tokenizer, tokenizer_2 = _tokenizer(None), _tokenizer(None)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        # CLIP-L ⊕ CLIP-G features (2 x 16), zero-padded to T5's width.
        joint_attention_dim=T5_DIM,
        pooled_projection_dim=2 * hidden,
        out_channels=4,
        qk_norm="rms_norm" if sd35 else None,
        dual_attention_layers=(0,) if sd35 else (),
    )
    t5_tokenizer = tiny_t5_tokenizer() if t5 else None
    pipe: Any = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_flow_vae(),
        text_encoder=CLIPTextModelWithProjection(_text_config(tokenizer, hidden_size=hidden)),
        tokenizer=tokenizer,
        text_encoder_2=CLIPTextModelWithProjection(_text_config(tokenizer_2, hidden_size=hidden)),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_t5(t5_tokenizer) if t5_tokenizer is not None else None,
        tokenizer_3=t5_tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """A random-weight ``FluxPipeline``: two double- and two single-stream blocks.

    Examples
    --------
    >>> pipe = tiny_flux_pipeline()
    >>> len(pipe.transformer.single_transformer_blocks)
    2
    """
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = _tokenizer(None)
    t5_tokenizer = tiny_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_DIM,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    )
    pipe: Any = FluxPipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_flow_vae(),
        text_encoder=CLIPTextModel(_text_config(tokenizer, hidden_size=32)),
        tokenizer=tokenizer,
        text_encoder_2=_t5(t5_tokenizer),
        tokenizer_2=t5_tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def tiny_pixart_pipeline(seed: int = 0) -> PixArtSigmaPipeline:
    """A random-weight ``PixArtSigmaPipeline`` (two blocks, learned sigma).

    Examples
    --------
    >>> pipe = tiny_pixart_pipeline()
    >>> pipe.transformer.config.out_channels
    8
    """
    import torch
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    t5_tokenizer = tiny_t5_tokenizer()
    transformer = PixArtTransformer2DModel(
        sample_size=16,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=T5_DIM,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    pipe: Any = PixArtSigmaPipeline(
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
        vae=_vae(),
        text_encoder=_t5(t5_tokenizer),
        tokenizer=t5_tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")
