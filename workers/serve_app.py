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

How a scorer replica holds versions, and how a broken one fails only its own images: `workers.patch_scorer`.

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
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import ray
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from schemas import ModelCard, Settings
from schemas.settings import SERVING_VARIABLES
from trainer.registry import ModelRegistry
from trainer.tiling import MapBand
from workers import telemetry
from workers.backpressure import is_backpressure
from workers.bounded_cache import BoundedCache
from workers.http_api import HTTP_APP_NAME, HttpGateway
from workers.inspection import (
    CHUNK_PATCHES,
    CPU_FORWARD_PATCHES,
    InspectionPlan,
    PatchRange,
    ScoredImage,
    ScoringBusy,
    default_sizes,
    finish_inspection,
    plan_inspection,
)
from workers.live_models import DEFAULT_REFRESH_S, LiveVersions
from workers.patch_scorer import MAX_BATCH_PATCHES, PatchScorer, model_registry
from workers.retry import Backoff

log = logging.getLogger(__name__)

APP_NAME = "anomap"
CHUNK_WAIT_S = 10.0
"""How long the ingress keeps sending a patch range the scorers' queue refused before it refuses the image."""
VERSIONS_PER_INGRESS = 64
"""Model versions whose cards and scorer handles an ingress replica keeps (least recently used first out)."""


def _plan_and_put(
    image: np.ndarray, card: ModelCard, chunk_patches: int, forward_patches: int
) -> tuple[InspectionPlan, ray.ObjectRef]:
    """`plan_inspection`, and its padded image put in the object store once: every scorer request names it and
    a range. Thread-safe (the plans it reads are `functools` caches), so the ingress runs it off its loop."""
    plan = plan_inspection(image, card, chunk_patches, forward_patches)
    return plan, ray.put(plan.padded)


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
        self.registry = model_registry(settings)
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
    check_deployable(model_registry(settings), str(version) if version else None)
    chunk, forward = args.get("chunk_patches"), args.get("forward_patches")
    return build_app(
        settings,
        str(version) if version else None,
        chunk_patches=int(chunk) if chunk is not None else None,
        forward_patches=int(forward) if forward is not None else None,
    )
