"""The facts of a trace: one typed record, its JSON form (``meta`` in a trace file) and its readers.

:class:`TraceFacts` is what a trace records besides its arrays: the denoiser family, the CFG
and latent layouts, the noise schedule, how to rebuild the denoiser's call, the stored token
positions, what the attention values mean, where the previews came from, versions. It is
written by :meth:`diffwidget.tracing.context.TraceContext.result`, kept as ``Trace.facts``
and read by attribute everywhere else.

Older files hold fewer facts. Format 1 (UNet pipelines only) had no family, CFG layout,
latent layout, conditioning layout or model timesteps; those fields default to what format 1
meant (:meth:`TraceFacts.cfg`, :meth:`TraceFacts.call_layout`, :attr:`TraceFacts.timesteps_in`
apply the defaults), so this module is the one reader of every format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal, get_args

from diffwidget.records import NON_FINITE, JsonValue, MaxLen, Record
from diffwidget.tracing.cfg import CfgKind, CfgLayout, Half
from diffwidget.tracing.latent_rgb import LatentRgbMap
from diffwidget.tracing.noise import NoiseFamily, PredictionSource, PredictionType

#: Kind of each stored token position; start/end/pad are hidden by default in views.
TokenKind = Literal["start", "word", "end", "pad"]
TOKEN_KINDS: tuple[str, ...] = get_args(TokenKind)
#: Denoiser families (``DenoiserFamily.name`` of each module in ``tracing/families``).
FamilyName = Literal["unet", "sd3", "flux", "pixart"]
#: Format-1 traces came from UNet pipelines only.
LEGACY_FAMILY: FamilyName = "unet"
#: What the rows of ``Trace.attention`` sum to.
Normalisation = Literal["text_softmax", "joint_share"]
NORMALISATIONS: tuple[str, ...] = get_args(Normalisation)
#: What each normalisation means, for metadata and overlay captions.
NORMALISATION_TEXT: dict[str, str] = {
    "text_softmax": "softmax over the text tokens (cross-attention): each patch's row sums to 1",
    "joint_share": (
        "image→text block of the joint softmax over image and text keys (raw joint share, "
        "not renormalised over text): each patch's row sums to its share of attention on text"
    ),
}
#: What one attention value is, for colour scales (one phrase per normalisation).
ATTENTION_VALUE: dict[str, str] = {
    "text_softmax": "cross-attention probability of the token at each latent cell",
    "joint_share": (
        "joint-attention share of the token at each latent cell (its part of the joint "
        "softmax over image and text keys)"
    ),
}
#: Timestep dtypes a replay may build (the denoiser's own timestep argument); nothing else
#: from a file ever names a torch attribute.
TimestepDtype = Literal["float16", "bfloat16", "float32", "float64", "int32", "int64"]
#: How a replay rebuilds each argument of the denoiser call: a tensor with one row per CFG
#: half, a tensor without a batch axis, ``None``, or a plain value.
ConditioningKind = Literal["rows", "batch_free", "none", "value"]
#: The keyword whose tensor is stored as ``Trace.prompt_embeds``.
TEXT_ARGUMENT = "encoder_hidden_states"

#: Parts of a trace that can be missing when something failed after the denoising loop.
MissingPart = Literal["image", "previews"]

#: Bounds on what a file may claim (far above any pipeline's, far below a hostile file's).
MAX_TEXT_TOKENS = 4096
MAX_STEPS = 10_000
MAX_LAYERS = 4096
_NAME = MaxLen(1000)
_TEXT = MaxLen(100_000)

Name = Annotated[str, _NAME]
StepFloats = Annotated[list[float], MaxLen(MAX_STEPS)]
TokenInts = Annotated[list[int], MaxLen(MAX_TEXT_TOKENS)]


def check_tokens(tokens: list[str], kinds: list[str]) -> None:
    """Raise ``ValueError`` unless each token has one known kind."""
    if len(tokens) != len(kinds):
        raise ValueError(
            f"tokens ({len(tokens)}) and token_kinds ({len(kinds)}) must have the same length"
        )
    bad = [k for k in kinds if k not in TOKEN_KINDS]
    if bad:
        raise ValueError(f"unknown token kinds {bad[:5]}; use one of {TOKEN_KINDS}")


@dataclass(frozen=True)
class CfgFacts(Record):
    """The CFG layout recorded (``w`` is ``Trace.guidance_scale``)."""

    layout: CfgKind
    halves: Annotated[list[Half], MaxLen(2)]


@dataclass(frozen=True)
class LatentLayoutFacts(Record):
    """The latent grid and the denoiser's patch size (Flux packs 2x2 latent cells)."""

    latent_hw: tuple[int, int]
    patch: int = 1


@dataclass(frozen=True)
class NoiseSchedule(Record):
    """Each step's ``x_t = alpha x0 + sigma eps`` and the model-input scale."""

    family: NoiseFamily
    alpha: StepFloats
    sigma: StepFloats
    model_input_scale: StepFloats

    def __post_init__(self) -> None:
        if not len(self.alpha) == len(self.sigma) == len(self.model_input_scale):
            raise ValueError("alpha, sigma and model_input_scale need one value per step")


@dataclass(frozen=True)
class ConditioningEntry(Record):
    """One argument of the denoiser call, and how a replay rebuilds it."""

    name: Name
    parent: Name | None
    kind: ConditioningKind
    value: Annotated[str, _NAME] | int | float | bool | None = None


