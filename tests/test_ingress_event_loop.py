"""The async endpoints keep their CPU work off the event loop their replica's other requests share.

Each test calls the deployment's own ``inspect`` on a plain object in ``asyncio.run`` (no Ray, no Serve), with the
CPU-heavy functions wrapped so that they record whether they ran on a thread with a running event loop; the
answers are still the real ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from helpers import SIZE, SMALL_CONFIG, small_png
from starlette.requests import Request

from schemas import InspectionResult
from trainer.pipeline import untrained_model
from trainer.scoring import PatchModel
from trainer.synthetic import synth_image
from workers import http_api, serve_app
from workers.inspection import ScoredImage, inspect_in_ranges, score_ranges


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _watched(where: dict[str, bool], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, recording in ``where[name]`` whether it was called on the event loop's thread."""

    def run(*args: Any, **kwargs: Any) -> Any:
        where[name] = _on_event_loop()
        return fn(*args, **kwargs)

    return run


@pytest.fixture(scope="module")
def model() -> PatchModel:
    images = [synth_image(seed, 64)[0].astype(np.float32) / 255 for seed in range(2)]
    card, state = untrained_model(SMALL_CONFIG, images, "metal", data_digest="test")
    return PatchModel.from_state(card, state, device="cpu")


def test_the_ingress_plans_and_stitches_in_a_thread(model: PatchModel, monkeypatch: pytest.MonkeyPatch) -> None:
    on_loop: dict[str, bool] = {}
    monkeypatch.setattr(serve_app, "plan_inspection", _watched(on_loop, "plan", serve_app.plan_inspection))
    monkeypatch.setattr(serve_app, "finish_inspection", _watched(on_loop, "finish", serve_app.finish_inspection))
    monkeypatch.setattr(serve_app, "ray", SimpleNamespace(put=_watched(on_loop, "put", lambda padded: padded)))

    async def score(patch_range: Any, padded: np.ndarray, version: str) -> Any:  # a scorer replica, in-process
        return score_ranges(model, [patch_range], [padded], 32)[0]

    handle = SimpleNamespace(score=SimpleNamespace(remote=score))
    service = object.__new__(serve_app.InspectionService.func_or_class)
    service.pinned, service._cards, service._scorers = model.card.version, {model.card.version: model.card}, {}
    service.scorer = SimpleNamespace(options=lambda **kwargs: handle)
    service.chunk_patches, service.forward_patches = 32, 32
    image = synth_image(5, 96)[0].astype(np.float32) / 255

    result = asyncio.run(service.inspect(image))

    assert on_loop == {"plan": False, "put": False, "finish": False}
    assert set(result.timings_ms) == {"tile", "patches", "stitch"}
    np.testing.assert_allclose(result.anomaly_map, inspect_in_ranges(model, image, 32).anomaly_map, atol=1e-6)


def test_the_http_gateway_decodes_and_encodes_maps_in_a_thread(
    model: PatchModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = http_api.HttpGateway.func_or_class.inspect
    names = endpoint.__globals__  # Serve's ingress keeps a copy of the class, with its own module namespace
    on_loop: dict[str, bool] = {}
    monkeypatch.setitem(names, "decode_image", _watched(on_loop, "decode", names["decode_image"]))
    monkeypatch.setitem(names, "map_objects", _watched(on_loop, "encode", names["map_objects"]))
    stored: dict[str, bytes] = {}

    async def inspect(image: np.ndarray, pixel_threshold: float | None, line: str) -> ScoredImage:
        return inspect_in_ranges(model, image, 32, pixel_threshold)

    gateway = SimpleNamespace(  # what the endpoint reads of its replica (the ingress wrapper itself is Serve's)
        service=SimpleNamespace(inspect=SimpleNamespace(remote=inspect)),
        store=SimpleNamespace(
            put_bytes=lambda key, data, content_type: stored.__setitem__(key, data),
            ref=lambda key: f"s3://anomap/{key}",
        ),
    )
    body = small_png(3)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    request = Request({"type": "http", "method": "POST", "path": "/v1/inspect", "headers": []}, receive)
    result = asyncio.run(endpoint(gateway, request, "cam01", "default", "cam01-http-1", None))

    assert on_loop == {"decode": False, "encode": False}
    assert isinstance(result, InspectionResult) and (result.height, result.width) == (SIZE, SIZE)
    assert sorted(stored) == sorted(ref.removeprefix("s3://anomap/") for ref in (result.map_ref, result.overlay_ref))
