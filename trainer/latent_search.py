"""The AnoGAN latent search (method.md §4): find z* = argmin_z L(z) for each patch by Adam steps.

L(z) = (1 − λ)·mean|x − G(z)| + λ·mean|f(x) − f(G(z))|, per sample, with f a discriminator feature layer
(`Discriminator.features` or `Discriminator.feature_map`) and λ = 0.1 as in AnoGAN. Mode ``search``
starts from z ~ N(0, I) (a seeded `torch.Generator`: the same seed gives the same z*); encoder refinement
starts from z0 = E(x). G and D stay frozen: eval mode, and gradients flow into z only.

Example (P = 64, Z = 128, 256 patches in network units)::

    result = search_latent(g, x, features=d.features, steps=500)          # x: (256, 1, 64, 64)
    result.z, result.reconstruction, result.loss                          # (256, 128), (256, 1, 64, 64), (256,)
    refined = search_latent(g, x, features=d.features, z0=e(x), steps=20)  # refine the encoder's guess

The search runs with gradients on even when called under `torch.inference_mode` or `torch.no_grad`;
its outputs are detached.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch import nn

DEFAULT_STEPS = 500
"""Γ: Adam steps per search, as in AnoGAN."""
DEFAULT_LAMBDA = 0.1
"""λ: weight of the discriminator-feature residual in L(z), as in AnoGAN."""
DEFAULT_LR = 0.05
"""Adam step size on z (z ~ N(0, I), so a coordinate can travel ~Γ·lr over the search)."""

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]
"""f: (N, 1, P, P) -> (N, ...) discriminator features, e.g. ``Discriminator.features``."""


class LatentSearchResult(NamedTuple):
    """The outcome of `search_latent` for N patches; all tensors detached."""

    z: torch.Tensor
    """(N, Z) the best code found per patch (the lowest L over the start and every step)."""
    reconstruction: torch.Tensor
    """(N, 1, P, P) G(z) in network units."""
    loss: torch.Tensor
    """(N,) L(z) per patch, float32."""


def check_search_arguments(steps: int, lam: float, lr: float = DEFAULT_LR) -> None:
    """Raise ValueError unless steps >= 0, λ in [0, 1] and lr > 0 (finite)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        msg = f"latent search steps must be an integer >= 0, got {steps!r}"
        raise ValueError(msg)
    if not 0.0 <= lam <= 1.0:
        msg = f"latent search lambda must be in [0, 1], got {lam}"
        raise ValueError(msg)
    if not (lr > 0 and lr < float("inf")):
        msg = f"latent search learning rate must be a positive finite number, got {lr}"
        raise ValueError(msg)


def latent_loss(
    generator: nn.Module,
    x: torch.Tensor,
    z: torch.Tensor,
    features: FeatureExtractor | None = None,
    lam: float = DEFAULT_LAMBDA,
    f_x: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L(z) per sample and G(z): x (N, 1, P, P), z (N, Z) -> ((N,) float32, (N, 1, P, P)).

    Differentiable in z (and in the networks, if the caller lets gradients flow there). ``f_x`` is f(x)
    when already computed; ``features`` may be None only when λ = 0.
    """
    rec = generator(z)  # (N, 1, P, P)
    loss = (x - rec.float()).abs().flatten(1).mean(1)  # (N,)
    if lam == 0:
        return loss, rec
    if features is None:
        msg = f"latent search with lambda={lam} > 0 needs a discriminator feature extractor"
        raise ValueError(msg)
    if f_x is None:
        f_x = features(x)
    f_rec = features(rec)
    feature_loss = (f_x.float() - f_rec.float()).abs().flatten(1).mean(1)  # (N,)
    return (1.0 - lam) * loss + lam * feature_loss, rec


@contextlib.contextmanager
def _frozen(modules: list[nn.Module]) -> Iterator[None]:
    """Eval mode for ``modules`` inside the block; their training flags come back afterwards."""
    before = [[m.training for m in module.modules()] for module in modules]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for module, flags in zip(modules, before, strict=True):
            for m, flag in zip(module.modules(), flags, strict=True):
                m.training = flag


def search_latent(
    generator: nn.Module,
    x: torch.Tensor,
    *,
    features: FeatureExtractor | None = None,
    z0: torch.Tensor | None = None,
    steps: int = DEFAULT_STEPS,
    lam: float = DEFAULT_LAMBDA,
    lr: float = DEFAULT_LR,
    seed: int = 0,
) -> LatentSearchResult:
    """Minimise L(z) over z for each patch of x by ``steps`` Adam steps (method.md §4).

    Args:
        generator: G, (N, Z) -> (N, 1, P, P); needs a ``latent_dim`` attribute when ``z0`` is None.
        x: patches (N, 1, P, P) in network units.
        features: f, (N, 1, P, P) -> (N, ...), e.g. ``discriminator.features``; required when λ > 0.
            When it is a bound method of an `nn.Module`, that module is put in eval mode for the search.
        z0: (N, Z) start, e.g. E(x) for encoder refinement; None draws z ~ N(0, I) from ``seed``.
        steps: Γ >= 0 Adam steps; 0 returns the start.
        lam: λ in [0, 1], weight of the feature residual.
        lr: Adam step size.
        seed: seed of the random start (drawn on the CPU, so the same on every device).

    Returns:
        `LatentSearchResult`: per patch the lowest-loss z seen (start included), G(z) and L(z).
        Per-sample losses are summed, so each patch's trajectory does not depend on the rest of the batch.
    """
    check_search_arguments(steps, lam, lr)
    if x.ndim != 4 or x.shape[1] != 1:
        msg = f"expected patches of shape (N, 1, P, P), got {tuple(x.shape)}"
        raise ValueError(msg)
    if lam > 0 and features is None:
        msg = f"latent search with lambda={lam} > 0 needs a discriminator feature extractor"
        raise ValueError(msg)
    n = len(x)
    if z0 is None:
        latent_dim = int(getattr(generator, "latent_dim", 0))
        if latent_dim < 1:
            msg = "a random start needs generator.latent_dim; pass z0 instead"
            raise ValueError(msg)
        cpu = torch.Generator().manual_seed(seed)
        z0 = torch.randn(n, latent_dim, generator=cpu)
    elif z0.ndim != 2 or len(z0) != n:
        msg = f"z0 must have shape (N={n}, Z), got {tuple(z0.shape)}"
        raise ValueError(msg)

    owner = getattr(features, "__self__", None)
    frozen = [generator] + ([owner] if isinstance(owner, nn.Module) else [])
    # Out of any inference mode (clones make normal tensors of inference ones), gradients on.
    with _frozen(frozen), torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone()
        z = z0.detach().to(device=x.device, dtype=torch.float32).clone().requires_grad_(True)
        with torch.no_grad():
            f_x = features(x).detach() if lam > 0 and features is not None else None
        best_z, best_loss = z.detach().clone(), torch.full((n,), float("inf"), device=x.device)
        optimiser = torch.optim.Adam([z], lr=lr)
        for step in range(steps + 1):
            loss, _ = latent_loss(generator, x, z, features, lam, f_x)  # (N,)
            with torch.no_grad():
                better = loss < best_loss
                best_loss = torch.where(better, loss, best_loss)
                best_z[better] = z[better]
            if step == steps:  # the last iterate is evaluated, not stepped from
                break
            (grad,) = torch.autograd.grad(loss.sum(), [z])  # into z only: G and D get no .grad
            z.grad = grad
            optimiser.step()
        with torch.no_grad():
            reconstruction = generator(best_z)
    return LatentSearchResult(best_z, reconstruction.detach(), best_loss.detach())
