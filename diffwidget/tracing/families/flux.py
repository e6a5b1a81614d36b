"""Flux family: FLUX.1 dev/schnell (``FluxTransformer2DModel``).

* Attention sites: the double-stream blocks' ``attn`` (text and image projected apart,
  joined ``[text, image]``) and the single-stream blocks' ``attn`` (one sequence that the
  block concatenated itself, so the processor never sees the text length: it is the
  transformer call's, which the trace's call tap tells the recorder). Both
  apply qk-RMSNorm, then RoPE on the joint sequence; the capture applies them exactly so
  before keeping the image→text block of the joint softmax (``"joint_share"``).
* CFG: FLUX.1-dev is guidance-distilled — one call per step, the guidance scale goes into
  the model as ``guidance`` (``none``); with ``true_cfg_scale > 1`` and a negative prompt
  the pipeline makes a second call, labelled by ``cache_context("uncond")`` (``separate``).
* Text: T5 only, ``max_sequence_length`` positions (512 for dev; CLIP gives only the pooled
  projection).
* Call: ``transformer(hidden_states, timestep=sigma, guidance, pooled_projections,
  encoder_hidden_states, txt_ids, img_ids)`` on latents packed 2x2 into tokens of
  ``4 x C`` channels; the ids have no batch axis.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from diffwidget.tracing.attention import ProcessorFactory
from diffwidget.tracing.cfg import CfgLayout
from diffwidget.tracing.concept_attention import (
    ConceptLayer,
    ConceptTokens,
    linear,
    norm,
    rope,
)
from diffwidget.tracing.families.base import (
    AttentionRecord,
    DenoiserCall,
    DenoiserFamily,
    LatentLayout,
    explicit_processors,
)
from diffwidget.tracing.families.joint import JointCaptureProcessor, explicit_softmax, heads
from diffwidget.tracing.joint_attention import image_to_text_probs
from diffwidget.tracing.tokens import PromptTokens, t5_tokens

#: FLUX.1-dev's default ``max_sequence_length``.
FLUX_T5_LENGTH = 512
#: Flux packs 2x2 latent cells into one token.
PACK = 2


def _rope(x: torch.Tensor, rotary: Any, positions: slice) -> torch.Tensor:
    """RoPE on ``x`` ``[B, n, H, d]`` with the joint sequence's angles at ``positions``."""
    from diffusers.models.embeddings import apply_rotary_emb

    if rotary is None:
        return x
    cos, sin = rotary
    return apply_rotary_emb(x, (cos[positions], sin[positions]), sequence_dim=1)  # type: ignore[arg-type, return-value]


