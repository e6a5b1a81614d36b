"""Similarities used by DF-RISE and the insertion/deletion curves, checked by hand."""

from __future__ import annotations

import numpy as np
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


def test_ssim_map_matches_scikit_image() -> None:
    """Local SSIM at every cell equals scikit-image's full SSIM image (same Gaussian)."""
    from skimage.metrics import structural_similarity

    from diffwidget.explain.similarity import ssim_map

    a, b = _x(0), 0.7 * _x(0) + 0.5 * _x(1)
    data_range = 6.0
    # scikit-image truncates its Gaussian at 3.5 sigma: 11 taps at sigma 1.5.
    ours = ssim_map(a, b, window=11, sigma=1.5, data_range=data_range)[0].numpy()
    for c in range(a.shape[1]):
        _, reference = structural_similarity(
            a[0, c].numpy().astype("float64"),
            b[0, c].numpy().astype("float64"),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=data_range,
            full=True,
        )
        assert reference.shape == ours[c].shape
        np.testing.assert_allclose(ours[c], reference, atol=2e-5)
    # The per-image score is the plain mean over every cell (no border cropped).
    mean = float(ssim(a, b, window=11, sigma=1.5, data_range=data_range)[0])
    assert mean == pytest.approx(float(ours.mean()), abs=1e-6)


def test_every_cell_counts_on_a_small_latent() -> None:
    """A change in the corner of a 16x16 latent moves the score as a central one does."""
    ref = _x(0)
    drops = {}
    for name, (rows, cols) in {
        "corner": (slice(0, 4), slice(0, 4)),
        "centre": (slice(6, 10), slice(6, 10)),
    }.items():
        changed = ref.clone()
        changed[..., rows, cols] = _x(5)[..., rows, cols]
        drops[name] = 1.0 - float(ssim(changed, ref, structure_only=True)[0])
    # With "valid" 15x15 windows the corner got 2.4e-5 of the weight: a ratio near 0.
    assert drops["corner"] > 0.25 * drops["centre"] > 0


def test_each_corner_cell_moves_the_score() -> None:
    """Masking any single cell of a 16x16 latent's corner changes the structure score.

    The local structure term weighs a region's inner edge more than its outer corner
    (about 9:1 on this toy), but no cell is ignored: with "valid" windows the top-left
    cells had 2.4e-5 of the weight of the central ones.
    """
    from explain_toys import CORNER, make_corner_pipe, make_corner_trace

    from diffwidget.tracing.replay import StepReplay

    pipe = make_corner_pipe()
    replay = StepReplay(pipe, make_corner_trace(pipe))
    x = replay.latent(0)
    ref = replay.pred_x0(x, 0)
    drops = np.zeros((CORNER, CORNER))
    for i in range(CORNER):
        for j in range(CORNER):
            keep = torch.ones_like(x)
            keep[..., i, j] = 0
            drops[i, j] = 1 - float(ssim(replay.pred_x0(x * keep, 0), ref, structure_only=True)[0])
    assert drops.min() > 0.05 * drops.max() > 0


@pytest.mark.parametrize(("size", "window"), [((16, 16), 15), ((16, 12), 11), ((8, 6), 5)])
def test_blur_matches_scipy_on_a_symmetric_extension(size: tuple[int, int], window: int) -> None:
    """The Gaussian behind every SSIM statistic equals SciPy's separable filter ("reflect").

    The blur is two matrix products with the extension folded into the weights; near the
    border a window reaches over the edge, where one cell carries two taps.
    """
    from scipy.ndimage import correlate1d

    from diffwidget.explain.similarity import _blur_matrix, _blur_same

    x = torch.randn(3, 2, *size, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    g = gaussian_window(window, 1.5).double()
    ours = _blur_same(x, _blur_matrix(size[0], g), _blur_matrix(size[1], g).T)
    taps = g.numpy()
    reference = correlate1d(
        correlate1d(x.numpy(), taps, axis=-2, mode="reflect"), taps, axis=-1, mode="reflect"
    )
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-12)
