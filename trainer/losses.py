"""The Noisy-AnoGAN losses (method.md §2, §4) as pure functions of logits and tensors.

Example::

    d_loss = discriminator_loss(d(real), d(fake), d(abnormal), gamma=0.9)   # scalar
    g_loss = generator_loss(d(fake))                                       # scalar, non-saturating
    e_loss = encoder_loss(x, g(e(x)), d.features(x), d.features(g(e(x))), kappa=1.0)

With ``gamma = 1`` (or no abnormal batch) the discriminator loss *is* the plain GAN loss: the same
code trains the AnoGAN baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _bce(logits: torch.Tensor, target: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean BCE over every logit, or the ``weight``-weighted mean (weight broadcastable to ``logits``)."""
    logits = logits.float()
    if weight is None:
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))
    weight = weight.float().expand_as(logits)
    per_logit = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target), reduction="none")
    return (per_logit * weight).sum() / weight.sum().clamp_min(1e-6)


def discriminator_loss(
    d_real: torch.Tensor,
    d_fake: torch.Tensor,
    d_abnormal: torch.Tensor | None,
    gamma: float,
    abnormal_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """BCE(D(x_real), 1) + γ·BCE(D(G(z)), 0) + (1 − γ)·BCE(D(x_abnormal), 0).

    Logits are (B,) per patch or (B, h, w) per cell of a dense discriminator; every BCE is a mean over
    all of them, so a cell is a sample of its own.

    Args:
        d_real: logits (B,) or (B, h, w) on normal training patches.
        d_fake: logits on generated patches, same layout.
        d_abnormal: logits (M,) or (M, h, w) on confirmed abnormal patches, or None (then the γ·fake
            term gets weight 1).
        gamma: γ in (0, 1].
        abnormal_weight: optional (M,) or (M, h, w) weights of the abnormal logits, e.g. 1 on the cells a
            defect mask touches and 0 elsewhere: the abnormal term is then the mean over the weighted cells.

    Returns:
        The scalar loss the discriminator minimises (the negative of method.md's V').
    """
    if not 0.0 < gamma <= 1.0:
        msg = f"gamma must be in (0, 1], got {gamma}"
        raise ValueError(msg)
    real_term = _bce(d_real, 1.0)
    if d_abnormal is None or gamma == 1.0:
        return real_term + _bce(d_fake, 0.0)
    return real_term + gamma * _bce(d_fake, 0.0) + (1.0 - gamma) * _bce(d_abnormal, 0.0, abnormal_weight)


def generator_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss BCE(D(G(z)), 1) on logits (B,)."""
    return _bce(d_fake, 1.0)


def encoder_loss(
    x: torch.Tensor, x_rec: torch.Tensor, f_x: torch.Tensor, f_rec: torch.Tensor, kappa: float
) -> torch.Tensor:
    """f-AnoGAN izi_f: mean((x − G(E(x)))²) + κ·mean((f(x) − f(G(E(x))))²).

    Args:
        x: patches (B, 1, P, P); x_rec: their reconstructions G(E(x)), same shape.
        f_x, f_rec: discriminator features (B, F) of x and of x_rec.
        kappa: weight of the feature term (0 = pixel loss only).
    """
    if x.shape != x_rec.shape or f_x.shape != f_rec.shape:
        msg = (
            f"shape mismatch: x {tuple(x.shape)} vs x_rec {tuple(x_rec.shape)}, "
            f"features {tuple(f_x.shape)} vs {tuple(f_rec.shape)}"
        )
        raise ValueError(msg)
    pixel = F.mse_loss(x_rec.float(), x.float())
    if kappa == 0.0:
        return pixel
    return pixel + kappa * F.mse_loss(f_rec.float(), f_x.float())
