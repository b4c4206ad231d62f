"""`POST /v1/inspect` over a real socket: an image in, an InspectionResult with a stored map out."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
from helpers import register_small_model, small_png
from ray import serve

from cluster.ports import free_port
from schemas import InspectionResult, ModelCard, Settings
from schemas.stream import MAX_INLINE_IMAGE_BYTES
from trainer.store import ObjectStore
from trainer.synthetic import DefectKind
from workers.http_api import InspectErrorResponse
from workers.maps import decode_map
from workers.serve_app import ServeHttpConflict, deploy

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def http_service(stack_settings: Settings, ray_cluster: str) -> Iterator[tuple[str, Settings, ModelCard]]:
    serve.shutdown()  # HTTP options apply only when Serve starts
    settings = stack_settings.model_copy(update={"bucket": f"http-{uuid.uuid4().hex[:8]}"})
    store = ObjectStore.from_settings(settings)
    store.ensure_bucket()
    card = register_small_model(store, settings.model_name)
    port = free_port()
    deploy(settings, card.version, scorer_replicas=1, chunk_patches=32, http_port=port)
    yield f"http://127.0.0.1:{port}", settings, card
    serve.shutdown()


def _post(url: str, body: bytes, content_type: str = "image/png") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_inspect_returns_a_result_whose_map_is_stored(http_service: tuple[str, Settings, ModelCard]) -> None:
    base, settings, card = http_service
    status, body = _post(f"{base}/v1/inspect?camera_id=cam09&job_id=cam09-http-1", small_png(3, (DefectKind.SCRATCH,)))
    assert status == 200, body
    result = InspectionResult.model_validate(body)
    assert (result.job_id, result.camera_id, result.model_version) == ("cam09-http-1", "cam09", card.version)
    stored = decode_map(ObjectStore.from_settings(settings).get_bytes(result.map_ref.split("/", 3)[3]))
    assert stored.shape == (result.height, result.width)
    # a folder of its own: a caller's job_id never overwrites the map of a streamed job of that id
    assert result.map_ref.endswith("/http/cam09-http-1.npz")


def test_bad_bodies_get_reason_codes(http_service: tuple[str, Settings, ModelCard]) -> None:
    base, _, _ = http_service
    status, body = _post(f"{base}/v1/inspect", b"not an image")
    assert (status, InspectErrorResponse.model_validate(body).detail.reason) == (422, "undecodable_image")
    status, body = _post(f"{base}/v1/inspect", b"")
    assert (status, InspectErrorResponse.model_validate(body).detail.reason) == (422, "empty_image")
    status, _ = _post(f"{base}/v1/inspect?job_id=../../etc", small_png(1))
    assert status == 422
    status, _ = _post(f"{base}/v1/inspect?pixel_threshold=1e-308", small_png(1))  # peaks would overflow to inf
    assert status == 422
    # an oversized body is refused from its Content-Length, before it is sent
    connection = http.client.HTTPConnection(urllib.parse.urlsplit(base).netloc, timeout=30)
    connection.putrequest("POST", "/v1/inspect")
    connection.putheader("Content-Type", "image/png")
    connection.putheader("Content-Length", str(MAX_INLINE_IMAGE_BYTES + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413
    refused = InspectErrorResponse.model_validate_json(response.read()).detail
    assert refused.reason == "payload_too_large" and "at most" in refused.detail
    connection.close()


@pytest.mark.parametrize(
    ("query", "parameter"),
    [("line=Bad", "line"), ("pixel_threshold=1e-308", "pixel_threshold"), ("pixel_threshold=many", "pixel_threshold")],
)
def test_a_bad_query_parameter_is_an_invalid_schema_422_that_names_it(
    http_service: tuple[str, Settings, ModelCard], query: str, parameter: str
) -> None:
    base, _, _ = http_service
    status, body = _post(f"{base}/v1/inspect?camera_id=cam01&{query}", small_png(1))
    assert status == 422, body
    error = InspectErrorResponse.model_validate(body).detail
    assert error.reason == "invalid_schema"
    assert f"query parameter {parameter!r}" in error.detail


def test_openapi_schema_documents_the_endpoint(http_service: tuple[str, Settings, ModelCard]) -> None:
    base, _, _ = http_service
    with urllib.request.urlopen(f"{base}/openapi.json", timeout=30) as response:
        schema = json.loads(response.read())
    operation = schema["paths"]["/v1/inspect"]["post"]
    assert "image/png" in operation["requestBody"]["content"]
    assert "InspectionResult" in json.dumps(operation["responses"]["200"])


def test_openapi_schema_documents_every_error_answer_with_the_error_body(
    http_service: tuple[str, Settings, ModelCard],
) -> None:
    base, _, _ = http_service
    with urllib.request.urlopen(f"{base}/openapi.json", timeout=30) as response:
        schema = json.loads(response.read())
    responses = schema["paths"]["/v1/inspect"]["post"]["responses"]
    assert sorted(responses) == ["200", "404", "413", "422", "503"]
    for status in ("404", "413", "422", "503"):
        assert responses[status]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/InspectErrorResponse"
        }, status
        assert responses[status]["description"] not in ("", "Additional Response"), status
    components = schema["components"]["schemas"]
    assert components["InspectErrorResponse"]["properties"]["detail"] == {"$ref": "#/components/schemas/InspectError"}
    assert sorted(components["InspectError"]["required"]) == ["detail", "reason"]
    assert "HTTPValidationError" not in components, "FastAPI's list-of-errors 422 body is never returned"


def test_asking_for_another_http_port_while_serve_runs_is_an_error(
    http_service: tuple[str, Settings, ModelCard],
) -> None:
    url, settings, card = http_service
    running = int(url.rsplit(":", 1)[1])
    with pytest.raises(ServeHttpConflict, match=f"HTTP on 127.0.0.1:{running}; its HTTP options cannot change"):
        deploy(settings, card.version, scorer_replicas=1, chunk_patches=32, http_port=free_port())
    assert _post(f"{url}/v1/inspect", small_png(3))[0] == 200, "the running app is untouched"
