"""UNet family: Stable Diffusion 1.x/2.x and SDXL (``UNet2DConditionModel``).

* Attention sites: every ``attn2`` cross-attention layer; probabilities are the softmax over
  the text keys (``"text_softmax"``), recomputed on the side for the conditional half.
* CFG: batched ``[uncond, cond]`` in one call per step when ``guidance_scale > 1``.
* Text: CLIP's 77 positions (SDXL's two encoders share them).
* Call: ``unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=...)``; the
  sample is ``scale_model_input(x_t)``, batched for CFG.
* Token relevance: :meth:`CrossAttentionFamily.explicit_attention` runs every ``Attention`` layer
  with its softmax written out (diffusers' reference ``AttnProcessor``), and
  :meth:`CrossAttentionFamily.text_attention` records the CLIP text encoder's self-attention.
* Grids: an ``attn2`` in down block ``k`` runs at resolution level ``k``, the mid block at
  the deepest, up block ``j`` at ``n - 1 - j`` (:mod:`diffwidget.tracing.budget`). UNets not
  laid out like diffusers' (a custom module with the UNet call signature) are still traced:
  their grids are found from the query count, and the memory budget assumes the full
  latent grid for every layer (an upper bound).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers.hooks import ModelHook

from diffwidget.tracing.attention import (
    CaptureAttnProcessor,
    ProcessorFactory,
    cross_attention_layers,
)
from diffwidget.tracing.cfg import CfgLayout
from diffwidget.tracing.concept_attention import ConceptLayer, linear
from diffwidget.tracing.families.base import (
    AttentionKind,
    AttentionRecord,
    DenoiserFamily,
    LatentLayout,
    TextAttention,
    explicit_processors,
)
from diffwidget.tracing.model_hooks import HOOK_PREFIX, attach_hook, detach_hook
from diffwidget.tracing.tokens import PromptTokens, prompt_tokens

_BLOCK = re.compile(r"(?:^|\.)(down_blocks|up_blocks)\.(\d+)\.|(?:^|\.)(mid_block)\.")
#: Sub-layer lists inside a diffusers block that output a spatial feature map.
_LAYER_LISTS = ("resnets", "attentions")
_RESAMPLERS = ("downsamplers", "upsamplers")
#: Suffix of the self-attention modules of a transformers text encoder (CLIP).
_TEXT_SELF_ATTENTION = "self_attn"
#: The registry name of the hooks that collect the text encoder's attention probabilities.
_TEXT_HOOK = HOOK_PREFIX + "text_attention"


def grid_at_level(latent_hw: tuple[int, int], level: int) -> tuple[int, int]:
    """Spatial grid after ``level`` stride-2 downsamplings of ``latent_hw`` (rounding up).

    diffusers' downsamplers are stride-2 convolutions with padding 1.
    """
    h, w = latent_hw
    for _ in range(level):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def layer_level(path: str, n_levels: int) -> int:
    """Resolution level of the UNet attention layer at the diffusers module ``path``.

    Down block ``k`` is at level ``k``, the mid block at the deepest level ``n - 1``, up
    block ``j`` at ``n - 1 - j``.
    """
    match = _BLOCK.search(path)
    if match is None:
        raise ValueError(
            f"cannot tell the resolution of attention layer {path!r}: diffwidget expects "
            "UNet2DConditionModel-style paths (down_blocks.k / mid_block / up_blocks.k)"
        )
    if match.group(3):
        return n_levels - 1
    index = int(match.group(2))
    return index if match.group(1) == "down_blocks" else n_levels - 1 - index


def layer_grid(
    path: str, n_levels: int, latent_hw: tuple[int, int], n_queries: int
) -> tuple[int, int]:
    """The ``(h_l, w_l)`` grid of a layer with ``n_queries`` query positions.

    The level comes from the module path; if the UNet is laid out differently, the first
    level whose grid holds exactly ``n_queries`` positions is used.
    """
    candidates = [grid_at_level(latent_hw, layer_level(path, n_levels))]
    candidates += [grid_at_level(latent_hw, level) for level in range(n_levels + 2)]
    for h, w in candidates:
        if h * w == n_queries:
            return h, w
    raise ValueError(
        f"attention layer {path!r} has {n_queries} query positions, which matches no "
        f"downsampled grid of the {latent_hw[0]}x{latent_hw[1]} latent"
    )


def block_paths(unet: Any) -> list[str]:
    """The UNet's top-level blocks in data-flow order: down blocks, mid block, up blocks."""
    paths = [f"down_blocks.{i}" for i in range(len(getattr(unet, "down_blocks", None) or []))]
    if getattr(unet, "mid_block", None) is not None:
        paths.append("mid_block")
    paths += [f"up_blocks.{i}" for i in range(len(getattr(unet, "up_blocks", None) or []))]
    return paths


