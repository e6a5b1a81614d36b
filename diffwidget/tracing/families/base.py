"""The protocol every denoiser family implements, and what the families share.

A *denoiser family* is everything diffwidget must know about one kind of denoiser to trace
it and to replay a recorded step, written once (see DESIGN.md §8):

* **attention sites**: the module paths whose image→text probabilities are captured, and a
  capture processor for each (:meth:`DenoiserFamily.attention_sites`);
* **CFG layout**: batched halves, separate calls or none (:meth:`DenoiserFamily.cfg_layout`,
  :mod:`diffwidget.tracing.cfg`);
* **text-token layout**: which tokenizers fill the text sequence (:meth:`prompt_tokens`);
* **the denoiser call**: which argument is the latent and which the timestep, what else the
  pipeline passes (pooled projections, ``txt_ids``/``img_ids``, ``guidance``, added
  conditioning), Flux's 2x2 latent packing and PixArt's learned-sigma channels
  (:meth:`parse_call`, :meth:`run`, :meth:`to_model_input`, :meth:`from_model_output`);
* **blocks**: the default DF-CAM layers and probe blocks, and how a block's output becomes
  a ``[B, C, h, w]`` feature map (:meth:`spatial`).

The x̂0 formula (epsilon, v, flow velocity) lives in :mod:`diffwidget.tracing.noise` and the
VAE decode in :mod:`diffwidget.tracing.decode`: they do not depend on the denoiser.
Everything else in diffwidget asks the family; a new family is one new module.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from diffwidget.tracing.attention import ProcessorFactory
from diffwidget.tracing.cfg import CfgKind, CfgLayout
from diffwidget.tracing.concept_attention import ConceptLayer
from diffwidget.tracing.trace import Normalisation

if TYPE_CHECKING:
    import torch

    from diffwidget.tracing.tokens import PromptTokens

#: Denoiser keyword arguments that configure a call rather than condition it; a replay
#: leaves them at their defaults.
CALL_OPTIONS = frozenset(
    {
        "return_dict",
        "cross_attention_kwargs",
        "joint_attention_kwargs",
        "attention_kwargs",
        "controlnet_block_samples",
        "controlnet_single_block_samples",
        "block_controlnet_hidden_states",
        "down_block_additional_residuals",
        "mid_block_additional_residual",
        "down_intrablock_additional_residuals",
    }
)
AttentionKind = Literal["cross", "self", "joint"]


@dataclass
class DenoiserCall:
    """One denoiser call as the pipeline made it.

    Attributes
    ----------
    sample : Tensor
        The latent input as the denoiser received it (CFG-batched, scaled, packed).
    timestep : Tensor
        The timestep argument as passed (SD3 passes sigma x 1000, Flux sigma).
    conditioning : dict
        Every other tensor argument, by keyword; nested dicts (``added_cond_kwargs``) are
        kept as dicts. ``None`` values are kept (they are part of the call).
    label : {"cond", "uncond"} or None
        diffusers' ``cache_context`` name of the call, when the pipeline set one.
    """

    sample: torch.Tensor
    timestep: torch.Tensor
    conditioning: dict[str, Any]
    label: str | None = None


@dataclass(frozen=True)
class LatentLayout:
    """How a trace's unpacked latent grid maps onto the denoiser's tokens.

    Attributes
    ----------
    latent_hw : tuple of int
        Unpacked latent grid ``(h, w)`` (the grid DF-RISE masks and overlays live on).
    patch : int
        Latent cells per token side (SD3/PixArt ``patch_size``; Flux's 2x2 packing; 1 for
        UNets).
    """

    latent_hw: tuple[int, int]
    patch: int = 1

    @property
    def token_grid(self) -> tuple[int, int]:
        """The image-token grid ``(h / patch, w / patch)`` of a transformer."""
        return (self.latent_hw[0] // self.patch, self.latent_hw[1] // self.patch)


@dataclass
class FamilyInfo:
    """One row of the supported-families table (README, errors, ``SUPPORTED``)."""

    name: str
    label: str
    pipelines: tuple[str, ...]
    attention: str
    notes: list[str] = field(default_factory=list)


class DenoiserFamily:
    """Base class of the denoiser families (one subclass per family module).

    Parameters
    ----------
    pipe : diffusers pipeline
        A pipeline this family :meth:`matches`.
    """

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""
    #: Pipeline classes (or base classes) of this family.
    pipelines: ClassVar[tuple[str, ...]] = ()
    #: Denoiser model classes (or base classes) of this family.
    models: ClassVar[tuple[str, ...]] = ()
    #: Attribute of the pipeline holding the denoiser.
    denoiser_attr: ClassVar[str] = "transformer"
    #: Keyword of the latent input in the denoiser's ``forward``.
    sample_arg: ClassVar[str] = "hidden_states"
    #: What the stored attention rows are normalised over.
    normalisation: ClassVar[Normalisation] = "text_softmax"
    #: Conditioning tensors without a batch axis (replayed as they are).
    batch_free: ClassVar[frozenset[str]] = frozenset()
    #: Keyword of the pipeline call argument that limits the T5 sequence, if any.
    max_sequence_arg: ClassVar[str | None] = None
    #: Keyword of the denoiser's text attention mask (1 attend, 0 masked out of every
    #: cross-attention softmax), if it takes one; word ablations mask a word's column with it.
    text_mask_argument: ClassVar[str | None] = None
    #: Accept any denoiser module under :attr:`denoiser_attr` outside diffusers pipelines.
    any_denoiser: ClassVar[bool] = False

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        denoiser = getattr(pipe, self.denoiser_attr, None)
        if denoiser is None:
            raise TypeError(
                f"{type(pipe).__name__} has no `{self.denoiser_attr}`; a {self.label} pipeline "
                f"needs one ({', '.join(self.pipelines)})"
            )
        # Any: diffusers models are reached by attribute (config, blocks), untyped for mypy.
        self.denoiser: Any = denoiser
        params = inspect.signature(denoiser.forward).parameters
        self._positional = [
            name
            for name, p in params.items()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]

    # ------------------------------------------------------------------ matching
    @classmethod
    def matches(cls, pipe: Any) -> bool:
        """Whether ``pipe`` belongs to this family.

        A diffusers pipeline matches by its class (or a base class): img2img, inpainting
        and other pipelines that share a denoiser class are not text-to-image runs. Objects
        that are not diffusers pipelines (a research harness holding a denoiser and a
        scheduler) match by their denoiser's class.
        """
        names = {c.__name__ for c in type(pipe).__mro__}
        if names & set(cls.pipelines):
            return True
        if "DiffusionPipeline" in names:
            return False
        denoiser = getattr(pipe, cls.denoiser_attr, None)
        if denoiser is None:
            return False
        return cls.any_denoiser or bool(
            {c.__name__ for c in type(denoiser).__mro__} & set(cls.models)
        )

    @classmethod
    def info(cls) -> FamilyInfo:
        """This family's row of the supported-families table."""
        return FamilyInfo(cls.name, cls.label, cls.pipelines, cls.normalisation)

    # ------------------------------------------------------------------ attention
    def attention_sites(self) -> dict[str, ProcessorFactory]:
        """Module path -> capture-processor factory, in data-flow order."""
        raise NotImplementedError

    def site_grid(self, path: str, n_queries: int, layout: LatentLayout) -> tuple[int, int]:
        """The spatial grid of a site's ``n_queries`` image queries."""
        grid = layout.token_grid
        if grid[0] * grid[1] != n_queries:
            raise ValueError(
                f"attention layer {path!r} has {n_queries} image queries, but the "
                f"{layout.latent_hw[0]}x{layout.latent_hw[1]} latent has {grid[0]}x{grid[1]} "
                "image tokens"
            )
        return grid

    def query_counts(self, layout: LatentLayout) -> dict[str, int]:
        """Image queries per site for a latent grid, known before the run (memory budget)."""
        grid = layout.token_grid
        return dict.fromkeys(self.attention_sites(), grid[0] * grid[1])

    def explicit_attention(self, n_text: int) -> AbstractContextManager[list[AttentionRecord]]:
        """A context in which every attention layer computes its softmax explicitly and
        records the probabilities in the autograd graph (token relevance); yields the
        records, one per layer call. The original processors are back on exit.

        ``n_text`` is the text length of the calls (Flux's single-stream blocks need it).
        """
        raise NotImplementedError(f"the {self.label} family has no explicit attention")

    def text_attention(self) -> AbstractContextManager[TextAttention | None]:
        """The text encoder whose self-attention token relevance propagates through, with
        its attention probabilities recorded per call; ``None`` where there is none."""
        return nullcontext(None)

    def site_heads(self) -> dict[str, int]:
        """Attention heads of each capture site (per-head capture stores one map per head)."""
        return {
            path: int(self.denoiser.get_submodule(path).heads) for path in self.attention_sites()
        }

    # ------------------------------------------------------------------ concepts
    def concept_layers(self) -> list[ConceptLayer]:
        """The attention layers concept maps are read at, in data-flow order
        (:mod:`~diffwidget.tracing.concept_attention`)."""
        raise NotImplementedError(f"concept maps are not available for the {self.label} family")

    def concept_embedder(self) -> Any:
        """The module that turns text embeddings into the first block's text stream (joint
        families: ``context_embedder``); None where text enters the layers as it is."""
        return getattr(self.denoiser, "context_embedder", None)

    def text_embeddings(self, prompts: Sequence[str], call_kwargs: dict[str, Any]) -> torch.Tensor:
        """The pipeline's text embeddings ``[n, L, dim]`` of ``prompts`` (its own
        ``encode_prompt``, without CFG), laid out as :meth:`prompt_tokens` labels them."""
        import torch

        encode = getattr(self.pipe, "encode_prompt", None)
        if encode is None:
            raise TypeError(
                f"{type(self.pipe).__name__} has no encode_prompt; concept words need the "
                "pipeline's text encoders"
            )
        params = inspect.signature(encode).parameters
        device = getattr(self.pipe, "_execution_device", None)
        options: dict[str, Any] = {
            "device": device if device is not None else self.denoiser.device,
            "num_images_per_prompt": 1,
            "do_classifier_free_guidance": False,
        }
        if self.max_sequence_arg is not None and call_kwargs.get(self.max_sequence_arg):
            options[self.max_sequence_arg] = int(call_kwargs[self.max_sequence_arg])
        kwargs = {k: v for k, v in options.items() if k in params}
        # SD3's and Flux's second and third prompts default to the first when None.
        kwargs.update({k: None for k in ("prompt_2", "prompt_3") if k in params})
        with torch.no_grad():
            out = encode(prompt=list(prompts), **kwargs)
        return out[0]

    # ------------------------------------------------------------------ tokens
    def text_length(self, call_kwargs: dict[str, Any]) -> int:
        """Length of the text sequence the denoiser will attend to."""
        raise NotImplementedError

    def prompt_tokens(self, prompt: str, call_kwargs: dict[str, Any]) -> PromptTokens:
        """Every position of the text sequence for ``prompt``, labelled."""
        raise NotImplementedError

    def _max_sequence_length(self, call_kwargs: dict[str, Any], default: int) -> int:
        if self.max_sequence_arg is None:
            return default
        value = call_kwargs.get(self.max_sequence_arg)
        if value is None:
            param = inspect.signature(type(self.pipe).__call__).parameters.get(
                self.max_sequence_arg
            )
            value = param.default if param is not None else default
        return int(value)

    # ------------------------------------------------------------------ CFG
    def cfg_layout(self, guidance_scale: float, call_kwargs: dict[str, Any]) -> CfgLayout:
        """How the pipeline will run CFG for these call arguments (batched when ``w > 1``)."""
        kind: CfgKind = "batched" if guidance_scale > 1.0 else "none"
        return CfgLayout(kind, guidance_scale)

    def guidance_argument(self) -> str:
        """The pipeline call argument that sets the CFG scale."""
        return "guidance_scale"

    # ------------------------------------------------------------------ the call
    def parse_call(self, args: Sequence[Any], kwargs: dict[str, Any]) -> DenoiserCall:
        """Split a denoiser call's arguments into latent, timestep and conditioning."""
        bound = dict(zip(self._positional, args, strict=False))
        bound.update(kwargs)
        if self.sample_arg not in bound or "timestep" not in bound:
            raise RuntimeError(
                f"{type(self.denoiser).__name__} was called without `{self.sample_arg}` and "
                "`timestep`; diffwidget traces the pipeline's own denoising loop"
            )
        sample = bound.pop(self.sample_arg)
        timestep = bound.pop("timestep")
        conditioning = {k: v for k, v in bound.items() if k not in CALL_OPTIONS}
        return DenoiserCall(sample, timestep, conditioning)

    def layout(self, call: DenoiserCall) -> LatentLayout:
        """The latent layout of a recorded call (its sample is ``[B, C, h, w]``)."""
        h, w = call.sample.shape[-2:]
        return LatentLayout((int(h), int(w)), self.patch_size())

    def patch_size(self) -> int:
        """Latent cells per image-token side."""
        return int(getattr(self.denoiser.config, "patch_size", 1) or 1)

    def latent_channels(self) -> int:
        """Channels of the unpacked latent."""
        return int(self.denoiser.config.in_channels)

    def vae_scale_factor(self) -> int:
        """Image pixels per latent cell."""
        return int(getattr(self.pipe, "vae_scale_factor", 8))

    def default_image_size(self) -> int:
        """The side the pipeline generates at when no ``height``/``width`` is given."""
        sample = getattr(self.pipe, "default_sample_size", None)
        if sample is None:
            sample = self.denoiser.config.sample_size
        return int(sample) * self.vae_scale_factor()

    def layout_for(self, height: int, width: int) -> LatentLayout:
        """The latent layout of an image of ``height`` x ``width`` pixels."""
        factor = self.vae_scale_factor()
        return LatentLayout((height // factor, width // factor), self.patch_size())

    def to_model_input(self, latents: torch.Tensor, layout: LatentLayout) -> torch.Tensor:
        """``[B, C, h, w]`` latents in the form the denoiser takes (identity but for Flux)."""
        return latents

    def to_latents(self, sample: torch.Tensor, layout: LatentLayout) -> torch.Tensor:
        """The inverse of :meth:`to_model_input` (what ``scheduler.step`` sees -> grid)."""
        return sample

    def from_model_output(self, output: torch.Tensor, layout: LatentLayout) -> torch.Tensor:
        """The denoiser's output as the scheduler uses it, on the ``[B, C, h, w]`` grid."""
        return self.to_latents(output, layout)

    def run(
        self, sample: torch.Tensor, timestep: torch.Tensor, conditioning: dict[str, Any]
    ) -> torch.Tensor:
        """Call the denoiser like the pipeline does; returns its raw output tensor."""
        out = self.denoiser(
            **{self.sample_arg: sample}, timestep=timestep, **conditioning, return_dict=False
        )
        # diffusers models return a tuple with return_dict=False; modules that only share
        # the call signature may still return an output object.
        return out.sample if hasattr(out, "sample") else first_tensor(out)

    # ------------------------------------------------------------------ blocks
    def cam_layers(self) -> list[str]:
        """Default DF-CAM layers (every block of the denoiser, in data-flow order)."""
        raise NotImplementedError

    def probe_blocks(self) -> list[str]:
        """Default concept-probe blocks: early, middle and late."""
        layers = self.cam_layers()
        if not layers:
            raise ValueError(
                f"{type(self.denoiser).__name__} has no blocks to probe; pass blocks=[...]"
            )
        picks = sorted({len(layers) // 4, len(layers) // 2, (3 * len(layers)) // 4})
        return [layers[i] for i in picks]

    def block_tensor(self, path: str, output: Any) -> torch.Tensor:
        """The image activation in a block's output (the first tensor by default)."""
        return first_tensor(output)

    def spatial(self, tensor: torch.Tensor, layout: LatentLayout) -> torch.Tensor:
        """A block activation as ``[B, C, h, w]``: token sequences are laid on their grid."""
        if tensor.ndim == 4:
            return tensor
        if tensor.ndim != 3:
            raise ValueError(
                f"a block output of shape {tuple(tensor.shape)} is neither a feature map "
                "[B, C, h, w] nor a token sequence [B, N, D]"
            )
        batch, n, channels = tensor.shape
        h, w = layout.token_grid
        if h * w != n:
            side = math.isqrt(n)
            raise ValueError(
                f"a block output has {n} tokens but the image has {h}x{w} tokens "
                f"({'square ' + str(side) + 'x' + str(side) if side * side == n else 'no grid'})"
            )
        return tensor.transpose(1, 2).reshape(batch, channels, h, w)


@dataclass
class AttentionRecord:
    """One attention call's probabilities, kept in the autograd graph (token relevance).

    Attributes
    ----------
    path : str
        The attention module's path.
    probs : Tensor, shape (batch, heads, n_queries, n_keys)
        ``softmax(q k^T / sqrt(d))`` of the call, every query row.
    kind : {"cross", "self", "joint"}
        Image→text cross-attention (every key is text), image-only self-attention, or joint
        attention over one image-and-text sequence.
    n_text : int
        Text positions among the keys (0 for self-attention).
    text_first : bool
        For joint attention: whether the sequence is ``[text, image]`` (Flux) or
        ``[image, text]`` (SD3).
    """

    path: str
    probs: torch.Tensor
    kind: AttentionKind
    n_text: int = 0
    text_first: bool = False


@dataclass
class TextAttention:
    """A text encoder in eager attention, recording its self-attention probabilities.

    Attributes
    ----------
    encoder : nn.Module
        The text encoder.
    probs : list of Tensor, shape (batch, heads, n, n)
        The probabilities of each self-attention layer of the last :meth:`encode` call.
    """

    encoder: Any
    probs: list[torch.Tensor] = field(default_factory=list)

    def encode(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The encoder's last hidden state for ``ids`` and this call's attention probabilities."""
        self.probs.clear()
        device = next(self.encoder.parameters()).device
        hidden = self.encoder(ids.to(device))[0]
        return hidden, list(self.probs)


@contextmanager
def explicit_processors(
    denoiser: Any, make: Callable[[str, list[AttentionRecord]], Any]
) -> Iterator[list[AttentionRecord]]:
    """Swap every attention processor of ``denoiser`` for ``make(path, records)``.

    The originals are put back in ``finally``, also when the forward pass raises; traced
    generations never run with these slow processors.

    Raises
    ------
    ValueError
        When the denoiser has no attention layers.
    """
    modules = {n: m for n, m in denoiser.named_modules() if hasattr(m, "set_processor")}
    if not modules:
        raise ValueError(
            f"{type(denoiser).__name__} has no diffusers attention layers; token relevance "
            "needs a denoiser that attends to the prompt (e.g. a StableDiffusionPipeline's UNet)"
        )
    records: list[AttentionRecord] = []
    originals = {path: m.processor for path, m in modules.items()}
    try:
        for path, module in modules.items():
            module.set_processor(make(path, records))
        yield records
    finally:
        for path, module in modules.items():
            module.set_processor(originals[path])


def first_tensor(output: object) -> torch.Tensor:
    """The first tensor of a module output (tensor, tuple, list or ``BaseOutput``)."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    if hasattr(output, "to_tuple"):
        return first_tensor(output.to_tuple())
    raise TypeError(f"cannot read a tensor from a module output of type {type(output).__name__}")
