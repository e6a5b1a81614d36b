"""The widget's synced state, written once: trait names, types and enumerations.

Everything else derives from this module: the anywidget class builds its traitlets from
:data:`TRAITS`, the kernel validates front-end writes with :func:`validate_incoming`, and
``js/src/schema.ts`` is generated from it by :func:`diffwidget.widget.schema_ts.typescript`
(``python -m diffwidget.widget.schema_ts`` rewrites it; a test fails when the two drift).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import traitlets

from diffwidget.explain.concept_results import WORD
from diffwidget.explain.protocol import METHOD_LABELS, SaliencyMethodName

#: Overlays: none, token attention (from the trace), every registered saliency method, and
#: the concept map of a typed word.
OverlayKind = Literal["none", "attention", SaliencyMethodName, "concept"]
#: Overlays computed on request in the kernel (the registered saliency methods).
HeavyOverlay = SaliencyMethodName
#: Overlays whose maps the kernel computes per step and sends in ``overlays``.
ComputedOverlay = Literal[SaliencyMethodName, "concept"]
#: Sources of the layer × step grid: the overlays with per-layer maps, the typed word's
#: concept maps, and the causal grid of activation patching (one number per cell).
GridSource = Literal["none", "attention", SaliencyMethodName, "concept", "patching"]
Status = Literal["idle", "running", "done", "cancelled", "error"]
ImageMode = Literal["x0", "noisy"]
CurveGroup = Literal[
    "attention_mass", "token_relevance", "concept_auc", "commitment", "faithfulness"
]
Dtype = Literal["uint8", "float32", "int32"]
#: How array payloads travel: binary comm buffers, or base64 text where buffers get lost.
Transport = Literal["binary", "base64"]
#: Messages the front end may send (actions, not state).
FrontendMessage = Literal[
    "cancel", "faithfulness", "decode_step", "buffers_missing", "prompt_switch"
]

OVERLAY_KINDS: tuple[str, ...] = get_args(OverlayKind)
HEAVY_OVERLAYS: tuple[str, ...] = get_args(HeavyOverlay)
COMPUTED_OVERLAYS: tuple[str, ...] = (*HEAVY_OVERLAYS, "concept")
GRID_SOURCES: tuple[str, ...] = get_args(GridSource)
STATUSES: tuple[str, ...] = get_args(Status)
IMAGE_MODES: tuple[str, ...] = get_args(ImageMode)
CURVE_GROUPS: tuple[str, ...] = get_args(CurveGroup)
DTYPES: tuple[str, ...] = get_args(Dtype)
TRANSPORTS: tuple[str, ...] = get_args(Transport)
FRONTEND_MESSAGES: tuple[str, ...] = get_args(FrontendMessage)

#: Human names of the overlays (menus, captions, errors), generated into schema.ts.
OVERLAY_LABELS: dict[str, str] = {
    "none": "no overlay",
    "attention": "token cross-attention",
    **METHOD_LABELS,
    "concept": "concept map",
}
#: The longest concept word the view may send (the concept maps' own limit).
CONCEPT_MAX_CHARS = WORD.n
#: Colour map of every overlay: matplotlib's inferno at eight evenly spaced points
#: (perceptually uniform, readable in greyscale). The PNG snapshot uses the same stops.
COLORMAP_NAME = "inferno"
COLORMAP_STOPS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 4),
    (40, 11, 84),
    (101, 21, 110),
    (159, 42, 99),
    (212, 72, 66),
    (245, 125, 21),
    (250, 193, 39),
    (252, 255, 164),
)
#: Categorical palette of curves (Tableau 10): distinct hues for up to ten series.
CURVE_PALETTE: tuple[str, ...] = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
)  # fmt: skip
#: Title and y-axis unit of each curve group (in-widget panels and bqplot figures).
CURVE_GROUP_TITLES: dict[str, str] = {
    "attention_mass": "Attention mass per token (image → text)",
    "token_relevance": "Token relevance per step (min–max over words)",
    "concept_auc": "Concept ROC-AUC per step",
    "commitment": "Committed: share of seeds keeping A's value when switched at step k",
    "faithfulness": "Faithfulness (insertion / deletion AUC)",
}
CURVE_GROUP_UNITS: dict[str, str] = {
    "attention_mass": "share of attention",
    "token_relevance": "relevance (0–1)",
    "concept_auc": "ROC-AUC",
    "commitment": "share",
    "faithfulness": "AUC",
}
#: Most seeds a prompt switch asked from the page judges (each missing one is traced first).
SWITCH_MAX_SEEDS = 8
#: ``attention_head`` value meaning "mean over heads".
MEAN_OVER_HEADS = -1

#: Enumerations exported to TypeScript as string unions plus constant arrays.
ENUMS: dict[str, tuple[str, ...]] = {
    "OverlayKind": OVERLAY_KINDS,
    "HeavyOverlay": HEAVY_OVERLAYS,
    "ComputedOverlay": COMPUTED_OVERLAYS,
    "GridSource": GRID_SOURCES,
    "Status": STATUSES,
    "ImageMode": IMAGE_MODES,
    "CurveGroup": CURVE_GROUPS,
    "Dtype": DTYPES,
    "Transport": TRANSPORTS,
    "FrontendMessage": FRONTEND_MESSAGES,
}

TraitKind = Literal["int", "float", "bool", "str", "text", "enum", "str_list", "int_list", "json"]


@dataclass(frozen=True)
class TraitSpec:
    """One synced trait.

    Attributes
    ----------
    name : str
        Trait name, identical in Python and TypeScript (snake_case on both sides).
    kind : str
        Value kind; ``json`` traits carry structured payloads whose TS type is ``ts_type``.
    default : Any
        Initial value.
    writable : bool
        Whether the front end may set it; every such write is validated in the kernel.
    doc : str
        What the trait means.
    enum : str, optional
        Name of the enumeration in :data:`ENUMS` for ``enum`` traits.
    ts_type : str, optional
        TypeScript type for ``json`` traits.
    """

    name: str
    kind: TraitKind
    default: Any
    writable: bool
    doc: str
    enum: str | None = None
    ts_type: str | None = None


TRAITS: tuple[TraitSpec, ...] = (
    TraitSpec("step", "int", 0, True, "Loop index shown (0..n_steps-1), never the timestep."),
    TraitSpec("token", "int", 0, True, "Index into `tokens` of the token whose overlay is shown."),
    TraitSpec("overlay", "enum", "none", True, "Overlay drawn over the image.", "OverlayKind"),
    TraitSpec("opacity", "float", 0.6, True, "Overlay opacity in [0, 1]."),
    TraitSpec("image_mode", "enum", "x0", True, "Predicted clean image or noisy x_t.", "ImageMode"),
    TraitSpec("show_special", "bool", False, True, "Show start/end/padding token chips."),
    TraitSpec(
        "attention_layer",
        "str",
        "",
        True,
        "Attention filter: '' (all layers), a grid such as '16x16', or one attn2 layer path.",
    ),
    TraitSpec("attention_head", "int", MEAN_OVER_HEADS, True, "Attention head shown; -1 = mean."),
    TraitSpec(
        "saliency_layer",
        "str",
        "",
        True,
        "Layer of a saliency method's per-layer maps shown ('' = the method's combination).",
    ),
    TraitSpec(
        "concept",
        "text",
        "",
        True,
        "Word (any, in the prompt or not) whose concept map the 'concept' overlay shows; "
        "'' = none.",
    ),
    TraitSpec(
        "patch_word",
        "text",
        "",
        True,
        "Word of the prompt the causal (patching) grid replaces; '' = none.",
    ),
    TraitSpec(
        "patch_replacement",
        "text",
        "",
        True,
        "Word the causal grid's source prompt has instead of `patch_word`; '' = none.",
    ),
    TraitSpec(
        "grid",
        "enum",
        "none",
        True,
        "Source of the layer x step grid ('none' = closed).",
        "GridSource",
    ),
    TraitSpec(
        "switch_word",
        "str",
        "",
        True,
        "Prompt word a prompt switch replaces (one of `switch_words`; '' = none chosen).",
    ),
    TraitSpec(
        "switch_replacement",
        "text",
        "",
        True,
        "The word it is replaced by (any one word, shown only as text).",
    ),
    TraitSpec(
        "switch_seeds",
        "int",
        1,
        True,
        "Seeds a prompt switch is judged over (1..SWITCH_MAX_SEEDS): the trace's seed, then +1…",
    ),
    TraitSpec("status", "enum", "idle", False, "State of the heavy computation.", "Status"),
    TraitSpec("progress", "float", 0.0, False, "Progress of the running computation, 0..1."),
    TraitSpec("error", "str", "", False, "Last rejected input or failed computation; '' if none."),
    TraitSpec("prompt", "str", "", False, "The traced prompt."),
    TraitSpec("tokens", "str_list", [], False, "Token strings."),
    TraitSpec("token_kinds", "str_list", [], False, "start / word / end / pad per token."),
    TraitSpec("timesteps", "int_list", [], False, "Scheduler timestep t of each step."),
    TraitSpec(
        "switch_words", "str_list", [], False, "The prompt's content words a switch can replace."
    ),
    TraitSpec("available", "str_list", [], False, "Overlay kinds that can be shown or computed."),
    TraitSpec(
        "actions",
        "str_list",
        ["cancel"],
        False,
        "Front-end messages the kernel can serve now (e.g. 'faithfulness' needs a pipeline).",
    ),
    TraitSpec("transport", "enum", "binary", False, "How array payloads travel.", "Transport"),
    TraitSpec(
        "previews",
        "json",
        None,
        False,
        "Decoded predicted x0 per step: uint8 [N, H, W, 3].",
        ts_type="ArrayPayload | null",
    ),
    TraitSpec(
        "exact_steps",
        "int_list",
        [],
        False,
        "Steps whose x0 preview was replaced by a full VAE decode on request.",
    ),
    TraitSpec(
        "noisy_previews",
        "json",
        None,
        False,
        "Decoded noisy latent x_t per step: uint8 [N, H, W, 3] (sent when first shown).",
        ts_type="ArrayPayload | null",
    ),
    TraitSpec(
        "attention",
        "json",
        None,
        False,
        "Per-token attention of the default filter, on its own grid (sent at open).",
        ts_type="AttentionSet | null",
    ),
    TraitSpec(
        "attention_filtered",
        "json",
        None,
        False,
        "Attention under the current filter when it is not the default (the view keeps each "
        "one it received); null under the default.",
        ts_type="AttentionSet | null",
    ),
    TraitSpec(
        "overlays",
        "json",
        {},
        False,
        "Computed overlays per kind: maps uint8 [K, h, w] for the listed steps (the concept "
        "map's are of the word in `concept`).",
        ts_type="Partial<Record<ComputedOverlay, OverlaySet>>",
    ),
    TraitSpec(
        "layer_options",
        "json",
        {"attention": [], "saliency": {}, "heads": 0},
        False,
        "Values the layer and head filters accept, with labels.",
        ts_type="LayerOptions",
    ),
    TraitSpec(
        "grid_data",
        "json",
        None,
        False,
        "Maps of the open layer x step grid (fetched when `grid` is set).",
        ts_type="GridData | null",
    ),
    TraitSpec(
        "scales",
        "json",
        {},
        False,
        "What the colour scale of each overlay means and how maps were normalised.",
        ts_type="Partial<Record<OverlayKind, ScaleInfo>>",
    ),
    TraitSpec(
        "faithfulness",
        "json",
        [],
        False,
        "Insertion/deletion results computed for shown maps, beside random orders.",
        ts_type="FaithfulnessEntry[]",
    ),
    TraitSpec(
        "curves",
        "json",
        None,
        False,
        "Curves over steps: values float32 [K, N] (NaN where not computed).",
        ts_type="CurveSet | null",
    ),
    TraitSpec(
        "switch",
        "json",
        None,
        False,
        "The last prompt switch: the final image of each switch step (one seed) and when "
        "each judged attribute committed.",
        ts_type="SwitchFilmstrip | null",
    ),
    TraitSpec(
        "descriptions",
        "json",
        {},
        False,
        "What each overlay and image mode shows, keyed by overlay kind or image mode.",
        ts_type="Record<string, string>",
    ),
)

TRAITS_BY_NAME: dict[str, TraitSpec] = {spec.name: spec for spec in TRAITS}
FRONTEND_WRITABLE: tuple[str, ...] = tuple(spec.name for spec in TRAITS if spec.writable)
#: Traits that carry array payloads (re-encoded as base64 when buffers do not arrive).
PAYLOAD_TRAITS: tuple[str, ...] = (
    "previews",
    "noisy_previews",
    "attention",
    "attention_filtered",
    "overlays",
    "grid_data",
    "faithfulness",
    "curves",
    "switch",
)


def build_traits() -> dict[str, traitlets.TraitType]:
    """Return fresh synced traitlets for every :data:`TRAITS` entry."""
    traits: dict[str, traitlets.TraitType] = {}
    for spec in TRAITS:
        trait: traitlets.TraitType
        if spec.kind == "int":
            trait = traitlets.Int(spec.default)
        elif spec.kind == "float":
            trait = traitlets.Float(spec.default)
        elif spec.kind == "bool":
            trait = traitlets.Bool(spec.default)
        elif spec.kind in ("str", "text"):
            trait = traitlets.Unicode(spec.default)
        elif spec.kind == "enum":
            assert spec.enum is not None
            trait = traitlets.Enum(ENUMS[spec.enum], default_value=spec.default)
        elif spec.kind == "str_list":
            trait = traitlets.List(traitlets.Unicode(), default_value=list(spec.default))
        elif spec.kind == "int_list":
            trait = traitlets.List(traitlets.Int(), default_value=list(spec.default))
        else:
            default = dict(spec.default) if isinstance(spec.default, dict) else spec.default
            trait = traitlets.Any(default, allow_none=True)
        traits[spec.name] = trait.tag(sync=True)
    return traits


class InvalidInput(ValueError):
    """A value sent by the front end that the kernel refuses."""


@dataclass(frozen=True)
class Bounds:
    """What the current trace accepts: step and token ranges, heads, layer filter values
    (and the prompt switch's seed count, 1..SWITCH_MAX_SEEDS, the same for every trace)."""

    n_steps: int
    n_tokens: int
    n_heads: int = 0
    choices: Mapping[str, Sequence[str]] = field(default_factory=dict)

    def int_range(self, name: str) -> tuple[int, int]:
        """Inclusive ``(low, high)`` of an integer trait."""
        if name == "step":
            return 0, self.n_steps - 1
        if name == "token":
            return 0, self.n_tokens - 1
        if name == "attention_head":
            return MEAN_OVER_HEADS, self.n_heads - 1
        if name == "switch_seeds":
            return 1, SWITCH_MAX_SEEDS
        raise KeyError(name)


def validate_incoming(name: str, value: Any, bounds: Bounds) -> Any:
    """Check one front-end write and return the value to store.

    Parameters
    ----------
    name : str
        Trait name the front end tried to set.
    value : Any
        The decoded JSON value (or a buffer, which no writable trait accepts).
    bounds : Bounds
        Ranges and choices of the current trace.

    Returns
    -------
    Any
        The value, converted to its Python type.

    Raises
    ------
    InvalidInput
        With a message that says what is accepted.

    Examples
    --------
    >>> validate_incoming("step", 3.0, Bounds(n_steps=20, n_tokens=5))
    3
    """
    spec = TRAITS_BY_NAME.get(name)
    if spec is None or not spec.writable:
        raise InvalidInput(
            f"the view may not set {name!r}; writable state is {list(FRONTEND_WRITABLE)}"
        )
    if spec.kind == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidInput(f"{name} must be an integer, got {type(value).__name__}")
        if isinstance(value, float) and not value.is_integer():
            raise InvalidInput(f"{name} must be an integer, got {value}")
        value = int(value)
        low, high = bounds.int_range(name)
        if name == "attention_head" and bounds.n_heads == 0 and value != MEAN_OVER_HEADS:
            raise InvalidInput(
                f"attention_head {value} is not available: this trace recorded only the mean "
                "over heads (-1)"
            )
        if not low <= value <= high:
            raise InvalidInput(f"{name} {value} is out of range; use {low}..{high}")
        return value
    if spec.kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidInput(f"{name} must be a number, got {type(value).__name__}")
        if not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise InvalidInput(f"{name} must lie in [0, 1], got {value}")
        return float(value)
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise InvalidInput(f"{name} must be true or false, got {value!r}")
        return value
    if spec.kind == "enum":
        assert spec.enum is not None
        allowed = ENUMS[spec.enum]
        if not isinstance(value, str) or value not in allowed:
            raise InvalidInput(f"unknown {name} {value!r}; use one of {list(allowed)}")
        return value
    if spec.kind == "text":
        return validate_concept(value, _TEXT_NAMES.get(name, name))
    if spec.kind == "str":
        allowed_values = ["", *bounds.choices.get(name, ())]
        if not isinstance(value, str) or value not in allowed_values:
            raise InvalidInput(f"unknown {name} {value!r}; use one of {allowed_values}")
        return value
    raise InvalidInput(f"the view may not set {name!r}")


#: What each free-text trait is called in the messages that refuse a value.
_TEXT_NAMES = {
    "concept": "the concept word",
    "switch_replacement": "the replacement word",
    "patch_word": "the patched word",
    "patch_replacement": "the patch's replacement word",
}


def validate_concept(value: Any, what: str = "the concept word") -> str:
    """A word typed in the view, checked: whitespace collapsed, length capped.

    The concept word and the prompt switch's replacement (``what`` names it in errors).
    ``""`` clears the word. Raises :class:`InvalidInput` saying what is accepted.

    Examples
    --------
    >>> validate_concept("  red   circle ")
    'red circle'
    """
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be text, got {type(value).__name__}")
    text = " ".join(value.split())
    if len(text) > CONCEPT_MAX_CHARS:
        raise InvalidInput(
            f"{what} has {len(text)} characters, too long; type a word or a short phrase "
            f"(at most {CONCEPT_MAX_CHARS} characters)"
        )
    if any(not ch.isprintable() for ch in text):
        raise InvalidInput(f"{what} has control characters; type plain text")
    return text
