"""The three patch networks of Noisy-AnoGAN: `Generator`, `Discriminator` and `Encoder` (DCGAN-style).

Every network halves (or doubles) the resolution per layer between P×P and 4×4, so a patch size P
in {32, 64, 128} gives log2(P) - 2 layers. Widths are ``base_channels · 2^i`` capped at 8×.
Patches are single-channel and live in [-1, 1] inside the networks.

Example (P = 64, Z = 64, base 32)::

    g, d, e = Generator(64, 64, 32), Discriminator(64, 32), Encoder(64, 64, 32)
    x = g(torch.randn(16, 64))          # (16, 1, 64, 64) in [-1, 1]
    d(x)                                # (16,) logits, "real" > 0
    d.features(x)                       # (16, 4096): the last conv layer, flattened
    e(x)                                # (16, 64): a latent code for x

    d = Discriminator(64, 32, head=DiscriminatorHead.DENSE)   # PatchGAN: a real/fake logit per 8×8 cell
    d(x), d.logit_map(x)                # (16, 8, 8), (16, 1, 8, 8)
"""

from __future__ import annotations

import itertools
import math
from enum import StrEnum

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

SUPPORTED_PATCH_SIZES = (32, 64, 128)


def _n_layers(patch_size: int) -> int:
    if patch_size not in SUPPORTED_PATCH_SIZES:
        msg = f"patch_size must be one of {SUPPORTED_PATCH_SIZES}, got {patch_size}"
        raise ValueError(msg)
    return int(math.log2(patch_size)) - 2  # P -> 4 by halving


def _widths(patch_size: int, base_channels: int) -> list[int]:
    """Channel width after each down-sampling layer, e.g. P=64, base=32 -> [32, 64, 128, 256]."""
    return [base_channels * min(2**i, 8) for i in range(_n_layers(patch_size))]


class _ConvTrunk(nn.Module):
    """Strided 4×4 convolutions from (B, 1, P, P) down to (B, C, 4, 4) (or ``n_layers`` halvings), LeakyReLU between."""

    def __init__(self, patch_size: int, base_channels: int, spectral_norm: bool, n_layers: int | None = None) -> None:
        super().__init__()
        widths = _widths(patch_size, base_channels)[:n_layers]
        layers: list[nn.Module] = []
        c_in = 1
        for c_out in widths:
            conv = nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1)
            layers += [_spectral_norm(conv) if spectral_norm else conv, nn.LeakyReLU(0.2, inplace=True)]
            c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.out_channels = widths[-1]
        self.out_size = patch_size >> len(widths)
        self.out_features = widths[-1] * self.out_size**2

    def spatial(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # (B, C, P / 2^L, P / 2^L)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).flatten(1)  # (B, C·4·4)


class Generator(nn.Module):
    """z (B, Z) -> patch (B, 1, P, P) in [-1, 1].

    Nearest up-sampling + 3×3 conv rather than transposed convolutions: no checkerboard pattern,
    which would otherwise show up in every residual map as a grid. Reflect padding: zero padding
    draws a dark frame round every generated patch, which shows up in the residual as a grid too.
    """

    def __init__(self, patch_size: int, latent_dim: int, base_channels: int) -> None:
        super().__init__()
        widths = _widths(patch_size, base_channels)[::-1]  # e.g. [256, 128, 64, 32]
        self.patch_size = patch_size
        self.latent_dim = latent_dim
        self.project = nn.Sequential(
            nn.Linear(latent_dim, widths[0] * 4 * 4, bias=False),
            nn.Unflatten(1, (widths[0], 4, 4)),  # (B, C0, 4, 4)
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        blocks: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(widths):
            blocks += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, padding_mode="reflect", bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
        blocks += [
            nn.Upsample(scale_factor=2, mode="nearest"),  # last doubling: -> (B, C_last, P, P)
            nn.Conv2d(widths[-1], 1, kernel_size=3, padding=1, padding_mode="reflect"),
            nn.Tanh(),
        ]
        self.blocks = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.project(z))  # (B, Z) -> (B, 1, P, P)


class DiscriminatorHead(StrEnum):
    """What the discriminator outputs per patch."""

    GLOBAL = "global"
    """One logit per patch from the whole trunk (DCGAN)."""
    DENSE = "dense"
    """A logit per 8×8 cell (PatchGAN): three strided layers (receptive field 38 px) then a 3×3 conv."""


DENSE_STRIDE = 8
"""Pixels per cell of a dense discriminator's logit map: (B, P/8, P/8) for a P×P patch."""


class Discriminator(nn.Module):
    """patch (B, 1, P, P) -> logits: (B,) with the global head, (B, P/8, P/8) with the dense head.

    ``features`` gives the last conv layer flattened (B, F) for the encoder's f-residual;
    ``feature_map`` the stride-4 layer (B, C, P/4, P/4) for feature-residual maps.
    """

    def __init__(
        self,
        patch_size: int,
        base_channels: int,
        spectral_norm: bool = True,
        head: DiscriminatorHead = DiscriminatorHead.GLOBAL,
    ) -> None:
        super().__init__()
        self.head_kind = DiscriminatorHead(head)
        dense = self.head_kind == DiscriminatorHead.DENSE
        n_layers = int(math.log2(DENSE_STRIDE)) if dense else None
        self.trunk = _ConvTrunk(patch_size, base_channels, spectral_norm, n_layers)
        if dense:
            head_layer: nn.Module = nn.Conv2d(self.trunk.out_channels, 1, kernel_size=3, padding=1)
        else:
            head_layer = nn.Linear(self.trunk.out_features, 1)
        self.head = _spectral_norm(head_layer) if spectral_norm else head_layer

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x)  # (B, 1, P, P) -> (B, F)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk.layers[:4](x)  # (B, 1, P, P) -> (B, 2·base, P/4, P/4): two conv + LeakyReLU

    def logit_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, P, P) -> (B, 1, h, w) logits: (P/8)² cells for the dense head, 1×1 for the global one."""
        if self.head_kind == DiscriminatorHead.DENSE:
            return self.head(self.trunk.spatial(x))  # (B, 1, P/8, P/8)
        return self.head(self.trunk(x))[:, :, None, None]  # (B, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.logit_map(x)
        if self.head_kind == DiscriminatorHead.DENSE:
            return logits.squeeze(1)  # (B, P/8, P/8): every cell is a real/fake decision
        return logits.flatten()  # (B,)


class Encoder(nn.Module):
    """patch (B, 1, P, P) -> z (B, Z): the discriminator's trunk shape, no spectral norm, linear head."""

    def __init__(self, patch_size: int, latent_dim: int, base_channels: int) -> None:
        super().__init__()
        self.trunk = _ConvTrunk(patch_size, base_channels, spectral_norm=False)
        self.head = nn.Linear(self.trunk.out_features, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x))  # (B, Z)


def build_networks(
    patch_size: int,
    latent_dim: int,
    base_channels: int,
    spectral_norm: bool = True,
    discriminator_head: DiscriminatorHead = DiscriminatorHead.GLOBAL,
) -> tuple[Generator, Discriminator, Encoder]:
    """The three networks of one model version, freshly initialised (seed torch first)."""
    return (
        Generator(patch_size, latent_dim, base_channels),
        Discriminator(patch_size, base_channels, spectral_norm, discriminator_head),
        Encoder(patch_size, latent_dim, base_channels),
    )
