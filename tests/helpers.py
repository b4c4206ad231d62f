"""Shared by the service tests: a small model version in the registry, and small job images.

card = register_small_model(store, "metal")    # untrained nets, calibrated on synthetic metal
png = small_png(seed=1)                        # a 128×128 synthetic image as PNG bytes
result = a_result("cam01-1", latency_ms=200.0)  # an InspectionResult as a consumer writes one
point_cli_at(monkeypatch, settings, bucket, tmp_path)   # the environment of a shell using these servers
with small_service(stack_settings, "e2e", scorer_replicas=2) as (settings, card):  # the Serve app, deployed
    ...
settings, card = live_small_model(stack_settings, "rescore")   # a bucket of its own with a small live model
with running(consumer): ...                    # a StreamConsumer in a thread, drained and stopped on exit
keys = add_s3_identity(s3_server, "reader", ["Read:b1", "List:b1"])   # a real identity on weed mini
wait_until(lambda: client.xlen("anomap:dead") >= 3, 60, "three dead letters")  # polls; Redis away = not yet
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import redis

from cluster.processes import ManagedServer
from cluster.servers import S3Keys, weed_binary
from schemas import InspectionResult, ModelCard, Settings
from trainer.config import TrainConfig
from trainer.imaging import encode_png
from trainer.pipeline import initial_model_version
from trainer.registry import ModelRegistry
from trainer.store import ObjectStore
from trainer.synthetic import DefectKind, synth_image
from workers.consumer import StreamConsumer

SIZE = 128


def a_result(
    job_id: str, latency_ms: float = 1.0, version: str = "v1", line: str = "default", is_anomalous: bool = False
) -> InspectionResult:
    """A valid result of a 128² job published ``latency_ms`` ago and scored now (no map behind its refs)."""
    now = datetime.now(UTC)
    return InspectionResult(
        job_id=job_id,
        camera_id="cam01",
        line=line,
        model_version=version,
        width=SIZE,
        height=SIZE,
        image_score=1.5 if is_anomalous else 0.5,
        raw_image_score=0.1,
        is_anomalous=is_anomalous,
        pixel_threshold=0.2,
        image_threshold=0.2,
        map_ref=f"s3://anomap/maps/{line}/{job_id}.npz",
        overlay_ref=f"s3://anomap/maps/{line}/{job_id}.jpg",
        captured_at=now - timedelta(milliseconds=latency_ms),
        published_at=now - timedelta(milliseconds=latency_ms),
        scored_at=now,
        latency_ms=latency_ms,
    )


SMALL_CONFIG = TrainConfig(patch_size=32, stride=16, latent_dim=16, base_channels=8, smoothing_sigma=1.0)
"""A patch-32 architecture that scores a 128² image in a few milliseconds."""


def register_small_model(store: ObjectStore, name: str) -> ModelCard:
    """Save a patch-32 model version (untrained networks, calibrated thresholds) and return its card."""
    images = [synth_image(seed, SIZE)[0].astype(np.float32) / 255 for seed in range(3)]
    return initial_model_version(ModelRegistry(store, name), SMALL_CONFIG, images, data_digest="test")


def small_png(seed: int, defects: tuple[DefectKind, ...] = ()) -> bytes:
    """A SIZE×SIZE synthetic brushed-metal image (with ``defects``) as PNG bytes."""
    return encode_png(synth_image(seed, SIZE, defects)[0])


def point_cli_at(
    monkeypatch: pytest.MonkeyPatch, settings: Settings, bucket: str, tmp_path: Path, redis: bool = True
) -> None:
    """Set the environment a shell would have for ``anomap`` commands on ``settings``' servers and ``bucket``.

    The Redis URL only with ``redis``; Ray, the stream prefix and the model name are left at their defaults.
    """
    assert settings.s3_endpoint and settings.s3_access_key and settings.s3_secret_key
    if redis:
        assert settings.redis_url
        monkeypatch.setenv("REDIS_URL", settings.redis_url.get_secret_value())
    monkeypatch.setenv("S3_ENDPOINT", settings.s3_endpoint)
    monkeypatch.setenv("S3_ACCESS_KEY", settings.s3_access_key.get_secret_value())
    monkeypatch.setenv("S3_SECRET_KEY", settings.s3_secret_key.get_secret_value())
    monkeypatch.setenv("ANOMAP_BUCKET", bucket)
    monkeypatch.setenv("ANOMAP_STATE_DIR", str(tmp_path / "state"))
    for name in ("RAY_ADDRESS", "ANOMAP_STREAM_PREFIX", "ANOMAP_MODEL_NAME"):
        monkeypatch.delenv(name, raising=False)


@contextlib.contextmanager
def small_service(
    stack_settings: Settings, bucket_prefix: str, scorer_replicas: int
) -> Iterator[tuple[Settings, ModelCard]]:
    """The Serve app pinned to a fresh small model version in a bucket of its own; deleted on exit."""
    from ray import serve

    from workers.serve_app import APP_NAME, deploy

    settings = stack_settings.model_copy(update={"bucket": f"{bucket_prefix}-{uuid.uuid4().hex[:8]}"})
    store = ObjectStore.from_settings(settings)
    store.ensure_bucket()
    card = register_small_model(store, settings.model_name)
    deploy(settings, card.version, scorer_replicas=scorer_replicas, chunk_patches=32)
    try:
        yield settings, card
    finally:
        serve.delete(APP_NAME)


def live_small_model(stack_settings: Settings, bucket_prefix: str) -> tuple[Settings, ModelCard]:
    """A bucket of its own (``<bucket_prefix>-<random>``) holding a small model version, live on the default line."""
    settings = stack_settings.model_copy(update={"bucket": f"{bucket_prefix}-{uuid.uuid4().hex[:8]}"})
    store = ObjectStore.from_settings(settings)
    store.ensure_bucket()
    card = register_small_model(store, settings.model_name)
    ModelRegistry(store, settings.model_name).set_live(card.version)
    return settings, card


@contextlib.contextmanager
def running(consumer: StreamConsumer) -> Iterator[None]:
    """``consumer`` in a thread of its own; stopped (graceful drain) on exit."""
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive(), "the consumer did not stop"


def add_s3_identity(server: ManagedServer, user: str, actions: list[str]) -> S3Keys:
    """Give ``server`` (a `start_seaweed` weed mini) an identity ``user`` with new random keys allowed only
    ``actions`` (SeaweedFS's ``Read``, ``Write``, ``List``, ``Admin``, each optionally ``:bucket``), through
    ``weed shell``'s ``s3.configure``. The S3 gateway learns of it a moment later: callers poll."""
    keys = S3Keys.random()
    command = (
        f"s3.configure -user={user} -access_key={keys.access_key} -secret_key={keys.secret_key} "
        f"-actions={','.join(actions)} -apply"
    )
    argv = [str(weed_binary()), "shell", f"-master=127.0.0.1:{server.ports['master']}"]
    argv.append(f"-filer=127.0.0.1:{server.ports['filer']}")
    done = subprocess.run(argv, input=command, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0 or keys.access_key not in done.stdout:
        msg = f"weed shell s3.configure failed ({done.returncode}): {done.stderr[-500:]}"
        raise RuntimeError(msg)
    return keys


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` every 0.1 s until it is true; fail the test naming ``what`` after ``timeout`` seconds.
    A check that cannot reach Redis (restarting, say) counts as not yet."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.ConnectionError):
            if check():
                return
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
