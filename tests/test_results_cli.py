"""``anomap results`` against a real Valkey: the latest results oldest first, entries it cannot read
named and skipped, and ``--follow`` printing what was there and then each new result as it lands."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import redis
from helpers import a_result
from pydantic import SecretStr
from typer.testing import CliRunner

from cluster.cli import app
from schemas import Settings, StreamNames

runner = CliRunner()
STREAM = StreamNames().results("default")


def _result(job_id: str) -> bytes:
    return a_result(job_id, is_anomalous=True).model_dump_json().encode()


def _env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    assert isinstance(settings.redis_url, SecretStr)
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "ANOMAP_STATE_DIR": str(tmp_path / "state"),
        "REDIS_URL": settings.redis_url.get_secret_value(),
    }


def test_latest_results_come_oldest_first_and_unreadable_entries_are_named(
    redis_client: redis.Redis, stack_settings: Settings, tmp_path: Path
) -> None:
    for i in range(4):
        redis_client.xadd(STREAM, {"result": _result(f"job-{i}")})
    junk = redis_client.xadd(STREAM, {"other": b"writer"}).decode()
    done = runner.invoke(app, ["results", "--count", "3"], env=_env(stack_settings, tmp_path))
    assert done.exit_code == 0, done.output
    assert [line.split("\t")[0] for line in done.stdout.splitlines()] == ["job-2", "job-3"]
    assert f"skipping results entry {junk}" in done.stderr
    assert runner.invoke(app, ["results", "--count", "-1"], env=_env(stack_settings, tmp_path)).exit_code == 2


def test_follow_prints_the_latest_then_each_new_result(
    redis_client: redis.Redis, stack_settings: Settings, tmp_path: Path
) -> None:
    redis_client.xadd(STREAM, {"result": _result("before")})
    code = "import sys; from cluster.cli import main; sys.argv = ['anomap', 'results', '--follow']; main()"
    follower = subprocess.Popen(
        [sys.executable, "-c", code],
        env=_env(stack_settings, tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert follower.stdout is not None
    threading.Thread(target=lambda: [lines.put(line) for line in follower.stdout], daemon=True).start()
    try:
        assert lines.get(timeout=60).startswith("before\tANOMALOUS")  # printed before any new one
        redis_client.xadd(STREAM, {"result": _result("after")})
        assert lines.get(timeout=30).startswith("after\tANOMALOUS")
    finally:
        follower.kill()
        follower.communicate(timeout=10)
