"""Attention capture that wraps, never replaces, each text→image attention processor.

The layer's original processor (SDPA, xformers, sliced, diffusers' attention dispatcher,
...) still computes the layer's output, so a traced image is bit-identical to an untraced
one and fast kernels are kept. On the side, for the *conditional* CFG half only, a capture
processor recomputes the query and key projections exactly as the layer applies them and
keeps the image→text probabilities averaged over heads, for the selected token positions,
in float16, on the device (no host sync inside the denoising loop).

This module holds what every denoiser family shares: the per-step storage
(:class:`AttentionRecorder`), the wrapping processor (:class:`CaptureAttnProcessor`), the
install/restore of processors (:class:`AttentionCapture`) and the cross-attention math of
UNet- and PixArt-style ``attn2`` layers (:func:`attention_probs`). Joint (MMDiT) attention
lives in :mod:`diffwidget.tracing.joint_attention`; which layers are captured, and how, is
each family's (:mod:`diffwidget.tracing.families`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from diffwidget.tracing.cfg import CfgLayout

#: Cross-attention layers are the ``attn2`` of each transformer block.
CROSS_ATTENTION_NAME = "attn2"


class AttentionRecorder:
    """Per-step, per-layer storage shared by all capture processors of one trace.

    Parameters
    ----------
    token_indices : list of int, optional
        Token positions to keep; ``None`` keeps all.
    """

    def __init__(
        self,
        token_indices: list[int] | None,
        cfg: CfgLayout | None = None,
        *,
        keep_heads: bool = False,
    ) -> None:
        self.token_indices = token_indices
        #: Also keep each head's probabilities (``Trace.attention_heads``).
        self.keep_heads = keep_heads
        self.head_maps: dict[str, list[torch.Tensor]] = {}
        self.cfg = cfg if cfg is not None else CfgLayout("batched", 2.0)
        #: False while the denoiser runs a call whose probabilities are not kept (the
        #: unconditional call of separate-call CFG).
        self.active = True
        #: Text positions of the running denoiser call (the observer sets it per call;
        #: Flux's single-stream layers see one joined sequence and need it).
        self.text_length: int | None = None
        #: ``cache_context`` name of the running call (separate-call CFG).
        self.label: str | None = None
        self.step = 0
        self.maps: dict[str, list[torch.Tensor]] = {}
        self.n_tokens_total: int | None = None
        #: ``encoder_hidden_states`` of the first captured call, in the pipeline's batch order.
        self.encoder_hidden_states: torch.Tensor | None = None
        self._index_cache: dict[torch.device, torch.Tensor] = {}

    def _indices(self, device: torch.device) -> torch.Tensor | None:
        if self.token_indices is None:
            return None
        if device not in self._index_cache:
            self._index_cache[device] = torch.tensor(self.token_indices, device=device)
        return self._index_cache[device]

    def cond(self, tensor: torch.Tensor) -> torch.Tensor:
        """The prompt's rows of a tensor of the running call (one image per trace)."""
        rows = self.cfg.cond_rows(tensor, self.label)
        if rows.shape[0] != 1:
            raise RuntimeError(
                f"attention saw a batch of {tensor.shape[0]}; trace one prompt and one image at "
                "a time (num_images_per_prompt=1)"
            )
        return rows

    def add(self, layer: str, probs: torch.Tensor) -> None:
        """Store ``probs`` for the current step.

        ``probs`` is ``[n_queries, n_tokens]`` (mean over heads), or ``[heads, n_queries,
        n_tokens]``: then the mean is stored, and the heads too when :attr:`keep_heads`.
        """
        if probs.ndim == 3:
            if self.keep_heads:
                self._store(self.head_maps, layer, probs)
            probs = probs.mean(dim=0)
        self._store(self.maps, layer, probs)

    def _store(self, where: dict[str, list[torch.Tensor]], layer: str, probs: torch.Tensor) -> None:
        stored = where.setdefault(layer, [])
        if len(stored) != self.step:
            raise RuntimeError(
                f"attention layer {layer} ran {len(stored) - self.step + 1} times in step "
                f"{self.step}; diffwidget traces pipelines that call the denoiser once per step "
                "and CFG half. Use DPMSolverMultistepScheduler, DDIMScheduler, "
                "EulerDiscreteScheduler or FlowMatchEulerDiscreteScheduler rather than a "
                "scheduler that evaluates the model several times per step (e.g. Heun)."
            )
        self.n_tokens_total = probs.shape[-1]
        indices = self._indices(probs.device)
        if indices is not None:
            probs = probs.index_select(-1, indices)
        stored.append(probs.to(torch.float16))


