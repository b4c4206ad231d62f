"""The retraining controller: fine-tune a line's live model on the confirmed images, promote it only if it holds up.

    outcome = retrain_once(client, registry, names, storage, line="press-2", policy=RetrainPolicy())
    outcome.status, outcome.reason     # "promoted", "no validation metric regressed and ..."
    outcome.candidate_version          # "v20261130-101500-000000" (its card holds a RetrainRecord)
    watch_retraining(client, registry, names, storage, ["press-2"], policy, interval_s=300, stop=event)

One run (`retrain_once`), for one line:

1. file pending confirmations (`ingest_confirmations`, one pass);
2. the parent is the line's live version; a confirmation (``abnormal/<job_id>``, ``normal/<job_id>``)
   is *new* when the parent's card (``retraining.confirmations``) does not list it — a version trained
   by hand lists none;
3. `decide_trigger` (``workers.retrain_policy``): K new ones, the period, ``force``; a parent already
   fine-tuned on exactly these confirmations (recorded in ``retrain/<model>/<line>/state.json``) is
   not tried again;
4. fine-tune the parent on Ray Train (`train_model_version`, ``init_weights`` = the parent's weights):
   normal = ``train/good`` + confirmed normal, abnormal = every confirmed abnormal image with its mask
   (none: the trainer mines patches), calibration = ``validation/good`` (see `workers.retrain_data`);
5. evaluate candidate and parent on the frozen validation set, and both on the confirmed abnormal images;
6. `judge`: promote (as `promote_model`: pointer, history, a ``promote`` event on ``anomap:models``)
   or reject (a ``rejected`` event; the pointer stays). A candidate that passed is still rejected when
   the live version moved during the run, or the run lost the line's lock. The card records everything:
   ``parent_version``, ``data_digest`` (keys and bytes of what it was trained on), ``metrics``
   (``validation_*``, ``parent_validation_*``, ``confirmed_above_share``) and a `RetrainRecord`
   (decision, each check, the confirmations used, the policy).

A run that raises anywhere leaves the live pointer as it was: promotion is the last step. A candidate
already saved is then marked ``failed`` in its card (best effort). One run per line at a time, guarded
by a Redis lock (``<prefix>:retrain:lock:<line>``): a second one is skipped.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import numpy as np
import redis

from schemas import ModelCard, ModelEvent, ModelEventKind, StreamNames
from schemas.model_card import RetrainDecision, RetrainRecord
from trainer.evaluation import evaluate
from trainer.model_io import weights_from_bytes
from trainer.pipeline import train_model_version
from trainer.postprocess import image_score
from trainer.registry import ModelRegistry
from trainer.scoring import PatchModel, anomaly_map
from trainer.store import CheckpointStorage
from workers.confirmations import IngestConfig, ingest_confirmations
from workers.model_events import PointersBusy, moving_pointers, publish_model_event
from workers.retrain_data import (
    ConfirmedListing,
    RetrainData,
    ValidationSet,
    list_confirmed,
    load_training_data,
    load_validation_set,
)
from workers.retrain_policy import RetrainPolicy, Trigger, Verdict, decide_trigger, finetune_config, judge
from workers.retrain_state import LineLock, RetrainAttempt, load_state, record_attempt

log = logging.getLogger("anomap.retrain")

Progress = Callable[[str], None]


class RetrainStatus(StrEnum):
    """What one `retrain_once` did."""

    PROMOTED = "promoted"
    REJECTED = "rejected"
    SKIPPED = "skipped"


@dataclass
class RetrainOutcome:
    """What `retrain_once` did for a line, for the CLI and the end-to-end test."""

    status: RetrainStatus
    line: str
    reason: str
    parent_version: str
    candidate_version: str | None = None
    new_confirmations: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """``{"candidate": {...}, "parent": {...}}`` on the validation set."""
    confirmed_scores: dict[str, list[float]] = field(default_factory=dict)
    """``{"candidate": [...], "parent": [...]}``: normalised image scores of the confirmed abnormal images."""
    warnings: list[str] = field(default_factory=list)
    event: ModelEvent | None = None
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``anomap retrain --json``)."""
        return {
            "status": self.status.value,
            "line": self.line,
            "reason": self.reason,
            "parent_version": self.parent_version,
            "candidate_version": self.candidate_version,
            "new_confirmations": self.new_confirmations,
            "checks": self.checks,
            "metrics": self.metrics,
            "confirmed_scores": self.confirmed_scores,
            "warnings": self.warnings,
            "event": None if self.event is None else self.event.model_dump(mode="json"),
            "seconds": round(self.seconds, 2),
        }

    def lines(self) -> list[str]:
        """The outcome for people, a few lines."""
        head = f"{self.status.value}: line {self.line}"
        if self.candidate_version:
            head += f": {self.candidate_version} (parent {self.parent_version})"
        else:
            head += f" (live {self.parent_version})"
        out = [f"{head}: {self.reason}", *(f"  - {check}" for check in self.checks)]
        if self.metrics:
            out.append("  validation metrics: " + json.dumps(self.metrics, sort_keys=True))
        if self.confirmed_scores:
            out.append("  confirmed abnormal, normalised scores: " + json.dumps(self.confirmed_scores))
        return out + [f"  warning: {warning}" for warning in self.warnings]


