"""The object store refuses: real ``AccessDenied`` answers from weed mini, for identities given too few
permissions with ``s3.configure`` (`helpers.add_s3_identity`), not a fake client.

- a job whose ``s3://`` reference names a bucket the service's keys may not read: one ``forbidden_object``
  dead letter, at once, and the consumer goes on;
- a consumer whose keys may read but not write: no job is lost. Each waits for the store as for an outage,
  is dead-lettered ``too_many_deliveries`` with the refusal in its detail, and once the keys may write, a
  re-drive scores it;
- a command whose keys may not read the bucket: one line naming the refusal, not a traceback.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from helpers import SMALL_CONFIG, add_s3_identity, point_cli_at, running, small_png, wait_until
from minio.error import S3Error
from pydantic import SecretStr

from cluster.cli import main
from cluster.connections import minio_client
from cluster.processes import ManagedServer
from cluster.servers import S3Keys
from schemas import DeadReason, InspectionJob, Settings, StreamNames
from trainer.pipeline import untrained_model
from trainer.scoring import PatchModel
from trainer.store import ObjectStore
from trainer.synthetic import synth_image
from workers.consumer import ConsumerConfig, StreamConsumer
from workers.dead_letters import Redrive, redrive
from workers.inspection import LocalInspector
from workers.publisher import publish_job
from workers.results import read_dead_letters, read_results

PROPAGATION_S = 20.0
"""How long weed's S3 gateway may take to learn of a new identity (about a second here)."""


def _with_keys(settings: Settings, keys: S3Keys, **update: object) -> Settings:
    return settings.model_copy(
        update={"s3_access_key": SecretStr(keys.access_key), "s3_secret_key": SecretStr(keys.secret_key), **update}
    )


def _refused(op: Callable[[], object]) -> bool:
    """Whether ``op`` is refused with AccessDenied (False when it succeeds)."""
    try:
        op()
    except S3Error as exc:
        if exc.code == "AccessDenied":
            return True
        if exc.code in {"InvalidAccessKeyId", "SignatureDoesNotMatch"}:  # the gateway does not know the keys yet
            return False
        raise
    return False


def _inspector() -> LocalInspector:
    card, state = untrained_model(SMALL_CONFIG, [synth_image(seed, 96)[0] for seed in range(2)], "metal")
    return LocalInspector(PatchModel.from_state(card, state, device="cpu"))


@pytest.fixture
def names() -> StreamNames:
    return StreamNames(f"deny{uuid.uuid4().hex[:6]}")


@pytest.fixture
def cameras_bucket(stack_settings: Settings) -> Iterator[str]:
    """A bucket the cameras upload to, created with the admin keys."""
    bucket = f"cams-{uuid.uuid4().hex[:12]}"
    client = minio_client(stack_settings)
    client.make_bucket(bucket)
    yield bucket
    for obj in client.list_objects(bucket, recursive=True):
        client.remove_object(bucket, obj.object_name)
    client.remove_bucket(bucket)


def test_a_reference_to_a_bucket_the_keys_may_not_read_is_one_forbidden_object_dead_letter(
    stack_settings: Settings,
    s3_server: ManagedServer,
    object_store: ObjectStore,
    cameras_bucket: str,
    redis_client: redis.Redis,
    names: StreamNames,
) -> None:
    """The bucket is allowed as a reference bucket by the configuration, but the store does not let the
    service's keys read it: the refusal is the job's, so it is answered at once, not retried."""
    own = object_store.bucket
    keys = add_s3_identity(s3_server, f"scorer-{own}", [f"{action}:{own}" for action in ("Read", "Write", "List")])
    settings = _with_keys(stack_settings, keys, reference_buckets=(cameras_bucket,))
    scorer_store = ObjectStore(minio_client(settings), own, settings.reference_buckets)
    ObjectStore(minio_client(stack_settings), cameras_bucket).put_bytes("cam01/1.png", small_png(1), "image/png")
    object_store.put_bytes("images/cam01/2.png", small_png(2), "image/png")
    wait_until(lambda: _refused(lambda: scorer_store.client.stat_object(cameras_bucket, "cam01/1.png")), PROPAGATION_S,
           "the gateway to refuse the scorer's keys the cameras' bucket")  # fmt: skip

    refs = {"locked": f"s3://{cameras_bucket}/cam01/1.png", "own": f"s3://{own}/images/cam01/2.png"}
    for job_id, ref in refs.items():
        publish_job(redis_client, names, InspectionJob(job_id=job_id, image_ref=ref))
    consumer = StreamConsumer(
        redis_client, scorer_store, _inspector(), names, ConsumerConfig(consumer="c", block_ms=100)
    )
    with running(consumer):
        wait_until(lambda: redis_client.xlen(names.results()) + redis_client.xlen(names.dead) >= 2, 60, "two answers")
    (letter,) = [letter for _, letter in read_dead_letters(redis_client, names)]
    assert (letter.job_id, letter.reason, letter.delivery_count) == ("locked", DeadReason.FORBIDDEN_OBJECT, 1)
    assert letter.detail == f"the store refuses to read {refs['locked']}: AccessDenied"
    assert [result.job_id for _, result in read_results(redis_client, names)] == ["own"]
    assert redis_client.xpending(names.jobs(), names.scorer_group)["pending"] == 0


