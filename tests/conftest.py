"""Shared fixtures: real servers, started lazily by the same code as ``anomap stack up``.

- ``valkey_server`` (session): `ManagedServer`, valkey-server on a free port, no password,
  ``appendonly yes`` (``.kill()`` then ``.restart()`` brings it back with its data, same port).
- ``s3_keys`` (session): the `S3Keys` of ``s3_server``.
- ``s3_server`` (session): `ManagedServer`, ``weed mini`` on free ports; ``.endpoint`` is its S3 URL.
- ``stack_settings`` (session): `Settings` on both: bucket ``anomap-test`` (created), ``state_dir``
  in a tmp dir, no Ray address.
- ``redis_client`` (function): ``redis.Redis`` (bytes) on ``valkey_server`` after ``FLUSHALL``; closed after.
- ``object_store`` (function): `ObjectStore` on a fresh bucket of its own, removed after.
- ``line_registry`` (function): the retraining tests' line (`retrain_helpers`): its data uploaded to
  ``object_store`` and an untrained parent live on it.
- ``local_ray`` (session): the `LocalRay` behind ``ray_cluster``: in-process (``num_cpus=4``,
  loopback, no dashboard, own temp dir), its metrics on ``.metrics_url``, reported every 2 s;
  Serve and Ray are shut down after.
- ``ray_cluster`` (session): the GCS address of ``local_ray``.

A test that asks for none of them starts nothing. Servers get SIGTERM if pytest dies.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr
from retrain_helpers import a_line_with_a_live_parent

from cluster.connections import LocalRay, minio_client, redis_from_url
from cluster.connections import object_store as open_object_store
from cluster.processes import ManagedServer
from cluster.servers import S3Keys, start_seaweed, start_valkey, valkey_url
from schemas.settings import Settings
from trainer.registry import ModelRegistry
from trainer.store import ObjectStore


@pytest.fixture(scope="session")
def valkey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagedServer]:
    server = start_valkey(tmp_path_factory.mktemp("valkey"), appendonly=True, die_with_parent=True)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_keys() -> S3Keys:
    return S3Keys.random()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory, s3_keys: S3Keys) -> Iterator[ManagedServer]:
    server = start_seaweed(
        tmp_path_factory.mktemp("seaweed"), s3_keys.access_key, s3_keys.secret_key, die_with_parent=True
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def stack_settings(
    tmp_path_factory: pytest.TempPathFactory, valkey_server: ManagedServer, s3_server: ManagedServer, s3_keys: S3Keys
) -> Settings:
    settings = Settings(
        redis_url=SecretStr(valkey_url(valkey_server)),
        s3_endpoint=s3_server.endpoint,
        s3_access_key=SecretStr(s3_keys.access_key),
        s3_secret_key=SecretStr(s3_keys.secret_key),
        bucket="anomap-test",
        state_dir=tmp_path_factory.mktemp("state"),
    )
    open_object_store(settings)
    return settings


@pytest.fixture
def redis_client(valkey_server: ManagedServer) -> Iterator[redis.Redis]:
    client = redis_from_url(valkey_url(valkey_server))
    client.flushall()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def object_store(stack_settings: Settings) -> Iterator[ObjectStore]:
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    store = open_object_store(stack_settings, bucket=bucket)
    try:
        yield store
    finally:
        client = minio_client(stack_settings)
        with contextlib.suppress(Exception):  # best effort: the store goes away with the session
            for obj in client.list_objects(bucket, recursive=True):
                client.remove_object(bucket, obj.object_name)
            client.remove_bucket(bucket)


@pytest.fixture
def line_registry(object_store: ObjectStore, tmp_path: Path) -> ModelRegistry:
    return a_line_with_a_live_parent(object_store, tmp_path)


RAY_METRICS_REPORT_INTERVAL_MS = 2000
"""How often the test cluster's processes report metrics (Ray's default, 10 s, would slow the metrics test)."""


@pytest.fixture(scope="session")
def local_ray() -> Iterator[LocalRay]:
    cluster = LocalRay(num_cpus=4, metrics_report_interval_ms=RAY_METRICS_REPORT_INTERVAL_MS)
    with cluster:
        yield cluster


@pytest.fixture(scope="session")
def ray_cluster(local_ray: LocalRay) -> str:
    assert local_ray.address is not None
    return local_ray.address
