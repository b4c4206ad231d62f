"""Model versions for people: promote, roll back and list, per line, with the pointer history in the
registry and an event on ``anomap:models`` for every move (real Valkey and SeaweedFS)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import redis
from helpers import point_cli_at
from typer.testing import CliRunner

from cluster.cli import app
from cluster.connections import redis_from_url
from cluster.ports import free_port
from schemas import ModelCard, ModelEventKind, Settings, StreamNames, Thresholds
from trainer.config import TrainConfig
from trainer.gan import NoisyAnoGAN
from trainer.model_io import weights_to_bytes
from trainer.registry import ModelRegistry, NothingToRollBack
from trainer.store import ObjectStore
from workers import model_events
from workers.model_events import (
    ModelEventNotAnnounced,
    pointer_lock_key,
    promote_model,
    read_model_events,
    rollback_model,
)
from workers.redis_lock import RenewedLock

NAMES = StreamNames()
runner = CliRunner()


def _version(registry: ModelRegistry, version: str, parent: str | None = None, auroc: float = 0.9) -> str:
    """A model version with a card and untrained weights (enough for the registry and the listing)."""
    card = ModelCard(
        name=registry.name,
        version=version,
        parent_version=parent,
        patch_size=32,
        stride=16,
        latent_dim=16,
        base_channels=8,
        gamma=0.9,
        abnormal_patch_source="mask",
        smoothing_sigma=1.0,
        data_digest="test",
        n_train_images=3,
        n_abnormal_images=2,
        thresholds=Thresholds(pixel=0.1, image=0.2, pixel_quantile=0.99, image_quantile=0.99, n_calibration_images=3),
        metrics={"image_auroc": auroc, "pixel_auroc": auroc - 0.1},
    )
    return registry.save(card, _weights())


@functools.cache
def _weights() -> bytes:
    """Untrained weights of the cards' architecture (P = 32, latent 16, 8 channels): the registry saves only
    weights that load and score."""
    config = TrainConfig(patch_size=32, stride=16, latent_dim=16, base_channels=8)
    return weights_to_bytes(NoisyAnoGAN(config, device="cpu").weights())


@pytest.fixture
def registry(object_store: ObjectStore) -> ModelRegistry:
    registry = ModelRegistry(object_store, "metal")
    for i, parent in enumerate((None, "v1", "v2")):
        _version(registry, f"v{i + 1}", parent, auroc=0.8 + i / 20)
    return registry


def test_promote_then_rollback_walks_back_through_the_history(registry: ModelRegistry) -> None:
    registry.set_live("v1")
    first = registry.promote("v2", reason="better")
    registry.promote("v3", reason="retrained")
    assert (first.event, first.version, first.previous, first.reason) == (ModelEventKind.PROMOTE, "v2", "v1", "better")
    assert registry.rollback(reason="regressed").version == "v2"
    assert registry.live_version() == "v2"
    assert registry.rollback().version == "v1"
    with pytest.raises(NothingToRollBack, match="v1 is the first live version recorded"):
        registry.rollback()
    assert registry.live_version() == "v1"
    history = registry.history()
    assert [(e.event.value, e.previous, e.version) for e in history] == [
        ("promote", None, "v1"),
        ("promote", "v1", "v2"),
        ("promote", "v2", "v3"),
        ("rollback", "v3", "v2"),
        ("rollback", "v2", "v1"),
    ]
    registry.promote("v3")
    assert registry.rollback().version == "v1"  # back to what was live before v3, not to v2


def test_a_line_without_a_pointer_follows_the_default_and_rollback_returns_it_there(
    registry: ModelRegistry,
) -> None:
    registry.set_live("v1")
    assert registry.live_version("press-2") == "v1"
    event = registry.promote("v3", line="press-2")
    assert (event.line, event.previous, event.version) == ("press-2", None, "v3")
    assert (registry.live_version("press-2"), registry.live_version()) == ("v3", "v1")
    assert registry.live_pointers() == {"default": "v1", "press-2": "v3"}
    assert registry.history() != registry.history("press-2")
    event = registry.rollback("press-2")
    assert (event.previous, event.version) == ("v3", None)
    assert registry.live_pointers() == {"default": "v1"}
    registry.promote("v2")
    assert registry.live_version("press-2") == "v2"  # it follows the default again
    with pytest.raises(NothingToRollBack, match="follows the default line's model"):
        registry.rollback("press-2")


def test_a_pointer_moved_outside_the_history_is_still_rolled_back_to(registry: ModelRegistry) -> None:
    registry.store.put_bytes("models/metal/live", b"v2")  # as an older anomap wrote it: no history
    registry.promote("v3")
    assert registry.rollback().version == "v2"
    with pytest.raises(NothingToRollBack):
        registry.rollback()


def test_a_line_named_history_has_its_own_pointer(registry: ModelRegistry) -> None:
    registry.promote("v1")
    registry.promote("v2", line="history")
    assert (registry.live_version(), registry.live_version("history")) == ("v1", "v2")
    assert [e.version for e in registry.history()] == ["v1"]
    assert [e.version for e in registry.history("history")] == ["v2"]


def test_promote_and_rollback_announce_events_and_a_repeat_announces_nothing(
    registry: ModelRegistry, redis_client: redis.Redis
) -> None:
    promote_model(registry, redis_client, NAMES, "v1", reason="first")
    promote_model(registry, redis_client, NAMES, "v2", line="press-2", reason="own model")
    assert not promote_model(registry, redis_client, NAMES, "v2", line="press-2").changed
    rollback_model(registry, redis_client, NAMES, line="press-2", reason="bad")
    events = [event for _, event in read_model_events(redis_client, NAMES)]
    assert [(e.event.value, e.line, e.previous, e.version, e.reason) for e in events] == [
        ("promote", "default", None, "v1", "first"),
        ("promote", "press-2", None, "v2", "own model"),
        ("rollback", "press-2", "v2", None, "bad"),
    ]
    raw = json.loads(redis_client.xrange(NAMES.models)[0][1][b"event"])
    assert {"event", "version", "previous", "line", "reason", "at"} <= set(raw)


@pytest.fixture
def cli_env(
    registry: ModelRegistry, stack_settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> ModelRegistry:
    point_cli_at(monkeypatch, stack_settings, registry.store.bucket, tmp_path)
    return registry


def test_models_commands_promote_list_and_roll_back(cli_env: ModelRegistry, redis_client: redis.Redis) -> None:
    outcome = runner.invoke(app, ["models", "rollback"])
    assert outcome.exit_code == 2
    assert "nothing to roll back to on the default line of model 'metal'" in outcome.output
    for args in (["v1"], ["v2"], ["v3", "--line", "press-2"]):
        outcome = runner.invoke(app, ["models", "promote", *args])
        assert outcome.exit_code == 0, outcome.output
    assert "promote: model metal on line press-2" in outcome.output

    outcome = runner.invoke(app, ["models", "list", "--json"])
    assert outcome.exit_code == 0, outcome.output
    listing = json.loads(outcome.stdout)
    assert listing["live"] == {"default": "v2", "press-2": "v3"}
    rows = {row["version"]: row for row in listing["versions"]}
    assert (rows["v3"]["parent_version"], rows["v3"]["gamma"], rows["v3"]["live_on"]) == ("v2", 0.9, ["press-2"])
    assert rows["v1"]["metrics"]["image_auroc"] == pytest.approx(0.8) and rows["v1"]["live_on"] == []
    outcome = runner.invoke(app, ["models", "list", "--line", "press-4", "--json"])
    assert json.loads(outcome.stdout)["live"] == {"press-4": "v2"}
    assert json.loads(outcome.stdout)["follows_default"] is True
    outcome = runner.invoke(app, ["models", "list"])
    assert outcome.exit_code == 0 and "v3" in outcome.output and "press-2" in outcome.output

    outcome = runner.invoke(app, ["models", "rollback", "--reason", "false alarms"])
    assert outcome.exit_code == 0, outcome.output
    assert cli_env.live_version() == "v1"
    last = list(read_model_events(redis_client, NAMES))[-1][1]
    assert (last.event, last.version, last.previous, last.reason) == (
        ModelEventKind.ROLLBACK,
        "v1",
        "v2",
        "false alarms",
    )

    outcome = runner.invoke(app, ["models", "promote", "v9"])
    assert outcome.exit_code == 2
    assert "model 'metal' has no version 'v9'" in outcome.output
    outcome = runner.invoke(app, ["models", "promote", "latest/"])
    assert outcome.exit_code == 2 and "is not a version name" in outcome.output, outcome.output


def test_a_promotion_that_finds_the_pointer_lock_taken_moves_nothing_and_says_so(
    cli_env: ModelRegistry, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another move (a retraining run's check-and-promote, say) holds the model's pointer lock for longer
    than the wait: the command fails in one line, and neither the pointer nor the stream moved."""
    assert runner.invoke(app, ["models", "promote", "v1"]).exit_code == 0
    events = len(list(read_model_events(redis_client, NAMES)))
    monkeypatch.setattr(model_events, "POINTER_LOCK_WAIT_S", 0.3)
    holder = RenewedLock(redis_client, pointer_lock_key(NAMES, "metal"), 30_000)
    assert holder.acquire()
    try:
        for args in (["promote", "v2"], ["rollback"]):
            outcome = runner.invoke(app, ["models", *args])
            assert outcome.exit_code == 2, outcome.output
            assert f"held its pointer lock ({holder.key})" in outcome.output, outcome.output
            assert "nothing was moved; run the command again" in " ".join(outcome.output.split())
    finally:
        holder.release()
    assert cli_env.live_version() == "v1" and len(list(read_model_events(redis_client, NAMES))) == events


