"""The embedded stack: servers start on free loopback ports, answer, and leave nothing behind."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest
import redis
from minio.error import S3Error
from pydantic import SecretStr

from cluster.connections import (
    MissingEndpoint,
    minio_from_endpoint,
    object_store,
    redis_client,
    redis_from_url,
    resolve_settings,
)
from cluster.ports import GRPC_OFFSET, free_port, free_port_pair, free_port_pairs, port_is_free
from cluster.processes import ManagedServer, launch, proc_cmdline, proc_start_ticks, process_table, tcp_accepts
from cluster.servers import S3Keys, start_seaweed, start_valkey, valkey_url
from cluster.stack import EmbeddedStack, StackError, stack_down, stack_status, stack_up
from cluster.start_lock import StartLockTimeout, start_lock
from cluster.state import Component, Origin, read_state, state_path
from schemas.settings import Settings
from trainer.store import ObjectStore


def _descendants(pid: int) -> dict[int, int]:
    """pid -> start ticks of ``pid`` and everything below it now."""
    table = process_table()
    found = {pid: table[pid].start_ticks} if pid in table else {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, info in table.items():
            if info.ppid == parent and child not in found:
                found[child] = info.start_ticks
                frontier.append(child)
    return found


def _alive(processes: dict[int, int]) -> list[int]:
    return [pid for pid, ticks in processes.items() if proc_start_ticks(pid) == ticks]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _pgrep(pattern: str) -> list[str]:
    """``pgrep -af pattern`` from /proc (procps is not on every machine): live processes but this one."""
    found = []
    for pid in process_table():
        cmdline = proc_cmdline(pid)
        if pid != os.getpid() and re.search(pattern, cmdline):
            found.append(f"{pid} {cmdline}")
    return found


def test_free_port_pair_has_its_grpc_port_free_too() -> None:
    port = free_port_pair()
    assert port_is_free(port) and port_is_free(port + GRPC_OFFSET)
    pairs = free_port_pairs(5)
    every = [*pairs, *(p + GRPC_OFFSET for p in pairs)]
    assert len(set(every)) == 10
    assert free_port(exclude=[port]) != port


def test_stop_kills_a_server_that_ignores_sigterm_and_its_children(tmp_path: Path) -> None:
    script = "trap '' TERM; sleep 300 & sleep 300 & wait"
    server = launch("stubborn", ["bash", "-c", script], data_dir=tmp_path, marker="trap", endpoint="-")
    deadline = time.monotonic() + 5
    while len(_descendants(server.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    family = _descendants(server.pid)
    assert len(family) == 3
    assert "killed" in server.stop(timeout=0.5)
    assert _alive(family) == []


def test_a_child_whose_command_line_lacks_the_marker_is_running_until_it_exits(tmp_path: Path) -> None:
    # valkey rewrites its title at start-up; a readiness wait that misread that as "exited" retried on
    # a new port and left the first valkey running on the same data directory (seen with `stack up`)
    server = launch("retitled", ["sleep", "30"], data_dir=tmp_path, marker="not-in-the-cmdline", endpoint="-")
    assert server.is_running()
    assert "stopped" in server.stop(timeout=5)
    assert not server.is_running()
    from_state = ManagedServer.model_validate(server.model_dump())  # known only from the state file
    assert not from_state.is_running()


def test_stop_leaves_a_reused_pid_alone(tmp_path: Path) -> None:
    me = ManagedServer(
        name="impostor",
        pid=os.getpid(),
        start_ticks=(proc_start_ticks(os.getpid()) or 0) + 1,
        marker="python",
        endpoint="-",
        argv=["x"],
        log_path=tmp_path / "x.log",
        data_dir=tmp_path,
    )
    assert not me.is_running()
    assert "another process" in me.stop()


def test_valkey_answers_ping_and_is_gone_after_stop(tmp_path: Path) -> None:
    server = start_valkey(tmp_path / "valkey", password="s3cret-pw", die_with_parent=True)
    try:
        client = redis_from_url(valkey_url(server, "s3cret-pw"))
        assert client.ping()
        client.close()
        assert "s3cret-pw" not in " ".join(server.argv)
        assert stat.S_IMODE((server.data_dir / "valkey.conf").stat().st_mode) == 0o600
        with pytest.raises(redis.RedisError, match=r"(?i)auth"):
            redis_from_url(valkey_url(server)).ping()
    finally:
        assert "stopped" in server.stop()
    assert proc_start_ticks(server.pid) is None
    assert port_is_free(server.ports["redis"])


def test_valkey_with_appendonly_keeps_data_through_kill_and_restart(tmp_path: Path) -> None:
    server = start_valkey(tmp_path / "valkey", appendonly=True, die_with_parent=True)
    try:
        client = redis_from_url(valkey_url(server))
        client.xadd("s", {"k": b"v"})
        time.sleep(1.2)  # appendfsync everysec
        assert server.kill().endswith("killed")
        assert not server.is_running()
        server.restart()
        assert client.xlen("s") == 1
        client.close()
    finally:
        server.stop()
    assert not server.is_running()


def test_seaweed_serves_objects_and_rejects_wrong_keys(tmp_path: Path) -> None:
    keys = S3Keys.random()
    server = start_seaweed(tmp_path / "seaweed", keys.access_key, keys.secret_key, die_with_parent=True)
    try:
        store = ObjectStore(minio_from_endpoint(server.endpoint, keys.access_key, keys.secret_key), "anomap-t")
        store.ensure_bucket()
        store.put_bytes("maps/a/b.npz", b"\x00map")
        assert store.get_bytes("maps/a/b.npz") == b"\x00map"
        assert list(store.list_keys("maps/")) == ["maps/a/b.npz"]
        wrong = minio_from_endpoint(server.endpoint, keys.access_key, "not-the-secret", retries=0)
        with pytest.raises(S3Error):
            wrong.list_buckets()
        assert keys.secret_key not in repr(keys) and keys.secret_key not in " ".join(server.argv)
    finally:
        assert "stopped" in server.stop()
    assert proc_start_ticks(server.pid) is None
    assert not any(tcp_accepts("127.0.0.1", port) for port in server.ports.values())
    assert not any(Path(f"/tmp/seaweedfs-{n}-grpc-{p + GRPC_OFFSET}.sock").exists() for n, p in server.ports.items())


def test_stack_up_serves_all_three_and_stack_down_leaves_no_process(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "state", bucket="anomap-stack")
    lines: list[str] = []
    began = time.monotonic()
    state = stack_up(settings, progress=lines.append)
    up_s = time.monotonic() - began
    try:
        assert {c.origin for c in state.components.values()} == {Origin.EMBEDDED}
        status = stack_status(settings)
        assert status["stack"] == "up"
        for kind in Component:
            assert status["components"][kind]["running"] and status["components"][kind]["reachable"], kind
        assert stack_up(settings).components[Component.RAY].server.pid == state.components[Component.RAY].server.pid
        metrics_url = status["components"]["ray"]["metrics"]
        assert metrics_url == state.ray_metrics_url
        assert metrics_url.startswith("http://127.0.0.1:") and metrics_url.endswith("/metrics")

        driver = textwrap.dedent(
            """
            import os, ray
            from cluster.connections import connect_ray
            address = connect_ray()
            assert ray.get(ray.remote(lambda: os.getpid()).remote()) != os.getpid()
            print(address)
            """
        )
        env = {**os.environ, "ANOMAP_STATE_DIR": str(settings.state_dir)}
        env.pop("RAY_ADDRESS", None)
        run = subprocess.run([sys.executable, "-c", driver], env=env, capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.strip() == state.ray_address
        # the dashboard's State API: what Ray Train's PlacementGroupCleaner asks whether a run's driver lives
        actors_api = f"{status['components']['ray']['dashboard']}/api/v0/actors"
        assert actors_api.startswith(f"{state.ray_dashboard_url}/") and state.ray_dashboard_url.startswith(
            "http://127."
        )
        deadline = time.monotonic() + 30  # Ray's metrics agent and dashboard start a little after the raylet
        while not (_answers(metrics_url) and _answers(actors_api)):
            assert time.monotonic() < deadline, f"nothing serves {metrics_url} or {actors_api}"
            time.sleep(0.5)
        family = {pid: ticks for server in state.servers() for pid, ticks in _descendants(server.pid).items()}
        assert len(family) > 5  # raylet, gcs_server, agents, workers...
    finally:
        began = time.monotonic()
        lines = stack_down(settings)
        down_s = time.monotonic() - began
    print(f"stack up {up_s:.1f} s, down {down_s:.1f} s")
    assert all("stopped" in line for line in lines), lines
    assert _alive(family) == []
    pids = [str(server.pid) for server in state.servers()]
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []  # not even as zombies
    ray_temp = state.components[Component.RAY].server.cleanup_paths[0]
    assert _pgrep(str(ray_temp)) == [] and _pgrep(str(settings.state_dir.resolve())) == []
    assert not ray_temp.exists()
    assert not state_path(settings.state_dir).exists()
    assert stack_status(settings)["stack"] == "not started"
    assert "nothing to stop" in stack_down(settings)[0]


def test_stack_valkey_keeps_queued_jobs_through_stack_down_and_up(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "state", bucket="anomap-aof")
    stack_up(settings, with_ray=False)
    try:
        client = redis_client(resolve_settings(Settings(state_dir=settings.state_dir)))
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        entry = client.xadd("anomap:jobs:default", {"job": "queued-before-restart"})
    finally:
        stack_down(settings)
    stack_up(settings, with_ray=False)  # a new password and port, the same data directory
    try:
        client = redis_client(resolve_settings(Settings(state_dir=settings.state_dir)))
        assert client.xrange("anomap:jobs:default") == [(entry, {b"job": b"queued-before-restart"})]
    finally:
        stack_down(settings)


def test_configured_redis_is_used_and_no_valkey_started(tmp_path: Path, valkey_server: ManagedServer) -> None:
    external = valkey_url(valkey_server)
    settings = Settings(redis_url=SecretStr(external), state_dir=tmp_path / "state", bucket="anomap-ext")
    state = stack_up(settings, with_ray=False)
    try:
        assert state.components[Component.REDIS].origin is Origin.EXTERNAL
        assert state.components[Component.REDIS].server is None
        assert [s.name for s in state.servers()] == ["seaweed"]
        assert Component.RAY not in state.components
        assert _pgrep(f"valkey-server.*{tmp_path}") == []

        path = state_path(settings.state_dir)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        keys = (state.s3_access_key.get_secret_value(), state.s3_secret_key.get_secret_value())
        assert all(key in path.read_text() for key in keys)
        shown = json.dumps(stack_status(settings), default=str) + state.public_json() + repr(state)
        assert not any(key in shown for key in keys)

        resolved = resolve_settings(Settings(state_dir=settings.state_dir))
        assert resolved.s3_endpoint == state.s3_endpoint and resolved.redis_url == SecretStr(external)
        assert object_store(resolved).exists("nothing") is False
        assert redis_client(resolved).ping()

        state.components[Component.S3].server.kill()
        assert stack_status(settings)["stack"] == "down"
        assert resolve_settings(Settings(state_dir=settings.state_dir)).s3_endpoint is None
        with pytest.raises(MissingEndpoint, match="S3_ENDPOINT"):
            object_store(Settings(state_dir=settings.state_dir))
    finally:
        stack_down(settings)
    assert valkey_server.is_running()


def test_stack_up_reuses_a_running_stack_refuses_a_partly_up_one_and_replaces_a_dead_one(tmp_path: Path) -> None:
    settings = Settings(state_dir=tmp_path / "state", bucket="anomap-part")
    state = stack_up(settings, with_ray=False)
    try:
        pids = [s.pid for s in state.servers()]
        assert [s.pid for s in stack_up(settings, with_ray=False).servers()] == pids
        state.components[Component.REDIS].server.kill()
        with pytest.raises(StackError, match=r"partly up.*anomap stack down"):
            stack_up(settings, with_ray=False)
        state.components[Component.S3].server.kill()
        fresh = stack_up(settings, with_ray=False)
        assert fresh.is_up() and not {s.pid for s in fresh.servers()} & set(pids)
    finally:
        stack_down(settings)


def test_embedded_stack_refuses_a_partly_up_recorded_stack(tmp_path: Path) -> None:
    """Starting anew would put a second Valkey on the survivor's append-only file."""
    settings = Settings(state_dir=tmp_path / "state", bucket="anomap-part2")
    state = stack_up(settings, with_ray=False)
    try:
        state.components[Component.S3].server.kill()
        with pytest.raises(StackError, match=r"partly up.*anomap stack down"), EmbeddedStack(settings, with_ray=False):
            pass
        assert state.components[Component.REDIS].server.is_running()
    finally:
        stack_down(settings)


