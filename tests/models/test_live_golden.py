"""The golden values the JavaScript runtime is tested against are what Python writes now."""

from __future__ import annotations

import pytest

from diffwidget.testing.live_golden import FIXTURE, golden, render


@pytest.mark.slow
def test_the_js_fixture_is_current() -> None:
    assert FIXTURE.is_file(), "run `python -m diffwidget.testing.live_golden`"
    assert FIXTURE.read_text() == render(golden()), (
        f"{FIXTURE} is out of date; run `python -m diffwidget.testing.live_golden`"
    )


def test_the_fixture_covers_both_noise_paths_and_short_runs() -> None:
    import json

    data = json.loads(FIXTURE.read_text())
    sizes = {case["n"] for case in data["noise"]}
    assert min(sizes) < 16 <= max(sizes)
    assert any(n % 16 for n in sizes if n > 16)
    steps = {case["steps"] for case in data["scheduler"]}
    assert min(steps) == 1
    assert any(s < 15 for s in steps)
    assert any(s >= 15 for s in steps)
