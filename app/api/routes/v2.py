"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST) beside the native API.

``/v2`` server metadata, ``/v2/health/live|ready``, model metadata and readiness, and
``/infer``: the body is decoded (:mod:`app.open_inference`) into the inputs ``/predict`` takes,
answered by the same code (:func:`app.prediction.predict`: limits, micro-batching, drift), and
encoded as output tensors. A version in the path is served only while it is the version this
process serves. Errors are the protocol's ``{"error": ...}`` (with ``reason``), with
``/predict``'s statuses; health and readiness are 200 when true and 400 when false.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from app import prediction
from app.api.deps import AutoAdaptDep, DecoderDep, ServerDep, SettingsDep
from app.api.openapi import body_schema, error_responses
from app.api.parsing import Decoder
from app.auto_adapt import AutoAdapter
from app.core.config import Settings
from app.errors import ServiceError
from app.model_server import ModelServer
from app.open_inference import (
    EXTENSIONS,
    PLATFORMS,
    encode_answer,
    input_metadata,
    output_metadata,
    read_infer,
)
from app.schemas_v2 import (
    ErrorPublic,
    InferRequest,
    InferResponse,
    LivePublic,
    ModelMetadataPublic,
    ModelReadyPublic,
    ReadyPublic,
    ServerMetadataPublic,
)
from app.serving import LoadedVersion
from store.errors import NotFoundError

router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])

MEDIA_TYPES = frozenset({"application/json", "application/octet-stream"})
HEADER_LENGTH = "inference-header-content-length"


def _served(server: ModelServer, name: str, version: str | None) -> LoadedVersion:
    """The version of ``name`` this process serves (404 unknown model, 503 not loaded), which must
    be ``version`` when the path names one (404 ``version_not_served``)."""
    current = server.current(name)
    _check_version(name, version, current.version)
    return current


def _check_version(name: str, version: str | None, served: int) -> None:
    if version is not None and version != str(served):
        raise NotFoundError(
            f"model {name!r} version {version!r} is not served (this process serves version {served})",
            reason="version_not_served",
        )


@router.get("", response_model=ServerMetadataPublic, summary="Server metadata")
async def server_metadata(request: Request) -> ServerMetadataPublic:
    return ServerMetadataPublic(
        name=request.app.title, version=request.app.version, extensions=list(EXTENSIONS)
    )


@router.get("/health/live", response_model=LivePublic, summary="Server live")
async def live() -> LivePublic:
    return LivePublic(live=True)


@router.get(
    "/health/ready",
    response_model=ReadyPublic,
    summary="Server ready: every served model is loaded",
    responses={400: {"model": ReadyPublic, "description": "not ready"}},
)
async def ready(server: ServerDep) -> JSONResponse:
    ok, _, _ = server.ready()
    return JSONResponse(ReadyPublic(ready=ok).model_dump(), status_code=200 if ok else 400)


def _model_ready(server: ModelServer, name: str, version: str | None) -> JSONResponse:
    current = server.slot(name).current
    if current is not None:
        _check_version(name, version, current.version)
    body = ModelReadyPublic(name=name, ready=current is not None).model_dump()
    return JSONResponse(body, status_code=200 if current is not None else 400)


READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ModelReadyPublic, "description": "not loaded yet"},
    **error_responses(404, 422, body=ErrorPublic),
}


@router.get("/models/{name}/ready", response_model=ModelReadyPublic, responses=READY_RESPONSES)
async def model_ready(name: str, server: ServerDep) -> JSONResponse:
    return _model_ready(server, name, None)


@router.get(
    "/models/{name}/versions/{version}/ready", response_model=ModelReadyPublic, responses=READY_RESPONSES
)
async def model_version_ready(name: str, version: str, server: ServerDep) -> JSONResponse:
    return _model_ready(server, name, version)


