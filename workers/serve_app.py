"""The Ray Serve application: an `InspectionService` ingress that shards each image's patches into
ranges over `PatchScorer` replicas, then stitches the map.

    InspectionService.inspect(image (H, W) float32)        one call per image
        ├─ plan_inspection: flatten along the grain (the card's detrend), pad; 4225 patches of 32² for a
        │      1024² image at stride 16, in 5 ranges of ≤ 1024
        ├─ ray.put(padded image)                          once: 4.4 MB, where the patches would be 17 MB
        ├─ PatchScorer.score(range, padded) × 5, in parallel   @serve.batch groups ranges by patch count;
        │      the scorer cuts its patches out of the zero-copy image (on its GPU, from the rows the range
        │      touches), forward passes of ≤ 128 on a CPU, and returns its range's `MapBand`: ~1 MB of
        │      windowed sums (summed on the GPU when it has one), where its maps are ~3.5 MB
        └─ finish_inspection: add the bands, finish the map, regions  → ScoredImage

Which model scores an image: a deployment pinned to a version (``version=...``) always uses it; one
that follows the registry (``version=None``, what ``anomap serve`` and ``deploy/serve.yaml`` run)
resolves the live version of the job's line at the start of each image (`LiveVersions`: the line's
pointer, else the default one, at most ``refresh_s`` old) and sends it with every patch range. The
scorers hold up to ``MODELS_PER_SCORER`` versions each (``@serve.multiplexed``, keyed by version, so
lines that share a version share the loaded weights) and Serve routes a range to a replica that has
its version loaded. A promotion is therefore a hot swap: images already started finish on the old
version, the next ones of that line use the new one within seconds, and every result names the
version that scored it.

A version that cannot load or score fails only its own images: a scorer's batch loads and scores each
version on its own, and the ranges of a failing one get a `VersionUnavailable` (their ingress fails that
image) while the others' ranges are scored (`score_per_version`). A load failure is remembered for
``LOAD_FAILURE_TTL_S`` seconds, so a broken version is not fetched again for every range. A replica
preloads its pinned version, or the default line's live one, to answer the first image at once; if that
fails it logs it and starts anyway, so one broken version cannot keep every line's scorers down.

Sizes and limits come from ``settings.serving`` (`ServingConfig`: ``ANOMAP_SCORER_*`` and
``ANOMAP_INGRESS_*``): the scorer replica count or its autoscaling bounds, and each deployment's
``max_ongoing_requests`` / ``max_queued_requests``. A call over a queue limit is refused at once
with Serve's ``BackPressureError``. Between the ingress and the scorers that is a pacing signal:
the ingress sends a refused range again (for up to ``CHUNK_WAIT_S``), so an image is not refused
because its own ranges filled the queue, and the ingress, busy longer, fills up in turn. Callers
of the ingress get the refusal: `ServeInspector` turns it into `ScoringBusy`, on which a stream
consumer waits and sends the same job again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import numpy as np
import ray
import torch
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from schemas import ModelCard, Settings
from schemas.settings import SERVING_VARIABLES
from trainer.registry import ModelRegistry
from trainer.scoring import PatchModel
from trainer.store import ObjectStore
from trainer.tiling import MapBand
from workers import telemetry
from workers.backpressure import is_backpressure
from workers.http_api import HTTP_APP_NAME, HttpGateway
from workers.inspection import (
    CHUNK_PATCHES,
    CPU_FORWARD_PATCHES,
    GPU_CHUNK_PATCHES,
    InspectionPlan,
    PatchRange,
    ScoredImage,
    ScoringBusy,
    default_sizes,
    finish_inspection,
    plan_inspection,
    score_ranges,
)
from workers.live_models import DEFAULT_REFRESH_S, LiveVersions
from workers.retry import Backoff

log = logging.getLogger(__name__)

APP_NAME = "anomap"
MAX_BATCH_PATCHES = GPU_CHUNK_PATCHES
"""The most patches a scorer takes in one ``@serve.batch`` (one request, or several merged): one request of
the largest default size."""
CHUNK_WAIT_S = 10.0
"""How long the ingress keeps sending a patch range the scorers' queue refused before it refuses the image."""
MODELS_PER_SCORER = 4
"""Model versions a scorer replica keeps loaded (least recently used first out): lines' models and a swap's two."""
LOAD_FAILURE_TTL_S = 5.0
"""How long a scorer answers a version that failed to load with that failure, without fetching it again."""
VERSIONS_PER_INGRESS = 64
"""Model versions whose cards and scorer handles an ingress replica keeps (least recently used first out)."""

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class VersionUnavailable(RuntimeError):
    """A model version could not load or score on a scorer replica; only the images of that version fail."""


