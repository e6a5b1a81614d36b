"""ConceptAttention computed from its definition, independently of diffwidget's concept code.

The concept words are appended to the prompt's text and the denoiser runs once with
processors that form the full softmax of every attention layer under ConceptAttention's
mask: image and text queries never see the concept keys; concept queries see the image
keys and the concept keys, never the text's. Everything else — the text embedder, the
context modulation, projections, qk-norms, RoPE, output projections, gates and
feed-forward of every block — is the model's own code, which treats the concept tokens
exactly as text. Each layer's image and concept attention outputs are recorded before and
after the output projections; scores are ``image @ concepts.T``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

#: Record: layer path -> {"attention": scores, "output": scores or None}.
Scores = dict[str, dict[str, torch.Tensor | None]]


def _heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, s, _ = x.shape
    return x.view(b, s, n_heads, -1).transpose(1, 2)


def _masked_softmax_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    allowed: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + bias)`` over the allowed keys, times the values:
    ``[B, S, H*d]``."""
    scores = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
    if bias is not None:
        scores = scores + bias
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    out = probs @ value
    return out.transpose(1, 2).flatten(2)


def concept_mask(n: int, text: slice, concepts: slice) -> torch.Tensor:
    """Who may attend to whom in a sequence of ``n`` tokens holding text and concepts."""
    allowed = torch.ones(n, n, dtype=torch.bool)
    rows = torch.ones(n, dtype=torch.bool)
    rows[concepts] = False
    allowed[rows.nonzero()[:, 0][:, None], torch.arange(n)[concepts]] = False
    allowed[concepts, text] = False
    return allowed


class SD3Reference:
    """``JointAttnProcessor2_0`` ([image, text + concepts]) with the mask and full softmax."""

    def __init__(self, path: str, n_text: int, n_concepts: int, seen: Scores) -> None:
        self.path, self.n_text, self.n_concepts, self.seen = path, n_text, n_concepts, seen

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        assert encoder_hidden_states is not None
        n_image, heads = hidden_states.shape[1], attn.heads
        q, k, v = (_heads(p(hidden_states), heads) for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        e = encoder_hidden_states
        eq, ek, ev = (
            _heads(p(e), heads) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
        )
        if attn.norm_added_q is not None:
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
        start = n_image + self.n_text
        n = start + self.n_concepts
        allowed = concept_mask(n, slice(n_image, start), slice(start, n))
        out = _masked_softmax_attention(
            torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v, ev], 2), allowed
        )
        image, context = out[:, :n_image], out[:, n_image:]
        image_out = attn.to_out[1](attn.to_out[0](image))
        concepts = context[:, self.n_text :]
        entry: dict[str, torch.Tensor | None] = {"attention": image @ concepts.transpose(1, 2)}
        if attn.context_pre_only:
            entry["output"] = None
            self.seen[self.path] = entry
            return image_out, context
        context = attn.to_add_out(context)
        entry["output"] = image_out @ context[:, self.n_text :].transpose(1, 2)
        self.seen[self.path] = entry
        return image_out, context


class FluxReference:
    """``FluxAttnProcessor`` ([text + concepts, image], RoPE) with the mask and full softmax."""

    def __init__(self, path: str, n_text: int, n_concepts: int, seen: Scores) -> None:
        self.path, self.n_text, self.n_concepts, self.seen = path, n_text, n_concepts, seen

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> Any:
        from diffusers.models.embeddings import apply_rotary_emb

        heads = attn.heads
        q, k, v = (_heads(p(hidden_states), heads) for p in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            e = encoder_hidden_states
            projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            eq, ek, ev = (_heads(p(e), heads) for p in projections)
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], 2), torch.cat([ek, k], 2), torch.cat([ev, v], 2)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=2)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=2)
        t, c = self.n_text, self.n_concepts
        n = q.shape[2]
        out = _masked_softmax_attention(q, k, v, concept_mask(n, slice(0, t), slice(t, t + c)))
        image, concepts = out[:, t + c :], out[:, t : t + c]
        entry: dict[str, torch.Tensor | None] = {"attention": image @ concepts.transpose(1, 2)}
        if encoder_hidden_states is None:  # single-stream: no output projection here
            entry["output"] = None
            self.seen[self.path] = entry
            return out
        image_out = attn.to_out[1](attn.to_out[0](image))
        context = attn.to_add_out(out[:, : t + c])
        entry["output"] = image_out @ context[:, t:].transpose(1, 2)
        self.seen[self.path] = entry
        return image_out, context


class CrossReference:
    """diffusers' ``AttnProcessor`` (explicit softmax) recording the image output; the
    concepts' outputs are their value vectors, through ``to_v`` and ``to_out`` modules."""

    def __init__(self, path: str, concepts: torch.Tensor, seen: Scores) -> None:
        self.path, self.concepts, self.seen = path, concepts, seen

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        assert encoder_hidden_states is not None
        text = encoder_hidden_states
        concepts = self.concepts
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
            concepts = attn.norm_encoder_hidden_states(concepts)
        q = _heads(attn.to_q(hidden_states), attn.heads)
        k, v = _heads(attn.to_k(text), attn.heads), _heads(attn.to_v(text), attn.heads)
        allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool)
        bias = None
        if attention_mask is not None:  # PixArt's text padding mask
            batch = hidden_states.shape[0]
            bias = attn.prepare_attention_mask(attention_mask, k.shape[2], batch)
            bias = bias.view(batch, attn.heads, -1, bias.shape[-1])
        image = _masked_softmax_attention(q, k, v, allowed, bias)
        image_out = attn.to_out[0](image)
        values = attn.to_v(concepts)
        self.seen[self.path] = {
            "attention": image @ values.transpose(1, 2),
            "output": image_out @ attn.to_out[0](values).transpose(1, 2),
        }
        return attn.to_out[1](image_out) / attn.rescale_output_factor


@contextmanager
def processors(denoiser: Any, made: dict[str, Any]) -> Iterator[None]:
    """The given processors on the given attention modules, the originals back after."""
    modules = dict(denoiser.named_modules())
    saved = {path: modules[path].processor for path in made}
    try:
        for path, processor in made.items():
            modules[path].set_processor(processor)
        yield
    finally:
        for path, processor in saved.items():
            modules[path].set_processor(processor)