def _metadata(server: ModelServer, settings: Settings, name: str, version: str | None) -> ModelMetadataPublic:
    current = _served(server, name, version)
    return ModelMetadataPublic(
        name=name,
        versions=[str(current.version)],
        platform=PLATFORMS[settings.backend],
        inputs=input_metadata(current.kind, current.manifest.inputs),
        outputs=output_metadata(current.num_classes, current.evidence is not None),
    )


METADATA_RESPONSES = error_responses(404, 422, 503, body=ErrorPublic)


@router.get("/models/{name}", response_model=ModelMetadataPublic, responses=METADATA_RESPONSES)
async def model_metadata(name: str, server: ServerDep, settings: SettingsDep) -> ModelMetadataPublic:
    """The model's input tensors (an image model's ``x`` also takes BYTES ``[N]``: PNG/JPEG files)
    and output tensors (``unusual`` where the served version has a clean reference for it)."""
    return _metadata(server, settings, name, None)


@router.get(
    "/models/{name}/versions/{version}", response_model=ModelMetadataPublic, responses=METADATA_RESPONSES
)
async def model_version_metadata(
    name: str, version: str, server: ServerDep, settings: SettingsDep
) -> ModelMetadataPublic:
    return _metadata(server, settings, name, version)


INFER_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": body_schema(InferRequest)},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "binary tensor data: the JSON request (Inference-Header-Content-Length "
                "bytes), then each binary input's bytes in order",
            },
        },
    }
}
INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the output tensors; with binary outputs, the JSON (Inference-Header-Content-Length "
        "bytes) then their bytes",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    **error_responses(404, 413, 415, 422, 503, body=ErrorPublic),
}


async def _infer(
    request: Request,
    name: str,
    version: str | None,
    server: ModelServer,
    settings: Settings,
    decoder: Decoder,
    auto: AutoAdapter,
) -> Response:
    served = _served(server, name, version)
    request.state.model = name
    media = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if media not in MEDIA_TYPES or encoding != "identity":
        raise ServiceError(
            f"unsupported content type {media!r} / encoding {encoding!r}: send application/json "
            "(or application/octet-stream with Inference-Header-Content-Length), uncompressed",
            reason="unsupported_media_type",
            status_code=415,
        )
    body = await request.body()
    call = await decoder.run(
        read_infer,
        body,
        request.headers.get(HEADER_LENGTH),
        served.kind,
        served.manifest.inputs,
        settings.max_inputs,
        settings.max_image_bytes,
    )
    del body
    answer = await prediction.predict(server, settings, auto, name, call.inputs, call.k, call.seed)
    _check_version(name, version, answer.version)  # the version was swapped while answering
    content, header_length = encode_answer(answer, call)
    if header_length is None:
        return Response(content, media_type="application/json")
    return Response(
        content,
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(header_length)},
    )


@router.post(
    "/models/{name}/infer",
    response_model=InferResponse,
    summary="Classify a batch of tensors (eq. 6), as POST /predict",
    openapi_extra=INFER_OPENAPI,
    responses=INFER_RESPONSES,
)
async def infer(
    request: Request,
    name: str,
    server: ServerDep,
    settings: SettingsDep,
    decoder: DecoderDep,
    auto: AutoAdaptDep,
) -> Response:
    """Inputs as ``GET /v2/models/{name}`` lists them; ``parameters``: ``k``, ``seed``,
    ``binary_data_output``; outputs ``probabilities``, ``label``, ``log_px``, ``unusual``."""
    return await _infer(request, name, None, server, settings, decoder, auto)


@router.post(
    "/models/{name}/versions/{version}/infer",
    response_model=InferResponse,
    summary="Classify with the named version, while it is the one served",
    openapi_extra=INFER_OPENAPI,
    responses=INFER_RESPONSES,
)
async def infer_version(
    request: Request,
    name: str,
    version: str,
    server: ServerDep,
    settings: SettingsDep,
    decoder: DecoderDep,
    auto: AutoAdaptDep,
) -> Response:
    return await _infer(request, name, version, server, settings, decoder, auto)
