"""The retraining run's locks, with real Valkey and SeaweedFS: one run per line (`LineLock`: renewed while
held, decided again once held, a lost one stops the promotion), and the model's pointer lock, which makes
a run's "is my parent still live?" check and its promotion one step against an operator's promotion."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from retrain_helpers import (
    LINE,
    NAMES,
    PARENT_CONFIG,
    confirm_squares,
    retrain_run,
)

from schemas import ModelCard, ModelEvent, ModelEventKind
from schemas.model_card import RetrainDecision, RetrainRecord
from trainer.pipeline import initial_model_version
from trainer.registry import ModelRegistry
from workers import retrain as retrain_module
from workers.model_events import PointersBusy, moving_pointers, pointer_lock_key, promote_model
from workers.redis_lock import RenewedLock
from workers.retrain import RetrainStatus
from workers.retrain_data import list_confirmed, load_validation_set
from workers.retrain_policy import RetrainPolicy, Verdict
from workers.retrain_state import LineLock, RetrainAttempt, record_attempt


def _run_holding_the_line(
    client: redis.Redis, registry: ModelRegistry, tmp_path: Path, parent: ModelCard
) -> tuple[retrain_module._Run, LineLock]:
    """A run of the line's retraining at its judging step (``parent`` its parent), holding the line's lock."""
    lock = LineLock(client, NAMES, LINE)
    assert lock.acquire()
    listing = list_confirmed(registry.store, LINE)
    run = retrain_module._Run(
        client, registry, NAMES, str(tmp_path), LINE, RetrainPolicy(), print, parent, listing, [], "test", lock
    )
    return run, lock


@contextlib.contextmanager
def _pointer_lock_held_while(client: redis.Redis, model: str, waiter: Callable[[], object]) -> Iterator[None]:
    """Hold ``model``'s pointer lock, start ``waiter`` in a thread and give it 0.5 s to reach the lock; on
    leaving the block, let go of the lock and wait for the thread to finish."""
    holder = RenewedLock(client, pointer_lock_key(NAMES, model), 30_000)
    assert holder.acquire()
    thread = threading.Thread(target=waiter)
    try:
        thread.start()
        time.sleep(0.5)
        yield
    finally:
        holder.release()
        if thread.ident is not None:
            thread.join(timeout=60)


def test_a_run_that_finished_while_this_one_waited_for_the_lock_is_not_repeated(
    line_registry: ModelRegistry, redis_client: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another controller finishes the same parent and data between this run's decision and its lock: the
    decision is taken again under the lock, and the run skips instead of fine-tuning the same data twice."""
    parent = line_registry.live_version(LINE)
    confirm_squares(redis_client, line_registry.store, range(30, 33))
    take = LineLock.acquire

    def the_other_run_finished_first(lock: LineLock) -> bool:
        digest = list_confirmed(line_registry.store, LINE).digest()
        attempt = RetrainAttempt(parent=parent, confirmations_digest=digest, candidate="v-other", decision="rejected")
        record_attempt(line_registry, LINE, attempt)
        return take(lock)

    monkeypatch.setattr(LineLock, "acquire", the_other_run_finished_first)
    outcome = retrain_run(redis_client, line_registry, tmp_path, min_confirmations=3)
    assert outcome.status is RetrainStatus.SKIPPED, outcome.lines()
    assert "v-other was rejected" in outcome.reason
    assert line_registry.versions() == [parent]
    assert not redis_client.exists(f"{NAMES.prefix}:retrain:lock:{LINE}")


def test_a_held_line_lock_is_renewed_past_its_ttl_and_released_by_its_holder(redis_client: redis.Redis) -> None:
    lock = LineLock(redis_client, NAMES, "renewed", ttl_s=1)
    assert lock.acquire()
    try:
        time.sleep(2.5)  # more than twice its ttl
        assert redis_client.get(lock.key) == lock.token.encode()
        assert not LineLock(redis_client, NAMES, "renewed").acquire()
    finally:
        lock.release()
    assert not redis_client.exists(lock.key)


