"""Training progress the driver can show while `TorchTrainer.fit()` blocks.

Rank 0 posts ``(step, total, metrics)`` to a small Ray actor at every checkpoint; a thread on the
driver polls it and calls ``progress(message)`` with the step, the rate and an ETA::

    with ProgressWatch(progress=console.log, total_steps=1400) as board:
        run_training(..., progress_board=board)
    # "training step 400/1400 (29 %), 3.1 steps/s, ETA 5 min 22 s, d_loss 1.21 g_loss 0.83"
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import ray


@ray.remote(num_cpus=0)
class ProgressBoard:
    """The latest step a training run reached, with its metrics, and how many times its worker group started.

    Rank 0 calls `started` once per worker group (the first, and each restart after a failure) and
    `update` at every checkpoint; `read` returns ``{"step", "total", "metrics", "attempts",
    "resumed_from"}`` (``resumed_from``: the checkpoint step the latest group started from, None for a
    fresh start).
    """

    def __init__(self) -> None:
        self.latest: dict[str, Any] = {"attempts": 0, "resumed_from": None}

    def started(self, resumed_from: int | None) -> None:
        """Record that a worker group started, from checkpoint step ``resumed_from`` (None: from scratch)."""
        self.latest = {**self.latest, "attempts": self.latest["attempts"] + 1, "resumed_from": resumed_from}

    def update(self, step: int, total: int, metrics: dict[str, float]) -> None:
        """Record the step reached (called by rank 0)."""
        self.latest = {**self.latest, "step": step, "total": total, "metrics": metrics}

    def read(self) -> dict[str, Any]:
        """The latest record (no ``step`` before the first update)."""
        return self.latest


def format_eta(seconds: float) -> str:
    """``95`` → ``'1 min 35 s'``."""
    seconds = max(round(seconds), 0)
    minutes, secs = divmod(seconds, 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def progress_line(step: int, total: int, elapsed_s: float, first_step: int, metrics: dict[str, float]) -> str:
    """One human line: step, percentage, rate and ETA (rate measured from the first step seen)."""
    done = step - first_step
    rate = done / elapsed_s if elapsed_s > 0 and done > 0 else 0.0
    eta = f", ETA {format_eta((total - step) / rate)}" if rate > 0 else ""
    shown = " ".join(f"{k} {v:.3g}" for k, v in metrics.items() if isinstance(v, int | float))
    speed = f", {rate:.2f} steps/s{eta}" if rate > 0 else ""
    return f"training step {step}/{total} ({100 * step / max(total, 1):.0f} %){speed}  {shown}"


class ProgressWatch:
    """Creates a `ProgressBoard` and reports its changes through ``progress`` until the block ends."""

    def __init__(self, progress: Callable[[str], None], total_steps: int, poll_s: float = 2.0) -> None:
        self.progress = progress
        self.total_steps = total_steps
        self.poll_s = poll_s
        self.board: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Any:
        self.board = ProgressBoard.remote()
        self._thread = threading.Thread(target=self._watch, name="training-progress", daemon=True)
        self._thread.start()
        return self.board

    def _watch(self) -> None:
        first: tuple[int, float] | None = None  # rate from the first report on: start-up does not skew it
        last_step = -1
        attempts = 0
        while not self._stop.wait(self.poll_s):
            try:
                latest = ray.get(self.board.read.remote(), timeout=10)
            except Exception:  # progress is best-effort; training goes on without it
                continue
            if latest.get("attempts", 0) > attempts:
                attempts = latest["attempts"]
                resumed = latest.get("resumed_from")
                if attempts > 1:  # a worker failed: say so, and report steps again from the checkpoint on
                    where = f"its checkpoint at step {resumed}" if resumed is not None else "the start"
                    self.progress(f"training worker group restarted after a failure (start {attempts}): from {where}")
                    last_step = resumed if resumed is not None else -1
                elif resumed is not None:  # the run's first group found checkpoints: a resumed run
                    self.progress(f"training resumed from its checkpoint at step {resumed}")
            step = int(latest.get("step", -1))
            if step <= last_step:
                continue
            now = time.monotonic()
            first = first or (step, now)
            last_step = step
            self.progress(progress_line(step, self.total_steps, now - first[1], first[0], latest["metrics"]))

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)
        if self.board is not None:
            ray.kill(self.board)
