"""ConceptAttention's arithmetic, and the per-layer hooks that feed it (family-agnostic).

ConceptAttention (Helbling et al., ICML 2025) adds *concept tokens* — any words, embedded
by the model's own text encoders — to every joint-attention layer of a DiT. They go
through the layer exactly as the prompt's text tokens do (the same modulation, projections,
qk-norms and RoPE, the same output projection, gates and feed-forward), with one change:

* the image never attends to them (the image tokens' attention, hence the image, is
  untouched: everything here runs on the side of the model's own call);
* a concept query attends over ``[image keys, concept keys]`` — not the prompt's text keys;
  its output is the concept's *attention output* ``o_c``.

The map of a concept at a layer is the image tokens' attention outputs ``o_x`` (the layer's
own, as the model computed them) projected onto the concepts' outputs, softmax over the
concepts: ``softmax_c(o_x · o_c)``, in the *output space* — after the layer's output
projection for the image stream and its context output projection for the concepts where
the layer has both — or in the *attention space* (before them).

For cross-attention (UNets, PixArt) there are no concept queries: a concept's output is
what the layer would write if the image attended to the concept alone, its value vector
``v_c`` (projected through the output projection in the output space).

This module holds the arithmetic (:func:`image_scores`, :func:`attend`, :func:`projections`)
and :class:`ConceptLayer`, the base of the families' concept layers: which submodules a
layer is read at, and the hooks that hand each tensor to the family's code as soon as the
model made it, so that no image-sized tensor is kept beyond its time. Image keys are
normalised, rotated and scored in token chunks bounded by
:data:`~diffwidget.tracing.joint_attention.CHUNK_BYTES`; the joint softmax is never formed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook

from diffwidget.tracing.joint_attention import CHUNK_BYTES
from diffwidget.tracing.model_hooks import attach_hook, detach_hook

if TYPE_CHECKING:
    from torch import nn

#: Where a concept map is read: after the layer's output projections, or before them.
Space = Literal["output", "attention"]
SPACES: tuple[str, ...] = get_args(Space)
#: Bound on one chunk of float32 image keys or values formed on the side; qk-norm and RoPE
#: make a few blocks of this size (a quarter of the joint capture's score chunk).
KEY_CHUNK_BYTES = CHUNK_BYTES // 8
#: Largest copy of a layer's query, key and value weights kept to project concept tokens in
#: one product. Beyond it the projections run one by one on the layer's own weights: the
#: copy would be as large as the weights (113 MB a layer in Flux), for a few concept tokens.
FUSED_WEIGHT_BYTES = KEY_CHUNK_BYTES
#: When a hook reads its module: its input, its output, or both (a block).
When = Literal["pre", "post", "both"]
_FLOAT32_BYTES = 4


@dataclass
class ConceptTokens:
    """The concept tokens of one layer, as the layer's attention sees them.

    Attributes
    ----------
    query : Tensor, shape (batch, heads, n_concepts, head_dim), optional
        After qk-norm and RoPE (None for cross-attention: concepts do not query there).
    key, value : Tensor, shape (batch, heads, n_concepts, head_dim)
        Keys after qk-norm and RoPE; values as projected.
    """

    query: torch.Tensor | None
    key: torch.Tensor
    value: torch.Tensor


def heads_first(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[B, n, H * d]`` -> ``[B, H, n, d]`` (a view).

    Examples
    --------
    >>> heads_first(torch.zeros(1, 5, 8), 4).shape
    torch.Size([1, 2, 5, 4])
    """
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def token_chunk(heads: int, width: int, limit_bytes: int = KEY_CHUNK_BYTES) -> int:
    """Tokens per chunk so that a float32 ``heads x chunk x width`` block stays in bounds."""
    return max(1, limit_bytes // max(1, heads * width * _FLOAT32_BYTES))


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 else x.float()


@torch.no_grad()
def image_scores(
    query: torch.Tensor,
    raw_keys: torch.Tensor,
    head_dim: int,
    prepare: Callable[[torch.Tensor, slice], torch.Tensor],
    scale: float,
    *,
    limit_bytes: int = KEY_CHUNK_BYTES,
) -> torch.Tensor:
    """Concept queries against image keys, ``q_c · k_x * scale``, in image-token chunks.

    Parameters
    ----------
    query : Tensor, shape (B, heads, n_concepts, head_dim)
        Concept queries as the layer would use them.
    raw_keys : Tensor, shape (B, n_image, heads * head_dim)
        The image tokens' key projections as the layer made them (before qk-norm, RoPE).
    head_dim : int
        Width of one head.
    prepare : callable
        ``prepare(keys [B, H, n, d], tokens)`` applies the layer's qk-norm and RoPE to the
        image tokens ``tokens`` (a slice of ``0..n_image``).
    scale : float
        The softmax scale.
    limit_bytes : int
        Bound on one chunk of float32 keys (their norm and RoPE make a few such blocks).

    Returns
    -------
    Tensor of float32, shape (B, heads, n_concepts, n_image)

    Examples
    --------
    >>> q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 7, 8)
    >>> s = image_scores(q, k, 4, lambda keys, tokens: keys, 0.5, limit_bytes=64)
    >>> ref = q @ k.view(1, 7, 2, 4).transpose(1, 2).transpose(2, 3) * 0.5
    >>> bool(torch.allclose(s, ref, atol=1e-6))
    True
    """
    batch, n_heads = query.shape[:2]
    n_image = raw_keys.shape[1]
    chunk = token_chunk(batch * n_heads, head_dim, limit_bytes)
    q = _float(query) * scale
    out = []
    for start in range(0, n_image, chunk):
        tokens = slice(start, min(start + chunk, n_image))
        keys = prepare(heads_first(raw_keys[:, tokens], head_dim), tokens)
        out.append(torch.matmul(q, _float(keys).transpose(-1, -2)))
    return out[0] if len(out) == 1 else torch.cat(out, dim=-1)


@torch.no_grad()
def attend(
    scores_image: torch.Tensor,
    raw_values: torch.Tensor,
    concepts: ConceptTokens,
    scale: float,
    *,
    limit_bytes: int = KEY_CHUNK_BYTES,
) -> torch.Tensor:
    """Concept outputs: each concept query's softmax over ``[image keys, concept keys]``
    applied to ``[image values, concept values]``.

    Parameters
    ----------
    scores_image : Tensor of float32, shape (B, heads, n_concepts, n_image)
        :func:`image_scores`.
    raw_values : Tensor, shape (B, n_image, heads * head_dim)
        The image tokens' value projections (values take no norm and no RoPE).
    concepts : ConceptTokens
        The concepts' own queries, keys and values.
    scale : float
        The softmax scale.
    limit_bytes : int
        Bound on one chunk of float32 values.

    Returns
    -------
    Tensor of float32, shape (B, n_concepts, heads * head_dim)
        The concepts' attention outputs, heads side by side as the layer joins them.
    """
    assert concepts.query is not None
    batch, n_heads, n_concepts, head_dim = concepts.value.shape
    scores_self = torch.matmul(
        _float(concepts.query) * scale, _float(concepts.key).transpose(-1, -2)
    )
    probs = torch.cat([scores_image, scores_self], dim=-1).softmax(dim=-1)
    n_image = scores_image.shape[-1]
    out = torch.matmul(probs[..., n_image:], _float(concepts.value))
    chunk = token_chunk(batch * n_heads, head_dim, limit_bytes)
    for start in range(0, n_image, chunk):
        tokens = slice(start, min(start + chunk, n_image))
        values = _float(heads_first(raw_values[:, tokens], head_dim))
        out = out + torch.matmul(probs[..., tokens], values)
    return out.transpose(1, 2).reshape(batch, n_concepts, n_heads * head_dim)


@torch.no_grad()
def projections(image: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
    """Image outputs projected onto concept outputs: ``o_x · o_c`` (float32).

    Parameters
    ----------
    image : Tensor, shape (B, n_image, width)
    concepts : Tensor, shape (B or 1, n_concepts, width)

    Returns
    -------
    Tensor of float32, shape (B, n_image, n_concepts)
        Scores; the map is their softmax over the concepts (taken when a result is built,
        so that a layer average can be taken either side of it).
    """
    return torch.matmul(_float(image), _float(concepts).transpose(-1, -2))


def argument(args: tuple[Any, ...], kwargs: dict[str, Any], name: str, index: int) -> Any:
    """A module call's argument ``name`` (keyword, or positional at ``index``)."""
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


class _Hook(ModelHook):
    """A diffusers ``ModelHook`` that hands a module's input and/or output to callables."""

    def __init__(
        self,
        before: Callable[[tuple[Any, ...], dict[str, Any]], None] | None,
        after: Callable[[Any], None] | None,
    ) -> None:
        super().__init__()
        self.before = before
        self.after = after

    def pre_forward(self, module: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if self.before is not None:
            self.before(args, kwargs)
        return args, kwargs

    def post_forward(self, module: Any, output: Any) -> Any:
        if self.after is not None:
            self.after(output)
        return output


class ConceptLayer:
    """One attention layer's concept computation (each family subclasses it).

    The observer (:class:`~diffwidget.tracing.concepts.ConceptTap`) hooks the submodules
    :meth:`reads` names and, per denoiser call, hands the prompt's rows of what the model
    made to the family's code: :meth:`begin` (the concept tokens of this layer, from the
    concept stream and the block's ``temb``), :meth:`prepare_keys` (the layer's qk-norm and
    RoPE on image keys), :meth:`concept_output` and :meth:`advance` (the rest of the block
    for the concept stream). Every projection on the concept side calls the layer's weights
    directly (:func:`linear`), so no hook on the model — the trace's own included — ever
    sees a concept token.

    Parameters
    ----------
    path : str
        The attention module's path (the trace's attention layer name).
    attn : nn.Module
        The attention module.
    block : nn.Module, optional
        The block whose call carries ``temb`` (joint layers).
    """

    #: ``"joint"`` (two streams), ``"single"`` (Flux's one-stream blocks) or ``"cross"``.
    kind: str = "joint"

    def __init__(self, path: str, attn: Any, block: Any = None) -> None:
        self.path = path
        self.attn = attn
        self.block = block
        head_dim = getattr(attn, "head_dim", None)
        #: Width of one attention head.
        self.head_dim = int(head_dim if head_dim is not None else attn.inner_dim // attn.heads)
        #: The softmax scale of the layer's SDPA call (its default, ``1 / sqrt(d)``).
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self._attached: list[tuple[Any, str, bool, bool]] = []
        self._fused: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._projected: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------ what the family says
    def tokens(self, x: torch.Tensor, *layers: Any) -> tuple[torch.Tensor, ...]:
        """``layers`` (the query, key and value projections) applied to concept tokens
        ``[B, n, D]``, each split into heads ``[B, H, n, d]``: in one matrix product with a
        fused copy of the weights where it is at most :data:`FUSED_WEIGHT_BYTES`, else one
        product per layer."""
        size = sum(layer.weight.nelement() * layer.weight.element_size() for layer in layers)
        if size > FUSED_WEIGHT_BYTES:
            return tuple(heads_first(linear(layer, x), self.head_dim) for layer in layers)
        if self._fused is None:
            weight = torch.cat([layer.weight for layer in layers])
            biases = [layer.bias for layer in layers]
            bias = None
            if any(b is not None for b in biases):
                bias = torch.cat(
                    [
                        b if b is not None else weight.new_zeros(layer.weight.shape[0])
                        for b, layer in zip(biases, layers, strict=True)
                    ]
                )
            self._fused = (weight, bias)
        weight, bias = self._fused
        out = F.linear(x.to(weight.dtype), weight, bias)
        return tuple(heads_first(part, self.head_dim) for part in out.chunk(len(layers), dim=-1))

    def has_output_projection(self) -> bool:
        """Whether both streams have an output projection (the output space exists)."""
        return output_module(self.attn) is not None

    def stored_width(self, spaces: Sequence[Space]) -> int:
        """Numbers a buffered step keeps per image token: keys, values (joint layers) and
        the image output in each space."""
        inner = int(self.attn.heads) * self.head_dim
        out = output_module(self.attn)
        width = 0 if self.kind == "cross" else 2 * inner
        for space in spaces:
            projected = space == "output" and self.has_output_projection() and out is not None
            width += int(out.out_features) if projected else inner
        return width

    def reads(self, spaces: Sequence[Space]) -> dict[str, tuple[nn.Module, When]]:
        """What to hook: ``"block"``, the projections (``"key"``, ``"value"`` or fused
        ``"qkv"``) and, per space, the image output (``"pre"``: a module's input,
        ``"post"``: its output)."""
        reads: dict[str, tuple[nn.Module, When]] = {}
        if self.block is not None:
            reads["block"] = (self.block, "both")
        reads.update(projection_reads(self.attn))
        out = output_module(self.attn)
        for space in spaces:
            projected = space == "output" and self.has_output_projection()
            reads[space] = (out, "post" if projected else "pre")
        return reads

    def begin(self, stream: torch.Tensor, temb: torch.Tensor, rotary: Any) -> ConceptTokens:
        """Modulate the concept stream ``[1, n, D]`` with ``temb`` ``[1, D']`` and project
        it to this layer's concept tokens (what :meth:`advance` needs is kept)."""
        raise NotImplementedError

    def prepare_keys(
        self, keys: torch.Tensor, tokens: slice, rotary: Any, n_text: int
    ) -> torch.Tensor:
        """The layer's qk-norm and RoPE on the keys ``[H, n, d]`` of image ``tokens``."""
        return norm(getattr(self.attn, "norm_k", None), keys)

    def image_rows(self, tensor: torch.Tensor, n_text: int) -> torch.Tensor:
        """The image tokens of a projection or an output ``[S, D]`` the hooks saw."""
        return tensor

    def concept_output(self, raw: torch.Tensor, space: Space) -> torch.Tensor:
        """The concepts' attention output ``[n, D]`` in ``space``."""
        if space == "output" and self.has_output_projection():
            return self.projected(raw)
        return raw

    def projected(self, raw: torch.Tensor) -> torch.Tensor:
        """:meth:`project` of ``raw``, computed once per concept output."""
        if self._projected is None or self._projected[0] is not raw:
            self._projected = (raw, self.project(raw))
        return self._projected[1]

    def project(self, raw: torch.Tensor) -> torch.Tensor:
        """The concepts' output projection (the context one of a joint layer)."""
        raise NotImplementedError

    def advance(self, stream: torch.Tensor, raw: torch.Tensor) -> torch.Tensor | None:
        """The concept stream after this block (gate, residual, feed-forward), from the
        concepts' attention output ``raw`` ``[n, D]``; None where the text stream ends."""
        raise NotImplementedError

    def cross_output(self, embeds: torch.Tensor) -> torch.Tensor:
        """Cross-attention layers: the concepts' values ``[n, D]`` from their embeddings."""
        raise NotImplementedError

    # ------------------------------------------------------------ hooks
    def attach(
        self,
        module: nn.Module,
        name: str,
        before: Callable[[tuple[Any, ...], dict[str, Any]], None] | None,
        after: Callable[[Any], None] | None,
    ) -> None:
        """Hook ``module`` (removed by :meth:`detach`)."""
        had = (hasattr(module, "_diffusers_hook"), "forward" in vars(module))
        attach_hook(module, _Hook(before, after), name)
        self._attached.append((module, name, *had))

    def detach(self) -> None:
        """Remove every hook this layer attached (last first) and drop what it cached."""
        self._fused = self._projected = None
        while self._attached:
            module, name, had_registry, had_forward = self._attached.pop()
            detach_hook(module, name, had_registry=had_registry, had_forward=had_forward)


def output_module(attn: Any) -> Any:
    """The output projection ``to_out[0]`` of an attention module, or None."""
    to_out = getattr(attn, "to_out", None)
    if to_out is None:
        return None
    return to_out[0] if isinstance(to_out, torch.nn.ModuleList) else to_out


def projection_reads(attn: Any) -> dict[str, tuple[nn.Module, When]]:
    """The image key and value projections of a layer: ``to_k`` and ``to_v``, or the fused
    ``to_qkv`` (``fuse_qkv_projections()``)."""
    if getattr(attn, "fused_projections", False) and getattr(attn, "to_qkv", None) is not None:
        return {"qkv": (attn.to_qkv, "post")}
    return {"key": (attn.to_k, "post"), "value": (attn.to_v, "post")}


def norm(module: Any, x: torch.Tensor) -> torch.Tensor:
    """A qk-norm module applied to concept tokens or image keys, in float32.

    diffusers' ``RMSNorm`` (the qk-norm of SD3.5, Flux and the embedded DiT) is computed by
    torch's fused ``rms_norm`` with the module's weight and eps (the same formula, a tenth of
    the module's Python cost); other norms run as they are. ``None`` leaves ``x`` as it is.
    """
    if module is None:
        return _float(x)
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "RMSNorm" and getattr(module, "bias", None) is None:
        return F.rms_norm(
            _float(x), (x.shape[-1],), None if weight is None else _float(weight), module.eps
        )
    return _float(module(x))


def linear(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` for a ``Linear`` without its hooks (concept tokens stay unseen)."""
    weight = layer.weight
    return F.linear(x if x.dtype == weight.dtype else x.to(weight.dtype), weight, layer.bias)


def rope(x: torch.Tensor, rotary: Any, rows: slice | torch.Tensor) -> torch.Tensor:
    """Flux's RoPE on ``x`` ``[B, H, n, d]`` with the joint sequence's angles at ``rows``."""
    from diffusers.models.embeddings import apply_rotary_emb

    if rotary is None:
        return x
    cos, sin = rotary
    return apply_rotary_emb(x, (cos[rows], sin[rows]), sequence_dim=2)  # type: ignore[arg-type, return-value]
