"""`TrainConfig`: every hyper-parameter of one Noisy-AnoGAN training run, in one frozen dataclass.

Example::

    cfg = TrainConfig(gamma=0.9, gan_steps=4000)     # validated on construction
    cfg.patch_size, cfg.batch_size                    # 64, 64 (global batch, split over workers)
    card_fields = cfg.to_card_dict()                  # flat dict for ModelCard.train_config
    TrainConfig.demo()                                # the product demo schedule (CPU, minutes)
    TrainConfig.tiny()                                # a few steps, patch 32: tests only

Batch sizes are *global*: each of ``num_workers`` Ray Train workers draws ``batch_size // num_workers``
patches per step, so a schedule means the same thing on 1 or 8 workers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Annotated, Any, Self

from pydantic import TypeAdapter, ValidationError

from schemas.model_card import MapMode, ModelCard, filter_shapes_problem
from trainer.blob_filter import BLOB_RADIUS, MAX_BLOB_RADIUS
from trainer.detrend import Detrend, DetrendAxis
from trainer.line_filter import GAUSSIAN_FINISH_SIGMA, MAX_LINE_LENGTH, SHORT_SEGMENT_WEIGHT, SIGNED_FINISH_SIGMA
from trainer.networks import DiscriminatorHead

CARD_FIELDS = (
    "patch_size",
    "stride",
    "latent_dim",
    "base_channels",
    "gamma",
    "smoothing_sigma",
    "line_length",
    "short_segment_weight",
    "blob_radius",
)
"""The fields `trainer.pipeline.build_card` copies into the `ModelCard`: checked against its bounds up front."""


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of the patch GAN, its encoder, the schedule and the Ray Train run."""

    # architecture
    patch_size: int = 64
    """P: patches are P×P pixels, P a power of two in [32, 128]."""
    stride: int = 32
    """S: tiling stride at inference (S <= P; overlap P - S)."""
    latent_dim: int = 64
    base_channels: int = 32
    """Width of the first discriminator / encoder layer; doubles per layer (capped at 8×)."""
    spectral_norm: bool = True
    """Spectral normalisation on every discriminator layer (the standard GAN stabiliser)."""
    discriminator_head: str = "global"
    """`DiscriminatorHead`: ``global`` (one logit per patch) or ``dense`` (a logit per 8×8 cell, PatchGAN)."""
    contrast_gain: float = 0.0
    """Network input: 0 maps [0, 1] to [-1, 1]; g > 0 feeds (patch − its mean)·g instead, so that a low-contrast
    surface fills the networks' range (aim for g ≈ 0.25 / patch std; 8 for the synthetic metal). 0 keeps the
    old behaviour, where the discriminator barely learns (its loss stays at 2·ln 2)."""
    detrend_sigma: float = 0.0
    """σ (pixels) of the blur along the grain subtracted from every image before the networks see it
    (`trainer.detrend`); 0 = off. Removes streaks a patch GAN cannot reproduce (12 for the synthetic metal)."""
    detrend_axis: str = "x"
    """`DetrendAxis` the grain runs along: ``x`` (rows), ``y`` (columns) or ``xy`` (an isotropic blur)."""
    # method (method.md §2, §4)
    gamma: float = 1.0
    """γ in (0, 1]: weight of the generated patches among the discriminator's fakes; 1 = plain AnoGAN."""
    kappa: float = 1.0
    """Weight of the discriminator-feature residual in the encoder loss (f-AnoGAN izi_f)."""
    map_mode: str = "residual"
    """`schemas.model_card.MapMode` of the versions this run makes: what a patch's pixel map measures."""
    smoothing_sigma: float = GAUSSIAN_FINISH_SIGMA
    """Gaussian σ (pixels) of the map's finish: before the line filter, or after it for a signed map
    (`trainer.scoring.finish_map`)."""
    line_length: int = 0
    """The line filter (`trainer.line_filter`): each pixel's largest mean (|mean| for a signed map) along a segment
    this long; 0 = off."""
    short_segment_weight: float = 0.0
    """The line filter's half-length segments count at this weight (`trainer.line_filter.segment_mean_max`);
    0 = off. Needs ``line_length`` > 0."""
    blob_radius: int = 0
    """The line filter also takes each pixel's mean over a disc this wide (`trainer.blob_filter`), so round
    spots keep their depth; 0 = off. Needs ``line_length`` > 0."""
    refine_steps: int = 0
    """Encoder mode: Adam steps of the latent loss L(z) from E(x) at inference (0 = the encoder alone)."""
    search_steps: int = 500
    """Search mode: Γ, Adam steps of L(z) from a seeded random z (AnoGAN: 500)."""
    search_lambda: float = 0.1
    """λ of L(z) = (1 − λ)·|x − G(z)| + λ·|f(x) − f(G(z))| (AnoGAN: 0.1)."""
    search_lr: float = 0.05
    """Adam step size on z for refinement and search."""
    # schedule
    batch_size: int = 64
    """Global normal-patch batch per step."""
    abnormal_batch_size: int = 32
    """Global abnormal-patch batch per discriminator step (γ < 1 only)."""
    gan_steps: int = 3000
    """Phase 1: discriminator + generator steps."""
    encoder_steps: int = 1500
    """Phase 2: encoder steps, generator and discriminator frozen."""
    steps_per_epoch: int = 250
    """Checkpoint granularity: a checkpoint is reported every this many steps (both phases)."""
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    lr_e: float = 5e-4
    beta1: float = 0.5
    beta2: float = 0.999
    augment: bool = True
    """Abnormal patches: flips, 90° rotations, brightness jitter. Normal patches: 180° turns and jitter."""
    brightness_jitter: float = 0.03
    """Largest additive brightness shift in [0, 1] intensity units."""
    seed: int = 0
    # abnormal patch bank (method.md §3)
    mined_patches_per_image: int = 8
    """Source (b): top-scoring patches kept per abnormal image without a mask."""
    mask_min_overlap: int = 1
    """Source (a): a patch is abnormal when at least this many of its pixels are in the mask."""
    warmup_fraction: float = 0.3
    """Share of the schedule spent on the γ = 1 warm-up that mining (b) needs."""
    # calibration (method.md §5)
    pixel_quantile: float = 0.999
    image_quantile: float = 0.99
    # distribution
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    """Ray CPUs per worker (fractional allowed) when not on GPU."""
    mixed_precision: bool = True
    """bf16 autocast on CUDA (ignored on CPU)."""
    max_failures: int = 2
    """Worker-group restarts Ray Train allows before the run fails (resumes from the last checkpoint)."""

    def __post_init__(self) -> None:
        p = self.patch_size
        if not (32 <= p <= 128 and _is_power_of_two(p)):
            msg = f"patch_size must be a power of two in [32, 128], got {p}"
            raise ValueError(msg)
        if not 1 <= self.stride <= p:
            msg = f"stride must be in [1, patch_size={p}], got {self.stride}"
            raise ValueError(msg)
        if self.discriminator_head not in set(DiscriminatorHead):
            known = [str(h) for h in DiscriminatorHead]
            msg = f"discriminator_head must be one of {known}, got {self.discriminator_head!r}"
            raise ValueError(msg)
        if self.map_mode not in set(MapMode):
            msg = f"map_mode must be one of {[str(m) for m in MapMode]}, got {self.map_mode!r}"
            raise ValueError(msg)
        if self.map_mode in (MapMode.LOGIT, MapMode.RESIDUAL_LOGIT) and self.discriminator_head != "dense":
            msg = f"map_mode {self.map_mode!r} needs discriminator_head='dense', got {self.discriminator_head!r}"
            raise ValueError(msg)
        if not 0.0 < self.gamma <= 1.0:
            msg = f"gamma must be in (0, 1], got {self.gamma}"
            raise ValueError(msg)
        positive_ints = {
            "latent_dim": self.latent_dim,
            "base_channels": self.base_channels,
            "batch_size": self.batch_size,
            "abnormal_batch_size": self.abnormal_batch_size,
            "steps_per_epoch": self.steps_per_epoch,
            "num_workers": self.num_workers,
            "mined_patches_per_image": self.mined_patches_per_image,
            "mask_min_overlap": self.mask_min_overlap,
        }
        for name, value in positive_ints.items():
            if value < 1:
                msg = f"{name} must be >= 1, got {value}"
                raise ValueError(msg)
        if self.mask_min_overlap > p * p:
            msg = (
                f"mask_min_overlap={self.mask_min_overlap} is more pixels than a {p}×{p} patch holds ({p * p}): "
                "no patch could overlap a mask that much"
            )
            raise ValueError(msg)
        for name, value in {"gan_steps": self.gan_steps, "encoder_steps": self.encoder_steps}.items():
            if value < 0:
                msg = f"{name} must be >= 0, got {value}"
                raise ValueError(msg)
        if self.gan_steps + self.encoder_steps == 0:
            msg = "gan_steps + encoder_steps must be > 0"
            raise ValueError(msg)
        for name, value in {"batch_size": self.batch_size, "abnormal_batch_size": self.abnormal_batch_size}.items():
            if value % self.num_workers:
                msg = f"{name}={value} must be divisible by num_workers={self.num_workers} (it is a global batch)"
                raise ValueError(msg)
        for name, value in {"lr_g": self.lr_g, "lr_d": self.lr_d, "lr_e": self.lr_e}.items():
            if not (value > 0 and math.isfinite(value)):
                msg = f"{name} must be a positive finite number, got {value}"
                raise ValueError(msg)
        for name, value in {"beta1": self.beta1, "beta2": self.beta2}.items():
            if not 0.0 <= value < 1.0:
                msg = f"{name} must be in [0, 1), got {value}"
                raise ValueError(msg)
        if not (self.contrast_gain >= 0 and math.isfinite(self.contrast_gain)):
            msg = f"contrast_gain must be a finite number >= 0, got {self.contrast_gain}"
            raise ValueError(msg)
        if not (self.detrend_sigma >= 0 and math.isfinite(self.detrend_sigma)):
            msg = f"detrend_sigma must be a finite number >= 0 (pixels), got {self.detrend_sigma}"
            raise ValueError(msg)
        if self.detrend_axis not in set(DetrendAxis):
            msg = f"detrend_axis must be one of {[str(a) for a in DetrendAxis]}, got {self.detrend_axis!r}"
            raise ValueError(msg)
        if self.refine_steps < 0 or self.search_steps < 0:
            msg = f"refine_steps and search_steps must be >= 0, got {self.refine_steps}, {self.search_steps}"
            raise ValueError(msg)
        if not (0.0 <= self.search_lambda <= 1.0 and self.search_lr > 0):
            msg = f"need 0 <= search_lambda <= 1 and search_lr > 0, got {self.search_lambda}, {self.search_lr}"
            raise ValueError(msg)
        finite = {"kappa": self.kappa, "smoothing_sigma": self.smoothing_sigma}
        finite |= {"brightness_jitter": self.brightness_jitter, "search_lr": self.search_lr}
        for name, value in finite.items():  # NaN passes every comparison, so ask for finiteness first
            if not (math.isfinite(value) and value >= 0):
                msg = f"{name} must be a finite number >= 0, got {value}"
                raise ValueError(msg)
        if self.seed < 0:
            msg = f"seed must be >= 0 (numpy's generators take no negative seeds), got {self.seed}"
            raise ValueError(msg)
        if not 0 <= self.line_length <= MAX_LINE_LENGTH:
            msg = f"line_length must be between 0 (off) and {MAX_LINE_LENGTH} pixels, got {self.line_length}"
            raise ValueError(msg)
        self._check_filter_shapes()
        if not 0.0 < self.warmup_fraction < 1.0:
            msg = f"warmup_fraction must be in (0, 1), got {self.warmup_fraction}"
            raise ValueError(msg)
        if not (0.0 < self.pixel_quantile < 1.0 and 0.0 < self.image_quantile <= 1.0):
            msg = (
                "need 0 < pixel_quantile < 1 and 0 < image_quantile <= 1, "
                f"got {self.pixel_quantile}, {self.image_quantile}"
            )
            raise ValueError(msg)
        if not (math.isfinite(self.cpus_per_worker) and self.cpus_per_worker > 0):
            msg = f"cpus_per_worker must be a finite number > 0, got {self.cpus_per_worker}"
            raise ValueError(msg)
        if self.max_failures < 0:
            msg = f"max_failures must be >= 0, got {self.max_failures}"
            raise ValueError(msg)
        self._check_card_bounds()  # last: the checks above name their fields' meaning better

    @property
    def per_worker_batch(self) -> int:
        """Normal patches each worker draws per step."""
        return self.batch_size // self.num_workers

    @property
    def per_worker_abnormal_batch(self) -> int:
        """Abnormal patches each worker draws per discriminator step."""
        return self.abnormal_batch_size // self.num_workers

    @property
    def detrend(self) -> Detrend:
        """The input flattening of this run's images (`trainer.detrend`; σ = 0: none)."""
        return Detrend(self.detrend_sigma, self.detrend_axis)

    @property
    def total_steps(self) -> int:
        """GAN steps plus encoder steps."""
        return self.gan_steps + self.encoder_steps

    def replace(self, **changes: Any) -> Self:
        """A validated copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)

    def _check_card_bounds(self) -> None:
        """The fields the model card records must fit its bounds now, not after training (`ModelCard`)."""
        for name in CARD_FIELDS:
            field = ModelCard.model_fields[name]
            try:
                TypeAdapter(Annotated[field.annotation, *field.metadata]).validate_python(getattr(self, name))
            except ValidationError as exc:
                msg = f"{name}={getattr(self, name)!r}: {exc.errors()[0]['msg']} (the model card's bounds)"
                raise ValueError(msg) from None

    def _check_filter_shapes(self) -> None:
        if not 0.0 <= self.short_segment_weight <= 1.0:
            msg = f"short_segment_weight must be between 0 (off) and 1, got {self.short_segment_weight}"
            raise ValueError(msg)
        if not 0 <= self.blob_radius <= MAX_BLOB_RADIUS:
            msg = f"blob_radius must be between 0 (off) and {MAX_BLOB_RADIUS} pixels, got {self.blob_radius}"
            raise ValueError(msg)
        problem = filter_shapes_problem(self.line_length, self.short_segment_weight, self.blob_radius)
        if problem:
            raise ValueError(problem)

    def to_card_dict(self) -> dict[str, float | int | str | bool | None]:
        """Every field as a flat dict (for ``ModelCard.train_config``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Self:
        """Rebuild from `to_card_dict` output; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            msg = f"unknown TrainConfig fields {unknown}; known: {sorted(known)}"
            raise ValueError(msg)
        return cls(**values)

    @classmethod
    def demo(cls, **overrides: Any) -> Self:
        """The product demo: 2 CPU workers, a few minutes on a 2-core machine.

        P = 32 (stride 16) with Z = 256, contrast gain 8 and an encoder-heavy schedule: at 512², ε = 0.1,
        one seed, in one process, ``benchmarks/map_quality.py``-style runs gave pixel AUROC / AP / AUPRO
        of .805 / .006 / .46 for the earlier P = 64, Z = 128, 1000 + 400 steps; .858 / .018 / .52 at
        P = 32; .875 / .028 / .60 with Z = 256; .911 / .094 / .69 with 2000 encoder steps (and .920 /
        .106 / .71 with 4000: diminishing). The encoder, not the generator, was the bottleneck: 200
        latent-search steps from E(x) cut the residual on normal patches from 0.0129 to 0.0092.

        Maps were ``ssim_residual`` (the residual weighted by 1 − SSIM) from the sixth session: in all six runs
        at 256² (demo seeds 0–3, base 32 seeds 0–1, `benchmarks/residual_variants.py`) it beat the plain residual
        on pixel AP (+.003 to +.088, mean +.024), and at 1024² (seeds 0–2, `benchmarks/quality.py`) it gave 1.8–2.1× the
        residual's pixel AP on every run, for ~0.06 CPU-s more per 1024² image (4–5 % of this model).

        Images are flattened along the brushing (``detrend_sigma`` 12, axis x: `trainer.detrend`): at 1024²
        (ε = 0.1, seeds 0 and 1, `benchmarks/quality.py`) pixel AP .06 → .26, AUPRO .72 → .85, image AUROC
        .61 → .91 against the same schedule without it; an isotropic blur (σ 6) gave nothing.

        Maps are finished with the line filter (15 px, no Gaussian: `trainer.line_filter`): at 1024² (ε = 0.1,
        k = 5, γ = 0.9, seeds 0–2) pixel AUROC / AP / AUPRO / image AUROC .966 / .279 / .854 / .956 → .972 /
        .355 / .870 / .972 against a Gaussian σ = 2 on the same reconstructions; on the γ = 0.8 runs spots lost pixel AP
        (.75 → .56) and cracks gained (.45 → .51).

        Maps are ``signed_residual``, line-filtered before their magnitude is taken, then smoothed with σ = 0.7
        (`trainer.scoring.finish_map`): on the same weights (1024², ε = 0.1, k = 5, γ = 0.9, seeds 0–2, machine B)
        .970 / .351 / .872 / .978 with ``ssim_residual`` and the line filter → .969 / .565 / .859 / .989; pixel AP
        rose in all 18 runs of the grid (docs/benchmarks.md, "Signed residuals").

        The filter also takes 7 px segments at 0.6 and a disc of radius 3 (``short_segment_weight``,
        ``blob_radius``): on the same weights pixel AUROC rose in all 18 runs of the grid (.969 → .970 on the
        row above), and spots' pixel AP .551 → .667 (docs/benchmarks.md, "Short segments and discs").
        """
        values: dict[str, Any] = {
            "patch_size": 32,
            "contrast_gain": 8.0,
            "detrend_sigma": 12.0,
            "stride": 16,
            "latent_dim": 256,
            "base_channels": 16,
            "map_mode": "signed_residual",
            "smoothing_sigma": SIGNED_FINISH_SIGMA,
            "line_length": 15,
            "short_segment_weight": SHORT_SEGMENT_WEIGHT,
            "blob_radius": BLOB_RADIUS,
            "batch_size": 32,
            "abnormal_batch_size": 16,
            "gan_steps": 1000,
            "encoder_steps": 2000,
            "steps_per_epoch": 300,
            "lr_e": 1e-3,
            "num_workers": 2,
            "cpus_per_worker": 1.0,
        }
        values.update(overrides)
        return cls(**values)

    @classmethod
    def wide(cls, **overrides: Any) -> Self:
        """The demo schedule with networks twice as wide (base 32): better maps, for GPU nodes or patient CPUs.

        At 256², ε = 0.1, seeds 0 and 1 (``benchmarks/residual_variants.py``, docs/benchmarks.md), plain
        pixel AP .157 → .221, pixel AUROC .907 → .930, AUPRO .70 → .78 against `demo`; it trains 2.3×
        longer on a CPU and scores at 128 instead of 35 GFLOP per 1024² image. Twice the steps added
        little (.224 AP), base 64 less than base 32 at this schedule (.206).
        """
        return cls.demo(**({"base_channels": 32} | overrides))

    @classmethod
    def tiny(cls, **overrides: Any) -> Self:
        """A few steps at P = 32 with a very narrow network: for tests, not for detecting anything."""
        values: dict[str, Any] = {
            "patch_size": 32,
            "stride": 16,
            "latent_dim": 8,
            "base_channels": 4,
            "batch_size": 8,
            "abnormal_batch_size": 4,
            "gan_steps": 4,
            "encoder_steps": 2,
            "steps_per_epoch": 3,
            "smoothing_sigma": 1.0,
            "num_workers": 2,
            "cpus_per_worker": 0.5,
            "max_failures": 0,
        }
        values.update(overrides)
        return cls(**values)


def map_finish_overrides(
    line_length: int | None,
    smoothing_sigma: float | None,
    short_segment_weight: float | None = None,
    blob_radius: int | None = None,
) -> dict[str, object]:
    """`TrainConfig` overrides of the map's finish, from ``anomap train``'s flags (None = not given).

    Turning the line filter off (``line_length`` 0) turns off its parts too (half-length segments, discs)
    where they are not given, and brings back the Gaussian σ = 2 of the versions before the filter, not
    an unsmoothed map, where σ is not given.
    """
    overrides: dict[str, object] = {}
    if line_length is not None:
        overrides["line_length"] = line_length
        if line_length == 0:
            overrides |= {"smoothing_sigma": GAUSSIAN_FINISH_SIGMA, "short_segment_weight": 0.0, "blob_radius": 0}
    given = {
        "smoothing_sigma": smoothing_sigma,
        "short_segment_weight": short_segment_weight,
        "blob_radius": blob_radius,
    }
    return overrides | {name: value for name, value in given.items() if value is not None}
