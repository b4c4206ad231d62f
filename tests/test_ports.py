"""Free ports: also where the kernel's ephemeral range starts too low to leave room below it."""

from __future__ import annotations

import pytest

import cluster.ports as ports
from cluster.ports import GRPC_OFFSET, free_port, free_port_pair, free_port_pairs, free_ports, port_is_free


@pytest.mark.parametrize("ephemeral_low", [1024, 10000, 21000, 32768, 65535])
def test_free_ports_and_pairs_are_found_wherever_the_ephemeral_range_starts(
    ephemeral_low: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1024: no room at all below it (was ``empty range for randrange()``); 10000: room for single ports
    but none for a pair P, P + 10000 (was a RuntimeError)."""
    monkeypatch.setattr(ports, "_ephemeral_low", lambda: ephemeral_low)
    singles = free_ports(3)
    assert len(set(singles)) == 3 and all(port_is_free(port) for port in singles)
    assert port_is_free(free_port(exclude=singles))
    pairs = free_port_pairs(3)
    every = [*pairs, *(port + GRPC_OFFSET for port in pairs)]
    assert len(set(every)) == 6 and all(0 < port < 65536 and port_is_free(port) for port in every)
    pair = free_port_pair(exclude=every)
    assert pair not in every and pair + GRPC_OFFSET not in every


def test_ports_stay_below_the_ephemeral_range_when_there_is_room(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ports, "_ephemeral_low", lambda: 32768)
    assert all(20000 <= port < 32768 for port in free_ports(5))
    assert all(20000 <= port < 32768 - GRPC_OFFSET for port in free_port_pairs(3))
