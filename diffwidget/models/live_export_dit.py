"""The embedded DiT's graphs for the browser (build time only; see :mod:`.live_export`).

Four graphs, the decoders shared with the UNet's export (the DiT uses the UNet's VAE):

* ``text_encoder``: token ids ``[2, L]`` (``[uncond, cond]``; both CLIP encoders read the
  same word-level tokenizer) -> ``text [2, L + 1, D]`` and ``pooled [2, P]``, the joint
  text embeddings as ``StableDiffusion3Pipeline.encode_prompt`` builds them: each encoder's
  penultimate hidden states side by side on the feature axis, zero-padded to
  ``joint_attention_dim``, then the absent T5's all-zero rows, given here as *one* row
  standing for all ``max_sequence_length`` (256) of them; ``pooled`` is the two projected
  (pooled) outputs side by side;
* ``transformer``: ``sample [2, C, h, w]``, ``timestep [1]`` (float32, ``sigma * 1000``),
  ``text``, ``pooled`` -> ``model_output`` (the velocity) and, per joint block, the
  conditional half's image→text block of the joint softmax over image and text keys, mean
  over heads, ``[n_image_tokens, L + 256]`` with every one of the 256 positions (rows sum to
  the text's share, as the trace's ``"joint_share"``).

The 256 zero rows are identical in every layer (same keys, values and queries), so the
graph computes one and weights its key as 256 (log 256 added to its logit), exactly as
training does (:class:`diffwidget.models.dit.TailWeightedJointAttnProcessor`): the same
numbers as the pipeline's full sequence up to float rounding, at a quarter of the tokens
(81 instead of 336). Its share is split evenly over the 256 positions in the attention
outputs. Joint attention is written out as an explicit softmax (as ``JointAttnProcessor2_0``
computes it, with the queries' and keys' RMS norms), so its probabilities can be returned.
"""

from __future__ import annotations

import math
from typing import Any

from diffwidget.models.live_graphs import (
    ATTENTION_PREFIX,
    CFG_HALVES,
    COND_ROW,
    ExportPlan,
    GraphSpec,
    decoder_specs,
    tokenizer_facts,
)
from diffwidget.models.live_manifest import AttentionOutput
from diffwidget.models.sd3_attention import joint_outputs, joint_qkv


class ExportJointAttnProcessor:
    """SD3 joint attention (image tokens first) with the softmax written out.

    Mirrors diffusers' ``JointAttnProcessor2_0`` on a sequence whose last text token stands
    for ``copies`` identical ones (its logit raised by log ``copies``) and stores the
    conditional half's image→text probabilities, mean over heads, with that token's share
    split over its ``copies`` positions.
    """

    def __init__(self, store: dict[str, Any], layer: str, copies: int) -> None:
        if copies < 1:
            raise ValueError(f"copies must be at least 1, got {copies}")
        self.store = store
        self.layer = layer
        self.copies = copies

    def __call__(
        self,
        attn: Any,
        hidden_states: Any,
        encoder_hidden_states: Any = None,
        attention_mask: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        if encoder_hidden_states is None or attention_mask is not None:
            raise ValueError(
                "the live export handles joint attention over image and text tokens without "
                "masks (the embedded DiT's); this layer has a mask or no text"
            )
        n_image = hidden_states.shape[1]
        query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states)
        head_dim = query.shape[-1]
        import torch

        # SDPA's default scale, 1/sqrt(d), on the queries (as the trace's capture applies it).
        scores = (query * (1.0 / math.sqrt(head_dim))) @ key.transpose(-1, -2)
        bias = torch.zeros(key.shape[2], dtype=scores.dtype)
        bias[-1] = math.log(self.copies)
        probs = (scores + bias).softmax(dim=-1)
        text = probs[COND_ROW, :, :n_image, n_image:].mean(dim=0)
        tail = (text[:, -1:] / self.copies).expand(-1, self.copies)
        self.store[self.layer] = torch.cat([text[:, :-1], tail], dim=-1)
        return joint_outputs(attn, probs @ value, n_image)


def joint_layers(transformer: Any) -> list[str]:
    """Every joint block's ``attn``, in order (the trace's SD3 attention sites)."""
    return [f"transformer_blocks.{i}.attn" for i in range(len(transformer.transformer_blocks))]


