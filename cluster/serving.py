"""Bring the inspection service up in this process: the Serve app plus stream-consumer threads.

    with InspectionServer(settings, version, consumers=2) as server:
        ...                      # jobs on anomap:jobs[:<line>] are scored until the block ends
    server.stats                 # outcomes per consumer

Leaving the block stops the consumers after the jobs they hold (graceful drain), then deletes the
Serve application; so does a failure on entry after the deploy. A signal handler calls
``server.request_stop()``: during the deploy the server then drains and stops as soon as it is up (a
second request aborts the deploy), so no Serve app is left behind.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from types import TracebackType
from typing import TYPE_CHECKING

from ray import serve

from cluster.connections import object_store, redis_client
from schemas import Settings, StreamNames
from workers.consumer import ConsumerConfig, ConsumerStats, StreamConsumer
from workers.http_api import HTTP_APP_NAME
from workers.serve_app import APP_NAME, ServeInspector, deploy

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle


class ConsumerDied(RuntimeError):
    """A consumer thread of `InspectionServer` ended while the server was meant to run."""


class InspectionServer:
    """The Serve app (pinned to ``version``, or following each line's live version when it is None) and
    ``consumers`` consumer threads on ``lines``.

    Replica counts, autoscaling and Serve's queue limits come from ``settings.serving``;
    ``scorer_replicas``, when given, fixes the scorer replica count instead. A consumer whose job
    Serve refuses for backpressure waits and sends it again (see `StreamConsumer`).
    """

    def __init__(
        self,
        settings: Settings,
        version: str | None,
        consumers: int = 2,
        lines: tuple[str, ...] = ("default",),
        scorer_replicas: int | None = None,
        max_in_flight: int = 2,
        claim_idle_ms: int = 60_000,
        http_port: int | None = None,
    ) -> None:
        self.settings = settings
        self.version = version
        self.n_consumers = consumers
        self.lines = lines
        self.scorer_replicas = scorer_replicas
        self.max_in_flight = max_in_flight
        self.claim_idle_ms = claim_idle_ms
        self.http_port = http_port
        self.stop = threading.Event()
        self.stats: list[ConsumerStats] = []
        self._threads: list[threading.Thread] = []
        self._deploying = False

    def request_stop(self) -> None:
        """Drain and stop (for signal handlers). A second request while the app deploys aborts the deploy
        (KeyboardInterrupt; the app is deleted) rather than wait for it."""
        if self._deploying and self.stop.is_set():
            raise KeyboardInterrupt
        self.stop.set()

    def __enter__(self) -> InspectionServer:
        self._deploying = True
        try:
            handle = deploy(self.settings, self.version, scorer_replicas=self.scorer_replicas, http_port=self.http_port)
        except (KeyboardInterrupt, SystemExit):  # aborted: the app may have been submitted already
            self._delete_apps()
            raise
        finally:
            self._deploying = False
        try:
            self._start_consumers(handle)
        except BaseException:  # no Serve app left running for nobody
            with contextlib.suppress(Exception):  # the entry's own error is the one to see
                self.__exit__(None, None, None)
            raise
        return self

    def _start_consumers(self, handle: DeploymentHandle) -> None:
        inspector = ServeInspector(handle)
        names = StreamNames(self.settings.stream_prefix)
        store = object_store(self.settings)
        host = socket.gethostname()
        for i in range(self.n_consumers):
            config = ConsumerConfig.for_service(
                self.settings,
                f"{host}-{os.getpid()}-{i}",
                tuple(self.lines),
                max_in_flight=self.max_in_flight,
                claim_idle_ms=self.claim_idle_ms,
            )
            consumer = StreamConsumer(redis_client(self.settings), store, inspector, names, config)
            consumer.ensure_groups()
            self.stats.append(consumer.stats)
            thread = threading.Thread(target=consumer.run, args=(self.stop,), name=config.consumer, daemon=True)
            thread.start()
            self._threads.append(thread)

    def wait(self) -> None:
        """Block until `stop` is set (by a signal handler, say).

        Raises `ConsumerDied` when a consumer thread ended on its own (a bug: a consumer answers or leaves
        pending every entry and survives outages): rather than serve on with fewer consumers, the process
        should exit non-zero so that its supervisor restarts it; the dead thread's entries stay pending and
        are reclaimed.
        """
        while not self.stop.wait(1.0):
            dead = [thread.name for thread in self._threads if not thread.is_alive()]
            if dead:
                msg = f"consumer thread(s) {', '.join(dead)} ended unexpectedly (the traceback is in the log above)"
                raise ConsumerDied(msg)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=300)
        if self.http_port is not None:
            serve.delete(HTTP_APP_NAME)
        serve.delete(APP_NAME)

    def _delete_apps(self) -> None:
        """Best effort: delete the app(s) of an aborted deploy."""
        for name in ([HTTP_APP_NAME] if self.http_port is not None else []) + [APP_NAME]:
            with contextlib.suppress(Exception):
                serve.delete(name)