def layer_paths(unet: Any) -> list[str]:
    """Every resnet, attention and resampler inside the top-level blocks, in data-flow order.

    Within a block the UNet runs ``resnets[i]`` then ``attentions[i]`` for each i, then the
    down- or upsampler; blocks follow :func:`block_paths`. This is the layer set the paper's
    DF-CAM code sums over.
    """
    paths: list[str] = []
    for block_path in block_paths(unet):
        block = unet.get_submodule(block_path)
        lists = [getattr(block, name, None) or [] for name in _LAYER_LISTS]
        for i in range(max(len(items) for items in lists)):
            paths += [
                f"{block_path}.{name}.{i}"
                for name, items in zip(_LAYER_LISTS, lists, strict=True)
                if i < len(items)
            ]
        for name in _RESAMPLERS:
            paths += [
                f"{block_path}.{name}.{i}" for i in range(len(getattr(block, name, None) or []))
            ]
    return paths


class UNetExplicitProcessor:
    """diffusers' ``AttnProcessor`` (the reference, non-fused one) recording its softmax.

    Same norms, projections, mask, output path and residual; the probabilities
    ``softmax(Q K^T * scale)`` are recorded in the autograd graph, ``(batch, heads, n_queries,
    n_keys)``. Installed only while token relevance runs.
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
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        text = encoder_hidden_states
        batch, seq_len, _ = (text if text is not None else hidden_states).shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        source = hidden_states if text is None else text
        if text is not None and attn.norm_cross:
            source = attn.norm_encoder_hidden_states(text)
        key, value = attn.to_k(source), attn.to_v(source)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        if getattr(attn, "norm_k", None) is not None:
            key = attn.norm_k(key)
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
        # (batch * heads, q, k) viewed per head; the output is computed from the view, so
        # gradients reach the recorded tensor.
        probs = attn.get_attention_scores(query, key, attention_mask).unflatten(0, (-1, attn.heads))
        n_text = 0 if text is None else int(text.shape[1])
        kind: AttentionKind = "self" if text is None else "cross"
        self.records.append(AttentionRecord(self.path, probs, kind, n_text))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs.flatten(0, 1), value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class _AttentionWeights(ModelHook):
    """Keeps the probabilities an eager self-attention layer returns beside its output."""

    def __init__(self, probs: list[torch.Tensor]) -> None:
        super().__init__()
        self.probs = probs

    def post_forward(self, module: Any, output: Any) -> Any:
        if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor):
            self.probs.append(output[1])
        return output


@contextmanager
def _eager_attention(text_encoder: Any) -> Iterator[None]:
    """Switch a transformers text encoder to eager attention (so it returns probabilities)."""
    config = getattr(text_encoder, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    switch = previous not in (None, "eager") and hasattr(text_encoder, "set_attn_implementation")
    try:
        if switch:
            text_encoder.set_attn_implementation("eager")
        yield
    finally:
        if switch:
            text_encoder.set_attn_implementation(previous)


@contextmanager
def recorded_text_attention(encoder: Any) -> Iterator[TextAttention]:
    """``encoder`` in eager attention with hooks on its ``*.self_attn`` layers; both undone
    in ``finally``. (Asking transformers for ``output_attentions`` would leave its own
    capture hooks on the model.)"""
    text = TextAttention(encoder)
    layers = [m for n, m in encoder.named_modules() if n.endswith(_TEXT_SELF_ATTENTION)]
    attached: list[tuple[Any, bool, bool]] = []
    try:
        with _eager_attention(encoder):
            for module in layers:
                attached.append(
                    (module, hasattr(module, "_diffusers_hook"), "forward" in vars(module))
                )
                attach_hook(module, _AttentionWeights(text.probs), _TEXT_HOOK)
            yield text
    finally:
        for module, had_registry, had_forward in attached:
            detach_hook(module, _TEXT_HOOK, had_registry=had_registry, had_forward=had_forward)


class CrossConceptLayer(ConceptLayer):
    """Concept words in a cross-attention layer: no concept queries; a concept's output is
    what the layer writes when the image attends to the concept alone, its value vector
    (through the output projection in the output space)."""

    kind = "cross"

    def reads(self, spaces: Any) -> dict[str, tuple[Any, Any]]:
        """Only the image output (``to_out[0]``'s input or output)."""
        out = self.attn.to_out[0]
        return {space: (out, "post" if space == "output" else "pre") for space in spaces}

    def cross_output(self, embeds: torch.Tensor) -> torch.Tensor:
        """``to_v`` of the concept embeddings (after the layer's cross norm)."""
        weight = self.attn.to_v.weight
        key = (weight.device, weight.dtype)
        cached = getattr(self, "_values", None)
        if cached is None or cached[0] != key:
            text = embeds.to(*key)
            if self.attn.norm_cross:
                text = self.attn.norm_encoder_hidden_states(text)
            self._values = (key, linear(self.attn.to_v, text))
        return self._values[1]

    def project(self, raw: torch.Tensor) -> torch.Tensor:
        """The output projection ``to_out[0]``."""
        return linear(self.attn.to_out[0], raw)


class CrossAttentionFamily(DenoiserFamily):
    """What the families with ``attn2`` cross-attention (UNets, PixArt) share for token
    relevance: explicit attention on every ``Attention`` layer, and the text encoder's."""

    def concept_layers(self) -> list[Any]:
        """Every cross-attention (``attn2``) layer, as :meth:`attention_sites` lists them."""
        modules = dict(self.denoiser.named_modules())
        return [CrossConceptLayer(path, modules[path]) for path in self.attention_sites()]

    def explicit_attention(self, n_text: int) -> Any:
        """Every ``Attention`` layer with its softmax written out (token relevance)."""
        return explicit_processors(self.denoiser, UNetExplicitProcessor)

    def text_attention(self) -> Any:
        """The pipeline's one text encoder; ``None`` for SDXL's two encoders (no single
        encoder's attention explains the concatenated embedding)."""
        encoder = getattr(self.pipe, "text_encoder", None)
        if encoder is None or hasattr(self.pipe, "text_encoder_2"):
            return super().text_attention()
        return recorded_text_attention(encoder)


class UNetFamily(CrossAttentionFamily):
    """Stable Diffusion 1.x/2.x and SDXL UNets (and modules with their call signature)."""

    name = "unet"
    label = "UNet (Stable Diffusion 1.x/2.x, SDXL)"
    pipelines = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
    models = ("UNet2DConditionModel",)
    denoiser_attr = "unet"
    sample_arg = "sample"
    normalisation = "text_softmax"
    #: Custom modules with the UNet call signature (held outside a diffusers pipeline).
    any_denoiser = True
    #: ``UNet2DConditionModel`` turns it into the cross-attention bias of every ``attn2``.
    text_mask_argument = "encoder_attention_mask"

    # ------------------------------------------------------------------ attention
    def attention_sites(self) -> dict[str, ProcessorFactory]:
        """Every cross-attention (``attn2``) layer, down blocks to up blocks."""
        return dict.fromkeys(cross_attention_layers(self.denoiser), CaptureAttnProcessor)

    def _n_levels(self) -> int | None:
        channels = getattr(self.denoiser.config, "block_out_channels", None)
        return len(channels) if channels is not None else None

    def site_grid(self, path: str, n_queries: int, layout: LatentLayout) -> tuple[int, int]:
        """The grid of the layer's resolution level (found from ``n_queries`` if unknown)."""
        n_levels = self._n_levels()
        if n_levels is not None:
            try:
                return layer_grid(path, n_levels, layout.latent_hw, n_queries)
            except ValueError:
                pass
        for level in range(16):
            h, w = grid_at_level(layout.latent_hw, level)
            if h * w == n_queries:
                return h, w
        raise ValueError(
            f"attention layer {path!r} has {n_queries} query positions, which matches no "
            f"downsampled grid of the {layout.latent_hw[0]}x{layout.latent_hw[1]} latent"
        )

    def query_counts(self, layout: LatentLayout) -> dict[str, int]:
        """Queries per layer from its level; the full latent grid where the level is unknown."""
        n_levels = self._n_levels()
        counts = {}
        for path in self.attention_sites():
            level = 0
            if n_levels is not None:
                try:
                    level = layer_level(path, n_levels)
                except ValueError:
                    level = 0
            h, w = grid_at_level(layout.latent_hw, level)
            counts[path] = h * w
        return counts

    def cfg_layout(self, guidance_scale: float, call_kwargs: dict[str, Any]) -> CfgLayout:
        """Batched CFG when ``w > 1``; guidance-embedded UNets (LCM) run the prompt alone."""
        if getattr(self.denoiser.config, "time_cond_proj_dim", None) is not None:
            return CfgLayout("none", guidance_scale)
        return super().cfg_layout(guidance_scale, call_kwargs)

    # ------------------------------------------------------------------ tokens
    def text_length(self, call_kwargs: dict[str, Any]) -> int:
        """CLIP's ``model_max_length`` (77 for Stable Diffusion)."""
        return int(self.pipe.tokenizer.model_max_length)

    def prompt_tokens(self, prompt: str, call_kwargs: dict[str, Any]) -> PromptTokens:
        """CLIP's positions, exactly as the pipeline tokenizes the prompt."""
        return prompt_tokens(self.pipe.tokenizer, prompt)

    # ------------------------------------------------------------------ blocks
    def block_paths(self) -> list[str]:
        """The top-level blocks in data-flow order (:func:`block_paths`)."""
        return block_paths(self.denoiser)

    def cam_layers(self) -> list[str]:
        """Every resnet, attention and resampler inside the blocks (:func:`layer_paths`)."""
        paths = layer_paths(self.denoiser)
        if not paths:
            raise ValueError(
                f"{type(self.denoiser).__name__} is not laid out like diffusers' "
                "UNet2DConditionModel (no down_blocks / mid_block / up_blocks), so there are no "
                "default layers; pass blocks=[...] with module paths from "
                "[n for n, _ in unet.named_modules()]"
            )
        return paths

    def probe_blocks(self) -> list[str]:
        """A middle down block, the mid block and a middle up block.

        These span the UNet's coarsest, most semantic resolution and one resolution on each
        side of it, where concept information is expected to appear first.
        """
        paths = self.block_paths()
        downs = [p for p in paths if p.startswith("down_blocks.")]
        ups = [p for p in paths if p.startswith("up_blocks.")]
        chosen = []
        if downs:
            chosen.append(downs[len(downs) // 2])
        if "mid_block" in paths:
            chosen.append("mid_block")
        if ups:
            chosen.append(ups[len(ups) // 2])
        if not chosen:
            raise ValueError(
                "the UNet has no down_blocks, mid_block or up_blocks; pass blocks=[...] with "
                "module paths from [name for name, _ in unet.named_modules()]"
            )
        return chosen

    def spatial(self, tensor: Any, layout: LatentLayout) -> Any:
        """UNet activations are already ``[B, C, h, w]`` feature maps."""
        if tensor.ndim != 4:
            raise ValueError(
                f"expected a [batch, channels, h, w] block output, got shape "
                f"{tuple(tensor.shape)}; choose convolutional UNet blocks, resnets or attentions"
            )
        return tensor
