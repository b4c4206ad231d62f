"""One stack start at a time per state dir, and a start that SIGTERM cannot leave half done.

    with start_lock(settings.state_dir):     # waits (up to timeout_s) while another start holds it
        ...                                  # read the state file, start servers, write the state file

Two starts in one state dir would each start servers on the same data folders (two Valkeys on one
append-only file). The lock is an ``flock`` on ``<state_dir>/stack.lock``: the kernel releases it
when its holder dies, so a killed start never leaves it held. While it is held in the main thread,
SIGTERM raises `SystemExit`, so the caller's rollback stops what it had started instead of leaving
servers running that no state file records.
"""

from __future__ import annotations

import contextlib
import fcntl
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

LOCK_NAME = "stack.lock"


class StartLockTimeout(RuntimeError):
    """Another start in the same state dir held the lock for longer than the wait allowed."""


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def start_lock(state_dir: Path, timeout_s: float = 120.0, poll_s: float = 0.2) -> Iterator[None]:
    """Hold ``<state_dir>/stack.lock`` for the block (waiting up to ``timeout_s`` for another holder).

    A state dir created here is made mode 700: it will hold the stack's credentials, data and logs.
    """
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = state_dir / LOCK_NAME
    with path.open("a") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    msg = f"another stack start in {state_dir} held {path} for over {timeout_s:g} s"
                    raise StartLockTimeout(msg) from None
                time.sleep(poll_s)
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            yield
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            fcntl.flock(handle, fcntl.LOCK_UN)
