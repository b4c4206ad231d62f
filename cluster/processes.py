"""Servers run as their own processes: start, wait until ready, stop by PID.

Each server is started in a new session (``start_new_session=True``), so its PID is also its
process-group id; stopping it sends SIGTERM to the PID, waits for it, its process group and its
descendants to exit, then SIGKILLs whatever is left. A `ManagedServer` is a pydantic model, so it
can be written to the stack's state file and stopped later from another process; before
signalling, the PID is checked to still be the process that was started (same start time in
``/proc/<pid>/stat`` and a marker in ``/proc/<pid>/cmdline``).

    >>> server = launch("valkey", [binary, str(conf)], data_dir=Path("/tmp/x"), marker="valkey-server",
    ...                 endpoint="127.0.0.1:21001", ready_check=lambda: tcp_accepts("127.0.0.1", 21001))
    >>> wait_ready(server, timeout=10)
    0.12
    >>> server.kill(); server.restart()      # crash and come back (fault tests)
    >>> server.stop()
    'valkey (pid 4242) stopped'

Linux only (reads ``/proc``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

from pydantic import BaseModel, ConfigDict, PrivateAttr

_PR_SET_PDEATHSIG = 1
_libc: ctypes.CDLL | None = None


class ServerStartError(RuntimeError):
    """A server exited or did not become ready; the message carries the end of its log."""


def proc_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot; None if it does not exist or is a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # fields after "(comm)": state is field 3
    if fields[0] in {"Z", "X"}:
        return None
    return int(fields[19])  # field 22: starttime


def proc_cmdline(pid: int) -> str:
    """``/proc/<pid>/cmdline`` with NULs as spaces ("" when unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


class ProcInfo(NamedTuple):
    """What `process_table` knows of one live process."""

    ppid: int
    pgid: int
    start_ticks: int


def kill_matching(marker: str) -> list[int]:
    """SIGKILL every live process whose command line contains ``marker``; returns their pids.

    Only for markers unique to one server instance (e.g. its own data directory).
    """
    killed = []
    for pid in process_table():
        if pid != os.getpid() and marker in proc_cmdline(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


def process_table() -> dict[int, ProcInfo]:
    """Every live (non-zombie) process: pid -> parent, process group, start time."""
    table: dict[int, ProcInfo] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] not in {"Z", "X"}:  # fields[1]: ppid, [2]: pgrp, [19]: starttime
            table[int(entry.name)] = ProcInfo(int(fields[1]), int(fields[2]), int(fields[19]))
    return table


def _reap_own_zombie(pid: int, start_ticks: int, wait_s: float = 0.0) -> None:
    """``waitpid`` a zombie that is this process's child and started at ``start_ticks``.

    With ``wait_s`` > 0, a child of ours that is still exiting (not a zombie yet) is polled for up to
    ``wait_s`` seconds: after a stop, the leader can turn zombie a moment after its group was seen gone.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) != os.getpid() or int(fields[19]) != start_ticks:
            return  # not our child (or a reused PID): nothing of ours to reap
        if fields[0] == "Z":
            try:
                reaped, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return
            if reaped == pid:
                return
            # A multi-threaded leader (weed is Go) shows "Z" as soon as its main thread exits, but
            # cannot be reaped until its last thread has: poll again rather than leave a zombie.
        if time.monotonic() >= deadline:
            return
        time.sleep(0.05)


def tcp_accepts(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _set_parent_death_signal() -> None:
    """Runs in the child before exec: SIGTERM it when the process that started it dies."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class ManagedServer(BaseModel):
    """A server process this code started (here or in an earlier process, via the state file)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    pid: int
    start_ticks: int
    marker: str
    endpoint: str
    argv: list[str]
    ports: dict[str, int] = {}
    log_path: Path
    data_dir: Path
    cleanup_paths: list[Path] = []

    _popen: subprocess.Popen[bytes] | None = PrivateAttr(default=None)
    _env: dict[str, str | None] | None = PrivateAttr(default=None)
    _die_with_parent: bool = PrivateAttr(default=False)
    _ready_check: Callable[[], bool] | None = PrivateAttr(default=None)

    def _reap(self) -> None:
        if self._popen is not None:
            self._popen.poll()
        else:  # started by this process through another handle (e.g. `stack_up`, then `stack_down`)
            _reap_own_zombie(self.pid, self.start_ticks)

    def is_running(self) -> bool:
        """Whether ``pid`` is alive and still the process that was started (not a reused PID).

        For a child of this process the answer is its `Popen`'s (an unreaped child's PID cannot be
        reused). Known only from the state file, the process must have the start time and carry the
        marker in its command line; a server that rewrites its title (valkey does, at start-up) can
        show an empty one for a moment, so a missing marker is read twice more before it counts.
        """
        self._reap()
        if self._popen is not None:
            return self._popen.returncode is None
        if proc_start_ticks(self.pid) != self.start_ticks:
            return False
        for _ in range(3):
            if self.marker in proc_cmdline(self.pid):
                return True
            time.sleep(0.01)
        return False

    def _pid_taken_by_other(self) -> bool:
        return proc_start_ticks(self.pid) is not None and not self.is_running()

    def log_tail(self, lines: int = 25) -> str:
        """The last ``lines`` lines of the server's log ("" when there is none)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _track(self, tracked: dict[int, int], include_leader: bool) -> list[int]:
        """Add the group and all descendants to ``tracked`` (pid -> start ticks); return those alive."""
        table = process_table()
        if include_leader and self.pid in table and table[self.pid].start_ticks == self.start_ticks:
            tracked.setdefault(self.pid, self.start_ticks)
        children: dict[int, list[int]] = {}
        for pid, info in table.items():
            children.setdefault(info.ppid, []).append(pid)
            if info.pgid == self.pid:
                tracked.setdefault(pid, info.start_ticks)
        stack = [pid for pid, ticks in tracked.items() if pid in table and table[pid].start_ticks == ticks]
        while stack:
            for child in children.get(stack.pop(), []):
                if child not in tracked:
                    tracked[child] = table[child].start_ticks
                    stack.append(child)
        return [pid for pid, ticks in tracked.items() if pid in table and table[pid].start_ticks == ticks]

    def _wait_gone(self, tracked: dict[int, int], include_leader: bool, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        while True:
            self._reap()
            alive = self._track(tracked, include_leader)
            if not alive or time.monotonic() >= deadline:
                return alive
            time.sleep(0.1)

    def stop(self, timeout: float = 20.0, kill_timeout: float = 5.0, *, graceful: bool = True) -> str:
        """SIGTERM the server, wait up to ``timeout`` s for it and its processes, then SIGKILL them.

        "Its processes" are its process group plus every descendant seen while waiting (Ray puts
        each worker in a group of its own). Does nothing to a PID that now belongs to another
        process (the kernel does not reuse a PID while a process group of that id exists, so none
        of the group can be left either). Returns what was done, e.g. ``"ray (pid 4242) stopped"``.
        """
        label = f"{self.name} (pid {self.pid})"
        if self._pid_taken_by_other():
            self._cleanup()
            return f"{label} was not running (pid now belongs to another process)"
        was_running = self.is_running()
        tracked: dict[int, int] = {}
        if not self._track(tracked, include_leader=was_running):
            self._cleanup()
            return f"{label} was not running"
        if was_running and graceful:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
        how = "stopped"
        alive = self._wait_gone(tracked, was_running, timeout) if graceful else [self.pid]
        if alive:
            how = f"killed (still running {timeout:g} s after SIGTERM)" if graceful else "killed"
            if self.is_running():  # else the group id could (in theory) name someone else's group by now
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
            for pid in self._track(tracked, was_running):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            alive = self._wait_gone(tracked, was_running, kill_timeout)
            if alive:
                msg = f"{label}: processes {alive} survived SIGKILL"
                raise RuntimeError(msg)
        self._reap()  # not redundant with _cleanup: the leader may turn zombie only after the wait saw it go
        self._cleanup()
        return f"{label} {how}" if was_running else f"{label}: leftover processes {how}"

    def kill(self) -> str:
        """SIGKILL the server and its processes at once (a crash, for fault tests); see `stop`."""
        return self.stop(timeout=0.0, graceful=False)

    def restart(self, timeout: float = 60.0) -> float:
        """Stop (if running) and start again with the same command, ports and data; wait until ready.

        Only in the process that started the server (its environment is not kept in the state
        file). Returns the seconds until ready.
        """
        if self._env is None:
            msg = f"{self.name} (pid {self.pid}) can only be restarted by the process that started it"
            raise RuntimeError(msg)
        if self.is_running():
            self.stop()
        popen, ticks = _spawn(self.name, self.argv, self.data_dir, self.log_path, self._env, self._die_with_parent)
        self.pid, self.start_ticks, self._popen = popen.pid, ticks, popen
        return wait_ready(self, timeout=timeout)

    def _cleanup(self) -> None:
        if self._popen is not None:  # our child: collect its exit status (it may still be a zombie)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout=5)
        else:  # started by this process but known only from the state file: reap its zombie
            _reap_own_zombie(self.pid, self.start_ticks, wait_s=3.0)
        for path in self.cleanup_paths:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def _private_log(path: Path) -> BinaryIO:
    """``path`` opened for appending, mode 600 (a server's log can show its credentials)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a log written before this rule
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "ab")


def _spawn(
    name: str,
    argv: Sequence[str],
    data_dir: Path,
    log_path: Path,
    env: Mapping[str, str | None],
    die_with_parent: bool,
) -> tuple[subprocess.Popen[bytes], int]:
    global _libc
    if die_with_parent and _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    child_env = dict(os.environ)
    for key, value in env.items():
        if value is None:
            child_env.pop(key, None)
        else:
            child_env[key] = value
    with _private_log(log_path) as log:
        popen = subprocess.Popen(  # argv built by this package, no shell
            list(argv),
            cwd=data_dir,
            env=child_env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_set_parent_death_signal if die_with_parent else None,
        )
    ticks = proc_start_ticks(popen.pid)
    if ticks is None:
        popen.wait(timeout=5)
        msg = f"{name} exited at once ({argv[0]}); log {log_path}:\n{_tail(log_path)}"
        raise ServerStartError(msg)
    return popen, ticks


def launch(
    name: str,
    argv: Sequence[str],
    *,
    data_dir: Path,
    marker: str,
    endpoint: str,
    ports: Mapping[str, int] | None = None,
    env: Mapping[str, str | None] | None = None,
    cleanup_paths: Sequence[Path] = (),
    ready_check: Callable[[], bool] | None = None,
    die_with_parent: bool = False,
    log_name: str | None = None,
) -> ManagedServer:
    """Start ``argv`` in its own session, cwd ``data_dir``, stdout+stderr to ``data_dir/<name>.log`` (mode 600).

    ``env`` is added to the current environment (a None value removes that variable). With
    ``die_with_parent`` the server gets SIGTERM when this process dies (for test sessions and
    ``anomap demo``; not for ``anomap stack up``, whose servers outlive the command).
    ``ready_check`` is kept for `wait_ready` and `ManagedServer.restart`.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / (log_name or f"{name}.log")
    env = dict(env or {})
    popen, ticks = _spawn(name, argv, data_dir, log_path, env, die_with_parent)
    server = ManagedServer(
        name=name,
        pid=popen.pid,
        start_ticks=ticks,
        marker=marker,
        endpoint=endpoint,
        argv=list(argv),
        ports=dict(ports or {}),
        log_path=log_path,
        data_dir=data_dir,
        cleanup_paths=list(cleanup_paths),
    )
    server._popen = popen
    server._env = env
    server._die_with_parent = die_with_parent
    server._ready_check = ready_check
    return server


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_ready(server: ManagedServer, check: Callable[[], bool] | None = None, timeout: float = 30.0) -> float:
    """Poll ``check`` (default: the server's own) until it returns True; returns the seconds it took.

    Exceptions from ``check`` count as "not yet". If the server exits, or ``timeout`` passes, the
    server is stopped and `ServerStartError` is raised with the end of its log; so it is when the wait
    is interrupted (Ctrl-C, or SIGTERM turned into `SystemExit` by `cluster.start_lock`).
    """
    check = check or server._ready_check
    if check is None:
        msg = f"no readiness check for {server.name}: pass one"
        raise ValueError(msg)
    started = time.monotonic()
    try:
        while True:
            if not server.is_running():
                server.stop(timeout=5)
                msg = f"{server.name} exited before it was ready; log {server.log_path}:\n{server.log_tail()}"
                raise ServerStartError(msg)
            try:
                if check():
                    return time.monotonic() - started
            except Exception:  # any failure of a readiness probe means "not ready yet"
                pass
            if time.monotonic() - started > timeout:
                server.stop(timeout=5)
                msg = (
                    f"{server.name} (pid {server.pid}) not ready at {server.endpoint} after {timeout:g} s; "
                    f"log {server.log_path}:\n{server.log_tail()}"
                )
                raise ServerStartError(msg)
            time.sleep(0.1)
    except (KeyboardInterrupt, SystemExit):  # interrupted while waiting: the caller never gets the server
        server.stop(timeout=5)
        raise