def normalised_scores(model: PatchModel, images: Sequence[np.ndarray]) -> list[float]:
    """Image scores of (H, W) images under ``model``, divided by its card's image threshold (1.0 = at threshold)."""
    threshold = model.card.thresholds.image
    return [round(image_score(anomaly_map(image, model)) / threshold, 4) for image in images]


def _validation_metrics(model: PatchModel, validation: ValidationSet) -> dict[str, float]:
    return {name: round(value, 6) for name, value in evaluate(model, validation).metrics.items()}


def _flat_metrics(metrics: dict[str, dict[str, float]], scores: dict[str, list[float]]) -> dict[str, float]:
    """Flat card metrics: ``validation_*``, ``parent_validation_*``, ``[parent_]confirmed_above_share``."""
    flat = {f"validation_{k}": v for k, v in metrics["candidate"].items()}
    flat |= {f"parent_validation_{k}": v for k, v in metrics["parent"].items()}
    for prefix, values in (("", scores["candidate"]), ("parent_", scores["parent"])):
        if values:
            flat[f"{prefix}confirmed_above_share"] = float(np.mean([s >= 1.0 for s in values]))
    return flat


@dataclass(frozen=True)
class _Run:
    """Everything one triggered run of one line works with."""

    client: redis.Redis
    registry: ModelRegistry
    names: StreamNames
    storage: CheckpointStorage | str
    line: str
    policy: RetrainPolicy
    say: Progress
    parent: ModelCard
    listing: ConfirmedListing
    new: list[str]
    trigger: str
    lock: LineLock

    def fine_tune(self) -> tuple[ModelCard, RetrainData, ValidationSet, bytes]:
        """Load the data, fine-tune the parent on Ray Train; the candidate (not live), data and parent weights."""
        store = self.registry.store
        validation = load_validation_set(store, self.line, min_side=self.parent.patch_size)
        data = load_training_data(store, self.line, self.listing, min_side=self.parent.patch_size)
        for warning in [*validation.warnings, *data.warnings]:
            self.say(f"warning: {warning}")
        cfg = finetune_config(self.parent, self.policy, has_abnormal=bool(data.abnormal))
        _, parent_weights = self.registry.load(self.parent.version)
        self.say(
            f"fine-tuning on {len(data.normal)} normal and {len(data.abnormal)} abnormal images, γ = {cfg.gamma}, "
            f"{cfg.gan_steps} + {cfg.encoder_steps} steps; calibrating on {len(validation.good)} validation normals"
        )
        card = train_model_version(
            cfg,
            data.normal,
            data.abnormal,
            data.abnormal_masks,
            validation.good,
            self.registry,
            self.registry.name,
            data.data_digest,
            self.storage,
            parent_version=self.parent.version,
            progress=self.say,
            init_weights=weights_from_bytes(parent_weights),
        )
        return card, data, validation, parent_weights

    def measure(
        self, card: ModelCard, data: RetrainData, validation: ValidationSet, parent_weights: bytes
    ) -> tuple[dict[str, dict[str, float]], dict[str, list[float]]]:
        """Validation metrics and confirmed-image scores of candidate and parent (keys ``candidate``, ``parent``)."""
        models = {
            "candidate": PatchModel.from_safetensors(card, self.registry.load(card.version)[1]),
            "parent": PatchModel.from_safetensors(self.parent, parent_weights),
        }
        self.say(f"evaluating {card.version} and {self.parent.version} on {len(validation.test_images)} images")
        metrics = {role: _validation_metrics(model, validation) for role, model in models.items()}
        scores = {role: normalised_scores(model, data.abnormal) for role, model in models.items()}
        return metrics, scores

    def _against_live(self, verdict: Verdict) -> Verdict:
        """``verdict``, unless the line's live version is no longer the parent the candidate was judged against:
        an operator's promotion or rollback during the run wins, and the candidate is rejected (the next run
        fine-tunes the new live version). Rejected too when this run no longer holds the line's lock (it
        expired while Redis was away, and another run may be promoting its own candidate)."""
        if not verdict.promote:
            return verdict
        if not self.lock.held():
            lost = (
                f"the retraining lock of line {self.line!r} ({self.lock.key}) was lost during the run (it expired "
                "while Redis was away, and another run may hold it), so the candidate is not promoted"
            )
            return verdict.overruled(lost)
        live = self.registry.live_version(self.line)
        if live == self.parent.version:
            return verdict
        moved = (
            f"the live version of line {self.line!r} moved from {self.parent.version} to {live} during the run "
            f"(a promotion or rollback); the candidate was judged against {self.parent.version}, so it is not promoted"
        )
        return verdict.overruled(moved)

    def settle_under_lock(
        self, card: ModelCard, record: RetrainRecord, on_merit: Verdict
    ) -> tuple[Verdict, ModelEvent]:
        """Check the promotion against the live version and settle it, holding the model's pointer lock from the
        check to the move (`workers.model_events.moving_pointers`): an operator's promotion cannot slip in
        between. A rejection on merit moves nothing and takes no lock; a lock that stays busy overrules."""
        if not on_merit.promote:
            return on_merit, self.settle(card, record, on_merit)
        try:
            with moving_pointers(self.client, self.names, self.registry.name):
                verdict = self._against_live(on_merit)
                return verdict, self.settle(card, record, verdict)
        except PointersBusy as exc:
            verdict = on_merit.overruled(f"{exc}: the candidate is not promoted")
            return verdict, self.settle(card, record, verdict)

    def settle(self, card: ModelCard, record: RetrainRecord, verdict: Verdict) -> ModelEvent:
        """Write the card judged by ``verdict``, then move the pointer (promoted) or build the ``rejected`` event."""
        record = record.model_copy(update={"decision": verdict.decision, "reasons": verdict.reasons})
        self.registry.update_card(card.model_copy(update={"retraining": record}))
        reason = f"retrain ({self.trigger}): {verdict.summary}"[:500]
        if verdict.promote:
            # The commit point. As `promote_model`, but the event is published by the caller: once the
            # pointer has moved, a failure to announce it must not mark the live version as failed.
            return self.registry.promote(card.version, self.line, reason)
        return ModelEvent(
            event=ModelEventKind.REJECTED,
            name=self.registry.name,
            line=self.line,
            version=card.version,
            previous=self.registry.own_version(self.line),
            reason=reason,
        )

    def execute(self, outcome: RetrainOutcome) -> RetrainOutcome:
        """Fine-tune, measure, judge, settle; a failure after the candidate was saved marks it failed."""
        card, data, validation, parent_weights = self.fine_tune()
        outcome.candidate_version = card.version
        outcome.warnings = [*validation.warnings, *data.warnings]
        digest = self.listing.digest()
        record = RetrainRecord(
            line=self.line,
            decision=RetrainDecision.FAILED,
            trigger=self.trigger,
            confirmations=self.listing.names,
            new_confirmations=self.new,
            confirmations_digest=digest,
            validation_digest=validation.digest,
            policy=self.policy.model_dump(mode="json"),
        )
        try:
            metrics, scores = self.measure(card, data, validation, parent_weights)
            on_merit = judge(self.policy, metrics["candidate"], metrics["parent"], scores["candidate"])
            card = card.model_copy(update={"metrics": card.metrics | _flat_metrics(metrics, scores)})
            record = record.model_copy(
                update={
                    "validation": metrics,
                    "confirmed_scores": scores["candidate"],
                    "parent_confirmed_scores": scores["parent"],
                }
            )
            verdict, event = self.settle_under_lock(card, record, on_merit)
        except BaseException as exc:
            self._mark_failed(card, record, exc)
            raise
        if event.changed or event.event is ModelEventKind.REJECTED:
            publish_model_event(self.client, self.names, event)
        if verdict.promote == on_merit.promote:  # a rejection only because the pointer moved does not count as
            attempt = RetrainAttempt(  # tried: a rollback to this parent may retrain on the same data
                parent=self.parent.version,
                confirmations_digest=digest,
                candidate=card.version,
                decision=verdict.decision,
            )
            record_attempt(self.registry, self.line, attempt)
        outcome.status = RetrainStatus.PROMOTED if verdict.promote else RetrainStatus.REJECTED
        outcome.reason, outcome.checks, outcome.event = verdict.summary, verdict.reasons, event
        outcome.metrics, outcome.confirmed_scores = metrics, scores
        return outcome

    def _mark_failed(self, card: ModelCard, record: RetrainRecord, exc: BaseException) -> None:
        """Best effort: the card says the run broke, and the attempt does not block a retry."""
        failed = record.model_copy(update={"decision": RetrainDecision.FAILED, "reasons": [repr(exc)[:1000]]})
        attempt = RetrainAttempt(
            parent=self.parent.version,
            confirmations_digest=record.confirmations_digest,
            candidate=card.version,
            decision=RetrainDecision.FAILED,
        )
        try:
            if self.registry.own_version(self.line) == card.version:  # the pointer moved; the history write broke
                log.warning("%s is live on line %r although its run raised: %r", card.version, self.line, exc)
                return
            self.registry.update_card(card.model_copy(update={"retraining": failed}))
            record_attempt(self.registry, self.line, attempt)
        except Exception as inner:
            log.warning("could not mark %s as failed: %r", card.version, inner)


