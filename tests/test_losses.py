"""The Noisy-AnoGAN losses: γ = 1 is plain AnoGAN, γ < 1 moves weight from generated to abnormal patches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from trainer.losses import discriminator_loss, encoder_loss, generator_loss


def _logits(seed: int, n: int = 16) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3


def _plain_gan_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(d_real, torch.ones_like(d_real)) + F.binary_cross_entropy_with_logits(
        d_fake, torch.zeros_like(d_fake)
    )


def test_gamma_one_is_exactly_the_plain_gan_loss() -> None:
    real, fake, abnormal = _logits(0), _logits(1), _logits(2, 8)
    plain = _plain_gan_loss(real, fake)
    assert torch.equal(discriminator_loss(real, fake, abnormal, gamma=1.0), plain)
    assert torch.equal(discriminator_loss(real, fake, None, gamma=1.0), plain)


def test_without_abnormal_patches_gamma_does_not_matter() -> None:
    real, fake = _logits(0), _logits(1)
    assert torch.equal(discriminator_loss(real, fake, None, gamma=0.7), _plain_gan_loss(real, fake))


def test_gamma_below_one_weights_fake_and_abnormal_terms() -> None:
    real, fake, abnormal = _logits(0), _logits(1), _logits(2, 8)
    gamma = 0.8
    bce_real = F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
    bce_fake = F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    bce_abn = F.binary_cross_entropy_with_logits(abnormal, torch.zeros_like(abnormal))
    expected = bce_real + gamma * bce_fake + (1 - gamma) * bce_abn
    assert torch.allclose(discriminator_loss(real, fake, abnormal, gamma), expected)


def test_discriminator_that_calls_abnormal_patches_real_is_penalised_more_as_gamma_falls() -> None:
    real, fake = torch.full((4,), 5.0), torch.full((4,), -5.0)
    abnormal_called_real = torch.full((4,), 5.0)
    losses = [discriminator_loss(real, fake, abnormal_called_real, g).item() for g in (1.0, 0.9, 0.5)]
    assert losses[0] < losses[1] < losses[2]


@pytest.mark.parametrize("gamma", [0.0, -0.1, 1.5])
def test_gamma_out_of_range_is_rejected(gamma: float) -> None:
    with pytest.raises(ValueError, match="gamma"):
        discriminator_loss(_logits(0), _logits(1), None, gamma)


def test_generator_loss_is_non_saturating() -> None:
    assert math.isclose(generator_loss(torch.zeros(4)).item(), math.log(2), rel_tol=1e-6)
    confident_fake = torch.full((4,), -10.0, requires_grad=True)
    generator_loss(confident_fake).backward()
    assert confident_fake.grad is not None and confident_fake.grad.abs().min() > 0.2  # still a strong gradient


def test_encoder_loss_is_pixel_mse_plus_kappa_feature_mse() -> None:
    x, x_rec = torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 0.5)
    f_x, f_rec = torch.zeros(2, 3), torch.ones(2, 3)
    assert math.isclose(encoder_loss(x, x_rec, f_x, f_rec, kappa=0.0).item(), 0.25)
    assert math.isclose(encoder_loss(x, x_rec, f_x, f_rec, kappa=2.0).item(), 0.25 + 2.0)
    assert encoder_loss(x, x, f_x, f_x, kappa=1.0).item() == 0.0


def test_encoder_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shape mismatch"):
        encoder_loss(torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 8, 8), torch.zeros(2, 3), torch.zeros(2, 3), 1.0)


def test_per_cell_logit_maps_get_the_same_loss_as_their_cells_as_patches() -> None:
    real, fake, abnormal = (torch.randn(n, 4, 4, generator=torch.Generator().manual_seed(n)) for n in (6, 7, 3))
    as_maps = discriminator_loss(real, fake, abnormal, gamma=0.9)
    as_cells = discriminator_loss(real.flatten(), fake.flatten(), abnormal.flatten(), gamma=0.9)
    assert torch.allclose(as_maps, as_cells)
