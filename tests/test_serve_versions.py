"""The serving app's per-version logic without Ray: a batch scored a version at a time, load failures
remembered for a while, bounded ingress caches, and what ``app_builder`` checks before it builds.

``app_builder`` runs against a real S3 store (SeaweedFS); nothing here starts Ray or Serve.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import numpy as np
import pytest
from helpers import point_cli_at, register_small_model

from schemas import Settings
from trainer.registry import ModelNotFound, ModelRegistry
from trainer.store import ObjectStore
from trainer.tiling import MapBand
from workers.bounded_cache import BoundedCache
from workers.patch_scorer import LoadFailures, VersionUnavailable, score_per_version, version_groups
from workers.serve_app import app_builder


def _band(i: int) -> MapBand:
    return MapBand(top=i, values=np.full((1, 1), float(i), dtype=np.float32), n_patches=1)


def test_version_groups_keep_arrival_order() -> None:
    assert version_groups(["b", "a", "b", "c", "a"]) == {"b": [0, 2], "a": [1, 4], "c": [3]}
    assert version_groups([]) == {}


def test_a_failing_version_fails_only_its_own_ranges_of_the_batch() -> None:
    """The old batch loaded versions one after another and let the first error fail every range."""
    versions = ["good", "broken", "good", "other", "broken"]
    calls: list[tuple[str, list[int]]] = []

    async def score_group(version: str, indices: list[int]) -> list[MapBand]:
        calls.append((version, indices))
        if version == "broken":
            raise ValueError("weights are not valid safetensors data (7 bytes)")
        return [_band(i) for i in indices]

    out = asyncio.run(score_per_version(versions, score_group))

    assert calls == [("good", [0, 2]), ("broken", [1, 4]), ("other", [3])]  # every version was tried
    assert [band.top for band in out if isinstance(band, MapBand)] == [0, 2, 3]
    for i in (1, 4):
        error = out[i]
        assert isinstance(error, VersionUnavailable)
        assert str(error) == "model version 'broken' failed on this scorer: ValueError: weights are not valid " + (
            "safetensors data (7 bytes)"
        )


def test_a_group_that_returns_too_few_bands_is_its_versions_error_alone() -> None:
    async def score_group(version: str, indices: list[int]) -> list[MapBand]:
        return [] if version == "short" else [_band(i) for i in indices]

    out = asyncio.run(score_per_version(["short", "fine"], score_group))
    assert isinstance(out[0], VersionUnavailable) and "scoring 1 ranges gave 0 bands" in str(out[0])
    assert isinstance(out[1], MapBand)


def test_a_load_failure_is_remembered_for_its_ttl_then_tried_again() -> None:
    now = [100.0]
    failures = LoadFailures(ttl_s=5.0, clock=lambda: now[0])
    failures.check("v1")  # nothing recorded: no error
    failures.record("v1", ValueError("weights do not match model card metal/v1"))
    now[0] = 104.9
    with pytest.raises(VersionUnavailable, match=r"'v1' failed to load on this scorer less than 5 s ago: ValueError"):
        failures.check("v1")
    failures.check("v2")  # another version is not affected
    now[0] = 105.0
    failures.check("v1")  # expired: the next range loads it again
    failures.check("v1")


def test_bounded_cache_keeps_the_most_recently_used() -> None:
    cache: BoundedCache[str, int] = BoundedCache(3)
    for i, key in enumerate("abc"):
        cache[key] = i
    assert cache.get("a") == 0  # a is now the most recent
    cache["d"] = 3
    assert list(cache) == ["c", "a", "d"] and cache.get("b") is None
    cache["c"] = 4  # setting counts as use too
    cache["e"] = 5
    assert list(cache) == ["d", "c", "e"]
    for i in range(1000):
        cache[f"v{i}"] = i
    assert len(cache) == 3
    with pytest.raises(ValueError, match="capacity"):
        BoundedCache(0)


@pytest.fixture
def builder_env(
    stack_settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> tuple[ObjectStore, ModelRegistry]:
    """An empty bucket of its own, and the environment ``app_builder`` reads its settings from."""
    settings = stack_settings.model_copy(update={"bucket": f"builder-{uuid.uuid4().hex[:8]}"})
    store = ObjectStore.from_settings(settings)
    store.ensure_bucket()
    point_cli_at(monkeypatch, settings, settings.bucket, tmp_path, redis=False)
    return store, ModelRegistry(store, settings.model_name)


def test_app_builder_pinned_needs_the_version_not_a_live_pointer(
    builder_env: tuple[ObjectStore, ModelRegistry],
) -> None:
    store, registry = builder_env
    card = register_small_model(store, registry.name)  # saved, never made live
    with pytest.raises(ModelNotFound, match="has no live version yet"):
        app_builder({})  # following the registry: something must be live
    assert app_builder({"version": card.version}) is not None  # pinned: no live pointer needed
    with pytest.raises(ModelNotFound, match=f"model {registry.name!r} has no version 'v-nope'"):
        app_builder({"version": "v-nope"})
    registry.promote(card.version)
    with pytest.raises(ModelNotFound, match="has no version 'v-nope'"):  # a live pointer does not excuse it
        app_builder({"version": "v-nope"})
    assert app_builder({}) is not None
