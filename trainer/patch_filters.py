"""Filters over batches of patches in torch: Gaussian blur and structural dissimilarity (1 − SSIM).

Both take and return (B, 1, P, P) tensors, on any device, so a scorer makes its maps where its model runs::

    blurred = gaussian_blur(residual, sigma=2.0)          # (B, 1, 32, 32) -> (B, 1, 32, 32)
    dissimilar = ssim_dissimilarity(x, reconstruction)    # (B, 1, 32, 32) x2 -> (B, 1, 32, 32) in [0, 2]

SSIM (Wang et al., 2004) compares local means, contrasts and correlation in a Gaussian window
(σ = 1.5 px, the paper's) with the standard constants for a [0, 1] dynamic range. Windows at the patch
edge are reflect-padded (the edge pixel is not repeated).
"""

from __future__ import annotations

from functools import lru_cache

import torch

SSIM_SIGMA = 1.5
"""Width of SSIM's Gaussian window, in pixels (Wang et al.)."""
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2
"""SSIM's stabilising constants (K1 = 0.01, K2 = 0.03) for intensities in [0, 1]."""


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """A normalised 1-D Gaussian of radius max(1, round(3σ)): (2r + 1,) float32."""
    radius = max(1, round(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


@lru_cache(maxsize=32)
def blur_matrix(size: int, sigma: float) -> torch.Tensor:
    """The (size, size) matrix B with (x @ B)[..., i] = the reflect-padded Gaussian blur of x's last axis at i.

    Blurring a patch as two small matmuls (``B.T @ x @ B``) is ~30× faster on a CPU than single-channel
    convolutions of a large batch. Reflect padding does not repeat the edge pixel; σ's radius must be < size.
    """
    k = gaussian_kernel(sigma)
    r = (len(k) - 1) // 2
    if r >= size:
        msg = f"a Gaussian of sigma={sigma} (radius {r}) needs patches larger than {size} pixels"
        raise ValueError(msg)
    matrix = torch.zeros(size, size, dtype=torch.float32)
    for i in range(size):
        for j, weight in enumerate(k.tolist()):
            src = abs(i + j - r)  # reflect at 0
            src = src if src < size else 2 * (size - 1) - src  # reflect at size - 1
            matrix[src, i] += weight
    return matrix


@lru_cache(maxsize=32)
def blur_matrix_on(size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`blur_matrix` on ``device`` in ``dtype``, copied there once: a copy from pageable host memory to a
    GPU waits for the work already queued there, so one per forward pass would stall every pass."""
    return blur_matrix(size, sigma).to(device=device, dtype=dtype)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, P, P), reflect-padded: (B, 1, P, P); σ <= 0 returns ``x``."""
    if sigma <= 0:
        return x
    rows = blur_matrix_on(x.shape[-2], sigma, x.device, x.dtype)
    cols = rows if x.shape[-1] == x.shape[-2] else blur_matrix_on(x.shape[-1], sigma, x.device, x.dtype)
    return rows.T @ x @ cols


def ssim_dissimilarity(x: torch.Tensor, y: torch.Tensor, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """1 − SSIM(x, y) per pixel of patches (B, 1, P, P) in [0, 1] intensity units -> (B, 1, P, P) in [0, 2].

    0 where the two agree in local mean, contrast and structure; it rises where one has an edge or groove
    the other lacks, nearly independently of how bright the surface is.
    """
    with torch.autocast(x.device.type, enabled=False):  # variances are differences of squares: float32 throughout
        x, y = x.float(), y.float()
        both = gaussian_blur(torch.cat([x, y, x * x, y * y, x * y]), sigma)
        mx, my, xx, yy, xy = both.chunk(5)
        vx, vy, cxy = xx - mx * mx, yy - my * my, xy - mx * my
        luminance = (2 * mx * my + SSIM_C1) / (mx * mx + my * my + SSIM_C1)
        return 1.0 - luminance * (2 * cxy + SSIM_C2) / (vx + vy + SSIM_C2)