@dataclass(frozen=True)
class TextCut(Record):
    """A prompt longer than one text encoder: the words that encoder never saw."""

    segment: Name
    limit: int
    dropped: Annotated[list[Name], MaxLen(MAX_TEXT_TOKENS * 8)]


class TraceIncompleteWarning(UserWarning):
    """A trace was kept without a part that failed after the loop (``facts.missing``)."""


@dataclass(frozen=True)
class Missing(Record):
    """A part of the trace that could not be made after the loop, and why.

    The recorded steps are complete; ``reason`` is the error's text (e.g. the pipeline's VAE
    decode running out of memory, which leaves the trace without its final image).
    """

    part: MissingPart
    reason: Annotated[str, _NAME]


@dataclass(frozen=True)
class TraceFacts(Record):
    """Everything a trace records besides its arrays (``meta`` in the file).

    Every field is optional in a file: format 1 and traces built in code hold only some.
    Unknown keys are ignored, so a file with facts added later still opens.

    Examples
    --------
    >>> TraceFacts(family="flux").family
    'flux'
    >>> TraceFacts.from_json({"seed": 3, "cfg": True}).seed  # format 1 wrote "cfg": ignored
    3
    """

    UNKNOWN_KEYS = "ignore"

    family: FamilyName = LEGACY_FAMILY
    pipeline: Name | None = None
    denoiser: Name | None = None
    scheduler: Name | None = None
    scheduler_config: Annotated[JsonValue, NON_FINITE] = None
    prediction_type: PredictionType | None = None
    seed: int | None = None
    height: int | None = None
    width: int | None = None
    negative_prompt: Annotated[str, _TEXT] | None = None
    cfg_layout: CfgFacts | None = None
    preview_source: PredictionSource | None = None
    preview_decoder: Name | None = None
    preview_map: LatentRgbMap | None = None
    token_indices: TokenInts | None = None
    token_segments: Annotated[list[Name], MaxLen(MAX_TEXT_TOKENS)] | None = None
    token_words: TokenInts | None = None
    n_text_tokens: int | None = None
    text_cut: Annotated[list[TextCut], MaxLen(8)] = field(default_factory=list)
    attention_grids: Annotated[dict[str, tuple[int, int]], MaxLen(MAX_LAYERS)] = field(
        default_factory=dict
    )
    attention_normalisation: Normalisation = "text_softmax"
    latent_layout: LatentLayoutFacts | None = None
    conditioning: Annotated[list[ConditioningEntry], MaxLen(64)] | None = None
    model_timesteps: StepFloats | None = None
    model_timestep_dtype: TimestepDtype = "float32"
    noise_schedule: NoiseSchedule | None = None
    timesteps_exact: StepFloats | None = None
    unet_dtype: Name | None = None
    versions: Annotated[dict[str, Name], MaxLen(64)] = field(default_factory=dict)
    missing: Annotated[list[Missing], MaxLen(4)] = field(default_factory=list)

    def cfg(self, guidance_scale: float, n_rows: int) -> CfgLayout:
        """The CFG layout a replay uses (:meth:`~diffwidget.tracing.cfg.CfgLayout.replayed`).

        Format 1 recorded no layout: CFG was batched when ``w > 1``.
        """
        kind: CfgKind = self.cfg_layout.layout if self.cfg_layout else "batched"
        return CfgLayout.replayed(kind, guidance_scale, n_rows)

    def call_layout(self, extra: list[str]) -> list[ConditioningEntry]:
        """How to rebuild the denoiser call; format 1: text, then SDXL's ``extra`` tensors."""
        if self.conditioning is not None:
            return self.conditioning
        legacy = [ConditioningEntry(TEXT_ARGUMENT, None, "rows")]
        return legacy + [ConditioningEntry(k, "added_cond_kwargs", "rows") for k in extra]

    @property
    def guided(self) -> bool:
        """Whether the run had an unconditional CFG half (format 1: UNet CFG was batched)."""
        return self.cfg_layout is None or self.cfg_layout.layout != "none"

    @property
    def timesteps_in(self) -> list[float] | None:
        """The denoiser's timestep argument per step (format 1: the scheduler's exact ``t``)."""
        return self.model_timesteps or self.timesteps_exact

    @property
    def attention_value(self) -> str:
        """What one stored attention value is (for colour scales and captions)."""
        return ATTENTION_VALUE[self.attention_normalisation]

    def missing_note(self) -> str:
        """One sentence per part of the trace that is missing, with the reason.

        Examples
        --------
        >>> TraceFacts(missing=[Missing("image", "out of memory")]).missing_note()
        'No final image: out of memory.'
        """
        what = {"image": "No final image", "previews": "No previews"}
        return " ".join(f"{what[m.part]}: {m.reason.rstrip('.')}." for m in self.missing)

    def cut_note(self) -> str:
        """One sentence per text encoder that cut the prompt, naming the words it never saw.

        Examples
        --------
        >>> TraceFacts(text_cut=[TextCut("clip", 77, ["blue", "square"])]).cut_note()[-28:]
        '77 positions: "blue square".'
        """
        notes = []
        for cut in self.text_cut:
            words = " ".join(cut.dropped)
            notes.append(
                f"Words the {cut.segment} text encoder never saw, beyond its {cut.limit} "
                f'positions: "{words}".'
            )
        return " ".join(notes)