def test_maps_the_store_will_not_take_lose_no_job_and_a_redrive_scores_them_once_it_will(
    stack_settings: Settings,
    s3_server: ManagedServer,
    object_store: ObjectStore,
    redis_client: redis.Redis,
    names: StreamNames,
) -> None:
    """Read-only keys: scoring works, writing the map is refused. A refused write is retried like an outage
    (an operator may grant the permission meanwhile), so each job ends as a ``too_many_deliveries`` dead
    letter that says what the store answered; re-driven to a consumer whose keys may write, each gets its
    one result."""
    own = object_store.bucket
    reader = add_s3_identity(s3_server, f"reader-{own}", [f"Read:{own}", f"List:{own}"])
    read_only = ObjectStore(minio_client(_with_keys(stack_settings, reader)), own)
    wait_until(lambda: _refused(lambda: read_only.put_bytes("probe", b"1")), PROPAGATION_S, "a refused write")

    jobs = [f"cam01-{i}" for i in range(3)]
    for i, job_id in enumerate(jobs):
        publish_job(redis_client, names, InspectionJob(job_id=job_id), image=small_png(i))
    config = ConsumerConfig(
        consumer="ro", block_ms=100, store_retry_s=0.3, claim_idle_ms=300, claim_every_s=0.2, max_deliveries=2
    )
    inspector = _inspector()
    with running(StreamConsumer(redis_client, read_only, inspector, names, config)):
        wait_until(lambda: redis_client.xlen(names.dead) >= len(jobs), 90, "every job to be dead-lettered")
    letters = dict(read_dead_letters(redis_client, names))
    assert sorted(letter.job_id or "" for letter in letters.values()) == jobs
    for letter in letters.values():
        assert letter.reason is DeadReason.TOO_MANY_DELIVERIES
        assert "delivered 3 times (limit 2) without a result; the last try failed" in letter.detail
        refusal = f"storing the map: the store answered AccessDenied (Access Denied.) for s3://{own}/maps/default/"
        assert refusal in letter.detail and f"/{letter.job_id}.npz" in letter.detail, letter.detail
    assert redis_client.xlen(names.results()) == 0 and not list(object_store.list_keys("maps/"))

    for dead_id, letter in letters.items():  # the operator fixed the keys: send the jobs again
        assert redrive(redis_client, names, dead_id, letter)[0] is Redrive.REDRIVEN
    with running(StreamConsumer(redis_client, object_store, inspector, names, ConsumerConfig(consumer="rw"))):
        wait_until(lambda: redis_client.xlen(names.results()) >= len(jobs), 60, "every re-driven job's result")
    results = [result for _, result in read_results(redis_client, names)]
    assert sorted(result.job_id for result in results) == jobs and redis_client.xlen(names.dead) == 0
    maps = {key.rsplit("/", 1)[-1] for key in object_store.list_keys("maps/")}
    assert {f"{job_id}.npz" for job_id in jobs} <= maps
    assert np.all([result.model_version == inspector.model.card.version for result in results])


def test_a_command_whose_keys_may_not_read_the_bucket_says_so_in_one_line(
    stack_settings: Settings,
    s3_server: ManagedServer,
    object_store: ObjectStore,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """Through the real entry point (`cluster.cli.main`): exit 2, one line, the store's code, no key."""
    outsider = add_s3_identity(s3_server, f"outsider-{object_store.bucket}", ["Read:someone-else"])
    settings = _with_keys(stack_settings, outsider)
    probe = ObjectStore(minio_client(settings), object_store.bucket)
    wait_until(lambda: _refused(lambda: list(probe.list_keys("models/"))), PROPAGATION_S, "a refused listing")
    point_cli_at(monkeypatch, settings, object_store.bucket, tmp_path)
    monkeypatch.setattr(sys, "argv", ["anomap", "models", "list"])
    with pytest.raises(SystemExit) as exited:
        main()
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert f"error: the object store at {stack_settings.s3_endpoint} refused the request: AccessDenied" in err
    assert "check S3_ACCESS_KEY and S3_SECRET_KEY" in err and outsider.secret_key not in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