def test_a_version_folder_copied_under_another_name_is_listed_as_unreadable(
    cli_env: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """v1's card copied to v9 (a restore under the wrong name): the listing names the problem and goes on."""
    store = cli_env.store
    for name in ("card.json", "weights.safetensors"):
        store.put_bytes(f"models/metal/v9/{name}", store.get_bytes(f"models/metal/v1/{name}"))
    outcome = runner.invoke(app, ["models", "list", "--json"])
    assert outcome.exit_code == 0, outcome.output
    rows = {row["version"]: row for row in json.loads(outcome.stdout)["versions"]}
    assert "v1" in rows["v9"]["problem"] and rows["v2"]["gamma"] == 0.9
    outcome = runner.invoke(app, ["models", "promote", "v9"])
    assert outcome.exit_code == 2 and "v9" in outcome.output, outcome.output
    monkeypatch.setenv("COLUMNS", "250")
    assert "unreadable card" in runner.invoke(app, ["models", "list"]).output


def test_a_move_while_redis_is_away_moves_nothing(registry: ModelRegistry) -> None:
    registry.set_live("v1")
    away = redis_from_url(f"redis://127.0.0.1:{free_port()}/0")
    for move in (lambda: promote_model(registry, away, NAMES, "v2"), lambda: rollback_model(registry, away, NAMES)):
        with pytest.raises(redis.ConnectionError):
            move()
    assert registry.live_version() == "v1" and [e.version for e in registry.history()] == ["v1"]


def test_a_move_whose_event_cannot_be_added_says_the_pointer_moved(
    cli_env: ModelRegistry, redis_client: redis.Redis
) -> None:
    """Redis answers but refuses the XADD (here: anomap:models is a string): the pointer has moved,
    and the command says so, and says not to repeat it, instead of reporting a plain failure."""
    cli_env.set_live("v1")
    redis_client.set(NAMES.models, "not a stream")
    with pytest.raises(ModelEventNotAnnounced, match="moved \\(v1 → v2\\)") as caught:
        promote_model(cli_env, redis_client, NAMES, "v2")
    assert caught.value.event.version == "v2" and cli_env.live_version() == "v2"
    outcome = runner.invoke(app, ["models", "rollback"])
    assert outcome.exit_code == 2
    assert "rollback: model metal on line default: v2 → v1" in outcome.output
    assert "Do not repeat the command" in outcome.output and "Traceback" not in outcome.output
    assert cli_env.live_version() == "v1"
