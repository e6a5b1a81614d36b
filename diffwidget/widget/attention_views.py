"""The kernel side of the attention overlay and the layer × step grid of one explorer.

What the view needs is computed once, on the grid it was recorded on, and sent once:

* the default filter's attention at open (``attention``); any other filter's only when the
  user picks it (``attention_filtered``), from a small cache keyed by the layers it averages,
  so going back to a filter costs neither the kernel nor, for the default, the comm;
* the grid's maps for every token when the grid opens, kept in the kernel; the view gets the
  selected token's rows (a token click sends one token's cells, not the whole grid).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from diffwidget.explain.attention import AttentionMaps, AttentionResult
from diffwidget.widget import layers
from diffwidget.widget.curves import Curve
from diffwidget.widget.grid import attention_grid, saliency_grid
from diffwidget.widget.payloads import GridData
from diffwidget.widget.schema import MEAN_OVER_HEADS

if TYPE_CHECKING:
    from diffwidget.explain.results import SaliencyMap
    from diffwidget.tracing.trace import Trace
    from diffwidget.widget.model import ExplorerWidget

#: Filtered aggregations kept in the kernel (each is [S, T, h, w] float32 on its grid).
FILTER_CACHE_SIZE = 8
#: The (layer, head) of the default filter.
DEFAULT_FILTER = ("", MEAN_OVER_HEADS)


class AttentionViews:
    """Attention sets and grid data of one explorer: computed, cached, published.

    Parameters
    ----------
    trace : Trace
        The explorer's trace.
    config : AttentionMaps, optional
        The explorer's aggregation settings (its default selection).
    widget : ExplorerWidget
        Where payloads are published.
    """

    def __init__(self, trace: Trace, config: AttentionMaps | None, widget: ExplorerWidget) -> None:
        self.trace = trace
        self.config = config
        self.widget = widget
        self.default: AttentionResult | None = None
        self.shown: AttentionResult | None = None
        self._cache: OrderedDict[tuple[tuple[str, ...], int], AttentionResult] = OrderedDict()
        self._grid: GridData | None = None
        self._grid_key: tuple[str, int] | None = None
        # Per head: sums of layers sharing a grid, made once and reused by every filter.
        self._sums: dict[int, dict[tuple[str, ...], np.ndarray]] = {}
        # What the trace says about its text (words a text encoder cut) ends each caption.
        self.note = trace.facts.cut_note().rstrip(".")  # the view ends the sentence
        if trace.attention:
            sums = self._sums.setdefault(MEAN_OVER_HEADS, {})
            self.default = (config or AttentionMaps()).attribute(trace, grid="native", sums=sums)
            self.shown = self.default
            self._remember(self.default, MEAN_OVER_HEADS)

    @property
    def default_layers(self) -> list[str]:
        """The layers the default filter averages."""
        return list(self.default.layers) if self.default is not None else []

    def _remember(self, result: AttentionResult, head: int) -> None:
        self._cache[(tuple(result.layers), head)] = result
        self._cache.move_to_end((tuple(result.layers), head))
        while len(self._cache) > FILTER_CACHE_SIZE:
            self._cache.popitem(last=False)

    def publish_default(self) -> None:
        """Send the default filter's maps (at open)."""
        value = None
        if self.default is not None:
            value = layers.attention_set(self.default, *DEFAULT_FILTER, self.note).to_json()
        self.widget.publish("attention", value)

    def filtered(self, layer: str, head: int) -> AttentionResult:
        """The aggregation under (``layer``, ``head``), from the cache when it was made before.

        Raises
        ------
        ValueError, KeyError
            When the filter selects nothing this trace recorded.
        """
        config = layers.filter_config(self.trace, self.config, layer)
        chosen = tuple(config.selection(self.trace)[0])
        cached = self._cache.get((chosen, head))
        if cached is not None:
            self._cache.move_to_end((chosen, head))
            return cached
        if head not in self._sums:  # one head's sums at a time (each is a trace's worth)
            self._sums = {MEAN_OVER_HEADS: self._sums.get(MEAN_OVER_HEADS, {}), head: {}}
        result = layers.filtered_attention(self.trace, self.config, layer, head, self._sums[head])
        self._remember(result, head)
        return result

    def refresh(self) -> AttentionResult | None:
        """Apply the widget's current filter; send its maps unless it is the default.

        Raises
        ------
        ValueError, KeyError
            When the filter selects nothing this trace recorded (nothing is sent).
        """
        if self.default is None:
            return None
        layer, head = str(self.widget.attention_layer), int(self.widget.attention_head)
        if (layer, head) == DEFAULT_FILTER:
            self.shown = self.default
            self.widget.publish("attention_filtered", None)
        else:
            self.shown = self.filtered(layer, head)
            payload = layers.attention_set(self.shown, layer, head, self.note).to_json()
            self.widget.publish("attention_filtered", payload)
        return self.shown

    # ----------------------------------------------------------------- grid
    def grid_data(self, cached: Callable[[str], Mapping[int, SaliencyMap]]) -> GridData | None:
        """The open grid with every token's maps (built on first use, kept for the head).

        Raises
        ------
        ValueError
            When the source has no per-layer maps.
        """
        source = str(self.widget.grid)
        head = int(self.widget.attention_head)
        if source == "none":
            self._grid, self._grid_key = None, None
            return None
        if source == "attention":
            if not self.trace.attention:
                raise ValueError("this trace holds no cross-attention to put in a grid")
            if self._grid_key != (source, head) or self._grid is None:
                self._grid, self._grid_key = attention_grid(self.trace, head), (source, head)
            return self._grid
        # Saliency grids change as maps are computed: rebuilt each time (they are small).
        self._grid = saliency_grid(source, cached(source), self.trace.latent_shape)
        self._grid_key = (source, head)
        return self._grid

    def publish_grid(self, cached: Callable[[str], Mapping[int, SaliencyMap]]) -> None:
        """Send the open grid: the selected token's rows only when the maps are per token.

        Raises
        ------
        ValueError
            When the source has no per-layer maps (``grid_data`` is cleared first).
        """
        try:
            data = self.grid_data(cached)
        except ValueError:
            self._grid, self._grid_key = None, None
            self.widget.publish("grid_data", None)
            raise
        self.publish_grid_token(data)

    def publish_grid_token(self, data: GridData | None = None) -> None:
        """Send the grid rows of the selected token (after a token click)."""
        data = self._grid if data is None else data
        if data is None:
            self.widget.publish("grid_data", None)
            return
        token = int(self.widget.token)
        self.widget.publish("grid_data", data.with_tokens([token]).to_json())

    def export_grid(self) -> GridData | None:
        """The open grid with every token (for files that work without a kernel)."""
        return self._grid if str(self.widget.grid) != "none" else None


def mass_curves(trace: Trace, result: AttentionResult | None) -> list[Curve]:
    """One attention-mass curve per token (series, values over every step; NaN where absent)."""
    if result is None:
        return []
    mass = np.full((trace.n_steps, len(trace.tokens)), np.nan, np.float32)
    mass[np.asarray(result.steps, dtype=np.int64)] = result.mass
    return [
        Curve(name, "attention_mass", token, mass[:, token])
        for token, name in enumerate(trace.tokens)
    ]


def filter_values(options: Mapping[str, Any], layer: str) -> list[dict[str, str]]:
    """The attention filter options a file without a kernel can show: default and ``layer``."""
    return [o for o in options.get("attention", []) if o["value"] in ("", layer)]
