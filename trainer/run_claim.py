"""One driver per training run: a named Ray actor, owned by the driver that trains the run, marks it taken.

`anomap train --resume VERSION` given while the process that trains VERSION is still alive would start a second
Ray Train run on the same checkpoints. The claim refuses it. The actor is not detached: when its driver dies,
Ray kills it and frees the name, so the run can be resumed at once.

    with claim_training_run("metal-v20261202-091500-123456"):     # RunTaken if another driver holds it
        ...train...
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import ray

CLAIM_NAMESPACE = "anomap-training"
"""The Ray namespace the claims are named in (every driver's job sees it, whatever its own namespace)."""
RELEASE_WAIT_S = 10.0
"""How long a claim waits for a name whose driver just died to be freed before it calls the run taken."""


class RunTaken(RuntimeError):
    """Another live driver is training this run."""


@ray.remote(num_cpus=0)
class _RunClaim:
    """Holds a run's name for as long as the driver that created it lives."""

    def alive(self) -> bool:
        return True


def _holder_alive(run_name: str) -> bool:
    """Whether a claim of ``run_name`` exists and answers (False once its driver is gone)."""
    try:
        holder = ray.get_actor(run_name, namespace=CLAIM_NAMESPACE)
        return bool(ray.get(holder.alive.remote(), timeout=5))
    except (ValueError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False


@contextmanager
def claim_training_run(run_name: str, wait_s: float = RELEASE_WAIT_S) -> Iterator[None]:
    """Hold ``run_name`` while the block runs; raise `RunTaken` if a live driver holds it.

    A name still held by a driver that died is waited for (up to ``wait_s``) while Ray frees it.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            claim = _RunClaim.options(name=run_name, namespace=CLAIM_NAMESPACE, lifetime="non_detached").remote()
            break
        except ValueError as exc:  # the name is taken
            if _holder_alive(run_name):
                msg = (
                    f"training run {run_name} is being trained by another process that is still running "
                    "(its Ray actor answers); wait for it to finish, or stop it first"
                )
                raise RunTaken(msg) from exc
            if time.monotonic() >= deadline:
                msg = f"training run {run_name} is still held in Ray by a process that stopped; try again shortly"
                raise RunTaken(msg) from exc
            time.sleep(0.5)
    try:
        yield
    finally:
        ray.kill(claim, no_restart=True)