def test_a_run_that_lost_the_lines_lock_does_not_promote_its_candidate(
    line_registry: ModelRegistry, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """The lock expired while Redis was away and another run took it: this run's candidate, however good, must
    not go live (the other run may promote its own). Judged at the promotion, not at the next renewal."""
    parent = line_registry.load_card(line_registry.live_version(LINE))
    run, lock = _run_holding_the_line(redis_client, line_registry, tmp_path, parent)
    good = Verdict(promote=True, passed=["every check"], failures=[])
    try:
        assert run._against_live(good) is good
        redis_client.set(lock.key, "another-run's-token")  # expired meanwhile, and taken
        verdict = run._against_live(good)
    finally:
        lock.release()
    assert not verdict.promote and verdict.passed == ["every check"]
    assert f"retraining lock of line {LINE!r} ({lock.key}) was lost during the run" in verdict.summary
    assert redis_client.get(lock.key) == b"another-run's-token", "release leaves the other holder's lock"


def test_an_operators_promotion_waits_for_the_runs_check_and_move_and_the_run_sees_it_when_first(
    line_registry: ModelRegistry, redis_client: redis.Redis, tmp_path: Path
) -> None:
    """The pointers live in the object store, which cannot compare-and-set: the run checks "is my parent still
    live?" and moves the pointer under the model's pointer lock, so an operator's promotion that holds the lock
    first is seen by the run's check (the candidate is rejected), and one that comes second waits for the move."""
    parent = line_registry.load_card(line_registry.live_version(LINE))
    good_images = load_validation_set(line_registry.store, LINE).good
    candidate = initial_model_version(line_registry, PARENT_CONFIG, good_images, data_digest="candidate")
    chosen = initial_model_version(line_registry, PARENT_CONFIG, good_images, data_digest="operator")
    run, lock = _run_holding_the_line(redis_client, line_registry, tmp_path, parent)
    record = RetrainRecord(line=LINE, decision=RetrainDecision.FAILED)
    good = Verdict(promote=True, passed=["every check"], failures=[])
    settled: list[tuple[Verdict, ModelEvent]] = []
    try:  # the operator's promotion is under way when the run settles
        with _pointer_lock_held_while(redis_client, line_registry.name, lambda: settled.append(
            run.settle_under_lock(candidate, record, good)
        )):  # fmt: skip
            assert not settled, "the run waits for the operator's move"
            line_registry.promote(chosen.version, LINE, reason="operator's choice")
    finally:
        lock.release()
    verdict, event = settled[0]
    assert not verdict.promote and f"moved from {parent.version} to {chosen.version}" in verdict.summary
    assert event.event is ModelEventKind.REJECTED and line_registry.live_version(LINE) == chosen.version
    judged = line_registry.load_card(candidate.version).retraining
    assert judged is not None and judged.decision is RetrainDecision.REJECTED

    # second: the operator's move waits for the run's check and move, then moves the pointer on top of it
    run, lock = _run_holding_the_line(redis_client, line_registry, tmp_path, line_registry.load_card(chosen.version))
    try:  # the run holds the pointer lock from its check to its move
        with _pointer_lock_held_while(redis_client, line_registry.name, lambda: promote_model(
            line_registry, redis_client, NAMES, parent.version, LINE, "operator, later"
        )):  # fmt: skip
            assert line_registry.live_version(LINE) == chosen.version, "the operator's promotion waits for the lock"
            verdict = run._against_live(good)
            line_registry.promote(candidate.version, LINE, reason="the run's move")
    finally:
        lock.release()
    assert verdict.promote
    history = [(e.previous, e.version) for e in line_registry.history(LINE)][-2:]
    assert history == [(chosen.version, candidate.version), (candidate.version, parent.version)]


def test_a_pointer_lock_that_stays_taken_runs_nothing_and_says_who_holds_it(
    line_registry: ModelRegistry, redis_client: redis.Redis
) -> None:
    live = line_registry.live_version(LINE)
    holder = RenewedLock(redis_client, pointer_lock_key(NAMES, line_registry.name), 30_000)
    assert holder.acquire()
    try:
        busy = pytest.raises(PointersBusy, match=rf"model metal held its pointer lock \({holder.key}\)")
        with busy, moving_pointers(redis_client, NAMES, line_registry.name, wait_s=0.2):
            pytest.fail("the block runs only with the lock")
        assert line_registry.live_version(LINE) == live
    finally:
        holder.release()
    with moving_pointers(redis_client, NAMES, line_registry.name, wait_s=0.2):
        assert redis_client.exists(holder.key)
    assert not redis_client.exists(holder.key), "released after the block"
