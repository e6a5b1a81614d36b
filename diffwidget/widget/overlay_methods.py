"""The overlay methods an explorer uses: the ones given, checked, and the registry's defaults."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from diffwidget.explain.protocol import SaliencyMethod, check_saliency_method
from diffwidget.widget import schema


def resolve_methods(
    pipe: Any,
    methods: Mapping[str, Any] | None,
    options: Mapping[str, Mapping[str, Any]] | None,
) -> dict[str, SaliencyMethod | None]:
    """The explorer's overlay methods: given ones checked, registry defaults with a pipeline.

    Examples
    --------
    >>> sorted(resolve_methods(None, {}, None))
    []
    """
    if options is not None:
        warnings.warn(
            "method_options is deprecated; pass methods={'df_rise': DFRise(n_masks=200)}",
            DeprecationWarning,
            stacklevel=3,
        )
        unknown = sorted(set(options) - set(schema.HEAVY_OVERLAYS))
        if unknown:
            raise ValueError(f"method_options for {unknown}; use keys from {schema.HEAVY_OVERLAYS}")
    if methods is not None and not isinstance(methods, Mapping):
        raise TypeError(
            "methods must be a dict of overlay name -> method object, e.g. "
            "{'df_rise': DFRise(n_masks=200)}"
        )
    resolved: dict[str, SaliencyMethod | None] = {}
    if pipe is not None:
        for kind in schema.HEAVY_OVERLAYS:
            resolved[kind] = None  # the registry default, built on first use
    if options:
        from diffwidget.explain.registry import saliency_method

        for kind, settings in options.items():
            resolved[kind] = saliency_method(kind)(**settings)
    for kind, method in (methods or {}).items():
        resolved[kind] = check_saliency_method(kind, method)
    return resolved
