"""The typed contract between saliency methods and what shows or runs them (no torch).

Every per-step saliency method (DF-RISE, DF-CAM, or one of yours) is an object that

* is configured in ``__init__`` (number of masks, layers, seed, ...), usually through a
  typed config (:class:`~diffwidget.explain.base.SaliencyMethodBase` does this for you);
* has ``name`` (its registry name) and ``label`` (how people call it);
* computes with one verb, ``attribute(pipe, trace, step, progress=None)``, returning a
  :class:`~diffwidget.explain.results.SaliencyMap`;
* writes the sentence shown under its map with ``describe(result)``.

This module holds the registry of the saliency methods, one line each (:data:`METHODS`):
name, label, what a value of its map means, and where its class lives. The class registry
(:mod:`diffwidget.explain.registry`), the runs' ``--methods``, the widget's overlay
enumeration and the generated ``js/src/schema.ts`` all read it. A new method is its own
file plus its line here. This module imports no torch, so the widget can check method
objects without it.

Examples
--------
>>> from diffwidget.explain.rise import DFRise  # doctest: +SKIP
>>> check_saliency_method("df_rise", DFRise(n_masks=200)).label  # doctest: +SKIP
'DF-RISE'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args, runtime_checkable

if TYPE_CHECKING:
    from diffwidget.explain.results import SaliencyMap


@dataclass(frozen=True)
class MethodEntry:
    """One registered saliency method.

    Attributes
    ----------
    label : str
        How it is called in captions, menus and errors.
    value : str
        What one value of its (normalised) map means, for colour scales.
    module, cls : str
        Where the class lives (imported on first use by the registry).
    """

    label: str
    value: str
    module: str
    cls: str


#: Registry names of the per-step saliency methods (one name per line of :data:`METHODS`).
SaliencyMethodName = Literal["df_rise", "df_cam", "occlusion"]
#: The registry of the per-step saliency methods, in menu order.
METHODS: dict[str, MethodEntry] = {
    "df_rise": MethodEntry(
        "DF-RISE",
        "similarity of the prediction when the cell is kept",
        "diffwidget.explain.rise",
        "DFRise",
    ),
    "df_cam": MethodEntry(
        "DF-CAM",
        "Grad-CAM weight (activation × mean gradient, ReLU)",
        "diffwidget.explain.cam",
        "DFCam",
    ),
    "occlusion": MethodEntry(
        "Occlusion",
        "drop in similarity of the prediction when a window over the cell is zeroed",
        "diffwidget.explain.occlusion",
        "Occlusion",
    ),
}
SALIENCY_METHOD_NAMES: tuple[str, ...] = get_args(SaliencyMethodName)
if tuple(METHODS) != SALIENCY_METHOD_NAMES:  # pragma: no cover - import-time guard
    raise ImportError(
        f"the registry's methods {list(METHODS)} and SaliencyMethodName "
        f"{list(SALIENCY_METHOD_NAMES)} differ; name each method in both, in the same order"
    )
#: How each method is called in captions, menus and errors.
METHOD_LABELS: dict[str, str] = {name: entry.label for name, entry in METHODS.items()}
#: What one value of each method's (normalised) map means, for colour scales.
METHOD_VALUES: dict[str, str] = {name: entry.value for name, entry in METHODS.items()}
#: Registry names of the interventions over time steps (one name per line of
#: :data:`INTERVENTIONS`).
InterventionName = Literal["prompt_switch", "word_ablation", "activation_patching"]
#: The registry of the interventions: label, what one value of their curves or grids means,
#: and where the class lives. They branch a trace's recorded trajectory and judge the final
#: images (:mod:`diffwidget.explain.intervention_base`).
INTERVENTIONS: dict[str, MethodEntry] = {
    "prompt_switch": MethodEntry(
        "Prompt switch",
        "share of seeds whose final image keeps prompt A's value after switching to B at the step",
        "diffwidget.explain.prompt_switch",
        "PromptSwitch",
    ),
    "word_ablation": MethodEntry(
        "Word ablation",
        "share of seeds whose final image keeps the word's value with the word removed "
        "in the window",
        "diffwidget.explain.word_ablation",
        "WordAblation",
    ),
    "activation_patching": MethodEntry(
        "Activation patching",
        "share of seeds whose final image takes prompt B's value with the site patched from B",
        "diffwidget.explain.activation_patching",
        "ActivationPatching",
    ),
}
INTERVENTION_NAMES: tuple[str, ...] = get_args(InterventionName)
if tuple(INTERVENTIONS) != INTERVENTION_NAMES:  # pragma: no cover - import-time guard
    raise ImportError("INTERVENTIONS and InterventionName must name the same methods in order")
#: How each intervention is called in captions, menus and errors.
INTERVENTION_LABELS: dict[str, str] = {name: entry.label for name, entry in INTERVENTIONS.items()}
#: ``progress(done, total)``; returning ``False`` asks the method to stop early.
ProgressCallback = Callable[[int, int], "bool | None"]
#: Settings named in captions when they are in a result's ``meta``.
CAPTION_SETTINGS = ("n_masks", "p", "masks", "similarity", "target", "seed", "layers")
#: Longer lists (DF-CAM's default layers) are named by their first and last entries.
_NAMED_LIMIT = 6


class Cancelled(Exception):
    """Raised by a method without a partial result when ``progress`` returns ``False``."""


@runtime_checkable
class SaliencyMethod(Protocol):
    """A per-step saliency method as the widget and the runner use it."""

    @property
    def name(self) -> str:
        """Its registry name (a class attribute will do)."""
        ...

    @property
    def label(self) -> str:
        """How people call it."""
        ...

    def attribute(
        self, pipe: Any, trace: Any, step: int, progress: ProgressCallback | None = None
    ) -> SaliencyMap:
        """The map at loop index ``step``."""
        ...

    def describe(self, result: SaliencyMap) -> str:
        """One sentence saying what ``result`` shows and how it was computed."""
        ...


def method_label(name: str) -> str:
    """The label of a registered method, or the name itself for others."""
    return METHOD_LABELS.get(name) or INTERVENTION_LABELS.get(name, name)


def check_saliency_method(name: str, method: object) -> SaliencyMethod:
    """Check that ``method`` can serve the overlay ``name`` and return it.

    Raises
    ------
    TypeError
        When ``method`` is a class instead of an instance, lacks ``attribute`` or
        ``describe``, or is registered under another name; the message says what to pass.
    """
    if name not in SALIENCY_METHOD_NAMES:
        raise ValueError(f"no saliency overlay {name!r}; use one of {SALIENCY_METHOD_NAMES}")
    if isinstance(method, type):
        raise TypeError(
            f"methods[{name!r}] is the class {method.__name__}; pass an instance, e.g. "
            f"{method.__name__}() with its settings"
        )
    missing = [
        attr for attr in ("attribute", "describe") if not callable(getattr(method, attr, None))
    ]
    if missing:
        raise TypeError(
            f"methods[{name!r}] ({type(method).__name__}) has no {' or '.join(missing)}(); a "
            "saliency method needs attribute(pipe, trace, step, progress=None) -> SaliencyMap "
            "and describe(result) -> str (see diffwidget.explain.protocol.SaliencyMethod)"
        )
    own = getattr(method, "name", name)
    if own != name:
        raise TypeError(
            f"methods[{name!r}] is a {type(method).__name__} named {own!r}; register it under "
            f"methods={{{own!r}: ...}}"
        )
    return method  # type: ignore[return-value]


def describe_saliency(
    label: str,
    result: SaliencyMap,
    settings: Sequence[str] = CAPTION_SETTINGS,
    *,
    normalisation: str = "min–max normalised to [0, 1] per step",
) -> str:
    """The common caption shape: label, the settings found in ``meta``, the normalisation.

    Examples
    --------
    >>> import numpy as np
    >>> from diffwidget.explain.results import SaliencyMap
    >>> m = SaliencyMap("df_rise", 3, 500, np.zeros((2, 2)), np.zeros((2, 2)),
    ...                 meta={"n_masks": 8, "p": 0.5})
    >>> describe_saliency("DF-RISE", m, ("n_masks", "p"), normalisation="min–max per step")
    'DF-RISE saliency on the latent grid at step 3 (n_masks 8, p 0.5); min–max per step'
    """
    meta = dict(result.meta or {})
    named = []
    for key in settings:
        value = meta.get(key)
        if isinstance(value, (list, tuple)):
            names = [str(v) for v in value]
            if len(names) > _NAMED_LIMIT:
                names = [names[0], "…", names[-1]]
            named.append(f"{len(value)} {key} ({', '.join(names)})")
        elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
            named.append(f"{key} {value}")
    text = f"{label} saliency on the latent grid at step {result.step}"
    if named:
        text += f" ({', '.join(named)})"
    return f"{text}; {normalisation}"
