"""Free TCP ports on the loopback interface, for servers the embedded stack starts.

Ports are drawn at random below the kernel's ephemeral range (so that outgoing connections never
take them between the check and the server's ``bind``) and checked by binding them; where that range
starts too low to leave room below it, the kernel assigns them (bind to port 0). SeaweedFS opens
a gRPC port at HTTP port + 10000 for every HTTP port, so it needs pairs:

    >>> port = free_port()                   # e.g. 24117
    >>> http = free_port_pair()              # e.g. 21533: 21533 and 31533 are both free
    >>> a, b = free_port_pairs(2)            # two pairs, all four ports distinct

A port found free can still be taken by another process before the server binds it; callers that
start servers retry with fresh ports when a server fails to start.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Iterable
from pathlib import Path

GRPC_OFFSET = 10000
"""SeaweedFS listens for gRPC at the HTTP port plus this offset."""

_LOWEST = 20000
_ATTEMPTS = 500
_MIN_ROOM = 1000
"""Fewer free-to-draw ports than this below the ephemeral range: let the kernel assign them instead."""
_rng = random.SystemRandom()


def _ephemeral_low() -> int:
    """First port of the kernel's ephemeral range (32768 when it cannot be read)."""
    try:
        low, _high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low)
    except (OSError, ValueError):
        return 32768


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether ``host:port`` can be bound now (TCP; without SO_REUSEADDR, so strictly free)."""
    if not 0 < port < 65536:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _os_assigned_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _room_below_ephemeral(offset: int = 0) -> tuple[int, int] | None:
    """``(low, high)``: where to draw P from so that P + ``offset`` stays below the ephemeral range; None
    when the range starts too low to leave ``_MIN_ROOM`` ports there."""
    high = min(_ephemeral_low(), 65536) - offset
    low = _LOWEST if high - _LOWEST > _MIN_ROOM else 1024
    return (low, high) if high - low >= _MIN_ROOM else None


def free_port(host: str = "127.0.0.1", exclude: Iterable[int] = ()) -> int:
    """A TCP port on ``host`` that is free now and not in ``exclude``.

    Drawn below the ephemeral range when there is room there, else assigned by the kernel (bind to port 0).
    """
    taken = set(exclude)
    room = _room_below_ephemeral()
    if room is not None:
        for _ in range(_ATTEMPTS):
            port = _rng.randrange(*room)
            if port not in taken and port_is_free(port, host):
                return port
    for _ in range(_ATTEMPTS):
        port = _os_assigned_port(host)
        if port not in taken:
            return port
    msg = f"no free TCP port found on {host} (tried up to {2 * _ATTEMPTS} candidates)"
    raise RuntimeError(msg)


def _pair_is_free(port: int, offset: int, host: str, taken: set[int]) -> bool:
    if port in taken or port + offset in taken:
        return False
    return port_is_free(port, host) and port_is_free(port + offset, host)


def free_port_pair(host: str = "127.0.0.1", offset: int = GRPC_OFFSET, exclude: Iterable[int] = ()) -> int:
    """A port P such that P and P + ``offset`` are both free on ``host`` (and not in ``exclude``).

    Drawn so that both lie below the ephemeral range when there is room there, else from all of
    1024 .. 65535 - ``offset`` (a kernel-assigned P, then random ones).
    """
    taken = set(exclude)
    room = _room_below_ephemeral(offset)
    if room is not None:
        for _ in range(_ATTEMPTS):
            port = _rng.randrange(*room)
            if _pair_is_free(port, offset, host, taken):
                return port
    highest = 65535 - offset
    if highest >= 1024:
        for _ in range(_ATTEMPTS):
            port = _os_assigned_port(host)
            if port > highest:
                port = _rng.randrange(1024, highest + 1)
            if _pair_is_free(port, offset, host, taken):
                return port
    msg = f"no free port pair (P, P+{offset}) found on {host} after {2 * _ATTEMPTS} tries"
    raise RuntimeError(msg)


def free_ports(count: int, host: str = "127.0.0.1", exclude: Iterable[int] = ()) -> list[int]:
    """``count`` distinct free ports."""
    taken = set(exclude)
    ports: list[int] = []
    for _ in range(count):
        port = free_port(host, exclude=taken)
        taken.add(port)
        ports.append(port)
    return ports


def free_port_pairs(
    count: int, host: str = "127.0.0.1", offset: int = GRPC_OFFSET, exclude: Iterable[int] = ()
) -> list[int]:
    """``count`` ports P, each with P + ``offset`` free too; all 2 × ``count`` ports distinct."""
    taken = set(exclude)
    ports: list[int] = []
    for _ in range(count):
        port = free_port_pair(host, offset, exclude=taken)
        taken.update((port, port + offset))
        ports.append(port)
    return ports
