"""What the joint-attention (MMDiT) families share: taps on the q/k projections.

A joint layer's processor (SDPA or diffusers' attention dispatcher) computes the output
from projections it makes itself. Recomputing those projections on the side would cost as
much as the projections themselves (about 13 % of an SD3-medium block at 256² on a CPU),
so the capture processor *taps* them instead: diffusers ``ModelHook`` taps on the layer's
``to_q``, ``to_k`` and ``add_k_proj`` keep a reference to what they returned during the
original processor's call, and the capture applies only the cheap parts again (head split,
qk-RMSNorm, RoPE) before :func:`~diffwidget.tracing.joint_attention.image_to_text_probs`.
Layers with fused projections (``fuse_qkv_projections()``) are tapped at ``to_qkv`` and
``to_added_qkv``. The taps go away with the processor (:meth:`JointCaptureProcessor.close`).

Cheaper still, where the processor calls SDPA (``JointAttnProcessor2_0``, the attention
dispatcher's native backend): :class:`SdpaTap` sees that call, has it return the
log-sum-exp its flash kernel computes anyway
(:func:`~diffwidget.tracing.joint_attention.sdpa_with_lse`), and keeps SDPA's own
inputs — the queries and keys after qk-norm and RoPE, exactly as the model made them.
The family's ``record`` then needs only the image→text scores
(:meth:`JointCaptureProcessor.record_sdpa`); without such a call it falls back to the taps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.hooks import ModelHook
from torch.overrides import TorchFunctionMode

from diffwidget.tracing.attention import AttentionRecorder, CaptureAttnProcessor
from diffwidget.tracing.joint_attention import SdpaCall, sdpa_with_lse, text_probs_from_lse
from diffwidget.tracing.model_hooks import HOOK_PREFIX, attach_hook, detach_hook

#: Projections tapped, by the name of the attention module's Linear layer.
_SEPARATE = ("to_q", "to_k", "add_k_proj")
_FUSED = ("to_qkv", "to_added_qkv")
#: The registry name of the projection taps.
_PROJECTION_HOOK = HOOK_PREFIX + "projection"


class _LatestOutput(ModelHook):
    """Remembers the latest output of one Linear layer (a diffusers ``ModelHook``)."""

    def __init__(self, name: str, outputs: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.name = name
        self.outputs = outputs

    def post_forward(self, module: Any, output: Any) -> Any:
        self.outputs[self.name] = output
        return output


class ProjectionTap:
    """Module taps that remember the latest output of some of a module's Linear layers."""

    def __init__(self, module: Any) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self._attached: list[tuple[Any, bool, bool]] = []
        try:
            for name in (*_SEPARATE, *_FUSED):
                layer = getattr(module, name, None)
                if isinstance(layer, torch.nn.Module):
                    had = (hasattr(layer, "_diffusers_hook"), "forward" in vars(layer))
                    attach_hook(layer, _LatestOutput(name, self.outputs), _PROJECTION_HOOK)
                    self._attached.append((layer, *had))
        except BaseException:
            self.remove()
            raise

    def take(self, attn: Any, name: str, source: torch.Tensor | None) -> torch.Tensor:
        """The projection ``name`` of this call (recomputed from ``source`` if it was fused)."""
        fused, part = ("to_added_qkv", 1) if name == "add_k_proj" else ("to_qkv", 0)
        if name == "to_q":
            part = 0
        elif name == "to_k":
            part = 1
        if getattr(attn, "fused_projections", False) and fused in self.outputs:
            return self.outputs[fused].chunk(3, dim=-1)[part]
        if name in self.outputs:
            return self.outputs[name]
        if source is None:
            raise RuntimeError(f"projection {name} did not run in this attention call")
        return getattr(attn, name)(source)

    def clear(self) -> None:
        """Drop the references (they keep the tensors alive)."""
        self.outputs.clear()

    def remove(self) -> None:
        """Remove the taps."""
        while self._attached:
            layer, had_registry, had_forward = self._attached.pop()
            detach_hook(layer, _PROJECTION_HOOK, had_registry=had_registry, had_forward=had_forward)
        self.clear()


def heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[B, N, H * d]`` -> ``[B, N, H, d]``."""
    return x.unflatten(-1, (-1, head_dim))


class SdpaTap(TorchFunctionMode):
    """While active, SDPA calls also return their log-sum-exp (:attr:`calls`).

    Each ``torch.nn.functional.scaled_dot_product_attention`` call goes through
    :func:`~diffwidget.tracing.joint_attention.sdpa_with_lse`; where that declines, SDPA
    runs as it would have and the call is listed as ``None``. Every other function runs
    unchanged.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[SdpaCall | None] = []

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            found = sdpa_with_lse(*args, **kwargs)
            self.calls.append(None if found is None else found[1])
            if found is not None:
                return found[0]
        return func(*args, **kwargs)

    def single(self) -> SdpaCall | None:
        """The call, when the layer made exactly one and its log-sum-exp is known."""
        return self.calls[0] if len(self.calls) == 1 else None


class JointCaptureProcessor(CaptureAttnProcessor):
    """Base of the joint-attention capture processors (one per family layout)."""

    def __init__(
        self, original: Any, layer: str, recorder: AttentionRecorder, module: Any = None
    ) -> None:
        super().__init__(original, layer, recorder, module)
        self.tap = ProjectionTap(module) if module is not None else None
        #: The layer's SDPA call of the running forward, when :class:`SdpaTap` caught it.
        self.sdpa: SdpaCall | None = None

    def close(self) -> None:
        """Remove the projection taps."""
        if self.tap is not None:
            self.tap.remove()

    def _projection(self, attn: Any, name: str, source: torch.Tensor | None) -> torch.Tensor:
        if self.tap is None:
            return getattr(attn, name)(source)
        return self.tap.take(attn, name, source)

    def record_sdpa(self, queries: slice, text: slice) -> bool:
        """Record the image→text probabilities from the caught SDPA call; ``False`` (nothing
        recorded) without one.

        ``queries`` and ``text`` are the image-query and text-key positions of the joint
        sequence SDPA saw; the prompt's rows of the batch are kept.
        """
        call = self.sdpa
        if call is None:
            return False
        cond = self.recorder.cond
        probs = text_probs_from_lse(
            cond(call.query)[0, :, queries],
            cond(call.key)[0, :, text],
            cond(call.lse)[0, :, queries],
            call.scale,
            heads=self.recorder.keep_heads,
        )
        self.recorder.add(self.layer, probs)
        return True

    def _forward(self, attn: Any, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.recorder.active:
            return self.original(attn, hidden_states, *args, **kwargs)
        tap = SdpaTap()
        try:
            with tap:
                output = self.original(attn, hidden_states, *args, **kwargs)
            self.sdpa = tap.single()
            self.record(attn, hidden_states, *args, **kwargs)
            return output
        finally:
            self.sdpa = None
            if self.tap is not None:
                self.tap.clear()


def explicit_softmax(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d))`` over ``[B, H, S, d]`` tensors, in the inputs' dtype."""
    scale = 1.0 / math.sqrt(query.shape[-1])
    return (torch.matmul(query, key.transpose(-1, -2)) * scale).softmax(dim=-1)
