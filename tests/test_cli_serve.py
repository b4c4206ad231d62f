"""``anomap serve`` checks what it can before it deploys anything: its arguments, then Redis."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import point_cli_at, register_small_model
from pydantic import SecretStr
from typer.testing import CliRunner

import cluster.connections as connections
from cluster.cli import app
from cluster.ports import free_port
from schemas import Settings
from trainer.registry import ModelRegistry
from trainer.store import ObjectStore

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--version", "../x"], "error: --version '../x' is not a model version"),
        (["--version", ""], "error: --version '' is not a model version"),
        (["--lines", ""], "error: --lines '' names no line"),
        (["--lines", " , "], "error: --lines ' , ' names no line"),
        (["--lines", "Line2"], "error: --lines 'Line2' is not a line id"),
        (["--lines", "default,a/b"], "error: --lines 'a/b' is not a line id"),
    ],
)
def test_bad_serve_arguments_are_refused_before_anything_starts(
    args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("REDIS_URL", "S3_ENDPOINT", "S3_ACCESS_KEY", "S3_SECRET_KEY", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ANOMAP_STATE_DIR", str(tmp_path / "state"))  # no stack: a check after it would say so
    result = runner.invoke(app, ["serve", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_serve_pings_redis_before_it_connects_to_ray_or_deploys(
    stack_settings: Settings, object_store: ObjectStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The consumers would only fail after the Serve app is up."""
    card = register_small_model(object_store, "metal")
    ModelRegistry(object_store, "metal").set_live(card.version)
    away = stack_settings.model_copy(update={"redis_url": SecretStr(f"redis://127.0.0.1:{free_port()}/0")})
    point_cli_at(monkeypatch, away, object_store.bucket, tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")

    def no_ray(*args: object, **kwargs: object) -> str:
        raise AssertionError("serve went on to Ray with Redis away")

    monkeypatch.setattr(connections, "connect_ray", no_ray)
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 2, result.output
    assert "error: cannot reach Redis" in result.output and "Traceback" not in result.output
