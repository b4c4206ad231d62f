"""Telling Serve's refusals for backpressure apart from failures: the one is a pacing signal (send again
later), the other an error."""

from __future__ import annotations

from ray.serve.exceptions import BackPressureError


def is_backpressure(exc: BaseException) -> bool:
    """Whether ``exc`` is Serve refusing a call because a queue is full, here or in a deployment it called.

    A refusal between the ingress and the scorers reaches the caller wrapped in a ``RayTaskError``
    whose ``cause`` is the ``BackPressureError``.
    """
    return isinstance(exc, BackPressureError) or isinstance(getattr(exc, "cause", None), BackPressureError)
