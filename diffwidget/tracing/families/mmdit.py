"""SD3 family: Stable Diffusion 3 and 3.5 (``SD3Transformer2DModel``, MMDiT).

* Attention sites: each joint block's ``attn`` (``JointAttnProcessor2_0``): one softmax over
  ``[image, text]`` keys, image first. The image→text block is kept
  (:mod:`~diffwidget.tracing.joint_attention`): rows sum to the patch's text share
  (``"joint_share"``). SD3.5's dual-attention blocks also have an ``attn2``, which is
  image-only self-attention and is not captured; the last block is ``context_pre_only``
  (its text stream ends there, its attention still reads the text).
* CFG: batched ``[negative, positive]``; ``skip_guidance_layers`` (extra calls) is refused.
* Text: CLIP's positions (CLIP-L ⊕ CLIP-G features on one axis) then T5's
  ``max_sequence_length`` (256 by default; all-zero embeddings when T5 is absent), so each
  prompt word appears twice (:mod:`~diffwidget.tracing.tokens`).
* Call: ``transformer(hidden_states, timestep=sigma * 1000, encoder_hidden_states,
  pooled_projections)``; latents unscaled (flow matching), patches of ``patch_size``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from diffwidget.models.sd3_attention import joint_outputs, joint_qkv
from diffwidget.tracing.attention import ProcessorFactory
from diffwidget.tracing.cfg import CfgLayout
from diffwidget.tracing.concept_attention import (
    ConceptLayer,
    ConceptTokens,
    linear,
    norm,
)
from diffwidget.tracing.families.base import (
    AttentionKind,
    AttentionRecord,
    DenoiserFamily,
    explicit_processors,
)
from diffwidget.tracing.families.joint import JointCaptureProcessor, explicit_softmax, heads
from diffwidget.tracing.joint_attention import image_to_text_probs
from diffwidget.tracing.tokens import PromptTokens, empty_tokens, prompt_tokens, t5_tokens

#: diffusers' SD3 default ``max_sequence_length`` (T5 positions).
SD3_T5_LENGTH = 256
#: CLIP's length when a pipeline has no CLIP tokenizer.
CLIP_LENGTH = 77


class SD3CaptureProcessor(JointCaptureProcessor):
    """Image→text block of an SD3 joint attention layer (image tokens first)."""

    def record(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Joint probabilities of the conditional half, after qk-norm, in query chunks."""
        text = kwargs.get("encoder_hidden_states", args[0] if args else None)
        if text is None:
            return
        n_image = hidden_states.shape[1]
        if self.record_sdpa(slice(0, n_image), slice(n_image, None)):
            return
        cond = self.recorder.cond
        query = cond(self._projection(attn, "to_q", hidden_states))
        key = cond(self._projection(attn, "to_k", hidden_states))
        text_key = cond(self._projection(attn, "add_k_proj", text))
        head_dim = key.shape[-1] // attn.heads
        # [1, N, H*d] -> [1, H, N, d], as JointAttnProcessor2_0 views them.
        query, key, text_key = (heads(t, head_dim).transpose(1, 2) for t in (query, key, text_key))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if attn.norm_added_k is not None:
            text_key = attn.norm_added_k(text_key)
        keys = torch.cat([key, text_key], dim=2)[0]
        probs = image_to_text_probs(
            query[0],
            keys,
            slice(n_image, keys.shape[1]),
            1.0 / math.sqrt(head_dim),
            heads=self.recorder.keep_heads,
        )
        self.recorder.add(self.layer, probs)


class SD3ExplicitProcessor:
    """``JointAttnProcessor2_0`` with the softmax written out (token relevance only).

    Same projections, qk-norms, ``[image, text]`` order and output path; the probabilities
    are recorded in the autograd graph. Image-only calls (SD3.5's ``attn2``) are recorded
    with ``n_text = 0``.
    """

    def __init__(self, path: str, records: list[AttentionRecord]) -> None:
        self.path = path
        self.records = records

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        batch, n_image = hidden_states.shape[0], hidden_states.shape[1]
        text = encoder_hidden_states
        query, key, value = joint_qkv(attn, hidden_states, text)
        n_text = 0 if text is None else text.shape[1]
        probs = explicit_softmax(query, key)
        kind: AttentionKind = "joint" if n_text else "self"
        self.records.append(AttentionRecord(self.path, probs, kind, n_text, text_first=False))
        out = torch.matmul(probs, value).to(query.dtype)
        if text is None:
            out = out.transpose(1, 2).reshape(batch, n_image, -1)
            return attn.to_out[1](attn.to_out[0](out))
        return joint_outputs(attn, out, n_image)