def retrain_once(
    client: redis.Redis,
    registry: ModelRegistry,
    names: StreamNames,
    storage: CheckpointStorage | str,
    line: str = "default",
    policy: RetrainPolicy | None = None,
    force: bool = False,
    progress: Progress | None = None,
    now: datetime | None = None,
    ingest: IngestConfig | None = None,
) -> RetrainOutcome:
    """One retraining decision (and, when triggered, run) for ``line``; see the module docstring.

    Args:
        storage: where Ray Train keeps the fine-tune's checkpoints (`CheckpointStorage` or a local path).
        force: retrain whatever the counts and the history.
        progress: called with one-line status messages (default: the ``anomap.retrain`` logger).
        now: the time the period is measured to (default: now, UTC).
        ingest: how confirmations are filed first (default: consumer ``retrain`` of the ``datasets`` group).

    Needs a Ray connection when it trains. Raises on any failure: `ModelNotFound` (no live version),
    `RetrainDataError` (no training or validation data), `ObjectMissing` (data removed during the run), Ray
    Train's errors, connection errors. The live pointer is untouched by a failure before the promotion; one
    after it (announcing the promotion, recording the attempt) leaves the candidate live, as the log says.

    The decision is taken again once the line's lock is held, so a run that just finished elsewhere (a new
    parent, the same data tried) is not repeated; the lock is renewed for as long as the fine-tune runs.
    """
    policy = policy or RetrainPolicy()
    say = progress or (lambda message: log.info("%s", message))
    started = time.monotonic()
    store = registry.store
    counts = ingest_confirmations(client, store, names, ingest or IngestConfig(consumer="retrain", block_ms=10))
    if filed := {outcome.value: n for outcome, n in counts.items() if n}:
        say(f"confirmations filed: {filed}")
    planned = _plan(registry, line, policy, now, force)
    parent, listing, new, trigger = planned
    outcome = RetrainOutcome(RetrainStatus.SKIPPED, line, trigger.reason, parent.version, new_confirmations=new)
    lock = LineLock(client, names, line)
    if trigger.run and not lock.acquire():
        outcome.reason = f"another retraining of line {line!r} is running (lock {lock.key})"
    elif trigger.run:
        try:  # decided again under the lock: a run that just finished may have moved the parent or tried the data
            parent, listing, new, trigger = _plan(registry, line, policy, now, force)
            outcome = RetrainOutcome(RetrainStatus.SKIPPED, line, trigger.reason, parent.version, new_confirmations=new)
            if trigger.run:
                say(f"line {line}: retraining {registry.name}/{parent.version}: {trigger.reason}")
                run = _Run(
                    client, registry, names, storage, line, policy, say, parent, listing, new, trigger.reason, lock
                )
                run.execute(outcome)
        finally:
            lock.release()
    outcome.seconds = time.monotonic() - started
    say(f"line {line}: {outcome.status.value}: {outcome.reason}")
    return outcome


