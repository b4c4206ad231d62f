"""`ModelCard`: the metadata that travels with every model version in the registry.

Stored as ``models/<name>/<version>/card.json`` next to ``weights.safetensors``. A threshold is part
of a model version; results report scores normalised by it (1.0 = at threshold).

A version made by the retraining controller (`workers.retrain`) also carries a `RetrainRecord`:
what it was fine-tuned from and on, how it and its parent measured on the line's frozen validation
set, and whether it was promoted and why. Cards written before that field existed load with
``retraining=None``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from schemas.ids import LineId, ModelName, ModelVersion
from schemas.job import utc_now


class AbnormalPatchSource(StrEnum):
    """Where the discriminator's abnormal ("fake") patches came from (method.md §3)."""

    NONE = "none"
    """No abnormal images: plain AnoGAN (γ = 1)."""
    MASK = "mask"
    """Patches overlapping a given mask or box."""
    MINED = "mined"
    """Top-scoring patches under a warm-up model."""
    ALL = "all"
    """Every patch of the abnormal images (last resort)."""


class ScoreMode(StrEnum):
    """How a patch's latent code is found at inference (method.md §4)."""

    ENCODER = "encoder"
    SEARCH = "search"


class MapMode(StrEnum):
    """What a patch's pixel map measures (method.md §4); larger = more anomalous.

    Every finished map is >= 0. So is every patch map but ``signed_residual``'s, which the finish turns into a
    magnitude (`trainer.scoring.finish_map`).
    """

    RESIDUAL = "residual"
    """|x − G(E(x))|: the AnoGAN residual."""
    SMOOTH_RESIDUAL = "smooth_residual"
    """|Gσ * (x − G(E(x)))|: the signed residual smoothed before its magnitude (noise cancels, grooves do not)."""
    FEATURE = "feature"
    """|f(x) − f(G(E(x)))| at the discriminator's stride-4 layer, mean over channels, up-sampled."""
    LOGIT = "logit"
    """−log D(x) per cell of a dense discriminator, up-sampled: the discriminator's own "fake" score."""
    RESIDUAL_LOGIT = "residual+logit"
    """The product of ``residual`` and ``logit``."""
    SSIM_RESIDUAL = "ssim_residual"
    """|x − G(E(x))| × (1 − SSIM(x, G(E(x)))) per pixel: the residual where the local structure differs too."""
    SIGNED_RESIDUAL = "signed_residual"
    """x − G(E(x)), signed: stitched as it is, then averaged along lines before its magnitude is taken, so the
    grain's zero-mean residual cancels where a groove's, one sign along its length, does not."""

    @property
    def signed(self) -> bool:
        """Whether patch maps of this mode can be negative (the finish takes their magnitude)."""
        return self is MapMode.SIGNED_RESIDUAL


class Thresholds(BaseModel):
    """Calibrated thresholds in raw anomaly-map units."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pixel: float = Field(gt=0)
    image: float = Field(gt=0)
    pixel_quantile: float = Field(gt=0, lt=1)
    image_quantile: float = Field(gt=0, le=1)
    n_calibration_images: int = Field(ge=1)
    warnings: tuple[str, ...] = ()
    """What makes these thresholds less trustworthy than usual (`trainer.calibration.calibration_warnings`),
    e.g. too few calibration images; empty for cards written before this field existed."""


class RetrainDecision(StrEnum):
    """What the retraining controller did with a candidate version."""

    PROMOTED = "promoted"
    """It passed every check and is live on its line."""
    REJECTED = "rejected"
    """It failed a check; the line's live version stayed."""
    FAILED = "failed"
    """The run broke after the version was saved (evaluation or promotion); nothing was promoted."""


