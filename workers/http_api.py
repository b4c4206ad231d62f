"""`POST /v1/inspect`: one image in the request body, its `InspectionResult` back, synchronously.

For callers that want an answer now rather than on the results stream. The gateway is its own
Serve application (``anomap-http``) that calls the ``InspectionService`` of the ``anomap`` app, so
both paths score with the same replicas and write the same map objects::

    curl -s --data-binary @part.png -H 'Content-Type: image/png' \\
        'http://127.0.0.1:8000/v1/inspect?camera_id=cam01&line=default'

Every error has one body, `InspectErrorResponse`, and a reason code::

    {"detail": {"reason": "undecodable_image", "detail": "cannot identify image file"}}

Bodies over 16 MiB are a 413 ``payload_too_large``, refused before they are read whole; an undecodable or
oversized image is a 422 with the same reason codes as the dead-letter stream, a bad query parameter a 422
``invalid_schema`` whose detail names it; when the scorers' queues are full the answer is a 503 ``busy``
with ``Retry-After: 1`` (nothing was scored or stored: send the image again), when the object store is
away a 503 ``store_unavailable`` (nothing is left stored), and a line without a live model a 404
``no_live_model``. Maps go to ``maps/<line>/<day>/http/<job_id>``, so a caller's ``job_id`` never
overwrites a streamed job's map. The OpenAPI schema, these answers included, is at ``/openapi.json``.
"""

# No `from __future__ import annotations` here: FastAPI resolves the endpoint's annotations at runtime.
import asyncio
import contextlib
import time
import uuid
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, NoReturn

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle

from schemas import DeadReason, InspectionJob, InspectionResult, Settings
from schemas.ids import CAMERA_PATTERN, JOB_ID_PATTERN, LINE_PATTERN
from schemas.job import MIN_PIXEL_THRESHOLD
from schemas.stream import MAX_INLINE_IMAGE_BYTES
from trainer.imaging import ImageRejected, decode_image
from trainer.registry import ModelNotFound
from trainer.store import ObjectStore
from workers.backpressure import is_backpressure
from workers.maps import HTTP_FOLDER, map_objects
from workers.results import build_result

HTTP_APP_NAME = "anomap-http"


class GatewayReason(StrEnum):
    """Reasons only the HTTP gateway gives; a refused image or query has its `DeadReason` instead."""

    BUSY = "busy"
    """The scorers' queues are full: nothing was scored or stored; send the image again (``Retry-After``)."""
    STORE_UNAVAILABLE = "store_unavailable"
    """The map could not be stored; nothing is left half-written (``Retry-After``)."""
    NO_LIVE_MODEL = "no_live_model"
    """The line has no live model and there is no default one."""


class InspectError(BaseModel):
    """Why `POST /v1/inspect` did not return a result."""

    reason: str = Field(
        description="A `DeadReason` value where one applies (`invalid_schema`, `empty_image`, "
        "`undecodable_image`, `image_too_large`, `payload_too_large`, ...), else `busy`, "
        "`store_unavailable` or `no_live_model`.",
        examples=["undecodable_image"],
    )
    detail: str = Field(description="What was wrong, for a person.", examples=["cannot identify image file"])


class InspectErrorResponse(BaseModel):
    """The body of every error answer: ``{"detail": {"reason": ..., "detail": ...}}``."""

    detail: InspectError


def _error_response(description: str) -> dict[str, Any]:
    return {"model": InspectErrorResponse, "description": description}


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: _error_response("`no_live_model`: the line has no live model and there is no default one."),
    413: _error_response("`payload_too_large`: the body is over 16 MiB; refused before it is read whole."),
    422: _error_response(
        "The image or a query parameter was refused: `invalid_schema` (the detail names the parameter) or the "
        "dead-letter reason of the image (`empty_image`, `undecodable_image`, `image_too_large`, ...)."
    ),
    503: _error_response(
        "`busy` (the scorers' queues are full) or `store_unavailable` (the map could not be stored); nothing "
        "is left stored. Send the image again after `Retry-After` seconds."
    ),
}


def _refusal(status: int, reason: StrEnum, detail: str, headers: Mapping[str, str] | None = None) -> HTTPException:
    """An error answer whose body is an `InspectErrorResponse`."""
    body = InspectError(reason=reason.value, detail=detail).model_dump()
    return HTTPException(status, body, headers=dict(headers) if headers else None)


api = FastAPI(
    title="anomap",
    version="1",
    description="Pixel-level anomaly maps for factory camera images (Noisy-AnoGAN on patches).",
)

_IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            media: {"schema": {"type": "string", "format": "binary"}}
            for media in ("image/png", "image/jpeg", "image/tiff", "image/bmp", "application/octet-stream")
        },
    }
}


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A bad query parameter is a 422 ``invalid_schema`` that names it, in the body every error has."""
    detail = "; ".join(_describe_validation_error(error) for error in exc.errors())
    body = InspectErrorResponse(detail=InspectError(reason=DeadReason.INVALID_SCHEMA.value, detail=detail))
    return JSONResponse(body.model_dump(), status_code=422)


def _describe_validation_error(error: Mapping[str, Any]) -> str:
    """``query parameter 'line': String should match pattern '...' (got 'Bad')``."""
    where, *path = [str(part) for part in error.get("loc", ())] or ["request"]
    name = f"{where} parameter {'.'.join(path)!r}" if path else where
    given = error.get("input")
    if not isinstance(given, str | int | float):
        return f"{name}: {error.get('msg', 'invalid')}"
    shown = str(given) if len(str(given)) <= 60 else f"{str(given)[:60]}..."
    return f"{name}: {error.get('msg', 'invalid')} (got {shown!r})"


async def _read_bounded(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    too_large = DeadReason.PAYLOAD_TOO_LARGE
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _refusal(413, too_large, f"image is {declared} bytes; at most {limit} are allowed")
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise _refusal(413, too_large, f"image is over {limit} bytes; at most {limit} are allowed")
    if not body:
        raise _refusal(422, DeadReason.EMPTY_IMAGE, "the request body is empty")
    return bytes(body)


@serve.deployment(name="HttpGateway", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=16)
@serve.ingress(api)
class HttpGateway:
    """Decodes the body, scores it through the ``anomap`` app, stores the map, returns the result."""

    def __init__(self, settings: Settings, scoring_app: str = "anomap") -> None:
        self.store = ObjectStore.from_settings(settings)
        self.service: DeploymentHandle = serve.get_deployment_handle("InspectionService", app_name=scoring_app)

    @api.post("/v1/inspect", response_model=InspectionResult, responses=_ERROR_RESPONSES, openapi_extra=_IMAGE_BODY)
    async def inspect(
        self,
        request: Request,
        camera_id: Annotated[str, Query(pattern=CAMERA_PATTERN)] = "http",
        line: Annotated[str, Query(pattern=LINE_PATTERN)] = "default",
        job_id: Annotated[str | None, Query(pattern=JOB_ID_PATTERN)] = None,
        pixel_threshold: Annotated[float | None, Query(ge=MIN_PIXEL_THRESHOLD, le=1e6)] = None,
    ) -> InspectionResult:
        """Score the image in the body; the map and overlay are stored like a streamed job's."""
        started = time.perf_counter()
        data = await _read_bounded(request, MAX_INLINE_IMAGE_BYTES)
        try:
            job = InspectionJob(
                job_id=job_id or f"{camera_id}-http-{uuid.uuid4().hex[:12]}",
                camera_id=camera_id,
                line=line,
                pixel_threshold=pixel_threshold,
            )
            image = await asyncio.to_thread(decode_image, data)  # CPU work: off the loop the replica's requests share
        except ValidationError as exc:
            raise _refusal(422, DeadReason.INVALID_SCHEMA, str(exc)) from exc
        except ImageRejected as exc:
            raise _refusal(422, exc.reason, exc.detail) from exc
        decoded = time.perf_counter()
        try:
            scored = await self.service.inspect.remote(image, pixel_threshold, line)
        except Exception as exc:
            _raise_scoring_error(exc, line)
        scored_at = time.perf_counter()
        objects = await asyncio.to_thread(map_objects, job, image, scored, HTTP_FOLDER)  # npz + JPEG encoding
        written: list[str] = []
        try:
            for obj in objects:
                await asyncio.to_thread(self.store.put_bytes, obj.key, obj.data, obj.content_type)
                written.append(obj.key)
        except Exception as exc:  # minio retried already: the store is away; leave no half of the pair behind
            for key in written:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.store.delete, key)
            detail = f"storing the map failed: {exc.__class__.__name__}"
            raise _refusal(503, GatewayReason.STORE_UNAVAILABLE, detail, {"Retry-After": "5"}) from exc
        stage_ms = {
            "decode": (decoded - started) * 1e3,
            "score": (scored_at - decoded) * 1e3,
            "store": (time.perf_counter() - scored_at) * 1e3,
        }
        return build_result(job, scored, self.store.ref(objects[0].key), self.store.ref(objects[1].key), stage_ms)


def _scoring_error(exc: Exception, line: str) -> Exception:
    """What the caller gets when the ingress did not score the image: 503 when Serve's queues are full (send
    again), 404 when the line has no live model, else the error itself (a 500)."""
    if is_backpressure(exc):
        detail = "the scorers are at capacity; send the image again shortly"
        return _refusal(503, GatewayReason.BUSY, detail, {"Retry-After": "1"})
    cause = getattr(exc, "cause", None) or exc
    if isinstance(cause, ModelNotFound):
        return _refusal(404, GatewayReason.NO_LIVE_MODEL, f"line {line!r}: {cause}")
    return exc


def _raise_scoring_error(exc: Exception, line: str) -> NoReturn:
    """Raise `_scoring_error` of ``exc``, chained to it, or ``exc`` itself as it was (never its own cause)."""
    error = _scoring_error(exc, line)
    if error is exc:
        raise exc
    raise error from exc


def app_builder(args: Mapping[str, Any]) -> serve.Application:
    """Application builder for a Serve config (``import_path: workers.http_api:app_builder``).

    ``args``: ``scoring_app``, the name of the app whose ``InspectionService`` scores (default
    ``anomap``). Connection settings come from the environment (`Settings.from_env`).
    """
    unknown = sorted(set(args) - {"scoring_app"})
    if unknown:
        msg = f"unknown app_builder args {unknown}; expected only 'scoring_app'"
        raise ValueError(msg)
    return HttpGateway.bind(Settings.from_env(), str(args.get("scoring_app", "anomap")))