def _plan(
    registry: ModelRegistry, line: str, policy: RetrainPolicy, now: datetime | None, force: bool
) -> tuple[ModelCard, ConfirmedListing, list[str], Trigger]:
    """The line's live parent, its confirmed data, the confirmations the parent was not trained on, and whether
    (and why) to retrain now."""
    parent = registry.load_card(registry.live_version(line))
    listing = list_confirmed(registry.store, line)
    used = set(parent.retraining.confirmations) if parent.retraining else set()
    new = sorted(set(listing.names) - used)
    tried = load_state(registry, line).tried(parent.version, listing.digest())
    trigger = decide_trigger(
        policy,
        new,
        parent.created_at,
        now or datetime.now(UTC),
        force,
        None if tried is None else f"{tried.candidate} was {tried.decision.value}",
    )
    return parent, listing, new, trigger


def _live_or_unknown(registry: ModelRegistry, line: str) -> str:
    """The line's live version for a log line, or why it could not be read."""
    try:
        return registry.live_version(line)
    except Exception as exc:  # the store that broke the run may still be away
        return f"unknown ({exc.__class__.__name__})"


def watch_retraining(
    client: redis.Redis,
    registry: ModelRegistry,
    names: StreamNames,
    storage: CheckpointStorage | str,
    lines: Sequence[str],
    policy: RetrainPolicy,
    interval_s: float,
    stop: threading.Event,
    report: Callable[[RetrainOutcome], None] | None = None,
    progress: Progress | None = None,
) -> int:
    """Run `retrain_once` for every line, then wait ``interval_s``, until ``stop`` is set; returns the rounds run.

    A line whose run raises is logged (with the traceback) and the loop goes on; ``stop`` is checked
    between lines and while waiting, so a signal ends the loop after the run in progress.
    """
    if interval_s <= 0:
        msg = f"interval_s must be > 0, got {interval_s}"
        raise ValueError(msg)
    rounds = 0
    while not stop.is_set():
        for line in lines:
            if stop.is_set():
                break
            try:
                outcome = retrain_once(client, registry, names, storage, line, policy, progress=progress)
            except Exception:
                log.exception(
                    "retraining line %r failed (live version now: %s); next try in %g s",
                    line,
                    _live_or_unknown(registry, line),
                    interval_s,
                )
                continue
            if report is not None:
                report(outcome)
        rounds += 1
        stop.wait(interval_s)
    return rounds