class RetrainRecord(BaseModel):
    """How a retrained candidate came about and was judged (``ModelCard.retraining``).

    ``confirmations`` names every confirmed image the candidate was trained on, as
    ``"abnormal/<job_id>"`` or ``"normal/<job_id>"``: the next run calls a confirmation new when its
    name is not in its parent's list. ``validation`` holds ``{"candidate": {...}, "parent": {...}}``
    metrics on the frozen validation set (image_auroc, pixel_auroc, pixel_ap, aupro, as defined);
    ``confirmed_scores`` the candidate's normalised image scores of the confirmed abnormal images.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    line: LineId
    decision: RetrainDecision
    reasons: list[str] = Field(default_factory=list)
    trigger: str = ""
    confirmations: list[str] = Field(default_factory=list)
    new_confirmations: list[str] = Field(default_factory=list)
    confirmations_digest: str = Field(default="", max_length=128)
    validation_digest: str = Field(default="", max_length=128)
    validation: dict[str, dict[str, float]] = Field(default_factory=dict)
    confirmed_scores: list[float] = Field(default_factory=list)
    parent_confirmed_scores: list[float] = Field(default_factory=list)
    policy: dict[str, float | int | str | bool | None] = Field(default_factory=dict)


def tiling_problem(patch_size: int, stride: int) -> str | None:
    """Why ``stride`` cannot tile patches of ``patch_size`` (None when it can).

    `trainer.tiling.plan_tiles` pads by P − S and steps by S, so it needs 1 <= S <= P; `trainer.config.TrainConfig`
    checks the same when a version is trained.
    """
    if not 1 <= stride <= patch_size:
        return f"stride must be in [1, patch_size={patch_size}], got {stride}"
    return None


def filter_shapes_problem(line_length: int, short_segment_weight: float, blob_radius: int) -> str | None:
    """Why the line filter's extra shapes cannot go with this ``line_length`` (None when they can).

    The short segments and the disc are parts of the line filter (`trainer.scoring.finish_map`): with
    ``line_length`` 0 there is no filter, so both must be 0 too. `ModelCard` and `trainer.config.TrainConfig`
    both check this.
    """
    if line_length == 0 and (short_segment_weight > 0 or blob_radius > 0):
        return (
            f"short_segment_weight ({short_segment_weight}) and blob_radius ({blob_radius}) are "
            "parts of the line filter: they need line_length > 0, or 0 themselves"
        )
    return None


class ModelCard(BaseModel):
    """Everything needed to rebuild, serve and judge one model version."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    schema_version: Literal[1] = 1
    name: ModelName
    version: ModelVersion
    parent_version: ModelVersion | None = None
    created_at: AwareDatetime = Field(default_factory=utc_now)
    # architecture
    patch_size: int = Field(ge=16, le=256)
    stride: int = Field(ge=1, le=256)
    latent_dim: int = Field(ge=2, le=1024)
    base_channels: int = Field(ge=4, le=512)
    channels: Literal[1] = 1
    spectral_norm: bool = True
    # method
    gamma: float = Field(gt=0, le=1)
    abnormal_patch_source: AbnormalPatchSource
    score_mode: ScoreMode = ScoreMode.ENCODER
    map_mode: MapMode = MapMode.RESIDUAL
    smoothing_sigma: float = Field(ge=0, le=32)
    line_length: int = Field(default=0, ge=0, le=64)
    """Pixels of the line filter (`trainer.line_filter`); 0 = none (older versions). `trainer.scoring.finish_map`
    smooths before it, or after it for a signed ``map_mode``."""
    short_segment_weight: float = Field(default=0.0, ge=0, le=1)
    """Weight of the line filter's half-length segments (`trainer.line_filter.segment_mean_max`); 0 = none."""
    blob_radius: int = Field(default=0, ge=0, le=16)
    """Pixels of the disc whose mean also counts in the line filter (`trainer.blob_filter`); 0 = none."""
    # data and training
    data_digest: str = Field(max_length=128)
    n_train_images: int = Field(ge=0)
    n_abnormal_images: int = Field(ge=0)
    train_config: dict[str, float | int | str | bool | None] = Field(default_factory=dict)
    # calibration and quality
    thresholds: Thresholds
    metrics: dict[str, float] = Field(default_factory=dict)
    # retraining (None: trained by hand with `anomap train`)
    retraining: RetrainRecord | None = None

    @model_validator(mode="after")
    def _filter_shapes_need_the_line_filter(self) -> ModelCard:
        problem = filter_shapes_problem(self.line_length, self.short_segment_weight, self.blob_radius)
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _stride_tiles_the_patch(self) -> ModelCard:
        problem = tiling_problem(self.patch_size, self.stride)
        if problem:
            raise ValueError(problem)
        return self
