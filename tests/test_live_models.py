"""`LiveVersions`: the per-line live-version cache the Serve ingress resolves each image's model with."""

from __future__ import annotations

import asyncio

import pytest

from workers.live_models import LiveVersions


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
