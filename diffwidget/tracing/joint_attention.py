"""Image→text attention probabilities of a joint (MMDiT) attention layer, bounded in memory.

In SD3 and Flux the image and the text tokens attend jointly: each image query's softmax
runs over *all* keys, image and text. The image→text block of that softmax is

    P[i, j] = exp(q_i · k_j · scale - LSE_i),    LSE_i = log Σ_all keys exp(q_i · k · scale),

for image queries ``i`` and text keys ``j``. Only that block is kept, so the
``N_img × N_img`` image block is never stored: queries are processed in chunks, each chunk
forming its scores against all keys once (``heads × chunk × N_keys`` floats, bounded by
:data:`CHUNK_BYTES`, and worked on in place, so no second block is allocated), reducing
them to the log-sum-exp and keeping the text columns.
Rows therefore sum to the patch's *text share* of attention, not to 1 (``"joint_share"``);
:data:`~diffwidget.tracing.trace.NORMALISATIONS` names both conventions a trace can hold.

The log-sum-exp is what makes this cost something: it needs every ``q_i · k`` over all
keys, as many scores as the layer's own attention forms for its image queries. The
layer's own SDPA kernel computes it anyway. So where the layer calls
``torch.nn.functional.scaled_dot_product_attention`` and SDPA would pick a kernel that can
hand it back (the flash kernels, on the CPU and on CUDA), :func:`sdpa_with_lse` calls
*that* kernel exactly as SDPA does (same arguments, so the same output, bit for bit) and
keeps its log-sum-exp; :func:`text_probs_from_lse` then needs only the
``N_img × N_text`` scores. Anywhere else (another backend or attention dispatcher, a mask,
dropout, gradients) the layer's call runs untouched and :func:`image_to_text_probs` forms
the log-sum-exp again in query chunks. Both give the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend

#: ``torch._fused_sdp_choice``'s number for the flash kernels (``SDPBackend.FLASH_ATTENTION``).
FLASH = int(SDPBackend.FLASH_ATTENTION)  # type: ignore[call-overload]
#: Upper bound on the float32 score block one query chunk forms (``heads x chunk x keys``).
CHUNK_BYTES = 64 * 2**20
_FLOAT32_BYTES = 4


def query_chunk(heads: int, n_keys: int, limit_bytes: int = CHUNK_BYTES) -> int:
    """Queries per chunk so that one score block stays within ``limit_bytes``."""
    return max(1, limit_bytes // max(1, heads * n_keys * _FLOAT32_BYTES))


@torch.no_grad()
def image_to_text_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    text: slice,
    scale: float,
    *,
    limit_bytes: int = CHUNK_BYTES,
    heads: bool = False,
) -> torch.Tensor:
    """Mean over heads of the joint softmax's image→text block, in query chunks.

    Parameters
    ----------
    query : Tensor, shape (heads, n_image_queries, head_dim)
        Image queries exactly as the layer uses them (after qk-norm and RoPE).
    key : Tensor, shape (heads, n_keys, head_dim)
        All keys of the joint sequence (image and text), after qk-norm and RoPE.
    text : slice
        Positions of the text keys inside ``key``.
    scale : float
        The softmax scale (``1 / sqrt(head_dim)`` for SDPA's default).
    limit_bytes : int
        Bound on one chunk's score block.
    heads : bool
        Keep every head: ``(heads, n_image_queries, n_text)`` instead of the mean.

    Returns
    -------
    Tensor of float32, shape (n_image_queries, n_text)

    Examples
    --------
    >>> q, k = torch.randn(2, 6, 4), torch.randn(2, 9, 4)
    >>> p = image_to_text_probs(q, k, slice(6, 9), 0.5)
    >>> full = (q @ k.transpose(1, 2) * 0.5).softmax(-1)[:, :, 6:9].mean(0)
    >>> bool(torch.allclose(p, full, atol=1e-6))
    True
    """

    def block(scores: torch.Tensor, rows: slice) -> torch.Tensor:
        # Worked on in place: exp(s - max) / sum = exp(s - LSE).
        scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
        return scores[..., text] / scores.sum(dim=-1, keepdim=True)

    return _in_query_chunks(query, key, scale, block, limit_bytes, heads)


def _in_query_chunks(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float,
    block: Callable[[torch.Tensor, slice], torch.Tensor],
    limit_bytes: int,
    heads: bool,
) -> torch.Tensor:
    """``block(q_chunk · keyᵀ · scale, rows)`` over query chunks, joined (mean over heads
    unless ``heads``); one chunk's float32 scores stay within ``limit_bytes``."""
    n_heads, n_queries, _ = query.shape
    keys = key.float().transpose(1, 2)
    chunk = query_chunk(n_heads, keys.shape[-1], limit_bytes)
    out = []
    for start in range(0, n_queries, chunk):
        rows = slice(start, start + chunk)
        probs = block(torch.matmul(query[:, rows].float() * scale, keys), rows)
        out.append(probs if heads else probs.mean(dim=0))
    return torch.cat(out, dim=1 if heads else 0)


@dataclass
class SdpaCall:
    """What one SDPA call of a layer saw, with its kernel's log-sum-exp.

    Attributes
    ----------
    query, key : Tensor, shape (batch, heads, n, head_dim)
        SDPA's inputs, exactly as the layer passed them (after qk-norm and RoPE).
    lse : Tensor of float32, shape (batch, heads, n_queries)
        ``log Σ_keys exp(q · k · scale)`` per query, as the kernel computed it.
    scale : float
        The softmax scale the kernel used.
    """

    query: torch.Tensor
    key: torch.Tensor
    lse: torch.Tensor
    scale: float


def sdpa_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[torch.Tensor, SdpaCall] | None:
    """``F.scaled_dot_product_attention(...)`` and its log-sum-exp, or ``None``.

    Runs the kernel SDPA itself chooses for these inputs (``torch._fused_sdp_choice``) when
    that is a flash kernel, called as SDPA calls it, so the output is SDPA's bit for bit.
    ``None`` (the caller then runs SDPA as usual) for masks, dropout, causal or grouped
    attention, inputs that need gradients and every other kernel.

    Examples
    --------
    >>> q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    >>> out, call = sdpa_with_lse(q, k, v)
    >>> torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    True
    >>> ref = torch.logsumexp(q @ k.transpose(-1, -2) / 8**0.5, dim=-1)
    >>> bool(torch.allclose(call.lse, ref, atol=1e-5))
    True
    """
    if attn_mask is not None or dropout_p or is_causal or enable_gqa:
        return None
    tensors = (query, key, value)
    if any(t.ndim != 4 for t in tensors) or not (
        query.shape[:2] == key.shape[:2] == value.shape[:2]
    ):
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None
    choose = getattr(torch, "_fused_sdp_choice", None)
    try:
        choice = choose(query, key, value, None, 0.0, False, scale=scale) if choose else None
    except RuntimeError:
        return None
    if choice != FLASH:
        return None
    used = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    aten = torch.ops.aten
    try:
        if query.device.type == "cpu":
            out, lse = aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, 0.0, False, scale=scale
            )
        elif query.device.type == "cuda" and query.shape[-1] % 8 == 0:
            # SDPA pads the head dimension to a multiple of 8 first; 8k-wide heads need none.
            out, lse = aten._scaled_dot_product_flash_attention(
                query, key, value, 0.0, False, False, scale=used
            )[:2]
        else:
            return None
    except (AttributeError, NotImplementedError, RuntimeError):  # a torch without these ops
        return None
    return out, SdpaCall(query, key, lse, used)


