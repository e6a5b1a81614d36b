"""The registry of explanation methods, read by the widget, the runner and the contract tests.

Names and labels come from :mod:`diffwidget.explain.protocol`; the widget computes a heavy
overlay through exactly one call::

    saliency_method(name)(**settings).attribute(pipe, trace, step, progress=callback)
"""

from __future__ import annotations

import difflib

from diffwidget.explain.cam import DFCam
from diffwidget.explain.protocol import SALIENCY_METHOD_NAMES, SaliencyMethodName
from diffwidget.explain.relevance import TokenRelevance
from diffwidget.explain.rise import DFRise

__all__ = ["SALIENCY_METHODS", "TOKEN_METHODS", "SaliencyMethodName", "saliency_method"]

#: Methods that return a :class:`~diffwidget.explain.results.SaliencyMap` for one step.
SALIENCY_METHODS: dict[str, type] = {cls.name: cls for cls in (DFRise, DFCam)}
#: Methods that return a :class:`~diffwidget.explain.results.TokenRelevanceResult`.
TOKEN_METHODS: dict[str, type] = {"token_relevance": TokenRelevance}

if tuple(SALIENCY_METHODS) != SALIENCY_METHOD_NAMES:  # pragma: no cover - import-time guard
    raise ImportError(
        f"the saliency classes {sorted(SALIENCY_METHODS)} do not match the protocol's names "
        f"{SALIENCY_METHOD_NAMES}; add the new method to diffwidget/explain/protocol.py"
    )


def saliency_method(name: str) -> type:
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
    try:
        return SALIENCY_METHODS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(SALIENCY_METHODS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(
            f"no saliency method {name!r}.{hint} Registered: {sorted(SALIENCY_METHODS)}"
        ) from None