class FluxCaptureProcessor(JointCaptureProcessor):
    """Image→text block of a Flux attention layer (text tokens first, RoPE applied)."""

    def record(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Joint probabilities of the conditional half, after qk-norm and RoPE."""
        # FluxAttention calls processor(attn, hidden, encoder, mask, image_rotary_emb).
        text = kwargs.get("encoder_hidden_states", args[0] if args else None)
        rotary = kwargs.get("image_rotary_emb", args[2] if len(args) > 2 else None)
        if text is not None:
            n_text = int(text.shape[1])
        elif self.recorder.text_length is None:
            raise RuntimeError(
                f"{self.layer}: the single-stream block's text length is unknown (set "
                "AttentionRecorder.text_length to the transformer call's text length)"
            )
        else:
            n_text = self.recorder.text_length
        if self.record_sdpa(slice(n_text, None), slice(0, n_text)):
            return
        cond = self.recorder.cond
        head_dim = int(attn.head_dim)
        query = heads(cond(self._projection(attn, "to_q", hidden_states)), head_dim)
        key = attn.norm_k(heads(cond(self._projection(attn, "to_k", hidden_states)), head_dim))
        if text is not None:
            # Double-stream: the image stream is `hidden_states`; text keys are projected apart.
            text_key = heads(cond(self._projection(attn, "add_k_proj", text)), head_dim)
            text_key = _rope(attn.norm_added_k(text_key), rotary, slice(0, n_text))
            joint = slice(n_text, n_text + query.shape[1])
            query = _rope(attn.norm_q(query), rotary, joint)
            keys = torch.cat([text_key, _rope(key, rotary, joint)], dim=1)
        else:
            # Single-stream: one [text, image] sequence; the block told us the text length.
            keys = _rope(key, rotary, slice(0, key.shape[1]))
            # Only the image queries are needed: normalise and rotate those alone.
            image = slice(n_text, query.shape[1])
            query = _rope(attn.norm_q(query[:, image]), rotary, image)
        probs = image_to_text_probs(
            query[0].transpose(0, 1),
            keys[0].transpose(0, 1),
            slice(0, n_text),
            1.0 / math.sqrt(head_dim),
            heads=self.recorder.keep_heads,
        )
        self.recorder.add(self.layer, probs)


class FluxExplicitProcessor:
    """``FluxAttnProcessor`` with the softmax written out (token relevance only).

    Same projections, qk-RMSNorm, ``[text, image]`` order, RoPE and output path; the
    probabilities are recorded in the autograd graph (single-stream calls too: their text
    length is the transformer call's).
    """

    def __init__(self, path: str, records: list[AttentionRecord], n_text: int) -> None:
        self.path = path
        self.records = records
        self.n_text = n_text

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        from diffusers.models.embeddings import apply_rotary_emb

        d = attn.head_dim
        query = attn.norm_q(heads(attn.to_q(hidden_states), d))
        key = attn.norm_k(heads(attn.to_k(hidden_states), d))
        value = heads(attn.to_v(hidden_states), d)
        text = encoder_hidden_states
        if text is not None:
            eq = attn.norm_added_q(heads(attn.add_q_proj(text), d))
            ek = attn.norm_added_k(heads(attn.add_k_proj(text), d))
            ev = heads(attn.add_v_proj(text), d)
            query, key = torch.cat([eq, query], dim=1), torch.cat([ek, key], dim=1)
            value = torch.cat([ev, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        probs = explicit_softmax(query.transpose(1, 2), key.transpose(1, 2))
        self.records.append(
            AttentionRecord(self.path, probs, "joint", self.n_text, text_first=True)
        )
        out = torch.matmul(probs, value.transpose(1, 2)).transpose(1, 2).flatten(2, 3)
        out = out.to(query.dtype)
        if text is None:
            return out
        text_out, image = out[:, : text.shape[1]], out[:, text.shape[1] :]
        image = attn.to_out[1](attn.to_out[0](image.contiguous()))
        return image, attn.to_add_out(text_out.contiguous())


def _concept_rope(x: torch.Tensor, rotary: Any) -> torch.Tensor:
    """RoPE on concept tokens ``[B, H, n, d]``: every concept takes the angles of the first text
    position (FluxPipeline's ``txt_ids`` are all zero, so every text position has them)."""
    if rotary is None:
        return x
    return rope(x, rotary, torch.zeros(x.shape[2], dtype=torch.long, device=rotary[0].device))


class FluxConceptLayer(ConceptLayer):
    """Concept tokens through a Flux double-stream block (the context stream's path)."""

    def begin(self, stream: torch.Tensor, temb: torch.Tensor, rotary: Any) -> ConceptTokens:
        """``norm1_context`` with ``temb``, the added projections, qk-RMSNorm and RoPE."""
        block, attn = self.block, self.attn
        normed, *gates = block.norm1_context(stream, emb=temb)
        self._gates = tuple(gates)
        query, key, value = self.tokens(normed, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        query = _concept_rope(norm(attn.norm_added_q, query), rotary)
        key = _concept_rope(norm(attn.norm_added_k, key), rotary)
        return ConceptTokens(query, key, value)

    def prepare_keys(
        self, keys: torch.Tensor, tokens: slice, rotary: Any, n_text: int
    ) -> torch.Tensor:
        """qk-RMSNorm, then RoPE at the image tokens' joint positions (after the text)."""
        rows = slice(n_text + tokens.start, n_text + tokens.stop)
        return rope(norm(self.attn.norm_k, keys), rotary, rows)

    def project(self, raw: torch.Tensor) -> torch.Tensor:
        """The context output projection ``to_add_out``."""
        return linear(self.attn.to_add_out, raw)

    def advance(self, stream: torch.Tensor, raw: torch.Tensor) -> torch.Tensor | None:
        """``FluxTransformerBlock``'s context path after attention."""
        block = self.block
        gate_msa, shift_mlp, scale_mlp, gate_mlp = self._gates
        stream = stream + gate_msa.unsqueeze(1) * self.projected(raw).to(stream.dtype)
        normed = block.norm2_context(stream) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        stream = stream + gate_mlp.unsqueeze(1) * block.ff_context(normed)
        return stream.clip(-65504, 65504) if stream.dtype == torch.float16 else stream


class FluxSingleConceptLayer(FluxConceptLayer):
    """Concept tokens through a Flux single-stream block: one sequence ``[text, image]``,
    one set of projections, no output projection before the block's ``proj_out`` (maps are
    read in the attention space)."""

    kind = "single"

    def has_output_projection(self) -> bool:
        """The attention output goes straight into ``proj_out`` with the MLP branch."""
        return False

    def reads(self, spaces: Any) -> dict[str, tuple[Any, Any]]:
        """The block, ``to_k``/``to_v`` and the attention module's output."""
        reads = super().reads(())
        for space in spaces:
            reads[space] = (self.attn, "post")
        return reads

    def begin(self, stream: torch.Tensor, temb: torch.Tensor, rotary: Any) -> ConceptTokens:
        """The block's norm with ``temb``, its MLP branch, projections, qk-RMSNorm, RoPE."""
        block, attn = self.block, self.attn
        normed, gate = block.norm(stream, emb=temb)
        self._gate = gate
        self._mlp = block.act_mlp(linear(block.proj_mlp, normed))
        query, key, value = self.tokens(normed, attn.to_q, attn.to_k, attn.to_v)
        query = _concept_rope(norm(attn.norm_q, query), rotary)
        key = _concept_rope(norm(attn.norm_k, key), rotary)
        return ConceptTokens(query, key, value)

    def image_rows(self, tensor: torch.Tensor, n_text: int) -> torch.Tensor:
        """The image part of the joint sequence (the text comes first)."""
        return tensor[:, n_text:]

    def advance(self, stream: torch.Tensor, raw: torch.Tensor) -> torch.Tensor | None:
        """``FluxSingleTransformerBlock`` after attention: ``proj_out`` of both branches."""
        joined = torch.cat([raw.to(self._mlp.dtype), self._mlp], dim=2)
        stream = stream + self._gate.unsqueeze(1) * linear(self.block.proj_out, joined)
        return stream.clip(-65504, 65504) if stream.dtype == torch.float16 else stream


class FluxFamily(DenoiserFamily):
    """FLUX.1 transformers (double- and single-stream blocks)."""

    name = "flux"
    label = "Flux (FLUX.1 dev / schnell)"
    pipelines = ("FluxPipeline",)
    models = ("FluxTransformer2DModel",)
    denoiser_attr = "transformer"
    sample_arg = "hidden_states"
    normalisation = "joint_share"
    batch_free = frozenset({"txt_ids", "img_ids"})
    max_sequence_arg = "max_sequence_length"

    def attention_sites(self) -> dict[str, ProcessorFactory]:
        """Double-stream then single-stream blocks' ``attn``, in data-flow order."""
        t = self.denoiser
        sites: dict[str, ProcessorFactory] = {
            f"transformer_blocks.{i}.attn": FluxCaptureProcessor
            for i in range(len(t.transformer_blocks))
        }
        for i in range(len(t.single_transformer_blocks)):
            sites[f"single_transformer_blocks.{i}.attn"] = FluxCaptureProcessor
        return sites

    def concept_layers(self) -> list[ConceptLayer]:
        """Double-stream, then single-stream blocks' ``attn``."""
        t = self.denoiser
        layers: list[ConceptLayer] = [
            FluxConceptLayer(f"transformer_blocks.{i}.attn", b.attn, b)
            for i, b in enumerate(t.transformer_blocks)
        ]
        layers += [
            FluxSingleConceptLayer(f"single_transformer_blocks.{i}.attn", b.attn, b)
            for i, b in enumerate(t.single_transformer_blocks)
        ]
        return layers

    def text_length(self, call_kwargs: dict[str, Any]) -> int:
        """``max_sequence_length`` T5 positions."""
        return self._max_sequence_length(call_kwargs, FLUX_T5_LENGTH)

    def prompt_tokens(self, prompt: str, call_kwargs: dict[str, Any]) -> PromptTokens:
        """T5's positions (the pipeline's ``tokenizer_2``)."""
        return t5_tokens(self.pipe.tokenizer_2, prompt, self.text_length(call_kwargs))

    def cfg_layout(self, guidance_scale: float, call_kwargs: dict[str, Any]) -> CfgLayout:
        """``separate`` calls with ``true_cfg_scale > 1`` and a negative prompt, else none."""
        true_cfg = float(call_kwargs.get("true_cfg_scale", 1.0) or 1.0)
        negative = any(
            call_kwargs.get(name) is not None
            for name in ("negative_prompt", "negative_prompt_embeds")
        )
        if true_cfg > 1.0 and negative:
            return CfgLayout("separate", true_cfg)
        return CfgLayout("none", true_cfg)

    def guidance_argument(self) -> str:
        """Flux's classifier-free guidance scale is ``true_cfg_scale``."""
        return "true_cfg_scale"

    def patch_size(self) -> int:
        """The pipeline's 2x2 packing times the transformer's own patch (1)."""
        return PACK * int(getattr(self.denoiser.config, "patch_size", 1) or 1)

    def latent_channels(self) -> int:
        """The transformer takes 2x2-packed tokens of four latent cells each."""
        return int(self.denoiser.config.in_channels) // (PACK * PACK)

    def layout(self, call: DenoiserCall) -> LatentLayout:
        """The unpacked latent grid, read from ``img_ids`` (one row per token)."""
        ids = call.conditioning.get("img_ids")
        if ids is None:
            raise RuntimeError("the Flux transformer was called without img_ids")
        ids = ids.reshape(-1, ids.shape[-1])
        rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        return LatentLayout((PACK * rows, PACK * cols), PACK)

    def to_model_input(self, latents: torch.Tensor, layout: LatentLayout) -> torch.Tensor:
        """Pack ``[B, C, h, w]`` into ``[B, h/2 * w/2, 4C]`` as ``FluxPipeline`` does."""
        b, c, h, w = latents.shape
        x = latents.view(b, c, h // PACK, PACK, w // PACK, PACK).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)

    def to_latents(self, sample: torch.Tensor, layout: LatentLayout) -> torch.Tensor:
        """Unpack tokens ``[B, N, 4C]`` back to the ``[B, C, h, w]`` grid."""
        b, _, channels = sample.shape
        h, w = layout.latent_hw
        x = sample.view(b, h // PACK, w // PACK, channels // (PACK * PACK), PACK, PACK)
        return x.permute(0, 3, 1, 4, 2, 5).reshape(b, channels // (PACK * PACK), h, w)

    def explicit_attention(self, n_text: int) -> Any:
        """Explicit joint attention on every layer, for token relevance (records probabilities)."""
        return explicit_processors(
            self.denoiser, lambda path, records: FluxExplicitProcessor(path, records, n_text)
        )

    def cam_layers(self) -> list[str]:
        """Every double-stream, then every single-stream block."""
        t = self.denoiser
        return [f"transformer_blocks.{i}" for i in range(len(t.transformer_blocks))] + [
            f"single_transformer_blocks.{i}" for i in range(len(t.single_transformer_blocks))
        ]

    def block_tensor(self, path: str, output: Any) -> torch.Tensor:
        """Both block kinds return ``(text, image)``."""
        if isinstance(output, tuple) and len(output) == 2:
            return output[1]
        return super().block_tensor(path, output)
