"""Noisy-AnoGAN training math in one process: the networks, their optimisers and one step of each phase.

Phase 1 (``gan_steps``): a discriminator step on [real | G(z) | abnormal] then a non-saturating generator
step. Phase 2 (``encoder_steps``): G and D frozen (eval mode), the encoder learns z = E(x) with the
izi_f loss. The same step functions run under Ray Train, where G, D and E are DDP-wrapped
(`trainer.distributed`); here they are plain modules.

Example (one process, CPU)::

    model = NoisyAnoGAN(TrainConfig.tiny())
    sampler = PatchSampler(normal_images, abnormal_patches=None, cfg=model.cfg)
    run_schedule(model, sampler, start_step=0, on_epoch_end=lambda step, metrics: print(step, metrics))
    state = model.weights()          # {"generator.…": Tensor, "discriminator.…": …, "encoder.…": …}

Randomness is re-derived from (seed, rank, epoch) at every epoch start, so a run resumed from a
checkpoint continues exactly as the uninterrupted run would have, without storing RNG state.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import TrainConfig
from trainer.losses import discriminator_loss, encoder_loss, generator_loss
from trainer.model_io import NETWORK_PREFIXES, prefixed, sub_state
from trainer.networks import DiscriminatorHead, build_networks
from trainer.patches import augment, sample_patches

EpochHook = Callable[[int, dict[str, float]], None]
"""Called after each epoch with (steps done so far, mean metrics of the epoch)."""


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the module itself)."""
    return getattr(module, "module", module)