class BoundedCache(OrderedDict[K, V], Generic[K, V]):
    """A dict that keeps its ``capacity`` most recently used entries (``get`` and setting count as use)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            msg = f"capacity must be >= 1, got {capacity}"
            raise ValueError(msg)
        super().__init__()
        self.capacity = capacity

    def get(self, key: K, default: V | None = None) -> V | None:  # type: ignore[override]
        """The value of ``key`` (now the most recently used), else ``default``."""
        if key not in self:
            return default
        self.move_to_end(key)
        return self[key]

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


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


def _plan_and_put(
    image: np.ndarray, card: ModelCard, chunk_patches: int, forward_patches: int
) -> tuple[InspectionPlan, ray.ObjectRef]:
    """`plan_inspection`, and its padded image put in the object store once: every scorer request names it and
    a range. Thread-safe (the plans it reads are `functools` caches), so the ingress runs it off its loop."""
    plan = plan_inspection(image, card, chunk_patches, forward_patches)
    return plan, ray.put(plan.padded)


def _registry(settings: Settings) -> ModelRegistry:
    return ModelRegistry(ObjectStore.from_settings(settings), settings.model_name)


def _load_model(settings: Settings, version: str) -> PatchModel:
    card, weights = _registry(settings).load(version)
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
        preload = version or _registry(settings).live_version()
        return {preload: _LoadedModel(_load_model(settings, preload))}
    except Exception as exc:
        log.warning("PatchScorer: preloading model version %s failed; starting without it: %s", preload, exc)
        if preload is not None:
            failures.record(preload, exc)
        return {}


@serve.deployment(name="InspectionService", max_ongoing_requests=16)
class InspectionService:
    """Ingress: one image in, a `ScoredImage` out; its patches are scored across the replicas.

    ``version`` pins every line to one model version; ``None`` follows the registry's live pointers
    per line, re-read at most every ``refresh_s`` seconds (see the module docstring).
    """

    def __init__(
        self,
        scorer: DeploymentHandle,
        settings: Settings,
        version: str | None,
        chunk_patches: int = CHUNK_PATCHES,
        forward_patches: int = CPU_FORWARD_PATCHES,
        refresh_s: float = DEFAULT_REFRESH_S,
    ) -> None:
        self.scorer = scorer
        self.registry = _registry(settings)
        self.pinned = version
        self.live = LiveVersions(self.registry.live_version, refresh_s, on_change=self._live_changed)
        self.chunk_patches = chunk_patches
        self.forward_patches = forward_patches
        self._cards: BoundedCache[str, ModelCard] = BoundedCache(VERSIONS_PER_INGRESS)
        self._scorers: BoundedCache[str, DeploymentHandle] = BoundedCache(VERSIONS_PER_INGRESS)
        first = version or self.registry.live_version()
        try:  # a warm-up only: a card that cannot be read fails its own images, not the replica
            self._cards[first] = self.registry.load_card(first)
            telemetry.model_serving(first, "InspectionService")
        except Exception as exc:
            log.warning("InspectionService: reading the card of model version %s failed: %s", first, exc)

    async def inspect(
        self, image: np.ndarray, pixel_threshold: float | None = None, line: str = "default"
    ) -> ScoredImage:
        """Score an (H, W) float32 image in [0, 1] (uint8 and uint16 are scaled) with the live model of ``line`` (or
        the pinned one). Raises `VersionUnavailable` (wrapped by Ray) when that version cannot load or score."""
        start = time.perf_counter()
        version = self.pinned or await self.live.version(line)
        card = await self._card(version)
        # CPU work (flattening, padding, the copy into the object store) in a thread: the loop keeps serving
        # the replica's other images meanwhile
        plan, padded = await asyncio.to_thread(_plan_and_put, image, card, self.chunk_patches, self.forward_patches)
        tiled = time.perf_counter()
        scorer = self._scorer(version)
        tasks = [
            asyncio.ensure_future(self._score_range(scorer, patch_range, padded, version))
            for patch_range in plan.ranges
        ]
        try:
            bands = await asyncio.gather(*tasks)
        except BaseException:  # one range refused or failed: the image is refused, so stop scoring the rest
            for task in tasks:
                task.cancel()
            raise
        scored = time.perf_counter()
        timings = {"tile": (tiled - start) * 1e3, "patches": (scored - tiled) * 1e3}
        result = await asyncio.to_thread(finish_inspection, plan, list(bands), card, pixel_threshold, timings)
        result.timings_ms["stitch"] = (time.perf_counter() - scored) * 1e3
        return result

    def _live_changed(self, line: str, old: str, new: str) -> None:
        """A line's live version moved: ``anomap_model_info`` follows (the old one is retired once unused)."""
        telemetry.model_serving(new, "InspectionService")
        if old not in self.live.versions():
            telemetry.model_retired(old, "InspectionService")

    async def _card(self, version: str) -> ModelCard:
        card = self._cards.get(version)
        if card is None:
            card = await asyncio.to_thread(self.registry.load_card, version)
            self._cards[version] = card
            telemetry.model_serving(version, "InspectionService")
        return card

    def _scorer(self, version: str) -> DeploymentHandle:
        """The scorer handle that routes to replicas holding ``version`` (one handle per version, reused; the
        ``VERSIONS_PER_INGRESS`` most recent are kept, as are their cards)."""
        handle = self._scorers.get(version)
        if handle is None:
            handle = self._scorers[version] = self.scorer.options(multiplexed_model_id=version)
        return handle

    async def _score_range(
        self, scorer: DeploymentHandle, patch_range: PatchRange, padded: ray.ObjectRef, version: str
    ) -> MapBand:
        """One patch range through the scorers; refusals for backpressure are retried for up to ``CHUNK_WAIT_S``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CHUNK_WAIT_S
        backoff = Backoff(0.005, 0.2, jitter=0.5)
        while True:
            try:
                return await scorer.score.remote(patch_range, padded, version)
            except BackPressureError:
                delay = backoff.next_delay()
                if loop.time() + delay > deadline:
                    raise
                await asyncio.sleep(delay)

    async def model_version(self, line: str = "default") -> str:
        """The model version the next image of ``line`` is scored with."""
        return self.pinned or await self.live.version(line)


def build_app(
    settings: Settings,
    version: str | None,
    scorer_replicas: int | None = None,
    scorer_cpus: float = 0.5,
    ingress_cpus: float = 0.25,
    chunk_patches: int | None = None,
    scorer_gpus: float | None = None,
    forward_patches: int | None = None,
) -> serve.Application:
    """The application graph: ingress bound to the scorer deployment, pinned to ``version`` or, with
    ``None``, following the registry's live version per line (hot swap on promotion).

    Replica counts, autoscaling and request limits come from ``settings.serving``; ``scorer_replicas``,
    when given, overrides them with a fixed count (autoscaling off). ``scorer_gpus`` is each scorer
    replica's GPU share (fractions let replicas share a GPU); ``None`` means 0.5 when the Ray cluster
    has GPUs and 0 otherwise. A replica with a GPU scores on CUDA. ``chunk_patches`` caps one scorer
    request (a range of an image's patches) and ``forward_patches`` one forward pass; ``None`` means
    ``GPU_CHUNK_PATCHES`` / ``GPU_FORWARD_PATCHES`` on a GPU, ``CHUNK_PATCHES`` / ``CPU_FORWARD_PATCHES``
    on a CPU. Requests are made of whole forward passes, as in `plan_inspection`.
    """
    if chunk_patches is not None and not 1 <= chunk_patches <= MAX_BATCH_PATCHES:
        msg = f"chunk_patches must be in 1..{MAX_BATCH_PATCHES} (the scorer's batch limit), got {chunk_patches}"
        raise ValueError(msg)
    if forward_patches is not None and forward_patches < 1:
        msg = f"forward_patches must be >= 1, got {forward_patches}"
        raise ValueError(msg)
    serving = settings.serving
    if scorer_replicas is not None:
        serving = serving.updated({"scorer_replicas": scorer_replicas, "scorer_max_replicas": None})
    if scorer_gpus is None:
        scorer_gpus = 0.5 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    default_chunk, default_forward = default_sizes(scorer_gpus > 0)
    forward_patches = default_forward if forward_patches is None else forward_patches
    chunk_patches = default_chunk if chunk_patches is None else chunk_patches
    actor_options: dict[str, float] = {"num_cpus": scorer_cpus}
    if scorer_gpus > 0:
        actor_options["num_gpus"] = scorer_gpus
    scaling: dict[str, Any] = (
        {"autoscaling_config": serving.scorer_autoscaling_config()}
        if serving.autoscaling
        else {"num_replicas": serving.scorer_replicas}
    )
    scorer = PatchScorer.options(
        ray_actor_options=actor_options,
        max_ongoing_requests=serving.scorer_max_ongoing,
        max_queued_requests=serving.scorer_max_queued,
        **scaling,
    ).bind(settings, version, forward_patches=forward_patches)
    return InspectionService.options(
        ray_actor_options={"num_cpus": ingress_cpus},
        num_replicas=serving.ingress_replicas,
        max_ongoing_requests=serving.ingress_max_ongoing,
        max_queued_requests=serving.ingress_max_queued,
    ).bind(scorer, settings, version, chunk_patches, forward_patches)


def deploy(
    settings: Settings,
    version: str | None,
    scorer_replicas: int | None = None,
    chunk_patches: int | None = None,
    http_port: int | None = None,
    forward_patches: int | None = None,
) -> DeploymentHandle:
    """Start Serve and run the app pinned to ``version`` (``None``: following the live pointers); returns
    the ingress handle.

    Sizes and limits come from ``settings.serving`` (``scorer_replicas`` overrides as in `build_app`).
    Without ``http_port`` no HTTP proxy runs (callers use handles). With it, the proxy listens on
    127.0.0.1:``http_port`` and the `HttpGateway` app answers ``POST /v1/inspect``. HTTP options
    are cluster-wide: they apply only when this call starts Serve.
    """
    if http_port is None:
        serve.start(proxy_location="Disabled")
    else:
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": http_port})
        _check_http_port(http_port)
    app = build_app(
        settings, version, scorer_replicas=scorer_replicas, chunk_patches=chunk_patches, forward_patches=forward_patches
    )
    handle = serve.run(app, name=APP_NAME, route_prefix=None)
    if http_port is not None:
        serve.run(HttpGateway.bind(settings, APP_NAME), name=HTTP_APP_NAME, route_prefix="/")
    return handle


class ServeHttpConflict(RuntimeError):
    """Serve already runs on this Ray cluster with other HTTP options, which cannot change while it runs."""


def _check_http_port(http_port: int) -> None:
    """Raise `ServeHttpConflict` when the running Serve instance does not listen on ``http_port``.

    ``serve.start`` keeps an existing instance's HTTP options and only logs that the new ones are
    ignored; a caller asking for a port must hear that it will not get it.
    """
    from ray.serve.context import _get_global_client  # Ray 2.60: the only way to read the live HTTP options

    client = _get_global_client(raise_if_no_controller_running=False)
    config = getattr(client, "http_config", None)
    if config is None:
        return
    has_proxy = bool(serve.status().proxies)
    if config.port != http_port or not has_proxy:
        where = f"HTTP on {config.host}:{config.port}" if has_proxy else "no HTTP proxy"
        msg = (
            f"Serve already runs on this Ray cluster with {where}; its HTTP options cannot change while it runs. "
            f"Use that port, or stop Serve first (`serve shutdown`, or `anomap stack down` and up)."
        )
        raise ServeHttpConflict(msg)


class ServeInspector:
    """An `Inspector` that calls the Serve app through its handle (blocking, thread-safe)."""

    def __init__(self, handle: DeploymentHandle, timeout_s: float = 300.0) -> None:
        self.handle = handle
        self.timeout_s = timeout_s

    @classmethod
    def connect(cls, timeout_s: float = 300.0) -> ServeInspector:
        """A handle to the running ``anomap`` app."""
        return cls(serve.get_app_handle(APP_NAME), timeout_s)

    def __call__(self, image: np.ndarray, pixel_threshold: float | None = None, line: str = "default") -> ScoredImage:
        """Score ``image`` through Serve with the model of ``line``.

        Raises `ScoringBusy` when Serve refused it for backpressure, other errors when the app fails or times out.
        """
        response = None
        try:
            response = self.handle.inspect.remote(image, pixel_threshold, line)
            return response.result(timeout_s=self.timeout_s)
        except TimeoutError:
            if response is not None:  # the caller sends the image again: do not leave this one running
                response.cancel()
            raise
        except Exception as exc:
            if is_backpressure(exc):
                cause = getattr(exc, "cause", None) or exc
                raise ScoringBusy(f"the scorer's queues are full (Serve backpressure): {cause}") from exc
            raise


def check_deployable(registry: ModelRegistry, version: str | None) -> None:
    """Raise `trainer.registry.ModelNotFound` unless the app can start: a pinned ``version`` must exist (its card
    is read; ValueError if it is not a version name or its card is another's); with ``None`` a live version must.
    A pinned app never reads the live pointers, so it needs none."""
    if version is None:
        registry.live_version()
    else:
        registry.load_card(version)


def app_builder(args: Mapping[str, Any]) -> serve.Application:
    """Application builder for ``serve run`` / a Serve config file (``import_path: workers.serve_app:app_builder``).

    ``args``: ``version`` (pin one version; default: follow the live version of ``ANOMAP_MODEL_NAME`` per
    line, so promotions swap in without a redeploy), ``chunk_patches``,
    ``forward_patches`` (see `build_app`), and
    any `ServingConfig` field (``scorer_replicas``, ``scorer_min_replicas``, ``scorer_max_replicas``,
    ``scorer_target_ongoing``, ``scorer_max_ongoing``, ``scorer_max_queued``, ``ingress_replicas``,
    ``ingress_max_ongoing``, ``ingress_max_queued``), which override the ``ANOMAP_SCORER_*`` /
    ``ANOMAP_INGRESS_*`` environment. Connection settings come from the environment (`Settings.from_env`).
    Unknown args are an error, and so is a pinned version the registry does not hold, or (not pinned)
    no live version yet (`check_deployable`): at deploy time, with their message.
    """
    known = {"version", "chunk_patches", "forward_patches", *SERVING_VARIABLES}
    unknown = sorted(set(args) - known)
    if unknown:
        msg = f"unknown app_builder args {unknown}; expected some of {sorted(known)}"
        raise ValueError(msg)
    settings = Settings.from_env()
    overrides = {name: args[name] for name in SERVING_VARIABLES if name in args}
    settings = settings.model_copy(update={"serving": settings.serving.updated(overrides)})
    version = args.get("version")
    check_deployable(_registry(settings), str(version) if version else None)
    chunk, forward = args.get("chunk_patches"), args.get("forward_patches")
    return build_app(
        settings,
        str(version) if version else None,
        chunk_patches=int(chunk) if chunk is not None else None,
        forward_patches=int(forward) if forward is not None else None,
    )
