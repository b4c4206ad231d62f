"""``anomap demo`` refuses what it can before it starts anything (the run itself is not run here)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import cluster.demo as demo
from cluster.cli import app

runner = CliRunner()


@pytest.fixture
def no_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No endpoints configured, a state dir of its own; returns the state dir."""
    for name in ("REDIS_URL", "S3_ENDPOINT", "S3_ACCESS_KEY", "S3_SECRET_KEY", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    state_dir = tmp_path / "state"
    monkeypatch.setenv("ANOMAP_STATE_DIR", str(state_dir))
    return state_dir


@pytest.mark.parametrize(
    ("option", "message"),
    [("--report", "--report {path} is a file; expected a folder path"), ("--json", "cannot create folder")],
)
def test_demo_checks_its_output_paths_before_it_starts(
    option: str, message: str, no_stack: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not after a five-minute run."""

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("the demo started")

    monkeypatch.setattr(demo, "run_demo", must_not_run)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    path = a_file if option == "--report" else a_file / "summary.json"
    result = runner.invoke(app, ["demo", option, str(path)])
    assert result.exit_code == 2, result.output
    assert message.format(path=path) in result.output and "Traceback" not in result.output


def test_an_unreadable_state_file_stops_the_demo_with_one_line(no_stack: Path, tmp_path: Path) -> None:
    """The state file is read (and refused) before any server starts."""
    no_stack.mkdir()
    (no_stack / "stack.json").write_text("{not json")
    result = runner.invoke(app, ["demo", "--report", str(tmp_path / "report")])
    assert result.exit_code == 2, result.output
    assert "is not a valid stack state file" in result.output and "Traceback" not in result.output


def test_a_server_that_does_not_start_stops_the_demo_with_one_line_naming_its_log(
    no_stack: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A garbage append-only manifest: valkey exits at start (was a ServerStartError traceback)."""

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("the demo ran")

    monkeypatch.setattr(demo, "_run", must_not_run)
    aof = no_stack / "data" / "valkey" / "appendonlydir"
    aof.mkdir(parents=True)
    (aof / "appendonly.aof.manifest").write_text("this is not a manifest\n")
    result = runner.invoke(app, ["demo", "--report", str(tmp_path / "report")])
    assert result.exit_code == 2, result.output
    log = no_stack.resolve() / "data" / "valkey" / "valkey.log"
    assert f"error: stack not started: valkey exited before it was ready; log {log}" in result.stderr
    assert "Traceback" not in result.output
