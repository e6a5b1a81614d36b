"""A closed explorer leaves nothing behind: no open widget, no reference, no memory growth."""

from __future__ import annotations

import gc
import os
import weakref

import ipywidgets
import numpy as np
import pytest

from diffwidget.widget.explorer import Explorer

#: Cycles of the RSS check, and the cycle after which memory must stay flat.
CYCLES = 30
WARM_UP = 10
#: Allowed RSS growth per cycle after warm-up (MB). Before the fix: 0.38 MB per cycle.
MAX_GROWTH_MB_PER_CYCLE = 0.05


def open_widgets() -> int:
    """Widgets in ipywidgets' registry of open widgets (kept until each is closed)."""
    return len(ipywidgets.widgets.widget._instances)


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_close_closes_every_widget_it_created(synthetic_trace):
    before = open_widgets()
    explorer = Explorer(synthetic_trace)
    explorer.figure("attention_mass")
    assert open_widgets() > before + 2  # the view, its layout, the figure's marks/scales/axes
    explorer.close()
    assert open_widgets() == before


def test_a_closed_explorer_is_garbage(synthetic_trace):
    explorer = Explorer(synthetic_trace)
    explorer.figure("attention_mass")
    alive = weakref.ref(explorer)
    widget = weakref.ref(explorer.widget)
    explorer.close()
    del explorer
    gc.collect()
    assert alive() is None
    assert widget() is None


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads RSS from /proc")
def test_rss_plateaus_over_trace_explorer_close_cycles(tiny_sd_pipe):
    from diffwidget.tracing.generate import trace

    before = open_widgets()
    samples = []
    for cycle in range(CYCLES):
        traced = trace(tiny_sd_pipe, "a red circle on the left", num_inference_steps=3, seed=cycle)
        explorer = Explorer(traced)
        explorer.close()
        del explorer, traced
        gc.collect()
        samples.append(rss_mb())
        assert open_widgets() == before
    growth = (samples[-1] - samples[WARM_UP]) / (CYCLES - 1 - WARM_UP)
    assert growth < MAX_GROWTH_MB_PER_CYCLE, (
        f"RSS grew {growth:.3f} MB/cycle: {np.round(samples, 2)}"
    )
