"""`RenewedLock` on real Valkey: one holder at a time, renewed past its ttl while held, released only by its
holder, waited for, and ``lost`` when it was taken away."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from workers.redis_lock import RenewedLock


@pytest.fixture
def key() -> str:
    return f"locktest:{uuid.uuid4().hex[:8]}"


def test_a_held_lock_outlives_its_ttl_and_is_released_by_its_holder_only(redis_client: redis.Redis, key: str) -> None:
    lock = RenewedLock(redis_client, key, ttl_ms=600)
    assert lock.acquire()
    try:
        time.sleep(1.5)  # 2.5 ttls
        assert redis_client.get(key) == lock.token.encode()
        assert not RenewedLock(redis_client, key, ttl_ms=600).acquire()
        RenewedLock(redis_client, key, ttl_ms=600).release()  # not its holder: a no-op
        assert redis_client.get(key) == lock.token.encode()
    finally:
        lock.release()
    assert not redis_client.exists(key)
    assert not lock.lost.is_set()


def test_a_waiting_acquire_gets_the_lock_when_its_holder_lets_go(redis_client: redis.Redis, key: str) -> None:
    holder = RenewedLock(redis_client, key, ttl_ms=5_000)
    assert holder.acquire()
    threading.Timer(0.3, holder.release).start()
    waiter = RenewedLock(redis_client, key, ttl_ms=5_000)
    assert waiter.acquire(wait_s=10)
    assert redis_client.get(key) == waiter.token.encode()
    waiter.release()


def test_a_crashed_holders_lock_expires_and_a_taken_one_is_reported_lost(redis_client: redis.Redis, key: str) -> None:
    redis_client.set(key, "crashed", px=300)  # a holder that died without releasing
    lock = RenewedLock(redis_client, key, ttl_ms=300)
    assert lock.acquire(wait_s=5)
    redis_client.set(key, "someone else")  # taken away (it expired while Redis was away, say)
    assert lock.lost.wait(2)
    lock.release()
    assert redis_client.get(key) == b"someone else"
    with pytest.raises(ValueError, match="ttl must be >= 3 ms"):
        RenewedLock(redis_client, key, ttl_ms=1)
