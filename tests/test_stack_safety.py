"""The stack's command line and files: failures to start are one line, ``stack up``'s stdout is its JSON
alone, its files are private, ``stack down`` waits for a start, and stale state is cleaned up after."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from cluster.cli import app
from cluster.processes import ManagedServer
from cluster.stack import stack_down, stack_up
from cluster.start_lock import start_lock
from cluster.state import Component, ComponentState, Origin, StackState, read_state, write_state
from schemas.settings import Settings

runner = CliRunner()
ENDPOINTS = ("REDIS_URL", "S3_ENDPOINT", "S3_ACCESS_KEY", "S3_SECRET_KEY", "RAY_ADDRESS")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _fresh_env(monkeypatch: pytest.MonkeyPatch, state_dir: Path) -> None:
    for name in ENDPOINTS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ANOMAP_STATE_DIR", str(state_dir))


def test_a_server_that_does_not_start_is_one_line_naming_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A garbage append-only manifest: valkey exits at start (was a ServerStartError traceback)."""
    state_dir = tmp_path / "state"
    aof = state_dir / "data" / "valkey" / "appendonlydir"
    aof.mkdir(parents=True)
    (aof / "appendonly.aof.manifest").write_text("this is not a manifest\n")
    _fresh_env(monkeypatch, state_dir)
    result = runner.invoke(app, ["stack", "up"])
    assert result.exit_code == 2, result.output
    log = state_dir.resolve() / "data" / "valkey" / "valkey.log"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: stack not started: valkey exited before it was ready; log {log}"], result.stderr
    assert "Traceback" not in result.output
    assert read_state(state_dir) is None


def test_stack_up_prints_json_alone_on_stdout_and_keeps_its_files_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Progress goes to stderr (``stack up | jq`` works); the state dir and data are 700, logs 600 (the
    seaweed log shows the access key; the AOF holds the jobs)."""
    state_dir = tmp_path / "state"
    _fresh_env(monkeypatch, state_dir)
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # external: no Ray head started (nor contacted)
    monkeypatch.setenv("ANOMAP_BUCKET", "anomap-private")
    result = runner.invoke(app, ["stack", "up"])
    try:
        assert result.exit_code == 0, result.output
        document = json.loads(result.stdout)
        assert document["bucket"] == "anomap-private"
        assert "starting valkey" in result.stderr
        assert _mode(state_dir) == 0o700 and _mode(state_dir / "data") == 0o700
        for log in ("valkey/valkey.log", "seaweed/seaweed.log"):
            assert _mode(state_dir / "data" / log) == 0o600, log
    finally:
        assert runner.invoke(app, ["stack", "down"]).exit_code == 0


def test_stack_down_waits_for_a_start_in_progress(tmp_path: Path) -> None:
    """A stop during a start would stop servers the start is about to record (or miss them)."""
    settings = Settings(state_dir=tmp_path / "state")
    held, release = threading.Event(), threading.Event()

    def starting() -> None:
        with start_lock(settings.state_dir):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=starting)
    thread.start()
    assert held.wait(10)
    threading.Timer(1.0, release.set).start()
    began = time.monotonic()
    try:
        stack_down(settings)
    finally:
        release.set()
        thread.join()
    assert time.monotonic() - began >= 0.9


def test_replacing_a_stale_state_cleans_up_after_its_dead_servers(tmp_path: Path) -> None:
    """A server that died (SIGKILL, a reboot) left its cleanup paths (Ray's /tmp/anomap-ray-*): they go."""
    settings = Settings(state_dir=tmp_path / "state", bucket="anomap-stale")
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    leftover = tmp_path / "anomap-ray-leftover"
    leftover.mkdir()
    dead = ManagedServer(
        name="ray",
        pid=exited.pid,
        start_ticks=1,
        marker="--temp-dir=nowhere",
        endpoint="127.0.0.1:1",
        argv=["ray"],
        log_path=tmp_path / "ray.log",
        data_dir=tmp_path,
        cleanup_paths=[leftover],
    )
    stale = StackState(
        redis_url=SecretStr("redis://127.0.0.1:1/0"),
        s3_endpoint="http://127.0.0.1:1",
        s3_access_key=SecretStr("a"),
        s3_secret_key=SecretStr("b"),
        bucket="anomap-stale",
        ray_address="127.0.0.1:1",
        components={Component.RAY: ComponentState(origin=Origin.EMBEDDED, endpoint="127.0.0.1:1", server=dead)},
    )
    write_state(settings.state_dir, stale)
    said: list[str] = []
    state = stack_up(settings, progress=said.append, with_ray=False)
    try:
        assert not leftover.exists()
        assert any("cleaning up: ray" in line for line in said)
        assert state.is_up()
    finally:
        stack_down(settings)
