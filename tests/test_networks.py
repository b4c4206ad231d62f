"""Patch networks: shapes for every supported patch size, spectral norm in the discriminator."""

from __future__ import annotations

import pytest
import torch

from trainer.networks import Discriminator, DiscriminatorHead, Encoder, Generator, build_networks


# base 4: widths 4, 8, 16 (P=32) / 4, 8, 16, 32 (P=64) / 4, 8, 16, 32, 32 (P=128, capped at 8×); 4×4 at the end
@pytest.mark.parametrize(("patch", "n_features"), [(32, 16 * 16), (64, 32 * 16), (128, 32 * 16)])
def test_shapes_for_every_supported_patch_size(patch: int, n_features: int) -> None:
    torch.manual_seed(0)
    g, d, e = build_networks(patch, latent_dim=16, base_channels=4)
    z = torch.randn(3, 16)
    x = g(z)
    assert x.shape == (3, 1, patch, patch)
    assert x.min() >= -1 and x.max() <= 1  # tanh output
    assert d(x).shape == (3,)
    assert d.features(x).shape == (3, n_features)
    assert e(x).shape == (3, 16)


def test_unsupported_patch_size_is_rejected() -> None:
    with pytest.raises(ValueError, match="patch_size"):
        Generator(48, 16, 4)


def test_discriminator_has_spectral_norm_on_every_layer_when_asked() -> None:
    with_sn = Discriminator(32, 4, spectral_norm=True)
    without = Discriminator(32, 4, spectral_norm=False)
    parametrized = [m for m in with_sn.modules() if hasattr(m, "parametrizations")]
    assert len(parametrized) == 4  # 3 conv layers + the linear head
    assert not any(hasattr(m, "parametrizations") for m in without.modules())


def test_spectral_norm_bounds_the_largest_singular_value() -> None:
    torch.manual_seed(0)
    d = Discriminator(32, 4, spectral_norm=True)
    x = torch.randn(8, 1, 32, 32)
    for _ in range(20):  # power iteration converges in training mode
        d(x)
    head = d.head.weight  # the normalised weight
    assert torch.linalg.matrix_norm(head, ord=2) <= 1.01


def test_encoder_has_no_spectral_norm() -> None:
    assert not any(hasattr(m, "parametrizations") for m in Encoder(64, 8, 4).modules())


def test_generator_is_deterministic_in_eval_mode() -> None:
    torch.manual_seed(0)
    g = Generator(32, 8, 4).eval()
    z = torch.randn(2, 8)
    assert torch.equal(g(z), g(z))


@pytest.mark.parametrize("patch", [32, 64, 128])
def test_dense_discriminator_gives_a_logit_per_eight_pixel_cell(patch: int) -> None:
    torch.manual_seed(0)
    _, d, _ = build_networks(patch, latent_dim=16, base_channels=4, discriminator_head=DiscriminatorHead.DENSE)
    x = torch.rand(3, 1, patch, patch) * 2 - 1
    cells = patch // 8
    assert d(x).shape == (3, cells, cells)
    assert d.logit_map(x).shape == (3, 1, cells, cells)
    assert d.feature_map(x).shape == (3, 8, patch // 4, patch // 4)


def test_global_discriminator_logit_map_is_one_cell() -> None:
    d = Discriminator(32, 4).eval()  # eval: no spectral-norm power iteration between the two calls
    x = torch.rand(2, 1, 32, 32)
    assert d.logit_map(x).shape == (2, 1, 1, 1)
    assert torch.allclose(d.logit_map(x).flatten(), d(x))
