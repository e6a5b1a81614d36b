"""Fixtures for widget tests: synthetic traces built with NumPy (no torch needed)."""

from __future__ import annotations

import pytest

from diffwidget.testing import synthetic


@pytest.fixture
def synthetic_trace():
    """A 20-step synthetic trace with previews and three attention layers."""
    return synthetic.synthetic_trace()


@pytest.fixture
def make_explorer(synthetic_trace):
    """Build explorers of the synthetic trace; every one is closed after the test."""
    from diffwidget.widget.explorer import Explorer

    made = []

    def build(**kwargs):
        explorer = Explorer(synthetic_trace, **kwargs)
        made.append(explorer)
        return explorer

    yield build
    for explorer in made:
        explorer.close()
