"""The retraining controller's rules, as pure functions: when to retrain, how, and whether to promote.

    policy = RetrainPolicy(min_confirmations=5, tolerance=0.02)        # validated (pydantic)
    trigger = decide_trigger(policy, new=["abnormal/cam01-7"], parent_created_at=t0, now=t1)
    trigger.run, trigger.reason        # False, "1 new confirmation, fewer than 5; ..."
    cfg = finetune_config(parent_card, policy, has_abnormal=True)       # TrainConfig: parent's architecture,
                                                                        # 1/4 of its schedule, γ 0.8
    verdict = judge(policy, candidate={"pixel_ap": 0.31, ...}, parent={"pixel_ap": 0.30, ...},
                    confirmed_scores=[1.4, 2.0, 0.7])
    verdict.promote, verdict.failures  # False, ["1 of 3 confirmed abnormal images score below 1.0 ..."]

Triggers: ``force``; else nothing when the same confirmations were already tried on the same parent;
else at least ``min_confirmations`` new ones, or at least one new one once ``period_s`` has passed since
the parent was created (with no new confirmation a fine-tune would learn nothing new: it is skipped).

Promotion: none of `REGRESSION_METRICS` may fall by more than ``tolerance`` from the parent's value on
the same validation set (a negative tolerance demands an improvement), at least one of them must be
defined on it, and at least ``required_above`` of the confirmed abnormal images must reach a
normalised image score of 1.0 under the candidate.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from schemas import ModelCard
from schemas.model_card import MapMode, RetrainDecision
from trainer.config import TrainConfig
from trainer.scoring import line_finish_sigma

REGRESSION_METRICS = ("image_auroc", "pixel_auroc", "pixel_ap")
"""Validation metrics a candidate may not lose (beyond the tolerance) against its parent."""
ABOVE_THRESHOLD = 1.0
"""A normalised image score at or above this flags the image."""
DEFAULT_GAMMA = 0.8
"""γ of a fine-tune whose parent was plain AnoGAN (γ = 1)."""
_ARCHITECTURE = (
    "patch_size",
    "stride",
    "latent_dim",
    "base_channels",
    "spectral_norm",
    "smoothing_sigma",
    "line_length",
    "short_segment_weight",
    "blob_radius",
)


class RetrainPolicy(BaseModel):
    """When the controller retrains a line, how it fine-tunes, and what a candidate must show to go live."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_confirmations: int = Field(default=5, ge=1, description="K: new confirmations that trigger a run")
    period_s: float = Field(default=24 * 3600.0, gt=0, description="a run also starts this long after the parent")
    tolerance: float = Field(
        default=0.02, ge=-1.0, le=1.0, description="largest allowed drop of each validation metric (negative: gain)"
    )
    required_above: float = Field(
        default=1.0, ge=0.0, le=1.0, description="share of confirmed abnormal images that must score >= 1.0"
    )
    gamma: float | None = Field(default=None, gt=0, le=1, description="None: the parent's if < 1, else 0.8")
    schedule_fraction: float = Field(default=0.25, gt=0, le=1, description="share of the parent's steps")
    gan_steps: int | None = Field(default=None, ge=0, description="None: schedule_fraction of the parent's")
    encoder_steps: int | None = Field(default=None, ge=0, description="None: schedule_fraction of the parent's")
    lr_scale: float = Field(default=1.0, gt=0, le=100, description="multiplies the parent's learning rates")
    num_workers: int | None = Field(default=None, ge=1, le=256, description="Ray Train workers (None: parent's)")
    use_gpu: bool | None = Field(default=None, description="None: as the parent was trained")
    map_mode: MapMode | None = Field(default=None, description="None: the parent's")
    seed: int | None = Field(default=None, ge=0, description="None: the parent's seed + 1")


@dataclass(frozen=True)
class Trigger:
    """Whether to retrain now, and why (one line for people)."""

    run: bool
    reason: str


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.0f} s"


def decide_trigger(
    policy: RetrainPolicy,
    new: Sequence[str],
    parent_created_at: datetime,
    now: datetime,
    force: bool = False,
    already_tried: str | None = None,
) -> Trigger:
    """Whether a line should be retrained now.

    Args:
        new: names of the confirmations the live (parent) version was not trained on.
        parent_created_at, now: aware datetimes; the period runs from the parent's creation.
        force: retrain whatever the counts (``--force``).
        already_tried: when this parent was already fine-tuned on exactly the confirmations there are
            now, what came of it (e.g. ``"v2026… was rejected"``): nothing is tried again until a new
            confirmation arrives.
    """
    n = len(new)
    confirmations = _plural(n, "new confirmation")
    if force:
        return Trigger(True, f"forced ({confirmations})")
    if already_tried is not None:
        return Trigger(
            False,
            f"this data was already tried on the live version ({already_tried}); waiting for new "
            "confirmations (or --force)",
        )
    if n >= policy.min_confirmations:
        return Trigger(True, f"{confirmations} (>= {policy.min_confirmations})")
    age = (now - parent_created_at).total_seconds()
    if n and age >= policy.period_s:
        return Trigger(
            True, f"{confirmations} and the live version is {_duration(age)} old (period {_duration(policy.period_s)})"
        )
    if not n:
        return Trigger(False, "no new confirmations since the live version was trained")
    left = _duration(policy.period_s - age)
    return Trigger(False, f"{confirmations}, fewer than {policy.min_confirmations}; the period ends in {left}")


