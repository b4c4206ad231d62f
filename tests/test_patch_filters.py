"""SSIM and Gaussian blur on patch batches, against a direct computation."""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from trainer.patch_filters import (
    SSIM_C1,
    SSIM_C2,
    blur_matrix,
    blur_matrix_on,
    gaussian_blur,
    gaussian_kernel,
    ssim_dissimilarity,
)


def _scipy_ssim(x: np.ndarray, y: np.ndarray, sigma: float) -> np.ndarray:
    """SSIM of (P, P) images with scipy's Gaussian, truncated at the same radius as `gaussian_kernel`."""
    radius = (len(gaussian_kernel(sigma)) - 1) // 2

    def window(a: np.ndarray) -> np.ndarray:
        return gaussian_filter(a.astype(np.float64), sigma, mode="mirror", radius=radius)

    mx, my = window(x), window(y)
    vx, vy, cxy = window(x * x) - mx**2, window(y * y) - my**2, window(x * y) - mx * my
    return ((2 * mx * my + SSIM_C1) * (2 * cxy + SSIM_C2)) / ((mx**2 + my**2 + SSIM_C1) * (vx + vy + SSIM_C2))


def test_ssim_dissimilarity_matches_a_direct_computation() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((3, 24, 24), dtype=np.float32)
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1).astype(np.float32)
    got = ssim_dissimilarity(torch.from_numpy(x)[:, None], torch.from_numpy(y)[:, None])[:, 0].numpy()
    want = np.stack([1 - _scipy_ssim(a, b, 1.5) for a, b in zip(x, y, strict=True)])
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_identical_patches_are_not_dissimilar_and_a_groove_is() -> None:
    surface = np.full((1, 1, 32, 32), 0.5, dtype=np.float32) + np.random.default_rng(1).normal(0, 0.02, (1, 1, 32, 32))
    x = torch.from_numpy(surface.astype(np.float32))
    assert ssim_dissimilarity(x, x).abs().max() < 1e-5
    grooved = x.clone()
    grooved[..., 16, :] -= 0.2  # a dark line across the patch
    dissimilar = ssim_dissimilarity(grooved, x)[0, 0]
    assert dissimilar[16].mean() > 10 * dissimilar[:8].mean()


def test_gaussian_blur_keeps_a_constant_and_is_the_identity_at_sigma_zero() -> None:
    x = torch.full((2, 1, 16, 16), 0.3)
    torch.testing.assert_close(gaussian_blur(x, 2.0), x)
    noise = torch.rand(2, 1, 16, 16)
    assert gaussian_blur(noise, 0.0) is noise
    assert gaussian_blur(noise, 1.5).std() < noise.std()


def test_the_blur_matrix_is_made_once_per_device_and_dtype() -> None:
    """Forward passes reuse one copy on their device (on a GPU a fresh host copy per pass would stall it)."""
    first = blur_matrix_on(32, 1.5, torch.device("cpu"), torch.float32)
    assert blur_matrix_on(32, 1.5, torch.device("cpu"), torch.float32) is first
    assert torch.equal(first, blur_matrix(32, 1.5))
    halved = blur_matrix_on(32, 1.5, torch.device("cpu"), torch.bfloat16)
    assert halved.dtype == torch.bfloat16 and halved is not first
