"""Fixtures for widget tests: synthetic traces built with NumPy (no torch needed)."""

from __future__ import annotations

import pytest

from diffwidget.tracing import synthetic


@pytest.fixture
def synthetic_trace():
    """A 20-step synthetic trace with previews and three attention layers."""
    return synthetic.synthetic_trace()
