"""The AnoGAN latent search: it lowers L(z), is reproducible, refines the encoder and leaves G and D alone."""

from __future__ import annotations

import pytest
import torch

from trainer.latent_search import latent_loss, search_latent
from trainer.networks import Discriminator, Encoder, Generator, build_networks

P, Z, BASE = 32, 8, 4


@pytest.fixture(scope="module")
def nets() -> tuple[Generator, Discriminator, Encoder]:
    torch.manual_seed(0)
    g, d, e = build_networks(P, Z, BASE)
    return g.eval(), d.eval(), e.eval()


@pytest.fixture(scope="module")
def x(nets: tuple[Generator, Discriminator, Encoder]) -> torch.Tensor:
    """Patches G can draw, plus a little noise: a search has somewhere to go."""
    g = nets[0]
    with torch.no_grad():
        return g(torch.randn(6, Z, generator=torch.Generator().manual_seed(1))) + 0.02 * torch.randn(6, 1, P, P)


def _loss(g: Generator, d: Discriminator, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return latent_loss(g, x, z, d.features, lam=0.1)[0]


def test_search_lowers_the_loss_of_its_random_start(nets, x) -> None:
    g, d, _ = nets
    start = torch.randn(len(x), Z, generator=torch.Generator().manual_seed(3))
    result = search_latent(g, x, features=d.features, steps=30, seed=3)
    assert result.z.shape == (len(x), Z) and result.reconstruction.shape == x.shape and result.loss.shape == (len(x),)
    assert (result.loss < _loss(g, d, x, start)).all()
    torch.testing.assert_close(result.loss, _loss(g, d, x, result.z))
    torch.testing.assert_close(result.reconstruction, g(result.z).detach())


def test_a_fixed_seed_gives_the_same_search(nets, x) -> None:
    g, d, _ = nets
    first = search_latent(g, x, features=d.features, steps=10, seed=7)
    again = search_latent(g, x, features=d.features, steps=10, seed=7)
    other = search_latent(g, x, features=d.features, steps=10, seed=8)
    torch.testing.assert_close(first.z, again.z, rtol=0, atol=0)
    assert not torch.allclose(first.z, other.z)


def test_refining_the_encoder_code_does_not_increase_the_loss(nets, x) -> None:
    g, d, e = nets
    with torch.no_grad():
        z0 = e(x)
    result = search_latent(g, x, features=d.features, z0=z0, steps=10)
    start = _loss(g, d, x, z0)
    assert (result.loss <= start).all() and (result.loss < start).any()


def test_each_patch_is_searched_independently_of_its_batch(nets, x) -> None:
    g, d, _ = nets
    z0 = torch.randn(len(x), Z, generator=torch.Generator().manual_seed(4))
    together = search_latent(g, x, features=d.features, z0=z0, steps=5)
    alone = search_latent(g, x[:2], features=d.features, z0=z0[:2], steps=5)
    torch.testing.assert_close(together.z[:2], alone.z, atol=1e-5, rtol=1e-5)


def test_generator_and_discriminator_are_frozen(nets, x) -> None:
    g, d, _ = nets
    g.train()  # the search puts them in eval mode (batch norm statistics untouched) and back
    before = {k: v.clone() for k, v in (g.state_dict() | {f"d.{k}": v for k, v in d.state_dict().items()}).items()}
    search_latent(g, x, features=d.features, steps=5)
    assert g.training and not d.training
    g.eval()
    assert all(p.grad is None for p in [*g.parameters(), *d.parameters()])
    after = g.state_dict() | {f"d.{k}": v for k, v in d.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_search_runs_under_inference_mode(nets, x) -> None:
    g, d, _ = nets
    with torch.inference_mode():
        inner = search_latent(g, x.clone(), features=d.features, steps=5, seed=2)
    torch.testing.assert_close(inner.z, search_latent(g, x, features=d.features, steps=5, seed=2).z)


def test_without_features_lambda_must_be_zero(nets, x) -> None:
    g = nets[0]
    assert search_latent(g, x, steps=3, lam=0.0).loss.shape == (len(x),)
    with pytest.raises(ValueError, match="feature extractor"):
        search_latent(g, x, steps=3, lam=0.1)


def test_zero_steps_return_the_start(nets, x) -> None:
    g, d, _ = nets
    z0 = torch.randn(len(x), Z)
    torch.testing.assert_close(search_latent(g, x, features=d.features, z0=z0, steps=0).z, z0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": -1}, "steps must be an integer >= 0"),
        ({"steps": 2.5}, "steps must be an integer >= 0"),
        ({"lam": -0.1}, r"lambda must be in \[0, 1\]"),
        ({"lam": 1.5}, r"lambda must be in \[0, 1\]"),
        ({"lr": 0.0}, "learning rate"),
        ({"z0": torch.zeros(2, Z)}, r"z0 must have shape \(N=6, Z\)"),
    ],
)
def test_bad_arguments_are_refused(nets, x, kwargs: dict, match: str) -> None:
    g, d, _ = nets
    with pytest.raises(ValueError, match=match):
        search_latent(g, x, features=d.features, **kwargs)


def test_patches_of_the_wrong_shape_are_refused(nets) -> None:
    g, d, _ = nets
    with pytest.raises(ValueError, match=r"\(N, 1, P, P\)"):
        search_latent(g, torch.zeros(2, P, P), features=d.features, steps=1)