def to_model_range(patches: np.ndarray, device: torch.device, contrast_gain: float = 0.0) -> torch.Tensor:
    """(N, P, P) float in [0, 1] -> (N, 1, P, P) network input on ``device``.

    ``contrast_gain`` 0: the plain map to [-1, 1]. Otherwise each patch minus its own mean, times the
    gain: a low-contrast surface (grain std ≈ 0.026) then fills the networks' range (see `TrainConfig`).
    """
    array = np.ascontiguousarray(patches, dtype=np.float32)
    if not array.flags.writeable:  # e.g. zero-copy from the Ray object store
        array = array.copy()
    x = torch.from_numpy(array).to(device).unsqueeze(1)  # (N, 1, P, P)
    if contrast_gain > 0:
        return (x - x.mean(dim=(2, 3), keepdim=True)) * contrast_gain
    return x * 2.0 - 1.0


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """No parameter gradients for ``module`` inside the block (gradients still flow *through* it)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class PatchSampler:
    """Per-worker source of normal and abnormal patch batches, (B, 1, P, P) in [-1, 1].

    The normal images are flattened here (``cfg.detrend_sigma``, `trainer.detrend`); the abnormal patches
    come already flattened (`trainer.patches.abnormal_patch_bank` with ``detrend``).
    """

    def __init__(
        self,
        normal_images: Sequence[np.ndarray],
        abnormal_patches: np.ndarray | None,
        cfg: TrainConfig,
        rank: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        if not normal_images:
            msg = "training needs at least one normal image"
            raise ValueError(msg)
        p = cfg.patch_size
        if abnormal_patches is not None and abnormal_patches.shape[1:] not in ((p, p), (2, p, p)):
            msg = f"abnormal patches must have shape (M, {p}, {p}) or (M, 2, {p}, {p}), got {abnormal_patches.shape}"
            raise ValueError(msg)
        self.normal_images = cfg.detrend.images(list(normal_images))
        self.abnormal = abnormal_patches if abnormal_patches is not None and len(abnormal_patches) else None
        self.cfg = cfg
        self.rank = rank
        self.device = torch.device(device)
        self.start_epoch(0)

    def start_epoch(self, epoch: int) -> None:
        """Re-seed numpy and torch randomness from (seed, rank, epoch)."""
        self.rng = np.random.default_rng([self.cfg.seed, self.rank, epoch])
        self.torch_gen = torch.Generator().manual_seed(int(self.rng.integers(0, 2**62)))

    def normal(self, n: int) -> torch.Tensor:
        batch = sample_patches(self.normal_images, n, self.cfg.patch_size, self.rng)
        if self.cfg.augment:
            batch = augment(batch, self.rng, self.cfg.brightness_jitter, keep_orientation=True)
        return to_model_range(batch, self.device, self.cfg.contrast_gain)  # (n, 1, P, P)

    def abnormal_batch(self, m: int) -> torch.Tensor | None:
        """(m, 1, P, P) abnormal patches in [-1, 1]; (m, 2, P, P) with their masks in {0, 1} as channel 1
        when the bank has them."""
        if self.abnormal is None:
            return None
        batch = self.abnormal[self.rng.integers(0, len(self.abnormal), size=m)]  # with replacement
        if self.cfg.augment:
            batch = augment(batch, self.rng, self.cfg.brightness_jitter)
        if batch.ndim == 3:
            return to_model_range(batch, self.device, self.cfg.contrast_gain)  # (m, 1, P, P)
        patches = to_model_range(batch[:, 0], self.device, self.cfg.contrast_gain)
        masks = torch.from_numpy(np.ascontiguousarray(batch[:, 1:], dtype=np.float32)).to(self.device)
        return torch.cat([patches, masks], dim=1)  # (m, 2, P, P)

    def latent(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.cfg.latent_dim, generator=self.torch_gen).to(self.device)  # (n, Z)


def _autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def gan_step(
    g: nn.Module,
    d: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    real: torch.Tensor,
    z: torch.Tensor,
    abnormal: torch.Tensor | None,
    gamma: float,
    amp: bool = False,
) -> dict[str, float]:
    """One discriminator step then one generator step. ``g``/``d`` may be DDP-wrapped.

    Args:
        real: (B, 1, P, P) normal patches in [-1, 1]; z: (B, Z) latent codes;
        abnormal: (M, 1, P, P) confirmed abnormal patches, (M, 2, P, P) with their defect masks as
            channel 1, or None; gamma: γ of the discriminator loss.

    With a mask and a dense discriminator, only the cells the mask touches count as abnormal: the rest
    of an abnormal patch is normal surface.
    """
    use_abnormal = abnormal is not None and gamma < 1.0
    with _autocast(real.device, amp):
        fake = g(z)  # (B, 1, P, P)
        # one D forward on everything: spectral norm's power iteration runs once per step
        parts = [real, fake.detach()] + ([abnormal[:, :1]] if use_abnormal else [])
        logits = d(torch.cat(parts)).float()  # (B + B [+ M],) or (B + B [+ M], h, w)
    b = len(real)
    d_abnormal = logits[2 * b :] if use_abnormal else None
    weight = None
    if d_abnormal is not None and abnormal is not None and abnormal.shape[1] == 2 and d_abnormal.ndim == 3:
        weight = F.adaptive_max_pool2d(abnormal[:, 1:].float(), d_abnormal.shape[1:]).squeeze(1)  # (M, h, w)
    d_loss = discriminator_loss(logits[:b], logits[b : 2 * b], d_abnormal, gamma, weight)
    opt_d.zero_grad(set_to_none=True)
    d_loss.backward()
    opt_d.step()

    # the generator step goes through the bare discriminator: no DDP all-reduce of D gradients it does not need
    d_bare = unwrap(d)
    with frozen(d_bare), _autocast(real.device, amp):
        g_loss = generator_loss(d_bare(fake).float())
    opt_g.zero_grad(set_to_none=True)
    g_loss.backward()
    opt_g.step()
    with torch.no_grad():
        return {
            "d_loss": d_loss.item(),
            "g_loss": g_loss.item(),
            "d_real": torch.sigmoid(logits[:b]).mean().item(),
            "d_fake": torch.sigmoid(logits[b : 2 * b]).mean().item(),
        }


def encoder_step(
    e: nn.Module,
    g: nn.Module,
    d: nn.Module,
    opt_e: torch.optim.Optimizer,
    x: torch.Tensor,
    kappa: float,
    amp: bool = False,
) -> dict[str, float]:
    """One izi_f encoder step on normal patches x (B, 1, P, P); G and D must already be frozen and in eval mode."""
    g_bare, d_bare = unwrap(g), unwrap(d)
    with _autocast(x.device, amp):
        x_rec = g_bare(e(x))  # (B, 1, P, P)
        f_x = d_bare.features(x).detach() if kappa else x.new_zeros(len(x), 1)
        f_rec = d_bare.features(x_rec) if kappa else x.new_zeros(len(x), 1)
    loss = encoder_loss(x, x_rec, f_x, f_rec, kappa)
    opt_e.zero_grad(set_to_none=True)
    loss.backward()
    opt_e.step()
    with torch.no_grad():
        residual = (x_rec.float() - x).abs().mean().item() / 2.0  # in [0, 1] intensity units
    return {"e_loss": loss.item(), "residual": residual}


def _flatten_optimizer(prefix: str, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for idx, per_param in opt.state_dict()["state"].items():
        for key, value in per_param.items():
            out[f"{prefix}.{idx}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
    return out


def _load_optimizer(opt: torch.optim.Optimizer, prefix: str, flat: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        if key.startswith(prefix + "."):
            idx, name = key[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(idx), {})[name] = value
    current = opt.state_dict()
    current["state"] = state
    opt.load_state_dict(current)


class NoisyAnoGAN:
    """G, D, E and their Adam optimisers (β1 = 0.5: the usual GAN setting)."""

    def __init__(self, cfg: TrainConfig, device: torch.device | str | None = None) -> None:
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(cfg.seed)  # identical initial weights on every worker and every run
        head = DiscriminatorHead(cfg.discriminator_head)
        g, d, e = build_networks(cfg.patch_size, cfg.latent_dim, cfg.base_channels, cfg.spectral_norm, head)
        self.generator: nn.Module = g.to(self.device)
        self.discriminator: nn.Module = d.to(self.device)
        self.encoder: nn.Module = e.to(self.device)
        betas = (cfg.beta1, cfg.beta2)
        self.opt_g = torch.optim.Adam(self.generator.parameters(), lr=cfg.lr_g, betas=betas)
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=cfg.lr_d, betas=betas)
        self.opt_e = torch.optim.Adam(self.encoder.parameters(), lr=cfg.lr_e, betas=betas)

    @property
    def amp(self) -> bool:
        return self.cfg.mixed_precision and self.device.type == "cuda"

    def networks(self) -> dict[str, nn.Module]:
        """The bare (un-DDP'd) networks by weight prefix."""
        return {
            "generator": unwrap(self.generator),
            "discriminator": unwrap(self.discriminator),
            "encoder": unwrap(self.encoder),
        }

    def weights(self) -> dict[str, torch.Tensor]:
        """Flat CPU copies of the state of G, D, E: ``generator.…``, ``discriminator.…``, ``encoder.…``."""
        out: dict[str, torch.Tensor] = {}
        for prefix, net in self.networks().items():
            out |= prefixed(prefix, {k: v.detach().cpu().clone() for k, v in net.state_dict().items()})
        return out

    def load_weights(self, state: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load G, D, E from `weights` output (for fine-tuning or resuming)."""
        for prefix, net in self.networks().items():
            net.load_state_dict(sub_state(state, prefix), strict=strict)

    def training_state(self) -> dict[str, torch.Tensor]:
        """Weights plus optimiser state, tensors only (a checkpoint, with the step kept by the caller)."""
        out = self.weights()
        for name, opt in (("opt_g", self.opt_g), ("opt_d", self.opt_d), ("opt_e", self.opt_e)):
            out |= {k: v.detach().cpu().clone() for k, v in _flatten_optimizer(name, opt).items()}
        return out

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of `training_state`."""
        self.load_weights({k: v for k, v in state.items() if k.split(".", 1)[0] in NETWORK_PREFIXES})
        for name, opt in (("opt_g", self.opt_g), ("opt_d", self.opt_d), ("opt_e", self.opt_e)):
            _load_optimizer(opt, name, state)  # load_state_dict moves moments to the params' device itself

    def enter_encoder_phase(self) -> None:
        """Freeze G and D (eval mode: BatchNorm running stats, no spectral-norm updates)."""
        for net in (self.generator, self.discriminator):
            net.eval()
            for p in net.parameters():
                p.requires_grad_(False)

    def step(self, step: int, sampler: PatchSampler) -> dict[str, float]:
        """Global step ``step`` of the schedule: a GAN step in phase 1, an encoder step in phase 2."""
        cfg = self.cfg
        if step < cfg.gan_steps:
            n = cfg.per_worker_batch
            return gan_step(
                self.generator,
                self.discriminator,
                self.opt_g,
                self.opt_d,
                sampler.normal(n),
                sampler.latent(n),
                sampler.abnormal_batch(cfg.per_worker_abnormal_batch) if cfg.gamma < 1.0 else None,
                cfg.gamma,
                self.amp,
            )
        return encoder_step(
            self.encoder,
            self.generator,
            self.discriminator,
            self.opt_e,
            sampler.normal(cfg.per_worker_batch),
            cfg.kappa,
            self.amp,
        )


class TrainingDiverged(ValueError):
    """A loss went NaN or infinite: the weights are unusable."""


def run_schedule(model: NoisyAnoGAN, sampler: PatchSampler, start_step: int, on_epoch_end: EpochHook) -> None:
    """Run steps ``start_step .. total_steps``; call ``on_epoch_end`` every ``steps_per_epoch`` steps and at the end.

    ``start_step`` must be an epoch boundary (a checkpoint's step), so randomness lines up on resume.
    """
    cfg = model.cfg
    if start_step % cfg.steps_per_epoch and start_step != cfg.total_steps:
        msg = f"start_step {start_step} is not a multiple of steps_per_epoch {cfg.steps_per_epoch}"
        raise ValueError(msg)
    sums: dict[str, float] = {}
    count = 0
    for step in range(start_step, cfg.total_steps):
        if step % cfg.steps_per_epoch == 0:
            sampler.start_epoch(step // cfg.steps_per_epoch)
        if step == cfg.gan_steps or (step == start_step and step > cfg.gan_steps):
            model.enter_encoder_phase()
        for key, value in model.step(step, sampler).items():
            sums[key] = sums.get(key, 0.0) + value
        count += 1
        done = step + 1
        if done % cfg.steps_per_epoch == 0 or done == cfg.total_steps:
            means = {key: value / count for key, value in sums.items()}
            broken = {key: value for key, value in means.items() if not math.isfinite(value)}
            if broken:  # the weights are NaN from here on: stop now, not after the whole schedule
                msg = (
                    f"training diverged by step {done}: the last epoch's mean {broken} is not finite; "
                    "lower the learning rates (lr_g, lr_d, lr_e) or keep spectral_norm on"
                )
                raise TrainingDiverged(msg)
            on_epoch_end(done, means)
            sums, count = {}, 0


def train_in_process(
    cfg: TrainConfig,
    normal_images: Sequence[np.ndarray],
    abnormal_patches: np.ndarray | None = None,
    init_weights: dict[str, torch.Tensor] | None = None,
    on_epoch_end: EpochHook | None = None,
    device: str | None = None,
) -> dict[str, torch.Tensor]:
    """The whole schedule in this process (no Ray): experiments and debugging. Returns `NoisyAnoGAN.weights`."""
    model = NoisyAnoGAN(cfg, device)
    if init_weights is not None:
        model.load_weights(init_weights)
    sampler = PatchSampler(normal_images, abnormal_patches, cfg, rank=0, device=model.device)
    run_schedule(model, sampler, 0, on_epoch_end or (lambda step, metrics: None))
    return model.weights()


__all__ = [
    "NoisyAnoGAN",
    "PatchSampler",
    "TrainingDiverged",
    "encoder_step",
    "gan_step",
    "run_schedule",
    "train_in_process",
]