@torch.no_grad()
def text_probs_from_lse(
    query: torch.Tensor,
    text_key: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    *,
    limit_bytes: int = CHUNK_BYTES,
    heads: bool = False,
) -> torch.Tensor:
    """The image→text block ``exp(q · k_text · scale - LSE)`` from a known log-sum-exp.

    Parameters
    ----------
    query : Tensor, shape (heads, n_image_queries, head_dim)
        Image queries as the layer used them.
    text_key : Tensor, shape (heads, n_text, head_dim)
        Text keys as the layer used them.
    lse : Tensor, shape (heads, n_image_queries)
        Each query's log-sum-exp over *all* keys (:attr:`SdpaCall.lse`).
    scale, limit_bytes, heads
        As in :func:`image_to_text_probs`.

    Returns
    -------
    Tensor of float32, shape (n_image_queries, n_text), or (heads, ...) with ``heads``

    Examples
    --------
    >>> q, k = torch.randn(2, 6, 4), torch.randn(2, 9, 4)
    >>> lse = torch.logsumexp(q @ k.transpose(1, 2) * 0.5, dim=-1)
    >>> p = text_probs_from_lse(q, k[:, 6:], lse, 0.5)
    >>> bool(torch.allclose(p, image_to_text_probs(q, k, slice(6, 9), 0.5), atol=1e-6))
    True
    """

    def block(scores: torch.Tensor, rows: slice) -> torch.Tensor:
        return scores.sub_(lse[:, rows, None].float()).exp_()

    return _in_query_chunks(query, text_key, scale, block, limit_bytes, heads)
