"""``anomap train``: a version that was trained but could not be made live (or announced) is one line
that says it is registered and what to do, after the card (not a traceback)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import redis
from typer.testing import CliRunner

import cluster.cli_train as cli_train
import cluster.connections as connections
import trainer.pipeline as pipeline
import workers.model_events as model_events
from cluster.cli import app
from schemas import ModelEvent, ModelEventKind, Settings

runner = CliRunner()
ARGS = ["train", "--schedule", "tiny", "--size", "64", "--n-train", "2", "--abnormal-k", "1"]


class _Answering:
    def ping(self) -> bool:
        return True


@pytest.fixture
def trained(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training "succeeds" at once with version v2, on no stack."""
    card = SimpleNamespace(version="v2", model_dump_json=lambda: '{"version": "v2"}')
    monkeypatch.setattr(cli_train, "resolved_settings", lambda **wanted: Settings())
    monkeypatch.setattr(connections, "connect_ray", lambda *args, **kwargs: "")
    monkeypatch.setattr(connections, "object_store", lambda *args, **kwargs: None)
    monkeypatch.setattr(connections, "redis_client", lambda *args, **kwargs: _Answering())
    monkeypatch.setattr(pipeline, "train_model_version", lambda *args, **kwargs: card)


def test_a_live_move_that_was_not_announced_is_one_line(
    trained: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def moved_unannounced(*args: object, **kwargs: object) -> None:
        event = ModelEvent(event=ModelEventKind.PROMOTE, name="metal", version="v2", previous="v1")
        raise model_events.ModelEventNotAnnounced(event, redis.ResponseError("WRONGTYPE"))

    monkeypatch.setattr(model_events, "promote_model", moved_unannounced)
    result = runner.invoke(app, [*ARGS, "--storage-path", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert '"version": "v2"' in result.stdout
    assert "error: model version v2 was trained, registered and made live, but: model metal" in result.output
    assert "Traceback" not in result.output


def test_redis_lost_during_training_says_how_to_make_the_version_live(
    trained: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def away(*args: object, **kwargs: object) -> None:
        raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")

    monkeypatch.setattr(model_events, "promote_model", away)
    result = runner.invoke(app, [*ARGS, "--storage-path", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "was trained and registered but not made live" in result.output
    assert "`anomap models promote v2`" in result.output and "Traceback" not in result.output
