"""Serve backpressure slows intake instead of failing jobs.

- Unit: the serving settings (replicas, autoscaling, queue limits) from the environment and from
  ``deploy/serve.yaml`` args, with bad values named; jittered backoff; the intake limit.
- A consumer on real Valkey and SeaweedFS whose inspector refuses like a full Serve queue: the job
  is kept, sent again, and no new entry is read while it waits.
- The real Serve app with one scorer replica and every ``max_ongoing``/``max_queued`` at 1, under a
  burst from several consumers: refusals happen (an image's two chunks alone overfill the scorer
  queue; the consumers overfill the ingress's), and every job still ends with exactly one result.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import yaml
from helpers import SMALL_CONFIG, register_small_model, small_png
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError

from cluster.connections import object_store as open_object_store
from cluster.connections import redis_client as open_redis_client
from schemas import InspectionJob, Settings, StreamNames
from schemas.settings import ServingConfig
from trainer.imaging import decode_image
from trainer.pipeline import untrained_model
from trainer.scoring import PatchModel
from trainer.store import ObjectStore
from trainer.synthetic import synth_image
from workers.backpressure import is_backpressure
from workers.consumer import ConsumerConfig, Outcome, StreamConsumer
from workers.inspection import (
    CHUNK_PATCHES,
    CPU_FORWARD_PATCHES,
    GPU_CHUNK_PATCHES,
    GPU_FORWARD_PATCHES,
    LocalInspector,
    ScoredImage,
    ScoringBusy,
)
from workers.patch_scorer import MAX_BATCH_PATCHES
from workers.publisher import publish_job
from workers.results import read_dead_letters, read_results
from workers.retry import Backoff, IntakeLimit
from workers.serve_app import APP_NAME, ServeInspector, app_builder, build_app, deploy

SERVE_YAML = Path(__file__).parents[1] / "deploy" / "serve.yaml"


# ---- configuration --------------------------------------------------------------------------------
def test_serving_limits_and_autoscaling_come_from_the_environment() -> None:
    assert Settings.from_env({}).serving == ServingConfig()
    assert Settings.from_env({}).serving.scorer_autoscaling_config() is None
    serving = Settings.from_env(
        {
            "ANOMAP_SCORER_MIN_REPLICAS": "2",
            "ANOMAP_SCORER_MAX_REPLICAS": "6",
            "ANOMAP_SCORER_TARGET_ONGOING": "4",
            "ANOMAP_SCORER_MAX_ONGOING": "12",
            "ANOMAP_SCORER_MAX_QUEUED": "100",
            "ANOMAP_INGRESS_MAX_ONGOING": "3",
            "ANOMAP_INGRESS_MAX_QUEUED": "-1",
            "ANOMAP_INGRESS_REPLICAS": "3",
        }
    ).serving
    assert serving.autoscaling
    assert serving.scorer_autoscaling_config() == {"min_replicas": 2, "max_replicas": 6, "target_ongoing_requests": 4}
    assert (serving.scorer_max_ongoing, serving.scorer_max_queued) == (12, 100)
    assert (serving.ingress_replicas, serving.ingress_max_ongoing, serving.ingress_max_queued) == (3, 3, -1)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ANOMAP_SCORER_MAX_QUEUED": "0"}, r"scorer_max_queued \(ANOMAP_SCORER_MAX_QUEUED\) must be -1 \(no limit\)"),
        ({"ANOMAP_INGRESS_MAX_QUEUED": "-5"}, r"ANOMAP_INGRESS_MAX_QUEUED\) must be -1 \(no limit\) or >= 1, got -5"),
        ({"ANOMAP_INGRESS_MAX_ONGOING": "0"}, r"ANOMAP_INGRESS_MAX_ONGOING\) must be >= 1, got 0"),
        ({"ANOMAP_INGRESS_REPLICAS": "0"}, r"ingress_replicas \(ANOMAP_INGRESS_REPLICAS\) must be >= 1, got 0"),
        ({"ANOMAP_SCORER_REPLICAS": "0"}, r"ANOMAP_SCORER_REPLICAS\) must be >= 1"),
        ({"ANOMAP_SCORER_TARGET_ONGOING": "0"}, r"ANOMAP_SCORER_TARGET_ONGOING\) must be > 0"),
        (
            {"ANOMAP_SCORER_MIN_REPLICAS": "4", "ANOMAP_SCORER_MAX_REPLICAS": "2"},
            r"ANOMAP_SCORER_MAX_REPLICAS\) = 2 must be >= scorer_min_replicas \(ANOMAP_SCORER_MIN_REPLICAS\) = 4",
        ),
        ({"ANOMAP_SCORER_MAX_ONGOING": "many"}, r"serving.scorer_max_ongoing"),
    ],
)
def test_bad_serving_values_are_rejected_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


def test_the_app_graph_carries_the_configured_limits_and_autoscaling() -> None:
    env = {"ANOMAP_SCORER_MAX_REPLICAS": "4", "ANOMAP_SCORER_MAX_QUEUED": "50", "ANOMAP_INGRESS_MAX_QUEUED": "7"}
    ingress = build_app(Settings.from_env(env), "v1")._bound_deployment  # Ray 2.60 internals: what serve.run gets
    scorer = ingress.init_args[0]._bound_deployment
    assert (ingress.max_ongoing_requests, ingress.max_queued_requests, ingress.num_replicas) == (16, 7, 1)
    assert (scorer.max_ongoing_requests, scorer.max_queued_requests) == (32, 50)
    autoscaling = scorer._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas, autoscaling.target_ongoing_requests) == (1, 4, 8)
    fixed = build_app(Settings.from_env(env), "v1", scorer_replicas=3)._bound_deployment.init_args[0]._bound_deployment
    assert fixed.num_replicas == 3 and fixed._deployment_config.autoscaling_config is None
    wide = build_app(Settings.from_env({"ANOMAP_INGRESS_REPLICAS": "4"}), "v1")._bound_deployment
    assert wide.num_replicas == 4


@pytest.mark.parametrize(
    ("gpus", "chunk", "forward"),
    [(0.0, CHUNK_PATCHES, CPU_FORWARD_PATCHES), (0.5, GPU_CHUNK_PATCHES, GPU_FORWARD_PATCHES)],
)
def test_request_and_forward_sizes_follow_the_scorers_device(gpus: float, chunk: int, forward: int) -> None:
    ingress = build_app(Settings.from_env({}), "v1", scorer_gpus=gpus)._bound_deployment
    scorer = ingress.init_args[0]._bound_deployment
    assert ingress.init_args[3:5] == (chunk, forward)  # (scorer, settings, version, chunk, forward)
    assert scorer.init_kwargs["forward_patches"] == forward
    assert scorer.ray_actor_options.get("num_gpus", 0.0) == gpus
    explicit = build_app(Settings.from_env({}), "v1", scorer_gpus=gpus, chunk_patches=64, forward_patches=32)
    assert explicit._bound_deployment.init_args[3:5] == (64, 32)
    for bad in (0, MAX_BATCH_PATCHES + 1):
        with pytest.raises(ValueError, match=rf"chunk_patches must be in 1\.\.{MAX_BATCH_PATCHES}.*got {bad}"):
            build_app(Settings.from_env({}), "v1", scorer_gpus=gpus, chunk_patches=bad)


def test_serve_yaml_args_are_valid_serving_options_and_unknown_ones_are_refused() -> None:
    args = dict(yaml.safe_load(SERVE_YAML.read_text())["applications"][0]["args"])
    assert ServingConfig().updated(args).scorer_replicas == 2  # strings are parsed, as Serve passes them
    with pytest.raises(ValueError, match=r"unknown serving option\(s\) \['scorer_max_queue'\]"):
        ServingConfig().updated({"scorer_max_queue": "1"})
    with pytest.raises(ValueError, match=r"unknown app_builder args \['replicas'\]"):
        app_builder({"replicas": "2"})  # refused before any server is contacted


def test_consumer_backoff_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="backoff_jitter must be in"):
        ConsumerConfig(consumer="c", backoff_jitter=1.5)
    with pytest.raises(ValueError, match="busy_backoff_max_s"):
        ConsumerConfig(consumer="c", backoff_initial_s=2.0, busy_backoff_max_s=1.0)
    with pytest.raises(ValueError, match="jitter must be in"):
        Backoff(0.1, 1.0, jitter=-0.1)


def test_jittered_backoff_stays_within_its_bounds_and_is_capped() -> None:
    backoff = Backoff(0.1, 1.0, jitter=0.5, rng=random.Random(0))
    nominal = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    delays = [backoff.next_delay() for _ in nominal]
    assert all(d / 2 <= delay <= d for delay, d in zip(delays, nominal, strict=True))
    assert len(set(delays)) == len(delays)  # spread, not in step
    assert [Backoff(0.1, 1.0).next_delay() for _ in range(2)] == [0.1, 0.1]  # no jitter: exact


def test_serve_refusals_here_or_inside_the_app_become_scoring_busy() -> None:
    refusal = BackPressureError(num_queued_requests=1, max_queued_requests=1)
    inside = RayTaskError("inspect", "Traceback ...", refusal)  # the ingress's call to the scorers refused
    assert is_backpressure(refusal) and is_backpressure(inside) and is_backpressure(inside.as_instanceof_cause())
    assert not is_backpressure(RayTaskError("inspect", "Traceback ...", RuntimeError("replica died")))

    class RefusingHandle:  # a DeploymentHandle whose call Serve refuses
        class inspect:  # noqa: N801 - mirrors handle.inspect.remote(...).result(...)
            @staticmethod
            def remote(*_: object) -> RefusingHandle.inspect:
                return RefusingHandle.inspect()

            def result(self, timeout_s: float) -> ScoredImage:
                raise inside

    with pytest.raises(ScoringBusy, match="backpressure"):
        ServeInspector(RefusingHandle())(np.zeros((8, 8), np.float32))  # type: ignore[arg-type]


def test_intake_limit_halves_on_refusal_and_grows_back_by_one() -> None:
    limit = IntakeLimit(maximum=5)
    limit.refused()
    assert limit.current == 2
    limit.refused()
    limit.refused()
    assert limit.current == 1
    for _ in range(10):
        limit.accepted()
    assert limit.current == 5
    with pytest.raises(ValueError, match="maximum must be >= 1"):
        IntakeLimit(0)


# ---- a consumer whose job is refused ---------------------------------------------------------------
class RefusingInspector:
    """Scores in this process, but refuses ``busy_image`` as a full Serve queue does: until ``others``
    other jobs have results, then ``extra`` more times.

    At each refusal it records how many entries the consumer group has read so far (``entries-read``
    of XINFO GROUPS: results + pending would race with a job finishing in between) and its intake limit.
    """

    def __init__(
        self, inner: LocalInspector, busy_image: np.ndarray, others: int, client: redis.Redis, names: StreamNames
    ) -> None:
        self.inner = inner
        self.busy_image = busy_image
        self.others = others
        self.extra = 2
        self.client = client
        self.names = names
        self.consumer: StreamConsumer | None = None
        self.refusals: list[tuple[int, int, int]] = []  # (results then, entries read, intake limit)
        self.deadline = time.monotonic() + 30

    def __call__(self, image: np.ndarray, pixel_threshold: float | None = None, line: str = "default") -> ScoredImage:
        assert self.consumer is not None
        if np.array_equal(image, self.busy_image) and time.monotonic() < self.deadline:
            results = int(self.client.xlen(self.names.results()))
            if results < self.others or self.extra > 0:
                if results >= self.others:
                    self.extra -= 1
                groups = self.client.xinfo_groups(self.names.jobs())  # entries-read: delivered to the group so far
                read = next(int(g["entries-read"]) for g in groups if g["name"] == self.names.scorer_group.encode())
                self.refusals.append((results, read, self.consumer.intake.current))
                msg = "Request dropped due to backpressure (num_queued_requests=1, max_queued_requests=1)."
                raise ScoringBusy(msg)
        return self.inner(image, pixel_threshold)


def _local_inspector() -> LocalInspector:
    calibration = [synth_image(seed, 96)[0] for seed in range(2)]
    card, state = untrained_model(SMALL_CONFIG, calibration, "metal")
    return LocalInspector(PatchModel.from_state(card, state, device="cpu"))


def test_refused_job_is_kept_and_sent_again_and_nothing_new_is_read_meanwhile(
    redis_client: redis.Redis, object_store: ObjectStore
) -> None:
    names = StreamNames(f"bp{uuid.uuid4().hex[:6]}")
    busy_png = small_png(7)
    inspector = RefusingInspector(_local_inspector(), decode_image(busy_png), 3, redis_client, names)
    config = ConsumerConfig(consumer="bp", max_in_flight=4, block_ms=50, backoff_initial_s=0.01, busy_backoff_max_s=0.1)
    consumer = StreamConsumer(redis_client, object_store, inspector, names, config)
    inspector.consumer = consumer
    consumer.ensure_groups()
    job_ids = [f"cam01-bp{i:02d}" for i in range(6)]
    for i, job_id in enumerate(job_ids):  # all published first: the first read takes 4 of them
        publish_job(redis_client, names, InspectionJob(job_id=job_id), image=busy_png if i == 0 else small_png(i))
    stop = threading.Event()
    thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while redis_client.xlen(names.results()) < len(job_ids) and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    thread.join(timeout=60)
    assert not thread.is_alive()

    # the refused job waited while the 3 others read with it finished, and nothing new was read meanwhile
    assert max(results for results, _, _ in inspector.refusals) == 3
    assert {read for _, read, _ in inspector.refusals} == {4}, "read new entries while a job waited for capacity"
    assert consumer.stats.backpressure == len(inspector.refusals)
    assert inspector.refusals[-1][2] == 1  # the intake limit shrank to one job
    results = [result.job_id for _, result in read_results(redis_client, names)]
    assert sorted(results) == job_ids  # each exactly once
    assert list(read_dead_letters(redis_client, names)) == []
    assert consumer.stats.outcomes[Outcome.RESULT] == len(job_ids)
    assert consumer.stats.outcomes[Outcome.RETRY] == 0
    assert redis_client.xpending(names.jobs(), names.scorer_group)["pending"] == 0


# ---- the real Serve app at its limits -------------------------------------------------------------
TIGHT = ServingConfig(
    scorer_replicas=1,
    scorer_max_ongoing=1,
    scorer_max_queued=1,
    ingress_max_ongoing=1,
    ingress_max_queued=1,
)


@pytest.fixture(scope="module")
def tight_service(stack_settings: Settings, ray_cluster: str) -> Iterator[Settings]:
    from ray import serve

    settings = stack_settings.model_copy(update={"bucket": f"bp-{uuid.uuid4().hex[:8]}", "serving": TIGHT})
    store = open_object_store(settings)
    card = register_small_model(store, settings.model_name)
    deploy(settings, card.version, chunk_patches=64)  # a 128² image is 81 patches: 2 chunks, sent together
    yield settings
    serve.delete(APP_NAME)


@pytest.mark.ray
def test_burst_over_a_one_request_serve_queue_ends_with_one_result_per_job(
    tight_service: Settings, redis_client: redis.Redis
) -> None:
    settings = tight_service
    names = StreamNames(settings.stream_prefix)
    images = [small_png(seed) for seed in range(3)]
    job_ids = [f"cam02-burst{i:03d}" for i in range(20)]
    stop = threading.Event()
    consumers: list[StreamConsumer] = []
    threads: list[threading.Thread] = []
    clients: list[redis.Redis] = []
    for i in range(3):
        client = open_redis_client(settings)
        config = ConsumerConfig(
            consumer=f"burst{i}", max_in_flight=3, block_ms=50, backoff_initial_s=0.02, busy_backoff_max_s=0.2
        )
        consumer = StreamConsumer(
            client, ObjectStore.from_settings(settings), ServeInspector.connect(timeout_s=60), names, config
        )
        consumer.ensure_groups()
        consumers.append(consumer)
        clients.append(client)
    for i, job_id in enumerate(job_ids):
        publish_job(redis_client, names, InspectionJob(job_id=job_id, camera_id="cam02"), image=images[i % 3])
    for consumer in consumers:
        thread = threading.Thread(target=consumer.run, args=(stop,), daemon=True)
        thread.start()
        threads.append(thread)
    try:
        deadline = time.monotonic() + 120
        while redis_client.xlen(names.results()) + redis_client.xlen(names.dead) < len(job_ids):
            assert time.monotonic() < deadline, f"only {redis_client.xlen(names.results())} results after 120 s"
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        for client in clients:
            client.close()
    assert not any(thread.is_alive() for thread in threads)

    results = Counter(result.job_id for _, result in read_results(redis_client, names))
    assert results == Counter(job_ids)  # every job exactly once
    assert list(read_dead_letters(redis_client, names)) == []
    assert redis_client.xpending(names.jobs(), names.scorer_group)["pending"] == 0
    assert sum(c.stats.backpressure for c in consumers) > 0, "Serve never pushed back: the limits did not apply"
    assert sum(c.stats.outcomes[Outcome.RESULT] for c in consumers) == len(job_ids)
    assert sum(c.stats.outcomes[Outcome.RETRY] for c in consumers) == 0
