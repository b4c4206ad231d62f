"""`PatchScorer`: the Serve deployment that scores patch ranges of padded images, each with its model version.

    PatchScorer.score(range, padded, version) -> MapBand       one request per patch range of an image
        ├─ @serve.batch: requests merged up to MAX_BATCH_PATCHES patches (by patch count)
        ├─ per version of the batch (score_per_version): the model from @serve.multiplexed (≤ MODELS_PER_SCORER
        │      versions per replica, least recently used out), loaded from the registry on first use
        └─ score_ranges in a worker thread: patches cut from the zero-copy padded image, forward passes of
               ≤ forward_patches, the maps window-weighted and summed into the range's band

A version that cannot load or score fails only its own ranges: a scorer's batch loads and scores each version
on its own, and the ranges of a failing one get a `VersionUnavailable` (their ingress fails that image) while
the others' ranges are scored (`score_per_version`). A load failure is remembered for ``LOAD_FAILURE_TTL_S``
seconds (`LoadFailures`), so a broken version is not fetched again for every range. A replica preloads its
pinned version, or the default line's live one, to answer the first image at once; if that fails it logs it
and starts anyway, so one broken version cannot keep every line's scorers down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

import numpy as np
import torch
from ray import serve

from schemas import Settings
from trainer.registry import ModelRegistry
from trainer.scoring import PatchModel
from trainer.store import ObjectStore
from trainer.tiling import MapBand
from workers import telemetry
from workers.inspection import CPU_FORWARD_PATCHES, GPU_CHUNK_PATCHES, PatchRange, score_ranges

log = logging.getLogger(__name__)

MAX_BATCH_PATCHES = GPU_CHUNK_PATCHES
"""The most patches a scorer takes in one ``@serve.batch`` (one request, or several merged): one request of
the largest default size."""
MODELS_PER_SCORER = 4
"""Model versions a scorer replica keeps loaded (least recently used first out): lines' models and a swap's two."""
LOAD_FAILURE_TTL_S = 5.0
"""How long a scorer answers a version that failed to load with that failure, without fetching it again."""


class VersionUnavailable(RuntimeError):
    """A model version could not load or score on a scorer replica; only the images of that version fail."""


class LoadFailures:
    """The versions that failed to load recently, each remembered for ``ttl_s`` seconds of ``clock``."""

    def __init__(self, ttl_s: float = LOAD_FAILURE_TTL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self._failed: dict[str, tuple[float, str]] = {}

    def record(self, version: str, exc: BaseException) -> None:
        """``version`` failed to load with ``exc``."""
        self._failed[version] = (self.clock() + self.ttl_s, f"{type(exc).__name__}: {exc}")

    def check(self, version: str) -> None:
        """Raise `VersionUnavailable` if ``version`` failed to load less than ``ttl_s`` ago."""
        failed = self._failed.get(version)
        if failed is None:
            return
        until, reason = failed
        if self.clock() >= until:
            del self._failed[version]
            return
        msg = f"model version {version!r} failed to load on this scorer less than {self.ttl_s:g} s ago: {reason}"
        raise VersionUnavailable(msg)


def version_groups(versions: Sequence[str]) -> dict[str, list[int]]:
    """The indices of each version in ``versions``, versions in order of first arrival: ``["a", "b", "a"]`` ->
    ``{"a": [0, 2], "b": [1]}``."""
    groups: dict[str, list[int]] = {}
    for i, version in enumerate(versions):
        groups.setdefault(version, []).append(i)
    return groups


async def score_per_version(
    versions: Sequence[str], score_group: Callable[[str, list[int]], Awaitable[Sequence[MapBand]]]
) -> list[MapBand | VersionUnavailable]:
    """One batch's bands, a version at a time: ``score_group(version, indices)`` scores the ranges at ``indices``
    (one band per index). A version whose group raises gets a `VersionUnavailable` naming it at each of its
    indices; the other versions' bands are unaffected. Returns a band or an error per entry of ``versions``.
    """
    out: list[MapBand | VersionUnavailable | None] = [None] * len(versions)
    for version, indices in version_groups(versions).items():
        try:
            bands: list[MapBand | VersionUnavailable] = list(await score_group(version, indices))
            if len(bands) != len(indices):
                msg = f"scoring {len(indices)} ranges gave {len(bands)} bands"
                raise RuntimeError(msg)
        except VersionUnavailable as exc:  # e.g. a load failure remembered (`LoadFailures`): logged when it happened
            bands = [exc] * len(indices)
        except Exception as exc:
            log.warning("model version %s failed on this scorer: %s: %s", version, type(exc).__name__, exc)
            error = VersionUnavailable(f"model version {version!r} failed on this scorer: {type(exc).__name__}: {exc}")
            bands = [error] * len(indices)
        for i, band in zip(indices, bands, strict=True):
            out[i] = band
    return out  # type: ignore[return-value]  # every index was filled above


def _count_patches(ranges: list[PatchRange]) -> int:
    return sum(len(patch_range) for patch_range in ranges)


def model_registry(settings: Settings) -> ModelRegistry:
    """The registry of ``settings``' model name on its object store."""
    return ModelRegistry(ObjectStore.from_settings(settings), settings.model_name)