class SD3ConceptLayer(ConceptLayer):
    """Concept tokens through an SD3 joint block: the context stream's modulation
    (``norm1_context``), projections, qk-norms, output projection, gates and feed-forward.

    The last block is ``context_pre_only``: its text stream ends there, it has no context
    output projection (its maps are read in the attention space) and the stream stops.
    """

    def has_output_projection(self) -> bool:
        """Both projections exist except in the context-pre-only last block."""
        return not self.attn.context_pre_only and self.attn.to_add_out is not None

    def begin(self, stream: torch.Tensor, temb: torch.Tensor, rotary: Any) -> ConceptTokens:
        """``norm1_context`` with ``temb``, then ``add_{q,k,v}_proj`` and the added qk-norms."""
        block, attn = self.block, self.attn
        if block.context_pre_only:
            normed = block.norm1_context(stream, temb)
            self._gates: tuple[torch.Tensor, ...] | None = None
        else:
            normed, *gates = block.norm1_context(stream, emb=temb)
            self._gates = tuple(gates)
        query, key, value = self.tokens(normed, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        return ConceptTokens(norm(attn.norm_added_q, query), norm(attn.norm_added_k, key), value)

    def project(self, raw: torch.Tensor) -> torch.Tensor:
        """The context output projection ``to_add_out``."""
        return linear(self.attn.to_add_out, raw)

    def advance(self, stream: torch.Tensor, raw: torch.Tensor) -> torch.Tensor | None:
        """``JointTransformerBlock``'s context path after attention."""
        if self._gates is None:
            return None
        block = self.block
        gate_msa, shift_mlp, scale_mlp, gate_mlp = self._gates
        stream = stream + gate_msa.unsqueeze(1) * self.projected(raw).to(stream.dtype)
        normed = block.norm2_context(stream) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return stream + gate_mlp.unsqueeze(1) * block.ff_context(normed)


class SD3Family(DenoiserFamily):
    """SD3 / SD3.5 MMDiT transformers."""

    name = "sd3"
    label = "SD3 / SD3.5 (MMDiT)"
    pipelines = ("StableDiffusion3Pipeline",)
    models = ("SD3Transformer2DModel",)
    denoiser_attr = "transformer"
    sample_arg = "hidden_states"
    normalisation = "joint_share"
    max_sequence_arg = "max_sequence_length"

    def attention_sites(self) -> dict[str, ProcessorFactory]:
        """Every joint block's ``attn`` (never the dual-attention ``attn2``)."""
        blocks = self.denoiser.transformer_blocks
        return {f"transformer_blocks.{i}.attn": SD3CaptureProcessor for i in range(len(blocks))}

    def concept_layers(self) -> list[ConceptLayer]:
        """Every joint block's ``attn`` (the dual-attention ``attn2`` sees no text)."""
        blocks = self.denoiser.transformer_blocks
        return [
            SD3ConceptLayer(f"transformer_blocks.{i}.attn", block.attn, block)
            for i, block in enumerate(blocks)
        ]

    def _clip_length(self) -> int:
        tokenizer = getattr(self.pipe, "tokenizer", None)
        return int(tokenizer.model_max_length) if tokenizer is not None else CLIP_LENGTH

    def text_length(self, call_kwargs: dict[str, Any]) -> int:
        """CLIP's positions plus ``max_sequence_length`` T5 positions."""
        return self._clip_length() + self._max_sequence_length(call_kwargs, SD3_T5_LENGTH)

    def prompt_tokens(self, prompt: str, call_kwargs: dict[str, Any]) -> PromptTokens:
        """CLIP then T5 positions (empty positions when T5 is absent)."""
        clip = prompt_tokens(self.pipe.tokenizer, prompt, length=self._clip_length())
        length = self._max_sequence_length(call_kwargs, SD3_T5_LENGTH)
        t5 = getattr(self.pipe, "tokenizer_3", None)
        if t5 is None or getattr(self.pipe, "text_encoder_3", None) is None:
            return clip + empty_tokens(length)
        return clip + t5_tokens(t5, prompt, length)

    def cfg_layout(self, guidance_scale: float, call_kwargs: dict[str, Any]) -> CfgLayout:
        """Batched CFG; skip-layer guidance (an extra call per step) is refused."""
        if call_kwargs.get("skip_guidance_layers"):
            raise ValueError(
                "skip_guidance_layers runs the transformer a second time in some steps; "
                "diffwidget traces one call per step. Trace without it."
            )
        return super().cfg_layout(guidance_scale, call_kwargs)

    def explicit_attention(self, n_text: int) -> Any:
        """Explicit joint attention on every layer, for token relevance (records probabilities)."""
        return explicit_processors(self.denoiser, SD3ExplicitProcessor)

    def cam_layers(self) -> list[str]:
        """Every joint transformer block."""
        return [f"transformer_blocks.{i}" for i in range(len(self.denoiser.transformer_blocks))]

    def block_tensor(self, path: str, output: Any) -> torch.Tensor:
        """A joint block returns ``(text, image)``; the image stream is the second."""
        if isinstance(output, tuple) and len(output) == 2:
            return output[1]
        return super().block_tensor(path, output)
