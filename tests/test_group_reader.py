"""`GroupReader` against a real Valkey: forgetting dead group members without losing an entry."""

from __future__ import annotations

import time

import pytest
import redis

from schemas import StreamNames
from workers.consumer import ConsumerConfig
from workers.group_reader import GroupReader

NAMES = StreamNames("grtest")


def _reader(client: redis.Redis, name: str) -> GroupReader:
    reader = GroupReader(client, NAMES, name, [NAMES.jobs()], claim_idle_ms=60_000)
    reader.ensure_groups()
    return reader


def _members(client: redis.Redis) -> dict[str, int]:
    return {info["name"].decode(): int(info["pending"]) for info in client.xinfo_consumers(NAMES.jobs(), "scorers")}


def test_idle_consumers_holding_nothing_are_forgotten_and_those_holding_entries_are_kept(
    redis_client: redis.Redis,
) -> None:
    live, crashed_empty, crashed_holding = (_reader(redis_client, n) for n in ("live", "dead-empty", "dead-holding"))
    redis_client.xadd(NAMES.jobs(), {b"job": b"1"})
    assert len(crashed_holding.read_new(1, 10, set())) == 1  # it read an entry and then "crashed"
    crashed_empty.read_new(1, 10, set())  # it read nothing and then "crashed"
    time.sleep(0.3)
    live.read_new(1, 10, set())  # the live one keeps reading (resets its idle time)
    assert _members(redis_client) == {"live": 0, "dead-empty": 0, "dead-holding": 1}

    assert live.forget_dead(idle_ms=200) == ["dead-empty"]
    assert _members(redis_client) == {"live": 0, "dead-holding": 1}, "an entry's holder is never deleted"
    assert live.forget_dead(idle_ms=60_000) == []

    crashed_empty.read_new(1, 10, set())  # a forgotten consumer that comes back is simply recreated
    assert "dead-empty" in _members(redis_client)


def test_forget_idle_ms_is_validated() -> None:
    with pytest.raises(ValueError, match="forget_idle_ms must be >= 0"):
        ConsumerConfig(consumer="c", forget_idle_ms=-1)
    assert ConsumerConfig(consumer="c", forget_idle_ms=0).forget_idle_ms == 0
