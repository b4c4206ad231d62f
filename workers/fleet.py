"""A simulated camera fleet: each camera publishes its next image when its previous one is answered.

This closed loop keeps exactly one job per camera in flight, as a camera that waits for the part
under it to be judged would, so the measured latency is the service's own, not a queue's.

    fleet = CameraFleet(client, names, store, line="demo")
    outcome = fleet.run(jobs_by_camera, timeout_s=600, on_answer=print)
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import redis

from schemas import DeadLetter, InspectionJob, InspectionResult, StreamNames
from trainer.store import ObjectStore
from workers.publisher import publish_by_reference, publish_job
from workers.results import read_answer


@dataclass(frozen=True)
class CameraJob:
    """One image a camera will send; ``by_reference`` uploads it first and sends an ``s3://`` ref."""

    job: InspectionJob
    image: bytes
    by_reference: bool = False


@dataclass
class FleetOutcome:
    """Everything the fleet saw: results and dead letters by job id, and the wall-clock span."""

    published: int = 0
    results: dict[str, InspectionResult] = field(default_factory=dict)
    dead: dict[str, DeadLetter] = field(default_factory=dict)
    started: float = 0.0
    finished: float = 0.0

    @property
    def answered(self) -> int:
        """Jobs that got a result or a dead letter."""
        return len(self.results) + len(self.dead)

    @property
    def images_per_s(self) -> float:
        """Results per second of wall-clock time from the first publish to the last answer."""
        span = self.finished - self.started
        return len(self.results) / span if span > 0 else 0.0


def _last_id(client: redis.Redis, stream: str) -> str:
    newest = client.xrevrange(stream, count=1)
    return newest[0][0].decode() if newest else "0-0"


class CameraFleet:
    """Publishes jobs for several cameras on one line and waits for every answer."""

    def __init__(self, client: redis.Redis, names: StreamNames, store: ObjectStore, line: str) -> None:
        self.client = client
        self.names = names
        self.store = store
        self.line = line

    def _send(self, item: CameraJob, outcome: FleetOutcome) -> None:
        if item.by_reference:
            publish_by_reference(self.client, self.names, self.store, item.job, item.image)
        else:
            publish_job(self.client, self.names, item.job, image=item.image)
        outcome.published += 1

    def run(
        self,
        jobs_by_camera: dict[str, list[CameraJob]],
        timeout_s: float = 600.0,
        on_answer: Callable[[FleetOutcome], None] | None = None,
    ) -> FleetOutcome:
        """Send every camera's jobs, one in flight per camera, until all are answered or time is up."""
        queues = {camera: deque(items) for camera, items in jobs_by_camera.items()}
        camera_of = {item.job.job_id: camera for camera, items in jobs_by_camera.items() for item in items}
        total = len(camera_of)
        results_stream, dead_stream = self.names.results(self.line), self.names.dead
        cursors = {stream: _last_id(self.client, stream) for stream in (results_stream, dead_stream)}
        outcome = FleetOutcome(started=time.monotonic())
        for queue in queues.values():
            if queue:
                self._send(queue.popleft(), outcome)
        deadline = outcome.started + timeout_s
        while outcome.answered < total and time.monotonic() < deadline:
            reply = self.client.xread(cursors, block=1000, count=100)
            for stream, items in reply or []:
                name = stream.decode()
                for entry_id, fields in items:
                    cursors[name] = entry_id.decode()
                    job_id = self._record(name, fields, outcome, camera_of)
                    if job_id is not None and queues[camera_of[job_id]]:
                        self._send(queues[camera_of[job_id]].popleft(), outcome)
            if on_answer is not None:
                on_answer(outcome)
        outcome.finished = time.monotonic()
        return outcome

    def _record(
        self, stream: str, fields: dict[bytes, bytes], outcome: FleetOutcome, camera_of: dict[str, str]
    ) -> str | None:
        try:
            answer = read_answer(stream == self.names.dead, fields)
        except ValueError:  # another writer's entry (another version's, say): not one of ours
            return None
        if isinstance(answer, DeadLetter):
            letter = answer
            if letter.job_id in camera_of and letter.job_id not in outcome.dead:
                outcome.dead[letter.job_id] = letter
                return letter.job_id
            return None
        result = answer
        if result.job_id in camera_of and result.job_id not in outcome.results:
            outcome.results[result.job_id] = result
            return result.job_id
        return None
