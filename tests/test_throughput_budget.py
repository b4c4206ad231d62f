"""`benchmarks/throughput.py`'s time budget: how many images each phase gets (pure arithmetic)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # a folder of scripts, not a package

from throughput import (
    ROUND_ALLOWANCE_S,
    SERVE_SLOWDOWN,
    TAIL_ALLOWANCE_S,
    images_for_budget,
)


def planned_seconds(n: int, elapsed_s: float, seconds_per_image: float, rounds: int, latency_s: float) -> float:
    """What the run is planned to take with ``n`` images per phase (the model `images_for_budget` inverts)."""
    phases = 3 * rounds + 1
    fixed = elapsed_s + rounds * ROUND_ALLOWANCE_S + 2 * latency_s + TAIL_ALLOWANCE_S
    return fixed + phases * (n + 1) * seconds_per_image / SERVE_SLOWDOWN


@pytest.mark.parametrize("seconds_per_image", [0.3, 0.8, 1.2, 1.5])
def test_the_largest_count_that_fits_is_chosen(seconds_per_image: float) -> None:
    n = images_for_budget(270, 35, seconds_per_image, rounds=3, latency_s=20, most=100, fewest=1)
    assert planned_seconds(n, 35, seconds_per_image, 3, 20) <= 270
    assert planned_seconds(n + 1, 35, seconds_per_image, 3, 20) > 270


def test_a_fast_machine_keeps_every_image() -> None:
    assert images_for_budget(270, 25, 0.1, rounds=3, latency_s=20, most=12, fewest=6) == 12


def test_a_slow_machine_gets_the_fewest_not_fewer() -> None:
    """At 1.8 s per image (the slowest VM measured) 6 images per phase overrun slightly; 6 it is."""
    assert images_for_budget(270, 35, 1.8, rounds=3, latency_s=20, most=12, fewest=6) == 6
    assert images_for_budget(270, 300, 1.8, rounds=3, latency_s=20, most=12, fewest=6) == 6


def test_more_rounds_mean_fewer_images_per_phase() -> None:
    one = images_for_budget(600, 30, 1.0, rounds=1, latency_s=20, most=100, fewest=1)
    three = images_for_budget(600, 30, 1.0, rounds=3, latency_s=20, most=100, fewest=1)
    assert three < one


def test_never_more_images_than_there_are() -> None:
    assert images_for_budget(270, 35, 1.8, rounds=3, latency_s=20, most=4, fewest=6) == 4
