"""The registry of explanation methods: names -> classes -> configs.

The saliency methods are the lines of :data:`diffwidget.explain.protocol.METHODS` (name,
label and where the class lives); this module imports their classes, token relevance's and
the concept maps'. The widget computes a
heavy overlay through exactly one call::

    saliency_method(name)(config_or_settings).attribute(pipe, trace, step, progress=callback)

and a run rebuilds a method from its stored config with :func:`build`.

Examples
--------
>>> config_class("df_rise").__name__
'DFRiseConfig'
>>> type(build(config_class("df_cam")())).__name__
'DFCam'
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from diffwidget.explain.base import Method, SaliencyMethodBase
from diffwidget.explain.concept_maps import ConceptMaps
from diffwidget.explain.config import MethodConfig
from diffwidget.explain.protocol import INTERVENTIONS, METHODS, MethodEntry, SaliencyMethodName
from diffwidget.explain.relevance import TokenRelevance

__all__ = [
    "CONCEPT_METHODS",
    "INTERVENTION_METHODS",
    "SALIENCY_METHODS",
    "TOKEN_METHODS",
    "SaliencyMethodName",
    "build",
    "config_class",
    "intervention_method",
    "method_name",
    "saliency_method",
]


def _load(name: str, table: dict[str, MethodEntry] = METHODS) -> Any:
    entry = table[name]
    cls = getattr(importlib.import_module(entry.module), entry.cls)
    if getattr(cls, "name", None) != name:  # pragma: no cover - import-time guard
        raise ImportError(
            f"{entry.module}.{entry.cls} is named {getattr(cls, 'name', None)!r}, but the "
            f"registry lists it as {name!r}; make them agree in diffwidget/explain/protocol.py"
        )
    return cls


#: Methods that return a :class:`~diffwidget.explain.results.SaliencyMap` for one step.
SALIENCY_METHODS: dict[str, type[SaliencyMethodBase[Any]]] = {name: _load(name) for name in METHODS}
#: Methods that return a :class:`~diffwidget.explain.results.TokenRelevanceResult`.
TOKEN_METHODS: dict[str, type[Method[Any]]] = {TokenRelevance.name: TokenRelevance}
#: Methods that return a :class:`~diffwidget.explain.concept_maps.ConceptMapsResult`.
CONCEPT_METHODS: dict[str, type[Method[Any]]] = {ConceptMaps.name: ConceptMaps}
#: The interventions over time steps (prompt switch, word ablation, activation patching):
#: ``run(pipe, traces, ...)`` returns a judged result
#: (:mod:`diffwidget.explain.intervention_results`).
INTERVENTION_METHODS: dict[str, type[Method[Any]]] = {
    name: _load(name, INTERVENTIONS) for name in INTERVENTIONS
}
_ALL: dict[str, type[Method[Any]]] = {
    **SALIENCY_METHODS,
    **TOKEN_METHODS,
    **CONCEPT_METHODS,
    **INTERVENTION_METHODS,
}


def _unknown(name: str, known: dict[str, Any], what: str) -> KeyError:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return KeyError(f"no {what} {name!r}.{hint} Registered: {sorted(known)}")


def _lookup(table: dict[str, Any], name: str, what: str) -> Any:
    try:
        return table[name]
    except KeyError:
        raise _unknown(name, table, what) from None


def saliency_method(name: str) -> type[SaliencyMethodBase[Any]]:
    """The saliency method class registered under ``name``.

    Raises
    ------
    KeyError
        For an unknown name; the message lists the registered names.

    Examples
    --------
    >>> saliency_method("df_cam").__name__
    'DFCam'
    """
    return _lookup(SALIENCY_METHODS, name, "saliency method")


def intervention_method(name: str) -> type[Method[Any]]:
    """The intervention class registered under ``name``.

    Raises
    ------
    KeyError
        For an unknown name; the message lists the registered names.

    Examples
    --------
    >>> intervention_method("prompt_switch").__name__
    'PromptSwitch'
    """
    return _lookup(INTERVENTION_METHODS, name, "intervention")


def config_class(name: str) -> type[MethodConfig]:
    """The config class of the registered method ``name`` (saliency or token method)."""
    try:
        return _ALL[name].config_class
    except KeyError:
        raise _unknown(name, _ALL, "method") from None


def method_name(config: MethodConfig) -> str:
    """The registry name of the method ``config`` configures.

    Raises
    ------
    TypeError
        For a config no registered method takes.
    """
    for name, cls in _ALL.items():
        if type(config) is cls.config_class:
            return name
    raise TypeError(
        f"{type(config).__name__} configures no registered method; registered: {sorted(_ALL)}"
    )


def build(config: MethodConfig, **options: Any) -> Method[Any]:
    """The registered method configured by ``config`` (``options``: e.g. ``progress_bar``)."""
    return _ALL[method_name(config)](config, **options)
