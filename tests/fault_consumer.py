"""A stream consumer in a process of its own, for the fault tests to SIGKILL.

    python tests/fault_consumer.py <consumer name> <claim_idle_ms> <max_in_flight>

Settings come from the environment (``REDIS_URL``, ``S3_ENDPOINT``, ``S3_ACCESS_KEY``,
``S3_SECRET_KEY``, ``ANOMAP_BUCKET``, ``RAY_ADDRESS``); the Serve app must be running. Prints
``ready`` once it consumes; SIGTERM drains the jobs in flight and exits 0.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

from ray import serve

from cluster.connections import connect_ray, redis_client
from schemas import Settings, StreamNames
from trainer.store import ObjectStore
from workers.consumer import ConsumerConfig, StreamConsumer
from workers.serve_app import APP_NAME, ServeInspector


def main(name: str, claim_idle_ms: int, max_in_flight: int) -> int:
    logging.basicConfig(level=logging.WARNING, format=f"[{name}] %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    connect_ray(settings)
    inspector = ServeInspector(serve.get_app_handle(APP_NAME), timeout_s=60)
    config = ConsumerConfig(
        consumer=name, max_in_flight=max_in_flight, block_ms=100, claim_idle_ms=claim_idle_ms, claim_every_s=0.5
    )
    consumer = StreamConsumer(
        redis_client(settings), ObjectStore.from_settings(settings), inspector, StreamNames(), config
    )
    consumer.ensure_groups()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print("ready", flush=True)
    stats = consumer.run(stop)
    print({k.value: v for k, v in stats.outcomes.items()}, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