def test_a_second_start_in_the_same_state_dir_waits_for_the_first(tmp_path: Path) -> None:
    with (
        start_lock(tmp_path),
        pytest.raises(StartLockTimeout, match="another stack start"),
        start_lock(tmp_path, timeout_s=0.3),
    ):
        pass
    with start_lock(tmp_path, timeout_s=0.3):  # released with its holder
        pass


def test_sigterm_while_the_stack_starts_leaves_no_server_and_no_state(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    script = textwrap.dedent(
        f"""
        from cluster.stack import stack_up
        from schemas.settings import Settings
        stack_up(Settings(state_dir={str(state_dir)!r}, bucket="anomap-term"), progress=lambda m: print(m, flush=True))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in {"RAY_ADDRESS", "REDIS_URL", "S3_ENDPOINT"}}
    starting = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    assert starting.stdout is not None
    valkey = ""
    for line in starting.stdout:
        if line.startswith("valkey ready at "):
            valkey = line.split()[3]
        if line.startswith("starting seaweed"):  # valkey is up, weed is on its way
            time.sleep(0.3)
            starting.send_signal(signal.SIGTERM)
            break
    assert starting.wait(timeout=60) != 0
    starting.stdout.close()
    host, port = valkey.rsplit(":", 1)
    assert not tcp_accepts(host, int(port))  # valkey was stopped (its process title does not name the dir)
    assert _pgrep(str(state_dir.resolve())) == []  # nor was weed left running
    assert read_state(state_dir) is None


def test_embedded_stack_reuses_a_running_stack_and_stops_only_what_it_started(
    tmp_path: Path, valkey_server: ManagedServer, s3_server: ManagedServer, s3_keys: S3Keys
) -> None:
    outer = Settings(
        s3_endpoint=s3_server.endpoint,
        s3_access_key=SecretStr(s3_keys.access_key),
        s3_secret_key=SecretStr(s3_keys.secret_key),
        state_dir=tmp_path / "up",
        bucket="anomap-ctx",
    )
    state = stack_up(outer, with_ray=False)  # starts valkey only
    try:
        with EmbeddedStack(Settings(state_dir=outer.state_dir), with_ray=False) as inner:
            assert inner.servers() == []
            assert inner.redis_url == state.redis_url and inner.s3_endpoint == s3_server.endpoint
        assert state.is_up() and state_path(outer.state_dir).exists()
    finally:
        stack_down(outer)

    mine = Settings(redis_url=SecretStr(valkey_url(valkey_server)), state_dir=tmp_path / "ctx", bucket="anomap-ctx")
    with EmbeddedStack(mine, with_ray=False) as inner:
        assert [s.name for s in inner.servers()] == ["seaweed"]
        assert read_state(mine.state_dir) is not None  # other anomap commands can find it
        started = inner.servers()
    assert not any(s.is_running() for s in started)
    assert valkey_server.is_running() and s3_server.is_running()
    assert not state_path(mine.state_dir).exists()


def test_redis_client_fixture_gives_an_empty_bytes_client(redis_client: redis.Redis) -> None:
    assert redis_client.dbsize() == 0
    redis_client.set("left-behind", "x")  # the next test's client must not see it
    assert redis_client.get("left-behind") == b"x"


def test_object_store_fixture_gives_a_bucket_of_its_own(object_store: ObjectStore, stack_settings: Settings) -> None:
    assert object_store.bucket != stack_settings.bucket
    assert list(object_store.list_keys("")) == []
    object_store.put_bytes("images/a.png", b"png")
    assert object_store.get_bytes("images/a.png") == b"png"


def test_kill_matching_kills_only_the_marked_instance() -> None:
    from cluster.processes import kill_matching

    marker = f"anomap-test-marker-{os.getpid()}-{time.monotonic_ns()}"
    marked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "unrelated"])
    try:
        assert kill_matching(marker) == [marked.pid]
        assert marked.wait(timeout=10) == -signal.SIGKILL
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_commands_use_the_parts_of_a_stack_that_still_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store died, Valkey runs: `anomap status` still reports the streams, and a command that needs
    the store says which part of the stack stopped instead of "no embedded stack is up"."""
    from typer.testing import CliRunner

    from cluster.cli import app

    settings = Settings(state_dir=tmp_path / "state", bucket="anomap-part3")
    state = stack_up(settings, with_ray=False)
    try:
        state.components[Component.S3].server.kill()
        resolved = resolve_settings(settings)
        assert resolved.redis_url is not None and resolved.s3_endpoint is None
        for name in ("REDIS_URL", "S3_ENDPOINT", "S3_ACCESS_KEY", "S3_SECRET_KEY", "RAY_ADDRESS", "ANOMAP_BUCKET"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("ANOMAP_STATE_DIR", str(settings.state_dir))
        status = CliRunner().invoke(app, ["status", "--json", "--no-serve"])
        assert json.loads(status.stdout)["redis"]["ok"] is True, status.output
        listing = CliRunner().invoke(app, ["models", "list"])
        assert listing.exit_code == 2
        assert "the embedded stack's s3 stopped running" in listing.output and "Traceback" not in listing.output
    finally:
        stack_down(settings)
