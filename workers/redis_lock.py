"""A Redis lock held by one process at a time, renewed while held, released only by its holder.

    lock = RenewedLock(client, "anomap:filing:default:cam01-7", ttl_ms=30_000)
    if lock.acquire(wait_s=30):          # SET NX PX with a random token, polled until ``wait_s`` passed
        try: ...                         # a thread pushes the expiry back every third of the ttl
        finally: lock.release()          # stop renewing; compare-and-delete (a no-op if another holds it now)

The ttl only bounds how long a crashed holder blocks the others; a live holder keeps the lock however long
it works. ``lost`` is set when a renewal finds the lock gone (it expired while Redis was away, and another
process may hold it now).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import redis

log = logging.getLogger(__name__)

RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
POLL_S = 0.05
"""How often a waiting `RenewedLock.acquire` asks again."""


class RenewedLock:
    """``SET NX PX`` on ``key`` with a random token, renewed every third of ``ttl_ms`` while held."""

    def __init__(self, client: redis.Redis, key: str, ttl_ms: int) -> None:
        if ttl_ms < 3:
            msg = f"a lock's ttl must be >= 3 ms, got {ttl_ms}"
            raise ValueError(msg)
        self.client = client
        self.key = key
        self.ttl_ms = ttl_ms
        self.token = uuid.uuid4().hex
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self, wait_s: float = 0.0) -> bool:
        """Take the lock, waiting up to ``wait_s`` for its holder to let go, and start renewing it; False when
        another holder kept it that long."""
        deadline = time.monotonic() + wait_s
        while not self.client.set(self.key, self.token, nx=True, px=self.ttl_ms):
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)
        self.lost.clear()
        self._stop.clear()
        self._renewer = threading.Thread(target=self._renew, name=f"renew {self.key}", daemon=True)
        self._renewer.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            try:
                if not self.client.eval(RENEW, 1, self.key, self.token, self.ttl_ms):
                    log.warning("lost %s (it expired, and another holder may have it now)", self.key)
                    self.lost.set()
                    return
            except redis.RedisError as exc:  # Redis away for a moment: the next renewal tries again
                log.warning("could not renew %s: %r", self.key, exc)

    def held(self) -> bool:
        """Whether this holder has the lock right now (asked of Redis, not only of the last renewal)."""
        return not self.lost.is_set() and self.client.get(self.key) == self.token.encode()

    def release(self) -> None:
        """Stop renewing and give the lock back (a no-op when it expired and someone else took it)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        self.client.eval(RELEASE, 1, self.key, self.token)
