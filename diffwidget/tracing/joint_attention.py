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
"""

from __future__ import annotations

import torch

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
    n_heads, n_queries, _ = query.shape
    keys = key.float().transpose(1, 2)
    chunk = query_chunk(n_heads, keys.shape[-1], limit_bytes)
    rows = []
    for start in range(0, n_queries, chunk):
        # One score block per chunk, worked on in place: exp(s - max) / sum = exp(s - LSE).
        scores = torch.matmul(query[:, start : start + chunk].float() * scale, keys)
        scores.sub_(scores.amax(dim=-1, keepdim=True)).exp_()
        block = scores[..., text] / scores.sum(dim=-1, keepdim=True)
        rows.append(block if heads else block.mean(dim=0))
    return torch.cat(rows, dim=1 if heads else 0)
