"""Explanation methods computed from a trace: one class per method, one verb each.

Names load on first use, so importing this package (as the torch-free widget does for the
attention aggregation) never imports torch.

Examples
--------
>>> from diffwidget.explain import DFRise, DFCam, TokenRelevance  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "AttentionMaps": "diffwidget.explain.attention",
    "DFRise": "diffwidget.explain.rise",
    "DFRiseConfig": "diffwidget.explain.rise",
    "DFCam": "diffwidget.explain.cam",
    "DFCamConfig": "diffwidget.explain.cam",
    "TokenRelevance": "diffwidget.explain.relevance",
    "TokenRelevanceConfig": "diffwidget.explain.relevance",
    "InsertionDeletion": "diffwidget.explain.faithfulness",
    "InsertionDeletionConfig": "diffwidget.explain.faithfulness",
    "ConceptProbe": "diffwidget.explain.probes",
    "ConceptCurves": "diffwidget.explain.probes",
    "ConceptSet": "diffwidget.explain.concepts",
    "saliency_method": "diffwidget.explain.registry",
    "PromptSwitch": "diffwidget.explain.prompt_switch",
    "PromptSwitchConfig": "diffwidget.explain.prompt_switch",
    "WordAblation": "diffwidget.explain.word_ablation",
    "WordAblationConfig": "diffwidget.explain.word_ablation",
    "ActivationPatching": "diffwidget.explain.activation_patching",
    "ActivationPatchingConfig": "diffwidget.explain.activation_patching",
    "CommitmentCurves": "diffwidget.explain.intervention_results",
    "WordAblationResult": "diffwidget.explain.intervention_results",
    "PatchingGrid": "diffwidget.explain.intervention_results",
    "Judge": "diffwidget.explain.judges",
    "scene_judges": "diffwidget.explain.judges",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'diffwidget.explain' has no attribute {name!r}")


def __dir__() -> list[str]:
    # Tab completion offers the methods, not this module's own imports.
    return list(__all__)
