"""SD3 joint attention's arithmetic, shared by every place that writes the processor out.

diffusers' ``JointAttnProcessor2_0`` projects image and text tokens each with its own weights
and query/key norms, attends over ``[image, text]`` and projects each stream's output back.
The embedded DiT's training processor, its browser export and the tracer's explicit-softmax
processor all compute the same projections: :func:`joint_qkv` and :func:`joint_outputs`.
"""

from __future__ import annotations

from typing import Any


def joint_qkv(
    attn: Any, hidden_states: Any, encoder_hidden_states: Any = None
) -> tuple[Any, Any, Any]:
    """Queries, keys and values of SD3 joint attention, heads first, image tokens then text.

    Each stream through its own projections and query/key norms, as diffusers'
    ``JointAttnProcessor2_0`` computes them: ``[batch, heads, n_image + n_text, head_dim]``;
    the image tokens alone when there is no text (SD3.5's image-only ``attn2``).
    """
    import torch

    batch = hidden_states.shape[0]

    def heads(x: Any) -> Any:
        return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

    query, key = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states))
    value = heads(attn.to_v(hidden_states))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if encoder_hidden_states is None:
        return query, key, value
    text_query = heads(attn.add_q_proj(encoder_hidden_states))
    text_key = heads(attn.add_k_proj(encoder_hidden_states))
    text_value = heads(attn.add_v_proj(encoder_hidden_states))
    if attn.norm_added_q is not None:
        text_query = attn.norm_added_q(text_query)
    if attn.norm_added_k is not None:
        text_key = attn.norm_added_k(text_key)
    return (
        torch.cat([query, text_query], dim=2),
        torch.cat([key, text_key], dim=2),
        torch.cat([value, text_value], dim=2),
    )


def joint_outputs(attn: Any, out: Any, n_image: int) -> tuple[Any, Any]:
    """The image and text outputs of joint attention ``out`` (heads first), projected."""
    batch, n_heads, _, head_dim = out.shape
    out = out.transpose(1, 2).reshape(batch, -1, n_heads * head_dim)
    image_out, text_out = out[:, :n_image], out[:, n_image:]
    if not attn.context_pre_only:
        text_out = attn.to_add_out(text_out)
    return attn.to_out[1](attn.to_out[0](image_out)), text_out