def _transformer_graph(transformer: Any, layers: list[str], copies: int) -> Any:
    import torch

    class TransformerGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer
            self.store: dict[str, Any] = {}
            processors = {
                f"{name}.processor": ExportJointAttnProcessor(self.store, name, copies)
                for name in layers
            }
            if sorted(processors) != sorted(transformer.attn_processors):
                raise ValueError("the DiT has attention layers besides its joint blocks' attn")
            transformer.set_attn_processor(dict(processors))  # it empties its argument

        def forward(self, sample: Any, timestep: Any, text: Any, pooled: Any) -> tuple[Any, ...]:
            self.store.clear()
            out = self.transformer(
                hidden_states=sample,
                timestep=timestep.expand(sample.shape[0]),
                encoder_hidden_states=text,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
            if sorted(self.store) != sorted(layers):
                raise RuntimeError(f"attention maps of {sorted(self.store)}, expected {layers}")
            return (out, *(self.store[name] for name in layers))

    return TransformerGraph().eval()


def _text_graph(pipe: Any) -> Any:
    import torch

    width = int(pipe.transformer.config.joint_attention_dim)

    class JointTextGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoders = torch.nn.ModuleList([pipe.text_encoder, pipe.text_encoder_2])

        def forward(self, input_ids: Any) -> tuple[Any, Any]:
            features, pooled = [], []
            for encoder in self.encoders:
                out = encoder(input_ids, output_hidden_states=True)
                # encode_prompt without clip_skip: the penultimate layer's hidden states.
                features.append(out.hidden_states[-2])
                pooled.append(out.text_embeds)
            clip = torch.cat(features, dim=-1)
            clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
            # One all-zero row for the absent T5's (the transformer weights it as all of them).
            zeros = clip.new_zeros(clip.shape[0], 1, width)
            return torch.cat([clip, zeros], dim=-2), torch.cat(pooled, dim=-1)

    return JointTextGraph().eval()


def _check_one_tokenizer(pipe: Any) -> None:
    """The graph feeds one tokenization to both encoders: the tokenizers must agree."""
    if pipe.tokenizer_2 is None or tokenizer_facts(pipe.tokenizer) != tokenizer_facts(
        pipe.tokenizer_2
    ):
        raise ValueError(
            "the DiT's two tokenizers differ; the live export feeds one tokenization to both "
            "text encoders (give the graph a second input_ids to export this model)"
        )
    if getattr(pipe, "text_encoder_3", None) is not None:
        raise ValueError("the live export covers the DiT without T5 (text_encoder_3 = None)")


def _image_grid(transformer: Any) -> tuple[int, int]:
    side = int(transformer.config.sample_size) // int(transformer.config.patch_size)
    return side, side


def dit_plan(pipe: Any) -> ExportPlan:
    """The DiT's graphs and manifest facts (``StableDiffusion3Pipeline`` without T5)."""
    import torch

    from diffwidget.models.dit import tail_tokens

    _check_one_tokenizer(pipe)
    transformer, vae = pipe.transformer, pipe.vae
    layers = joint_layers(transformer)
    grid = _image_grid(transformer)
    channels = int(transformer.config.in_channels)
    size = int(transformer.config.sample_size)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    length = int(pipe.tokenizer.model_max_length)
    tail = tail_tokens()
    width = int(transformer.config.joint_attention_dim)
    pooled = int(transformer.config.pooled_projection_dim)
    rows = len(CFG_HALVES)
    attention = [
        AttentionOutput(layer=name, grid=grid, output=ATTENTION_PREFIX + name) for name in layers
    ]
    specs = [
        GraphSpec(
            "text_encoder",
            _text_graph(pipe),
            (torch.zeros(rows, length, dtype=torch.int64),),
            ["input_ids"],
            ["text", "pooled"],
        ),
        GraphSpec(
            "transformer",
            _transformer_graph(transformer, layers, tail),
            (
                torch.randn(rows, channels, size, size),
                torch.tensor([1000.0]),
                torch.randn(rows, length + 1, width),
                torch.randn(rows, pooled),
            ),
            ["sample", "timestep", "text", "pooled"],
            ["model_output", *(a.output for a in attention)],
        ),
        *decoder_specs(pipe, channels, size),
    ]
    return ExportPlan(specs, attention, channels, size, size * factor, tail, "joint_share")
