"""Similarities used by DF-RISE and the insertion/deletion curves, checked by hand."""

from __future__ import annotations

import pytest
import torch

from diffwidget.explain._common import auto_batch_size
from diffwidget.explain.similarity import cosine, effective_window, gaussian_window, ssim


def _x(seed: int = 0, size: int = 16) -> torch.Tensor:
    return torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))


def test_identical_images_score_one() -> None:
    x = _x()
    assert float(ssim(x, x)[0]) == pytest.approx(1.0, abs=1e-5)
    assert float(ssim(x, x, structure_only=True)[0]) == pytest.approx(1.0, abs=1e-5)
    assert float(cosine(x, x)[0]) == pytest.approx(1.0, abs=1e-6)


def test_structure_term_ignores_gain_and_offset_but_not_sign() -> None:
    x = _x()
    # Offset and positive gain change luminance/contrast only; the structure term stays ~1.
    assert float(ssim(3 * x + 1, x, structure_only=True)[0]) == pytest.approx(1.0, abs=1e-3)
    assert float(ssim(3 * x + 1, x)[0]) < 0.9
    # (-var + C3) / (var + C3): -1 up to the stabiliser C3 = (0.03 L)^2 / 2.
    assert -1.0 < float(ssim(-x, x, structure_only=True)[0]) < -0.9
    assert float(cosine(-x, x)[0]) == pytest.approx(-1.0, abs=1e-6)


def test_unrelated_images_score_low_and_batches_broadcast() -> None:
    ref = _x(0)
    batch = torch.cat([ref, _x(1), _x(2)])
    scores = ssim(batch, ref, structure_only=True)
    assert scores.shape == (3,)
    assert float(scores[0]) == pytest.approx(1.0, abs=1e-5)
    assert all(abs(float(s)) < 0.3 for s in scores[1:])


def test_window_shrinks_to_fit() -> None:
    assert effective_window((64, 64)) == 15
    assert effective_window((16, 16)) == 15
    assert effective_window((8, 8)) == 7
    assert effective_window((8, 6)) == 5
    g = gaussian_window(15, 1.5)
    assert float(g.sum()) == pytest.approx(1.0)
    assert int(g.argmax()) == 7
    # SSIM runs on a grid smaller than the paper's window.
    assert ssim(_x(size=6), _x(size=6)).shape == (1,)


def test_cpu_batch_size_scales_with_latent_area() -> None:
    def probe(_n: int) -> None:
        raise AssertionError("the CPU path must not probe")

    small, _ = auto_batch_size(probe, torch.device("cpu"), 500, (16, 16))
    large, note = auto_batch_size(probe, torch.device("cpu"), 500, (64, 64))
    assert small == 16 * large
    assert "CPU" in note
    assert auto_batch_size(probe, torch.device("cpu"), 3, (16, 16))[0] == 3