def finetune_config(parent: ModelCard, policy: RetrainPolicy, has_abnormal: bool) -> TrainConfig:
    """The `TrainConfig` of a fine-tune of ``parent``: its architecture and settings, the policy's schedule and γ.

    The map mode is the policy's, else the parent's; where it changes between signed and magnitude maps under
    the line filter, the map's σ is `trainer.scoring.line_finish_sigma`'s (the parent's belongs to the other
    order of the finish). γ is ``policy.gamma``, else the parent's when below 1, else `DEFAULT_GAMMA`; with no
    confirmed abnormal image it is 1 (plain AnoGAN: nothing to push the generator away from). Steps default
    to ``schedule_fraction`` of the parent's (at least 1 each where the parent had any).
    """
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    values: dict[str, object] = {k: v for k, v in parent.train_config.items() if k in known}
    values |= {name: getattr(parent, name) for name in _ARCHITECTURE}
    mode = MapMode(policy.map_mode or parent.map_mode)
    values["map_mode"] = str(mode)
    if mode.signed != parent.map_mode.signed and parent.line_length > 0:
        values["smoothing_sigma"] = line_finish_sigma(mode)
    base = TrainConfig(**values)  # type: ignore[arg-type]

    def steps(override: int | None, parent_steps: int) -> int:
        if override is not None:
            return override
        return max(1, round(parent_steps * policy.schedule_fraction)) if parent_steps else 0

    gamma = policy.gamma if policy.gamma is not None else (parent.gamma if parent.gamma < 1.0 else DEFAULT_GAMMA)
    changes: dict[str, object] = {
        "gamma": gamma if has_abnormal else 1.0,
        "gan_steps": steps(policy.gan_steps, base.gan_steps),
        "encoder_steps": steps(policy.encoder_steps, base.encoder_steps),
        "lr_g": base.lr_g * policy.lr_scale,
        "lr_d": base.lr_d * policy.lr_scale,
        "lr_e": base.lr_e * policy.lr_scale,
        "seed": policy.seed if policy.seed is not None else base.seed + 1,
    }
    if policy.num_workers is not None:
        changes["num_workers"] = policy.num_workers
    if policy.use_gpu is not None:
        changes["use_gpu"] = policy.use_gpu
    return base.replace(**changes)


@dataclass(frozen=True)
class Verdict:
    """Whether a candidate goes live: one line per check, passed and failed."""

    promote: bool
    passed: list[str]
    failures: list[str]

    @property
    def reasons(self) -> list[str]:
        """Failures first, then what passed."""
        return [*self.failures, *self.passed]

    @property
    def decision(self) -> RetrainDecision:
        """What a candidate's card records of this verdict: promoted or rejected."""
        return RetrainDecision.PROMOTED if self.promote else RetrainDecision.REJECTED

    def overruled(self, why: str) -> Verdict:
        """Not promoted, for ``why`` alone (a reason outside the checks); what passed is kept."""
        return Verdict(promote=False, passed=self.passed, failures=[why])

    @property
    def summary(self) -> str:
        """One line: why it was promoted or rejected."""
        if self.promote:
            return "no validation metric regressed and the confirmed defects score above threshold"
        return "; ".join(self.failures)


def _defined(metrics: Mapping[str, float], name: str) -> float | None:
    value = metrics.get(name)
    return float(value) if value is not None and math.isfinite(value) else None


def judge(
    policy: RetrainPolicy,
    candidate: Mapping[str, float],
    parent: Mapping[str, float],
    confirmed_scores: Sequence[float],
) -> Verdict:
    """Promote or reject a candidate.

    Args:
        candidate, parent: validation metrics of each on the same frozen validation set (a metric
            missing or NaN is undefined there and not compared).
        confirmed_scores: the candidate's normalised image scores (1.0 = at threshold) of the confirmed
            abnormal images, (N,); none means there is nothing to check.
    """
    passed: list[str] = []
    failures: list[str] = []
    compared = 0
    for name in REGRESSION_METRICS:
        new, old = _defined(candidate, name), _defined(parent, name)
        if new is None or old is None:
            passed.append(f"{name}: undefined on the validation set, not compared")
            continue
        compared += 1
        change = f"{name} {old:.3f} -> {new:.3f} ({new - old:+.3f}; tolerance {policy.tolerance:g})"
        (failures if old - new > policy.tolerance else passed).append(change)
    if compared == 0:
        failures.append(
            "no validation metric could be compared: the validation set needs defect images "
            "(with masks for the pixel metrics) besides good ones"
        )
    n = len(confirmed_scores)
    if n == 0:
        passed.append("no confirmed abnormal images to check")
    else:
        above = sum(score >= ABOVE_THRESHOLD for score in confirmed_scores)
        line = (
            f"{above} of {n} confirmed abnormal images score >= {ABOVE_THRESHOLD:g} "
            f"({above / n:.0%}; required {policy.required_above:.0%})"
        )
        (passed if above / n >= policy.required_above - 1e-9 else failures).append(line)
    return Verdict(promote=not failures, passed=passed, failures=failures)
