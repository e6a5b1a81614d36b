"""What the explorer reports beside its maps: colour-scale meanings, faithfulness entries.

Also the explorer's housekeeping that touches ipywidgets directly: closing every widget it
created. (Colab's custom widget manager is switched on by anywidget itself, once per
process, when a widget is created in Colab.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from diffwidget.explain.protocol import METHOD_VALUES
from diffwidget.widget import schema
from diffwidget.widget.codecs import encode_array
from diffwidget.widget.concept_overlay import CONCEPT, CONCEPT_SCALE


def scale_infos(attention_value: str) -> dict[str, dict[str, str]]:
    """What one value of each overlay means and how its maps are normalised.

    ``attention_value`` is what the trace's attention values are
    (:attr:`~diffwidget.tracing.facts.TraceFacts.attention_value`): a cross-attention
    probability, or a joint-attention share on SD3 and Flux.
    """
    infos = {
        "attention": {
            "meaning": attention_value,
            "normalisation": "each map divided by its own maximum; the scale shows that maximum",
        }
    }
    for kind in schema.HEAVY_OVERLAYS:
        infos[kind] = {
            "meaning": METHOD_VALUES.get(kind, "saliency"),
            "normalisation": "min–max normalised per step; the raw range is shown beside it",
        }
    infos[CONCEPT] = dict(CONCEPT_SCALE)
    return infos


@dataclass(frozen=True)
class FaithfulnessView:
    """Which map a faithfulness result belongs to (the view it was asked from)."""

    overlay: str
    step: int
    token: int | None
    layer: str
    head: int

    @classmethod
    def of(cls, widget: Any, step: int) -> FaithfulnessView:
        """The map shown by ``widget`` at ``step`` (token and filters as shown now)."""
        overlay = str(widget.overlay)
        attention = overlay == "attention"
        return cls(
            overlay=overlay,
            step=int(step),
            token=int(widget.token) if attention else None,
            layer=str(widget.attention_layer if attention else widget.saliency_layer),
            head=int(widget.attention_head) if attention else schema.MEAN_OVER_HEADS,
        )

    def key(self) -> tuple[Any, ...]:
        """Hashable identity."""
        return (self.overlay, self.step, self.token, self.layer, self.head)


def faithfulness_entry(view: FaithfulnessView, result: Any) -> dict[str, Any]:
    """The synced form of a :class:`~diffwidget.explain.results.FaithfulnessResult`."""
    meta = dict(result.meta or {})
    curves = np.stack(
        [
            result.saliency.deletion,
            result.saliency.insertion,
            result.random.deletion,
            result.random.insertion,
        ]
    ).astype(np.float32)
    operator = str(meta.get("operator", "paper"))
    similarity = str(meta.get("similarity", "?"))
    n_random = int(meta.get("n_random", 1))
    return {
        "overlay": view.overlay,
        "step": view.step,
        "token": view.token,
        "layer": view.layer,
        "head": view.head,
        "operator": operator,
        "operator_text": str(meta.get("operator_text", operator)),
        "similarity": similarity,
        "fractions": encode_array(np.asarray(result.saliency.fractions, np.float32)),
        "curves": encode_array(curves),
        "deletion_auc": float(result.saliency.deletion_auc),
        "insertion_auc": float(result.saliency.insertion_auc),
        "random_deletion_auc": float(result.random.deletion_auc),
        "random_insertion_auc": float(result.random.insertion_auc),
        "random_deletion_sd": float(meta.get("random_deletion_auc_sd", float("nan"))),
        "random_insertion_sd": float(meta.get("random_insertion_auc_sd", float("nan"))),
        "n_random": n_random,
        "description": (
            f"Insertion/deletion on the latent grid at step {view.step}: cells taken in the "
            f"map's order vs {n_random} seeded random order{'s' if n_random != 1 else ''}; "
            f"each stage's one-step prediction scored against the unperturbed one by "
            f"{similarity}. Lower deletion and higher insertion AUC mean a more faithful map."
        ),
    }


def close_widget_tree(widget: Any) -> None:
    """Close ``widget`` and every widget reachable through its synced traits (layouts, marks).

    ipywidgets keeps every open widget in a registry until it is closed; a DOM widget's
    ``layout`` (and a bqplot figure's marks, scales and axes) are widgets of their own.

    Examples
    --------
    >>> import ipywidgets
    >>> box = ipywidgets.HBox([ipywidgets.IntSlider()])
    >>> close_widget_tree(box)
    >>> box.children[0].comm is None
    True
    """
    import ipywidgets

    seen: set[int] = set()

    def visit(value: Any) -> None:
        if isinstance(value, ipywidgets.Widget):
            if id(value) in seen:
                return
            seen.add(id(value))
            for name in value.keys:
                if name.startswith("_"):
                    continue
                visit(getattr(value, name, None))
            value.close()
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    visit(widget)
