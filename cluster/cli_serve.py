"""``anomap serve``: the Serve app and the stream consumers of the given lines, until SIGINT/SIGTERM drains them.

    anomap serve [--lines default,press-2] [--consumers 2] [--replicas N] [--version V] [--http-port 8000]

Everything that can be checked is checked before anything is deployed: the line ids, the pinned version or
each line's live one (its card must be readable), and that Redis answers.
"""

from __future__ import annotations

import logging
import signal
from typing import TYPE_CHECKING, Annotated

import typer

from cluster.cli_common import checked_line, checked_version, console, fail, first_line, resolved_settings

if TYPE_CHECKING:
    from schemas import Settings


def serve(
    version: Annotated[
        str | None,
        typer.Option(
            help="Pin one model version for every line (default: each line's live version, "
            "re-read every few seconds, so `anomap models promote` swaps models without a restart)."
        ),
    ] = None,
    lines: Annotated[str, typer.Option(help="Comma-separated production lines to consume.")] = "default",
    consumers: Annotated[int, typer.Option(min=1, max=64)] = 2,
    replicas: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=256,
            help="A fixed number of PatchScorer replicas (default: ANOMAP_SCORER_REPLICAS, or autoscaling "
            "with ANOMAP_SCORER_MIN_REPLICAS/ANOMAP_SCORER_MAX_REPLICAS; queue limits: see README).",
        ),
    ] = None,
    http_port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Also answer POST /v1/inspect on 127.0.0.1:PORT.")
    ] = None,
) -> None:
    """Run the Serve app and stream consumers until interrupted (SIGINT/SIGTERM drain gracefully)."""
    line_ids = _serve_lines(lines)  # before anything starts: a bad value is one line, not a deployed app
    if version is not None:
        checked_version(version)
    settings = resolved_settings(redis=True, s3=True, ray=True)
    from cluster.connections import connect_ray
    from cluster.serving import ConsumerDied, InspectionServer
    from workers.logs import configure_logging

    live = _check_models(settings, version, line_ids)
    _check_redis(settings)
    try:
        configure_logging(logging.INFO)  # ANOMAP_LOG_FORMAT=json: one JSON object per line
    except ValueError as exc:
        fail(str(exc))
    connect_ray(settings)
    from workers.serve_app import ServeHttpConflict

    server = InspectionServer(
        settings, version, consumers=consumers, lines=line_ids, scorer_replicas=replicas, http_port=http_port
    )
    for sig in (signal.SIGINT, signal.SIGTERM):  # before the deploy: a signal during it drains once it is up
        signal.signal(sig, lambda *_: server.request_stop())
    try:
        with server:
            pointers = ", ".join(f"{line}: {v}" for line, v in live.items())
            models = f"model {version} (pinned)" if version else f"live models {pointers}"
            console.log(f"serving lines {', '.join(line_ids)} with {models}; Ctrl-C drains and stops")
            server.wait()
    except ServeHttpConflict as exc:  # raised by deploy, before anything runs
        fail(str(exc))
    except ConsumerDied as exc:  # the rest drained; exit non-zero so that a supervisor starts a fresh process
        fail(f"{exc}; the others drained and stopped, and its pending jobs are reclaimed at the next start")
    console.log("drained and stopped")


def _serve_lines(lines: str) -> tuple[str, ...]:
    """The line ids of ``--lines``, each checked; exit 2 when one is not a line id or there are none."""
    line_ids = tuple(checked_line(line.strip(), "--lines") for line in lines.split(",") if line.strip())
    if not line_ids:
        fail(f"--lines {lines!r} names no line; give comma-separated line ids, e.g. --lines default,line2")
    return line_ids


def _check_models(settings: Settings, version: str | None, line_ids: tuple[str, ...]) -> dict[str, str]:
    """The pinned version's card must be found, else each line's live one: exit 2 if not. Returns the live
    version per line (none when pinned)."""
    from cluster.connections import object_store
    from trainer.registry import ModelNotFound, ModelRegistry

    registry = ModelRegistry(object_store(settings), settings.model_name)
    try:
        if version is not None:
            registry.load_card(version)
            return {}
        live = {line: registry.live_version(line) for line in line_ids}
        for live_version in set(live.values()):
            registry.load_card(live_version)
    except (ModelNotFound, ValueError) as exc:  # ValueError: a card that names another version
        fail(str(exc))
    return live


def _check_redis(settings: Settings) -> None:
    """Exit 2 unless Redis answers PING: the consumers would fail only after the app is deployed."""
    import redis

    from cluster.connections import redis_client

    client = redis_client(settings, socket_timeout=5.0)
    try:
        client.ping()
    except redis.RedisError as exc:
        fail(f"cannot reach Redis ({first_line(exc)}); is the stack up (`anomap stack status`) and REDIS_URL right?")
    finally:
        client.close()
