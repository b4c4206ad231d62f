"""The retraining controller: its rules (pure), its data in the store, and whole runs with real Valkey,
SeaweedFS and Ray Train (tiny schedules on 64² images): skipped, rejected, promoted, and broken runs that
leave the live model alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from helpers import point_cli_at
from pydantic import ValidationError
from retrain_helpers import (
    FINE_TUNE,
    LINE,
    NAMES,
    PARENT_CONFIG,
    SIDE,
    confirm_squares,
    metal,
    model_events_of,
    retrain_run,
    write_line_folder,
)
from typer.testing import CliRunner

from cluster.cli import app
from schemas import ModelCard, ModelEvent, ModelEventKind, Settings
from schemas.model_card import AbnormalPatchSource, MapMode, RetrainDecision
from trainer.config import TrainConfig
from trainer.folder_dataset import DatasetError
from trainer.imaging import encode_png
from trainer.pipeline import PROVISIONAL_THRESHOLDS, build_card, initial_model_version
from trainer.registry import ModelRegistry, new_version_id
from trainer.store import ObjectMissing, ObjectStore
from workers import retrain as retrain_module
from workers.dataset_upload import upload_dataset_folder
from workers.retrain import RetrainOutcome, RetrainStatus, retrain_once, watch_retraining
from workers.retrain_data import ConfirmedListing, list_confirmed, load_validation_set
from workers.retrain_policy import RetrainPolicy, decide_trigger, finetune_config, judge
from workers.retrain_state import RetrainAttempt, RetrainState, load_state

runner = CliRunner()
T0 = datetime(2026, 1, 1, tzinfo=UTC)

# (a) the rules, pure


def test_trigger_needs_k_new_confirmations_or_the_period_and_force_always_runs() -> None:
    policy = RetrainPolicy(min_confirmations=3, period_s=3600)
    soon, late = T0 + timedelta(minutes=5), T0 + timedelta(hours=2)
    assert not decide_trigger(policy, ["a", "b"], T0, soon).run
    assert "2 new confirmations, fewer than 3" in decide_trigger(policy, ["a", "b"], T0, soon).reason
    assert decide_trigger(policy, ["a", "b", "c"], T0, soon).run
    assert decide_trigger(policy, ["a"], T0, late).run
    assert not decide_trigger(policy, [], T0, late).run  # nothing new to learn from
    assert decide_trigger(policy, [], T0, soon, force=True).run
    tried = decide_trigger(policy, ["a", "b", "c"], T0, soon, already_tried="v2 was rejected")
    assert not tried.run and "v2 was rejected" in tried.reason


def test_judge_rejects_a_drop_beyond_the_tolerance_and_unflagged_confirmed_defects() -> None:
    policy = RetrainPolicy(tolerance=0.02, required_above=1.0)
    parent = {"image_auroc": 0.90, "pixel_auroc": 0.95, "pixel_ap": 0.30, "aupro": 0.5}
    small_drop = {"image_auroc": 0.89, "pixel_auroc": 0.96, "pixel_ap": 0.29, "aupro": 0.1}
    assert judge(policy, small_drop, parent, [1.2, 3.0]).promote  # aupro is not a gate
    verdict = judge(policy, small_drop | {"pixel_ap": 0.25}, parent, [1.2, 0.7])
    assert not verdict.promote
    assert [f.split(" ")[0] for f in verdict.failures] == ["pixel_ap", "1"]
    assert "1 of 2 confirmed abnormal images" in verdict.summary
    assert judge(RetrainPolicy(required_above=0.5), parent, parent, [1.2, 0.7]).promote
    assert not judge(RetrainPolicy(tolerance=-0.01), parent, parent, []).promote  # negative: must improve
    undefined = judge(policy, {"aupro": 0.9}, {"aupro": 0.8}, [2.0])
    assert not undefined.promote and "no validation metric could be compared" in undefined.summary
    assert judge(policy, parent | {"pixel_ap": float("nan")}, parent, []).promote  # undefined: not compared


def test_policy_is_validated_and_the_fine_tune_keeps_the_parents_architecture(object_store: ObjectStore) -> None:
    with pytest.raises(ValidationError, match="min_confirmations"):
        RetrainPolicy(min_confirmations=0)
    with pytest.raises(ValidationError, match="required_above"):
        RetrainPolicy(required_above=1.5)
    with pytest.raises(ValidationError, match="extra"):
        RetrainPolicy(tolerence=0.1)  # type: ignore[call-arg]
    registry = ModelRegistry(object_store, "metal")
    parent = initial_model_version(registry, PARENT_CONFIG.replace(gan_steps=100, encoder_steps=40), [metal(1)])
    cfg = finetune_config(parent, RetrainPolicy(), has_abnormal=True)
    assert (cfg.patch_size, cfg.latent_dim, cfg.base_channels) == (32, 8, 4)
    assert (cfg.gan_steps, cfg.encoder_steps, cfg.gamma, cfg.seed) == (25, 10, 0.8, 1)
    assert finetune_config(parent, RetrainPolicy(), has_abnormal=False).gamma == 1.0
    lower = finetune_config(parent.model_copy(update={"gamma": 0.6}), RetrainPolicy(lr_scale=0.5), True)
    assert lower.gamma == 0.6 and lower.lr_g == pytest.approx(PARENT_CONFIG.lr_g / 2)
    with pytest.raises(ValueError, match="discriminator_head='dense'"):
        finetune_config(parent, RetrainPolicy(map_mode="logit"), has_abnormal=True)


def test_a_fine_tune_that_changes_the_maps_sign_takes_the_sigma_of_its_own_finish() -> None:
    signed = build_card(
        TrainConfig.demo(), "metal", "v1", AbnormalPatchSource.NONE, PROVISIONAL_THRESHOLDS, "d", 0, 0
    )  # the demo's: signed residuals, line 15, σ 0.7 after it
    assert (signed.map_mode, signed.smoothing_sigma) == (MapMode.SIGNED_RESIDUAL, 0.7)
    magnitude = finetune_config(signed, RetrainPolicy(map_mode=MapMode.SSIM_RESIDUAL), has_abnormal=True)
    assert (magnitude.map_mode, magnitude.smoothing_sigma, magnitude.line_length) == ("ssim_residual", 0.0, 15)
    same = finetune_config(signed, RetrainPolicy(), has_abnormal=True)
    assert (same.map_mode, same.smoothing_sigma) == ("signed_residual", 0.7)
    assert (same.short_segment_weight, same.blob_radius) == (0.6, 3)  # the filter's shapes are the parent's
    back = build_card(magnitude, "metal", "v2", AbnormalPatchSource.MASK, PROVISIONAL_THRESHOLDS, "d", 0, 0)
    assert finetune_config(back, RetrainPolicy(map_mode=MapMode.SIGNED_RESIDUAL), True).smoothing_sigma == 0.7
    no_filter = {"line_length": 0, "smoothing_sigma": 2.0, "short_segment_weight": 0.0, "blob_radius": 0}
    gaussian = signed.model_copy(update=no_filter)  # no line filter: σ is kept
    assert finetune_config(gaussian, RetrainPolicy(map_mode=MapMode.RESIDUAL), True).smoothing_sigma == 2.0


def test_old_cards_load_and_a_rejection_event_moves_no_pointer() -> None:
    card_json = {
        "name": "metal",
        "version": "v1",
        "patch_size": 32,
        "stride": 16,
        "latent_dim": 8,
        "base_channels": 4,
        "gamma": 1.0,
        "abnormal_patch_source": "none",
        "smoothing_sigma": 1.0,
        "data_digest": "x",
        "n_train_images": 1,
        "n_abnormal_images": 0,
        "thresholds": {"pixel": 1, "image": 1, "pixel_quantile": 0.5, "image_quantile": 0.5, "n_calibration_images": 1},
    }
    assert ModelCard.model_validate(card_json).retraining is None
    event = ModelEvent(event=ModelEventKind.REJECTED, name="metal", line=LINE, version="v2", previous="v1")
    assert not event.changed
    state = RetrainState(attempts=[RetrainAttempt(parent="v1", confirmations_digest="d", decision="failed")])
    assert state.tried("v1", "d") is None  # a failed attempt does not block a retry


def test_watch_goes_on_after_a_failing_round(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    stop = threading.Event()

    def fake_once(client: Any, registry: Any, names: Any, storage: Any, line: str, *args: Any, **kw: Any) -> Any:
        calls.append(line)
        if len(calls) == 1:
            raise RuntimeError("store away")
        if len(calls) >= 3:
            stop.set()
        return RetrainOutcome(RetrainStatus.SKIPPED, line, "nothing new", "v1")

    monkeypatch.setattr(retrain_module, "retrain_once", fake_once)
    reported: list[RetrainOutcome] = []
    rounds = watch_retraining(None, None, NAMES, "x", ["a"], RetrainPolicy(), 0.01, stop, reported.append)  # type: ignore[arg-type]
    assert calls == ["a", "a", "a"] and rounds == 3 and len(reported) == 2


# the data: upload and listing


def test_upload_puts_train_good_and_a_frozen_validation_set_and_refuses_to_overwrite(
    object_store: ObjectStore, tmp_path: Path
) -> None:
    root = write_line_folder(tmp_path / "metal")
    summary = upload_dataset_folder(object_store, root, LINE)
    assert (summary.train_good, summary.validation, summary.masks) == (4, {"good": 3, "square": 3}, 3)
    validation = load_validation_set(object_store, LINE)
    assert validation.test_labels == ["good"] * 3 + ["square"] * 3
    assert validation.test_masks[3] is not None and validation.test_masks[3].sum() == SIDE * SIDE
    with pytest.raises(DatasetError, match="--replace"):
        upload_dataset_folder(object_store, root, LINE)
    (root / "test/good/002.png").unlink()
    assert upload_dataset_folder(object_store, root, LINE, replace=True).removed == 1
    (root / "ground_truth/square/000_mask.png").write_bytes(encode_png(np.zeros((32, 32), dtype=bool)))
    with pytest.raises(DatasetError, match=r"000_mask.png is 32×32 but its image test/square/000 is 64×64"):
        upload_dataset_folder(object_store, root, "other", replace=True)
    bare = tmp_path / "bare"
    (bare / "train/good").mkdir(parents=True)
    (bare / "train/good/a.png").write_bytes(encode_png(metal(1)))
    with pytest.raises(DatasetError, match="test/good holds no readable image"):
        upload_dataset_folder(object_store, bare, "other")


def test_datasets_upload_command(tmp_path: Path, cli_env: None) -> None:
    root = write_line_folder(tmp_path / "metal")
    outcome = runner.invoke(app, ["datasets", "upload", str(root), "--line", LINE, "--json"])
    assert outcome.exit_code == 0, outcome.output
    assert json.loads(outcome.stdout)["validation"] == {"good": 3, "square": 3}
    outcome = runner.invoke(app, ["datasets", "upload", str(root), "--line", LINE])
    assert outcome.exit_code == 2 and "--replace" in outcome.output


def test_a_mask_is_recognised_only_beside_its_image(object_store: ObjectStore) -> None:
    for key in ("a.png", "a_mask.png", "b_mask.png"):
        object_store.put_bytes(f"datasets/{LINE}/abnormal/{key}", b"")
    object_store.put_bytes(f"datasets/{LINE}/normal/c.png", b"")
    listing = list_confirmed(object_store, LINE)
    assert listing == ConfirmedListing(abnormal={"a": True, "b_mask": False}, normal=["c"])
    assert listing.names == ["abnormal/a", "abnormal/b_mask", "normal/c"]


# whole runs, with real servers


@pytest.fixture
def cli_env(
    object_store: ObjectStore, stack_settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    point_cli_at(monkeypatch, stack_settings, object_store.bucket, tmp_path)


def test_fewer_than_k_confirmations_skip_and_leave_the_live_version(
    line_registry: ModelRegistry, redis_client: redis.Redis, tmp_path: Path
) -> None:
    live = line_registry.live_version(LINE)
    confirm_squares(redis_client, line_registry.store, range(30, 32))
    outcome = retrain_run(redis_client, line_registry, tmp_path, min_confirmations=5)
    assert outcome.status is RetrainStatus.SKIPPED
    assert outcome.reason.startswith("2 new confirmations, fewer than 5")
    assert outcome.new_confirmations == ["abnormal/cam01-30", "abnormal/cam01-31"]
    assert len(list_confirmed(line_registry.store, LINE).abnormal) == 2  # filed by the run
    assert line_registry.live_version(LINE) == live and line_registry.versions() == [live]
    assert model_events_of(redis_client) == []


@pytest.mark.ray
def test_clean_images_confirmed_as_defects_are_not_flagged_so_the_candidate_is_rejected_and_not_tried_again(
    ray_cluster: str, line_registry: ModelRegistry, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """A genuinely bad fine-tune under the default checks: the operators' "defects" are clean metal, so the
    candidate does not score them above threshold. (The tolerance check is `judge`'s, tested pure above.)"""
    parent = line_registry.live_version(LINE)
    confirm_squares(redis_client, line_registry.store, range(40, 43), clean=True)
    outcome = retrain_run(redis_client, line_registry, tmp_path, min_confirmations=3)
    assert outcome.status is RetrainStatus.REJECTED, outcome.lines()
    assert "confirmed abnormal images score >= 1" in outcome.reason
    assert line_registry.live_version(LINE) == parent
    assert [e.version for e in line_registry.history(LINE)] == [parent]
    card = line_registry.load_card(outcome.candidate_version or "")
    assert card.retraining is not None and card.retraining.decision is RetrainDecision.REJECTED
    assert any("confirmed abnormal images score >= 1" in reason for reason in card.retraining.reasons)
    (event,) = model_events_of(redis_client)
    assert (event.event, event.version, event.previous, event.line) == (
        ModelEventKind.REJECTED,
        card.version,
        parent,
        LINE,
    )
    again = retrain_run(redis_client, line_registry, tmp_path, min_confirmations=3)
    assert again.status is RetrainStatus.SKIPPED and f"{card.version} was rejected" in again.reason
    assert line_registry.live_version(LINE) == parent and len(model_events_of(redis_client)) == 1


@pytest.mark.ray
def test_a_promoted_candidate_is_live_recorded_and_announced_and_a_second_run_does_nothing(
    ray_cluster: str, line_registry: ModelRegistry, redis_client: redis.Redis, tmp_path: Path, cli_env: None
) -> None:
    parent = line_registry.live_version(LINE)
    jobs = confirm_squares(redis_client, line_registry.store, range(30, 33))
    outcome = retrain_run(redis_client, line_registry, tmp_path, min_confirmations=3)
    assert outcome.status is RetrainStatus.PROMOTED, outcome.lines()
    candidate = outcome.candidate_version
    assert candidate is not None and line_registry.live_version(LINE) == candidate

    card = line_registry.load_card(candidate)
    assert card.parent_version == parent and len(card.data_digest) == 64
    assert card.n_abnormal_images == 3 and card.abnormal_patch_source is AbnormalPatchSource.MASK
    assert {"validation_image_auroc", "parent_validation_pixel_ap", "confirmed_above_share"} <= set(card.metrics)
    record = card.retraining
    assert record is not None and record.decision is RetrainDecision.PROMOTED and record.line == LINE
    assert record.confirmations == [f"abnormal/{job}" for job in jobs] == record.new_confirmations
    assert set(record.validation) == {"candidate", "parent"} and len(record.confirmed_scores) == 3
    assert all(score >= 1.0 for score in record.confirmed_scores)
    (event,) = model_events_of(redis_client)
    assert (event.event, event.version, event.previous, event.line) == (ModelEventKind.PROMOTE, candidate, parent, LINE)
    assert event.reason.startswith("retrain (3 new confirmations")
    assert load_state(line_registry, LINE).attempts[-1].decision is RetrainDecision.PROMOTED

    versions = line_registry.versions()
    result = runner.invoke(
        app,
        ["retrain", "--once", "--line", LINE, "--json", "--min-confirmations", "3", "--storage-path", str(tmp_path)],
        env={"RAY_ADDRESS": ray_cluster},
    )
    assert result.exit_code == 0, result.output
    again = json.loads(result.stdout)
    assert (again["status"], again["parent_version"]) == ("skipped", candidate)
    assert again["reason"] == "no new confirmations since the live version was trained"
    assert line_registry.versions() == versions and len(model_events_of(redis_client)) == 1
    listed = runner.invoke(app, ["models", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {row["version"]: row for row in json.loads(listed.stdout)["versions"]}
    assert rows[candidate]["retrained"] == {"line": LINE, "decision": "promoted"} and rows[parent]["retrained"] is None


@pytest.mark.ray
def test_an_operators_promotion_during_the_run_wins_and_the_candidate_is_rejected(
    ray_cluster: str, line_registry: ModelRegistry, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """The operator promotes another version while the run fine-tunes the old one: the candidate, judged
    against a version that is no longer live, must not undo the operator's choice."""
    parent = line_registry.live_version(LINE)
    confirm_squares(redis_client, line_registry.store, range(30, 33))  # the promotable run of the test above
    good = load_validation_set(line_registry.store, LINE).good
    chosen: list[str] = []

    def operator_promotes_meanwhile(message: str) -> None:
        if message.startswith("evaluating") and not chosen:
            other = initial_model_version(line_registry, PARENT_CONFIG, good, data_digest="operator")
            line_registry.promote(other.version, LINE, reason="operator's choice")
            chosen.append(other.version)

    policy = RetrainPolicy(**(FINE_TUNE | {"min_confirmations": 3}))
    outcome = retrain_once(
        redis_client, line_registry, NAMES, str(tmp_path / "runs"), LINE, policy, progress=operator_promotes_meanwhile
    )
    assert outcome.status is RetrainStatus.REJECTED, outcome.lines()
    assert f"moved from {parent} to {chosen[0]} during the run" in outcome.reason
    assert line_registry.live_version(LINE) == chosen[0]
    card = line_registry.load_card(outcome.candidate_version or "")
    assert card.retraining is not None and card.retraining.decision is RetrainDecision.REJECTED
    assert [event.event for event in model_events_of(redis_client)] == [ModelEventKind.REJECTED]
    digest = list_confirmed(line_registry.store, LINE).digest()
    assert load_state(line_registry, LINE).tried(parent, digest) is None, "not judged on merit: not tried"


def test_a_run_whose_data_vanishes_after_listing_fails_and_leaves_the_live_version(
    line_registry: ModelRegistry, redis_client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = line_registry.live_version(LINE)
    jobs = confirm_squares(redis_client, line_registry.store, range(30, 33))
    real_listing = retrain_module.list_confirmed
    listings: list[ConfirmedListing] = []

    def listing_then_delete(store: ObjectStore, line: str) -> ConfirmedListing:
        listing = real_listing(store, line)
        listings.append(listing)
        if len(listings) == 2:  # the listing taken again under the line's lock, which the run trains on
            store.delete(f"datasets/{line}/abnormal/{jobs[1]}.png")  # gone between listing and loading
        return listing

    monkeypatch.setattr(retrain_module, "list_confirmed", listing_then_delete)
    with pytest.raises(ObjectMissing, match=jobs[1]):
        retrain_run(redis_client, line_registry, tmp_path, min_confirmations=3)
    assert line_registry.live_version(LINE) == parent and line_registry.versions() == [parent]
    assert model_events_of(redis_client) == [] and redis_client.keys("anomap:retrain:lock:*") == []


def test_a_run_that_breaks_after_the_candidate_is_saved_marks_it_failed_and_promotes_nothing(
    line_registry: ModelRegistry, redis_client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training replaced by a copy of the parent (no Ray); the evaluation then raises."""
    parent = line_registry.live_version(LINE)
    confirm_squares(redis_client, line_registry.store, range(30, 33))

    def copy_parent(cfg: TrainConfig, *args: Any, parent_version: str, **kwargs: Any) -> ModelCard:
        card, weights = line_registry.load(parent_version)
        copy = card.model_copy(update={"version": new_version_id(), "parent_version": parent_version})
        line_registry.save(copy, weights)
        return copy

    def broken_evaluate(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the scorer ran out of memory")

    monkeypatch.setattr(retrain_module, "train_model_version", copy_parent)
    monkeypatch.setattr(retrain_module, "evaluate", broken_evaluate)
    with pytest.raises(RuntimeError, match="out of memory"):
        retrain_run(redis_client, line_registry, tmp_path, min_confirmations=3)
    assert line_registry.live_version(LINE) == parent and model_events_of(redis_client) == []
    (candidate,) = [v for v in line_registry.versions() if v != parent]
    record = line_registry.load_card(candidate).retraining
    assert record is not None and record.decision is RetrainDecision.FAILED and "out of memory" in record.reasons[0]
    assert load_state(line_registry, LINE).attempts[-1].decision is RetrainDecision.FAILED

    def failing_training(*args: Any, **kwargs: Any) -> ModelCard:
        raise RuntimeError("Ray Train: training run failed for good")

    monkeypatch.setattr(retrain_module, "train_model_version", failing_training)
    with pytest.raises(RuntimeError, match="failed for good"):  # a failed attempt does not block a retry
        retrain_run(redis_client, line_registry, tmp_path, min_confirmations=3)
    assert line_registry.live_version(LINE) == parent and model_events_of(redis_client) == []


@pytest.mark.ray
def test_watch_logs_failing_rounds_goes_on_and_stops_cleanly_on_sigterm(
    ray_cluster: str, cli_env: None, tmp_path: Path
) -> None:
    """No live model on the line: every round fails and is logged; SIGTERM ends the loop with status 0."""
    log = tmp_path / "watch.log"
    env = os.environ | {"RAY_ADDRESS": ray_cluster}
    command = [sys.executable, "-c", "from cluster.cli import main; main()", "retrain", "--watch", "--interval", "1"]
    with log.open("w") as out:
        proc = subprocess.Popen([*command, "--line", LINE], env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 90
            while log.read_text().count("retraining line 'press-2' failed") < 2:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert "has no live version yet" in text and "SIGTERM: stopping" in text