def _load_model(settings: Settings, version: str) -> PatchModel:
    card, weights = model_registry(settings).load(version)
    return PatchModel.from_safetensors(card, weights)


class _LoadedModel:
    """A scorer's loaded model version. ``@serve.multiplexed`` calls ``__del__`` when it evicts one
    (least recently used, past ``MODELS_PER_SCORER``): its ``anomap_model_info`` gauge is retired."""

    def __init__(self, model: PatchModel) -> None:
        self.model = model
        telemetry.model_serving(model.card.version, "PatchScorer")

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # also runs at interpreter exit, when metrics may be gone
            telemetry.model_retired(self.model.card.version, "PatchScorer")


@serve.deployment(name="PatchScorer", max_ongoing_requests=32)
class PatchScorer:
    """Scores patch ranges of padded images → each range's map band; ranges are batched by patch count.

    Each range names its model version; the replica keeps up to ``MODELS_PER_SCORER`` versions loaded
    (``@serve.multiplexed``). The version given at construction (else the default line's live one) is loaded
    before the first request and handed to the multiplexed cache by the first load, whatever version that
    asks for (it is dropped if another): it is never held beside the cache. A preload that fails is logged
    and the replica starts anyway. Each version of a batch loads and scores on its own (`score_per_version`);
    a load failure is remembered for ``LOAD_FAILURE_TTL_S``.

    A batch runs in forward passes of at most ``forward_patches`` patches per version, consecutive ranges
    sharing one when they fit: the in-process path's batch size on a CPU, where merged batches of 512
    patches ran ~1.9× slower per patch than 128 (out of cache), and larger ones on a GPU. A batch is
    scored in a worker thread (torch releases the GIL), so the replica keeps taking requests meanwhile
    and the next batch is ready when one ends.
    """

    def __init__(
        self,
        settings: Settings,
        version: str | None,
        torch_threads: int = 1,
        forward_patches: int = CPU_FORWARD_PATCHES,
    ) -> None:
        torch.set_num_threads(torch_threads)
        self.settings = settings
        self.forward_patches = forward_patches
        self._failures = LoadFailures()
        self._preloaded: dict[str, _LoadedModel] = _preload(settings, version, self._failures)

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_SCORER)
    async def model(self, version: str) -> _LoadedModel:
        """The model of ``version``, loaded from the registry on first use (in a worker thread)."""
        loaded = self._preloaded.pop(version, None)
        self._preloaded.clear()  # a preload of another version is not what this replica is asked for: retired
        if loaded is None:
            loaded = _LoadedModel(await asyncio.to_thread(_load_model, self.settings, version))
        return loaded

    async def _model(self, version: str) -> _LoadedModel:
        """`model`, unless ``version`` failed to load less than ``LOAD_FAILURE_TTL_S`` ago (`VersionUnavailable`)."""
        self._failures.check(version)
        try:
            return await self.model(version)
        except Exception as exc:
            self._failures.record(version, exc)
            raise

    async def score(self, patch_range: PatchRange, padded: np.ndarray, version: str) -> MapBand:
        """Score one patch range of a padded image with model ``version`` -> its `MapBand`, batched with other
        requests (`_score_batch`). Raises `VersionUnavailable` when ``version`` cannot load or score here."""
        outcome = await self._score_batch(patch_range, padded, version)
        if isinstance(outcome, VersionUnavailable):
            raise VersionUnavailable(str(outcome))  # a fresh one per request: the batch's is shared
        return outcome

    @serve.batch(max_batch_size=MAX_BATCH_PATCHES, batch_wait_timeout_s=0.002, batch_size_fn=_count_patches)
    async def _score_batch(
        self, ranges: list[PatchRange], padded: list[np.ndarray], versions: list[str]
    ) -> list[MapBand | VersionUnavailable]:
        """Score each range's patches of its padded image with the range's model version and return each
        range's `MapBand` (its maps window-weighted and summed over the rows they touch, for the ingress to
        add up): `score_ranges`, whose forward passes hold at most ``forward_patches``, a version at a time
        (`score_per_version`: a version that fails gives its own ranges a `VersionUnavailable`).

        ``padded`` arrives as an object-store reference resolved by Ray: read-only and zero-copy on this node.
        """
        telemetry.patch_batch(_count_patches(ranges))

        async def score_group(version: str, indices: list[int]) -> list[MapBand]:
            loaded = await self._model(version)
            return await asyncio.to_thread(  # off the event loop: requests keep arriving while this scores
                score_ranges,
                loaded.model,
                [ranges[i] for i in indices],
                [padded[i] for i in indices],
                self.forward_patches,
            )

        return await score_per_version(versions, score_group)


def _preload(settings: Settings, version: str | None, failures: LoadFailures) -> dict[str, _LoadedModel]:
    """``{version: model}`` of ``version`` (else the default line's live one), loaded now; ``{}`` (logged, and
    a load failure recorded in ``failures``) when there is none or it does not load: the replica starts anyway."""
    preload = version
    try:
        preload = version or model_registry(settings).live_version()
        return {preload: _LoadedModel(_load_model(settings, preload))}
    except Exception as exc:
        log.warning("PatchScorer: preloading model version %s failed; starting without it: %s", preload, exc)
        if preload is not None:
            failures.record(preload, exc)
        return {}
