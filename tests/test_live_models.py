"""`LiveVersions`: the per-line live-version cache the Serve ingress resolves each image's model with."""

from __future__ import annotations

import asyncio

import pytest

from workers.live_models import DEFAULT_MAX_LINES, LiveVersions


class Pointers:
    """A registry's live pointers, with a clock the test moves and a switch to make reads fail."""

    def __init__(self) -> None:
        self.live = {"default": "v1"}
        self.reads = 0
        self.now = 0.0
        self.broken = False

    def resolve(self, line: str) -> str:
        self.reads += 1
        if self.broken:
            raise ConnectionError("object store unreachable")
        return self.live.get(line, self.live["default"])


def test_a_line_is_read_at_most_once_per_refresh_period_and_follows_promotions() -> None:
    pointers, changes = Pointers(), []
    live = LiveVersions(pointers.resolve, 2.0, clock=lambda: pointers.now, on_change=lambda *c: changes.append(c))

    async def scenario() -> list[str]:
        seen = [await live.version("default"), await live.version("default")]
        pointers.live["default"] = "v2"
        pointers.now = 1.9
        seen.append(await live.version("default"))  # still within refresh_s: the cached one
        pointers.now = 2.1
        seen.append(await live.version("default"))
        seen.append(await live.version("press-2"))  # no pointer of its own: the default one
        return seen

    assert asyncio.run(scenario()) == ["v1", "v1", "v1", "v2", "v2"]
    assert pointers.reads == 3 and changes == [("default", "v1", "v2")]
    assert live.versions() == {"v2"}


def test_an_unreachable_store_keeps_the_last_version_and_a_new_line_gets_the_error() -> None:
    pointers = Pointers()
    live = LiveVersions(pointers.resolve, 2.0, clock=lambda: pointers.now)

    async def scenario() -> None:
        assert await live.version("default") == "v1"
        pointers.broken, pointers.now = True, 5.0
        assert await live.version("default") == "v1"  # served on, not failed
        reads = pointers.reads
        assert await live.version("default") == "v1" and pointers.reads == reads  # not retried on every image
        with pytest.raises(ConnectionError):
            await live.version("press-2")

    asyncio.run(scenario())


def test_concurrent_images_share_one_read() -> None:
    pointers = Pointers()
    live = LiveVersions(pointers.resolve, 2.0, clock=lambda: pointers.now)

    async def scenario() -> list[str]:
        return await asyncio.gather(*(live.version("default") for _ in range(20)))

    assert asyncio.run(scenario()) == ["v1"] * 20 and pointers.reads == 1


def test_refresh_period_is_validated() -> None:
    with pytest.raises(ValueError, match="refresh_s must be >= 0"):
        LiveVersions(Pointers().resolve, -1.0)


def test_the_least_recently_used_line_is_forgotten_beyond_max_lines() -> None:
    pointers = Pointers()
    live = LiveVersions(pointers.resolve, 2.0, clock=lambda: pointers.now, max_lines=2)

    async def reads_for(*lines: str) -> int:
        before = pointers.reads
        for line in lines:
            assert await live.version(line) == "v1"
        return pointers.reads - before

    async def scenario() -> None:
        assert await reads_for("a", "b") == 2
        assert await reads_for("a") == 0  # cached, and now the most recently used
        assert await reads_for("c") == 1  # pushes out b, the least recently used
        assert len(live) == 2
        assert await reads_for("a", "c") == 0
        assert await reads_for("b") == 1  # forgotten: read again (within refresh_s)

    asyncio.run(scenario())


def test_made_up_line_names_do_not_grow_the_cache_without_bound() -> None:
    pointers = Pointers()
    live = LiveVersions(pointers.resolve, 2.0, clock=lambda: pointers.now)

    async def scenario() -> None:
        for i in range(DEFAULT_MAX_LINES + 100):
            await live.version(f"line-{i}")
        pointers.broken = True  # a line not resolved since it was forgotten now gets the error
        with pytest.raises(ConnectionError):
            await live.version("line-0")
        assert await live.version(f"line-{DEFAULT_MAX_LINES + 99}") == "v1"

    asyncio.run(scenario())
    assert len(live) == DEFAULT_MAX_LINES and pointers.reads == DEFAULT_MAX_LINES + 101


def test_a_line_being_refreshed_is_not_forgotten() -> None:
    pointers = Pointers()
    live = LiveVersions(pointers.resolve, 2.0, clock=lambda: pointers.now, max_lines=1)

    async def scenario() -> list[str]:  # b arrives while a is being read; the second a waits for that read
        return await asyncio.gather(*(live.version(line) for line in ("a", "b", "a")))

    assert asyncio.run(scenario()) == ["v1"] * 3
    assert pointers.reads == 2  # had b pushed out a mid-read, the second a would have read it again


def test_max_lines_is_validated() -> None:
    with pytest.raises(ValueError, match="max_lines must be >= 1"):
        LiveVersions(Pointers().resolve, max_lines=0)