@torch.no_grad()
def attention_keys(attn: Any, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """Scaled, transposed keys ``(K * attn.scale)^T`` of a diffusers ``Attention`` layer.

    Returns
    -------
    Tensor, shape (batch, heads, head_dim, n_tokens), float32
    """
    if attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    batch, head_dim = key.shape[0], key.shape[-1] // attn.heads
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if getattr(attn, "norm_k", None) is not None:
        key = attn.norm_k(key)
    return (key.float() * attn.scale).transpose(-1, -2)


@torch.no_grad()
def attention_probs(
    attn: Any,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    temb: torch.Tensor | None = None,
    *,
    keys: torch.Tensor | None = None,
    heads: bool = False,
) -> torch.Tensor:
    """``softmax(Q K^T * attn.scale)`` of a diffusers ``Attention`` layer, mean over heads.

    Applies the same input transforms as diffusers' ``AttnProcessor2_0`` (spatial norm,
    group norm, cross norm, q/k norms) and computes scores in float32.

    Parameters
    ----------
    keys : Tensor, optional
        Output of :func:`attention_keys`; the text (hence the keys) is the same at every
        step, so callers may compute it once. Otherwise computed from
        ``encoder_hidden_states``.

    heads : bool
        Return every head's probabilities, ``(batch, heads, n_queries, n_tokens)``.

    Returns
    -------
    Tensor, shape (batch, n_queries, n_tokens), float32
    """
    if keys is None:
        if encoder_hidden_states is None:
            raise ValueError("pass encoder_hidden_states or precomputed keys")
        keys = attention_keys(attn, encoder_hidden_states)
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    batch = hidden_states.shape[0]
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    head_dim = keys.shape[-2]
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if getattr(attn, "norm_q", None) is not None:
        query = attn.norm_q(query)
    scores = torch.matmul(query.float(), keys)
    if attention_mask is not None:
        mask = attn.prepare_attention_mask(attention_mask, keys.shape[-1], batch)
        scores = scores + mask.view(batch, attn.heads, -1, mask.shape[-1]).float()
    probs = scores.softmax(dim=-1)
    return probs if heads else probs.mean(dim=1)


class CaptureAttnProcessor:
    """Wraps an attention processor and records image→text probabilities on the side.

    The wrapped processor computes the layer's output unchanged; :meth:`record` sees the
    same inputs afterwards. This class records cross-attention (``attn2`` with
    ``encoder_hidden_states``: UNets, PixArt); joint-attention families subclass it.

    Parameters
    ----------
    original : callable
        The layer's processor; it still computes the layer output.
    layer : str
        The layer's diffusers module path, e.g.
        ``"mid_block.attentions.0.transformer_blocks.0.attn2"``.
    recorder : AttentionRecorder
        Where probabilities go.
    """

    def __init__(
        self, original: Any, layer: str, recorder: AttentionRecorder, module: Any = None
    ) -> None:
        self.original = original
        self.layer = layer
        self.recorder = recorder
        self._keys_source: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None
        # diffusers forwards only those cross_attention_kwargs that the processor's
        # __call__ names (it inspects the signature), so advertise the wrapped one's.
        forward = self._forward

        def call(*args: Any, **kwargs: Any) -> Any:
            return forward(*args, **kwargs)

        call.__signature__ = inspect.signature(original.__call__)  # type: ignore[attr-defined]
        # Only attribute lookup (what diffusers inspects) sees this; calls use the class's.
        self.__dict__["__call__"] = call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward(*args, **kwargs)

    def close(self) -> None:
        """Remove whatever the processor attached besides itself (called on restore)."""

    def _forward(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        output = self.original(attn, hidden_states, *args, **kwargs)
        if self.recorder.active:
            self.record(attn, hidden_states, *args, **kwargs)
        return output

    def record(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Compute and store this call's probabilities (cross-attention version)."""
        encoder_hidden_states = kwargs.get("encoder_hidden_states", args[0] if args else None)
        if encoder_hidden_states is None:
            return
        attention_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        temb = kwargs.get("temb", args[2] if len(args) > 2 else None)
        cond = self.recorder.cond
        # The pipeline passes the same text-embedding tensor at every step, so the keys
        # are computed once per trace rather than once per step.
        if self._keys_source is not encoder_hidden_states:
            self._keys = attention_keys(attn, cond(encoder_hidden_states))
            self._keys_source = encoder_hidden_states
        probs = attention_probs(
            attn,
            cond(hidden_states),
            attention_mask=None if attention_mask is None else cond(attention_mask),
            temb=None if temb is None else cond(temb),
            keys=self._keys,
            heads=self.recorder.keep_heads,
        )
        self.recorder.add(self.layer, probs[0])


ProcessorFactory = Callable[[Any, str, AttentionRecorder, Any], CaptureAttnProcessor]


def cross_attention_layers(unet: Any) -> list[str]:
    """Module paths of the cross-attention (``attn2``) layers in data-flow order.

    For UNets: down blocks, then the mid block, then up blocks (``named_modules``
    registers the mid block last); for PixArt-style transformers: block order. Layers named
    ``attn2`` that are not cross-attention (SD3.5's image-only second attention) are left
    out.
    """
    names = [
        name
        for name, module in unet.named_modules()
        if name.rsplit(".", 1)[-1] == CROSS_ATTENTION_NAME
        and getattr(module, "is_cross_attention", False)
        and hasattr(module, "set_processor")
    ]
    return sorted(names, key=_data_flow_key)


_BLOCK_ORDER = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}


def _data_flow_key(path: str) -> tuple[int, list[int]]:
    # The first UNet block name on the path decides (a wrapper may prefix the UNet's paths).
    parts = path.split(".")
    order = next((_BLOCK_ORDER[p] for p in parts if p in _BLOCK_ORDER), len(_BLOCK_ORDER))
    return order, [int(part) for part in parts if part.isdigit()]


class AttentionCapture:
    """Installs capture processors on a denoiser's text→image layers and restores them.

    Processors are swapped per layer with ``set_processor`` rather than with
    ``set_attn_processor``, which needs every layer and walks the whole model on each
    call; restoring puts back the processor of *every* attention layer, so a processor
    change made while tracing (e.g. ``enable_attention_slicing``) is undone too.

    Parameters
    ----------
    denoiser : nn.Module
        The pipeline's UNet or transformer.
    recorder : AttentionRecorder
        Shared storage for the captured maps.
    sites : dict of str to callable, optional
        Module path -> factory ``(original, path, recorder, module) -> CaptureAttnProcessor``;
        default: every cross-attention layer with :class:`CaptureAttnProcessor`.
    """

    def __init__(
        self,
        denoiser: Any,
        recorder: AttentionRecorder,
        sites: dict[str, ProcessorFactory] | None = None,
    ) -> None:
        self.unet = denoiser
        self.recorder = recorder
        if sites is None:
            sites = dict.fromkeys(cross_attention_layers(denoiser), CaptureAttnProcessor)
        self.layers = list(sites)
        if not self.layers:
            raise ValueError(
                f"{type(denoiser).__name__} has no text→image attention layers to trace; pass a "
                "pipeline whose denoiser attends to the prompt (see diffwidget's supported "
                "families: diffwidget.tracing.families.SUPPORTED)"
            )
        modules = dict(denoiser.named_modules())
        self._targets = [(layer, modules[layer], sites[layer]) for layer in self.layers]
        self._all_attention = [m for m in modules.values() if hasattr(m, "set_processor")]
        self._saved: list[tuple[Any, Any]] = []
        self._installed: list[tuple[str, Any, CaptureAttnProcessor]] = []

    def install(self) -> None:
        """Wrap every site's processor (restore with :meth:`restore`, in a ``finally``)."""
        if any(isinstance(m.processor, CaptureAttnProcessor) for _, m, _ in self._targets):
            raise RuntimeError(
                "this model is already being traced (a TraceContext is active on it); "
                "leave that context before starting another"
            )
        self._saved = [(module, module.processor) for module in self._all_attention]
        try:
            for layer, module, factory in self._targets:
                capture = factory(module.processor, layer, self.recorder, module)
                module.set_processor(capture)
                self._installed.append((layer, module, capture))
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        """Put every attention layer's original processor back (no-op if not installed)."""
        try:
            for _, _, capture in self._installed:
                capture.close()
        finally:
            for module, processor in self._saved:
                if module.processor is not processor:
                    module.set_processor(processor)
        self._saved = []
        self._installed = []

    def replaced_layers(self) -> list[str]:
        """Layers whose capture processor was swapped out since :meth:`install`."""
        return [
            layer for layer, module, capture in self._installed if module.processor is not capture
        ]
