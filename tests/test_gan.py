"""One-process training math: the steps learn, resuming from a checkpoint continues the same run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.config import TrainConfig
from trainer.gan import NoisyAnoGAN, PatchSampler, TrainingDiverged, gan_step, run_schedule, train_in_process


def _images(n: int = 2, size: int = 48) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(60, 200, (size, size), dtype=np.uint8) for _ in range(n)]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_is_reproducible_with_a_seed() -> None:
    cfg = TrainConfig.tiny()
    assert _same(train_in_process(cfg, _images(), device="cpu"), train_in_process(cfg, _images(), device="cpu"))


def test_training_changes_every_network() -> None:
    cfg = TrainConfig.tiny()
    before = NoisyAnoGAN(cfg, "cpu").weights()
    after = train_in_process(cfg, _images(), device="cpu")
    for prefix in ("generator.", "discriminator.", "encoder."):
        keys = [k for k in before if k.startswith(prefix) and before[k].is_floating_point()]
        assert any(not torch.equal(before[k], after[k]) for k in keys), prefix


def test_encoder_phase_leaves_generator_and_discriminator_untouched() -> None:
    cfg = TrainConfig.tiny(gan_steps=3, encoder_steps=3)
    states: dict[int, dict[str, torch.Tensor]] = {}
    model = NoisyAnoGAN(cfg, "cpu")
    sampler = PatchSampler(_images(), None, cfg)
    run_schedule(model, sampler, 0, lambda step, metrics: states.__setitem__(step, model.weights()))
    frozen = [k for k in states[3] if not k.startswith("encoder.")]
    assert all(torch.equal(states[3][k], states[6][k]) for k in frozen)
    assert any(not torch.equal(states[3][k], states[6][k]) for k in states[3] if k.startswith("encoder."))


def test_resuming_from_a_checkpoint_gives_the_uninterrupted_result() -> None:
    cfg = TrainConfig.tiny(gan_steps=4, encoder_steps=2, steps_per_epoch=2, gamma=0.5)
    abnormal = np.random.default_rng(1).random((5, 32, 32), dtype=np.float32)
    checkpoints: dict[int, dict[str, torch.Tensor]] = {}
    model = NoisyAnoGAN(cfg, "cpu")
    run_schedule(
        model,
        PatchSampler(_images(), abnormal, cfg),
        0,
        lambda step, metrics: checkpoints.__setitem__(step, model.training_state()),
    )
    for step in (2, 4):  # mid-GAN and at the phase boundary
        resumed = NoisyAnoGAN(cfg, "cpu")
        resumed.load_training_state(checkpoints[step])
        run_schedule(resumed, PatchSampler(_images(), abnormal, cfg), step, lambda step, metrics: None)
        assert _same(resumed.weights(), model.weights()), step


def test_a_run_whose_losses_go_nan_stops_at_the_first_epoch_end() -> None:
    cfg = TrainConfig.tiny(gan_steps=4, encoder_steps=2, steps_per_epoch=2)
    model = NoisyAnoGAN(cfg, "cpu")
    with torch.no_grad():  # as after a step too large for the learning rate
        for parameter in model.generator.parameters():
            parameter.fill_(float("nan"))
    epochs: list[int] = []
    with pytest.raises(TrainingDiverged, match="diverged by step 2"):
        run_schedule(model, PatchSampler(_images(), None, cfg), 0, lambda step, metrics: epochs.append(step))
    assert epochs == []  # no checkpoint of NaN weights was taken


def test_gan_step_reports_finite_losses_with_abnormal_patches() -> None:
    cfg = TrainConfig.tiny(gamma=0.7)
    metrics: list[dict[str, float]] = []
    abnormal = np.random.default_rng(1).random((3, 32, 32), dtype=np.float32)
    model = NoisyAnoGAN(cfg, "cpu")
    run_schedule(model, PatchSampler(_images(), abnormal, cfg), 0, lambda step, m: metrics.append(m))
    assert all(np.isfinite(v) for m in metrics for v in m.values())
    assert {"d_loss", "g_loss", "d_real", "d_fake"} <= set(metrics[0])
    assert {"e_loss", "residual"} <= set(metrics[-1])


def test_dense_discriminator_trains_on_masked_abnormal_patches() -> None:
    cfg = TrainConfig.tiny(gamma=0.7, discriminator_head="dense")
    rng = np.random.default_rng(1)
    patches = rng.random((3, 32, 32), dtype=np.float32)
    masks = np.zeros_like(patches)
    masks[:, 4:6, 8:20] = 1.0
    metrics: list[dict[str, float]] = []
    model = NoisyAnoGAN(cfg, "cpu")
    run_schedule(model, PatchSampler(_images(), np.stack([patches, masks], 1), cfg), 0, lambda s, m: metrics.append(m))
    assert all(np.isfinite(v) for m in metrics for v in m.values())
    assert model.discriminator(torch.zeros(2, 1, 32, 32)).shape == (2, 4, 4)


def test_only_masked_cells_of_abnormal_patches_count_as_fake() -> None:
    cfg = TrainConfig.tiny(gamma=0.5, discriminator_head="dense")
    torch.manual_seed(0)
    model = NoisyAnoGAN(cfg, "cpu")
    real, z = torch.zeros(2, 1, 32, 32), torch.randn(2, cfg.latent_dim)
    image = torch.rand(1, 1, 32, 32) * 2 - 1
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :8, :8] = 1.0  # the top-left cell only
    d = model.discriminator
    before = d(image).detach()
    gan_step(model.generator, d, model.opt_g, model.opt_d, real, z, torch.cat([image, mask], 1), cfg.gamma)
    delta = d(image).detach() - before  # (1, 4, 4)
    assert delta[0, 0, 0] < delta[0].flatten()[1:].mean()  # pushed towards "fake" the most
