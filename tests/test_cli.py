"""The command line: every command is listed, and bad arguments get a message, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cluster.cli import app

runner = CliRunner()


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("stack", "train", "eval", "serve", "publish", "results", "status", "demo"):
        assert command in result.output


def test_stack_help_lists_up_down_status() -> None:
    result = runner.invoke(app, ["stack", "--help"])
    assert result.exit_code == 0
    for command in ("up", "down", "status"):
        assert command in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--gamma", "1.5"], "--gamma must be in (0, 1]"),
        (["train", "--contamination", "1.0"], "--contamination must be in [0, 1)"),
        (["train", "--no-synthetic"], "give exactly one of --synthetic or --data DIR"),
        (["train", "--synthetic", "--data", "."], "give exactly one of --synthetic or --data DIR"),
        (["train", "--data", "no/such/folder"], "no/such/folder is not a folder; expected ROOT/train/good"),
    ],
)
def test_bad_arguments_name_the_problem(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_commands_that_need_a_stack_say_how_to_start_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REDIS_URL", "S3_ENDPOINT", "S3_ACCESS_KEY", "S3_SECRET_KEY", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ANOMAP_STATE_DIR", str(tmp_path / "state"))
    result = runner.invoke(app, ["results"])
    assert result.exit_code == 2
    assert "anomap stack up" in result.output
