"""The registry of explanation methods, read by the widget and by the contract tests.

The widget computes heavy overlays through exactly one call::

    saliency_method(name)().attribute(pipe, trace, step, progress=callback)
"""

from __future__ import annotations

import difflib
from typing import Literal

from diffwidget.explain.cam import DFCam
from diffwidget.explain.relevance import TokenRelevance
from diffwidget.explain.rise import DFRise

SaliencyMethodName = Literal["df_rise", "df_cam"]

#: Methods that return a :class:`~diffwidget.explain.results.SaliencyMap` for one step.
SALIENCY_METHODS: dict[str, type] = {"df_rise": DFRise, "df_cam": DFCam}
#: Methods that return a :class:`~diffwidget.explain.results.TokenRelevanceResult`.
TOKEN_METHODS: dict[str, type] = {"token_relevance": TokenRelevance}


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
