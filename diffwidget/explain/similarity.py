"""Per-image similarities between latents that need no downloaded weights.

Used by DF-RISE (masked vs unmasked prediction) and by the insertion/deletion curves.
The functions compare a batch ``a`` ``[B, C, h, w]`` with a reference ``b`` (same shape,
or one image ``[1, C, h, w]`` broadcast over the batch) and return one score per image.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

SimilarityName = Literal["ssim", "ssim_structure", "cosine"]
SIMILARITIES: tuple[str, ...] = get_args(SimilarityName)

#: The paper's SSIM window: a 15x15 Gaussian with sigma 1.5 (the reference SSIM uses 11x11).
SSIM_WINDOW = 15
SSIM_SIGMA = 1.5
#: SSIM stabilisers as fractions of the data range (Wang et al. 2004).
SSIM_K1 = 0.01
SSIM_K2 = 0.03
#: Guards divisions by a zero norm or a zero data range.
_TINY = 1e-12


def effective_window(size: tuple[int, int], window: int = SSIM_WINDOW) -> int:
    """The largest odd window ``<= window`` that fits into a grid of ``size``.

    Latent grids smaller than the paper's 15x15 window (tiny test models have 8x8) get a
    smaller window; the embedded model's 16x16 grid keeps the paper's 15.
    """
    fit = min(window, *size)
    return fit if fit % 2 == 1 else fit - 1


def gaussian_window(size: int, sigma: float, *, device: torch.device | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``size`` taps (float32)."""
    coords = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma**2))
    return g / g.sum()


def _symmetric_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    # Half-sample symmetric extension "c b a | a b c | c b a" (SciPy's and scikit-image's
    # "reflect"); torch's own "reflect" leaves the edge sample out.
    left = torch.arange(pad - 1, -1, -1, device=device)
    right = torch.arange(n - 1, n - 1 - pad, -1, device=device)
    return torch.cat([left, torch.arange(n, device=device), right])


def _blur_matrix(n: int, g: torch.Tensor) -> torch.Tensor:
    """``[n, n]`` matrix ``B`` with ``B @ v`` = the Gaussian ``g`` over the symmetric
    extension of ``v``, one output per input cell (the padding folded into the weights)."""
    taps, pad = g.numel(), g.numel() // 2
    index = _symmetric_index(n, pad, g.device)
    cols = index[torch.arange(n, device=g.device)[:, None] + torch.arange(taps, device=g.device)]
    rows = torch.arange(n, device=g.device)[:, None].expand(n, taps)
    matrix = torch.zeros(n, n, dtype=g.dtype, device=g.device)
    # Near the border one input cell appears twice in a window: accumulate its taps.
    return matrix.index_put_((rows, cols), g.expand(n, taps).clone(), accumulate=True)


def _blur_same(x: torch.Tensor, rows: torch.Tensor, cols_t: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian over a symmetric extension: output size = input size.

    Every cell is the centre of one window, so the mean over window positions weighs the
    cells at the border of a small latent as much as the central ones (with "valid"
    windows a 16x16 latent under a 15x15 window leaves 2x2 central positions). ``rows``
    and ``cols_t`` are :func:`_blur_matrix` for the two axes (the second transposed): two
    small matrix products, an order of magnitude faster on the CPU than two depthwise
    convolutions over a padded copy.
    """
    return rows @ x @ cols_t


def ssim_map(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    window: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
    structure_only: bool = False,
    data_range: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Local SSIM (or its structure term) at every cell: ``[B, C, h, w]`` float32.

    Parameters are those of :func:`ssim`; statistics are Gaussian-weighted over a window
    centred on each cell of a symmetric extension of the grid, as in scikit-image's
    ``structural_similarity(..., gaussian_weights=True, full=True)``.
    """
    a = a.float()
    b = b.float()
    size = effective_window((a.shape[-2], a.shape[-1]), window)
    g = gaussian_window(size, sigma, device=a.device)
    if data_range is None:
        flat = b.flatten(1)
        data_range = (flat.amax(dim=1) - flat.amin(dim=1)).clamp_min(_TINY)
    rng = torch.as_tensor(data_range, dtype=torch.float32, device=a.device).reshape(-1, 1, 1, 1)
    c1 = (SSIM_K1 * rng) ** 2
    c2 = (SSIM_K2 * rng) ** 2
    rows = _blur_matrix(a.shape[-2], g)
    cols_t = _blur_matrix(a.shape[-1], g).T
    mu_a = _blur_same(a, rows, cols_t)
    var_a = (_blur_same(a * a, rows, cols_t) - mu_a**2).clamp_min(0.0)
    cov = _blur_same(a * b, rows, cols_t)
    # A broadcast reference (DF-RISE's one unmasked prediction) is blurred once.
    mu_b = _blur_same(b, rows, cols_t)
    var_b = (_blur_same(b * b, rows, cols_t) - mu_b**2).clamp_min(0.0)
    cov = cov - mu_a * mu_b
    if structure_only:
        c3 = c2 / 2.0
        return (cov + c3) / (torch.sqrt(var_a * var_b) + c3)
    luminance = (2 * mu_a * mu_b + c1) / (mu_a**2 + mu_b**2 + c1)
    return luminance * (2 * cov + c2) / (var_a + var_b + c2)


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    window: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
    structure_only: bool = False,
    data_range: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean SSIM (or its structure term) per image, every cell weighted alike.

    Parameters
    ----------
    a, b : Tensor, shape (B, C, h, w) and (B or 1, C, h, w)
        Images or latents; ``b`` is the reference.
    window : int
        Gaussian window size; shrunk with :func:`effective_window` on grids smaller than it.
    sigma : float
        Gaussian standard deviation in grid cells.
    structure_only : bool
        Return only the structure term ``(s_ab + C3) / (s_a s_b + C3)``, ``C3 = C2 / 2``
        (the term DF-RISE scores masks with), instead of the full SSIM.
    data_range : float or Tensor, optional
        Dynamic range ``L`` for the stabilisers. Latents have no fixed range, so by default
        it is the reference's own ``max - min`` per image.

    Returns
    -------
    Tensor of float32, shape (B,)
        Mean of :func:`ssim_map` over channels and all cells. Unlike the reference SSIM
        code (and scikit-image's mean), no border is cropped: on a 16x16 latent a 15x15
        window leaves only central positions, and the border cells would carry almost no
        weight.
    """
    local = ssim_map(
        a, b, window=window, sigma=sigma, structure_only=structure_only, data_range=data_range
    )
    return local.flatten(1).mean(dim=1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the flattened images, one value per image (float32)."""
    a = a.float().flatten(1)
    b = b.float().flatten(1).expand_as(a)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(_TINY)


def similarity(
    a: torch.Tensor,
    b: torch.Tensor,
    kind: SimilarityName,
    *,
    window: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
) -> torch.Tensor:
    """Dispatch to :func:`ssim`, the SSIM structure term, or :func:`cosine`.

    Examples
    --------
    >>> import torch
    >>> x = torch.randn(1, 4, 16, 16)
    >>> round(float(similarity(x, x, "ssim_structure")[0]), 4)
    1.0
    """
    if kind == "cosine":
        return cosine(a, b)
    if kind == "ssim":
        return ssim(a, b, window=window, sigma=sigma)
    if kind == "ssim_structure":
        return ssim(a, b, window=window, sigma=sigma, structure_only=True)
    raise ValueError(f"unknown similarity {kind!r}; use one of {SIMILARITIES}")
