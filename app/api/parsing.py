"""Reading ``/predict`` and ``/adapt`` bodies: JSON (images or records) or multipart image uploads."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.data import Inputs
from app.errors import InputError, ServiceError, TooLargeError, validation_body
from app.inputs import files_to_inputs, images_to_inputs, records_to_inputs
from app.schemas import AdaptRequest, InputsRequest, PredictRequest

R = TypeVar("R", bound=InputsRequest)


class RequestValidationFailedError(ServiceError):
    """A body that does not match its schema (422, ``invalid_request``, with the pydantic errors)."""

    status_code = 422
    reason = "invalid_request"


@dataclass(frozen=True)
class ParsedInputs:
    """A request's target model, options and decoded inputs."""

    model: str
    inputs: Inputs
    k: int | None = None
    seed: int | None = None
    finetune: dict[str, Any] | None = None


def _validated(model_cls: type[R], payload: bytes | dict[str, object]) -> R:
    try:
        if isinstance(payload, bytes):
            return model_cls.model_validate_json(payload)
        return model_cls.model_validate(payload)
    except ValidationError as exc:
        body = validation_body(exc.errors())
        raise RequestValidationFailedError(body["detail"]["message"]) from exc


async def _json(
    request: Request,
    model_cls: type[R],
    max_inputs: int,
    max_image_bytes: int,
    check_model: Callable[[str], object],
) -> tuple[R, Inputs]:
    req = _validated(model_cls, await request.body())
    check_model(req.model)
    if req.count > max_inputs:
        raise TooLargeError(f"{req.count} inputs (limit {max_inputs})", reason="too_many_inputs")
    if req.images is not None:
        inputs = await run_in_threadpool(images_to_inputs, req.images, max_image_bytes)
    else:
        inputs = await run_in_threadpool(records_to_inputs, req.records or [])
    return req, inputs


async def _multipart(
    request: Request, max_inputs: int, max_image_bytes: int, check_model: Callable[[str], object]
) -> tuple[dict[str, str], Inputs]:
    try:
        form = await request.form(max_files=max_inputs, max_fields=16, max_part_size=max_image_bytes)
    except StarletteHTTPException as exc:
        too_many = "Too many files" in str(exc.detail)
        raise (
            TooLargeError(f"too many files (limit {max_inputs})", reason="too_many_inputs")
            if too_many
            else InputError(f"bad multipart body: {exc.detail}", reason="bad_multipart", status_code=400)
        ) from exc
    try:
        uploads = [
            item for key in ("images", "files") for item in form.getlist(key) if isinstance(item, UploadFile)
        ]
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        if len(uploads) > max_inputs:
            raise TooLargeError(f"{len(uploads)} files (limit {max_inputs})", reason="too_many_inputs")
        check_model(fields.get("model", ""))
        blobs = [await upload.read() for upload in uploads]
    finally:
        await form.close()
    inputs = await run_in_threadpool(files_to_inputs, blobs, max_image_bytes)
    return fields, inputs


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "application/json").split(";")[0].strip().lower()


async def read_predict(
    request: Request, max_inputs: int, max_image_bytes: int, check_model: Callable[[str], object]
) -> ParsedInputs:
    """``PredictRequest`` as JSON, or multipart with fields ``model``, ``k``, ``seed`` and files ``images``.

    ``check_model(name)`` runs before any input is decoded (an unknown model is reported first).
    """
    kind = _content_type(request)
    if kind == "application/json":
        req, inputs = await _json(request, PredictRequest, max_inputs, max_image_bytes, check_model)
        return ParsedInputs(req.model, inputs, k=req.k, seed=req.seed)
    if kind == "multipart/form-data":
        fields, inputs = await _multipart(request, max_inputs, max_image_bytes, check_model)
        opts = _validated(
            PredictRequest, {"model": fields.get("model", ""), "images": [], **_ints(fields, "k", "seed")}
        )
        return ParsedInputs(opts.model, inputs, k=opts.k, seed=opts.seed)
    raise InputError(f"unsupported content type {kind!r}", reason="unsupported_media_type", status_code=415)


async def read_adapt(
    request: Request, max_inputs: int, max_image_bytes: int, check_model: Callable[[str], object]
) -> ParsedInputs:
    """``AdaptRequest`` as JSON, or multipart with ``model``, optional ``finetune`` (JSON) and files."""
    kind = _content_type(request)
    if kind == "application/json":
        req, inputs = await _json(request, AdaptRequest, max_inputs, max_image_bytes, check_model)
        return ParsedInputs(req.model, inputs, finetune=req.finetune)
    if kind == "multipart/form-data":
        fields, inputs = await _multipart(request, max_inputs, max_image_bytes, check_model)
        try:
            finetune = json.loads(fields["finetune"]) if "finetune" in fields else None
        except ValueError as exc:
            raise InputError(f"finetune is not JSON: {exc}", reason="invalid_request") from exc
        opts = _validated(
            AdaptRequest, {"model": fields.get("model", ""), "images": [], "finetune": finetune}
        )
        return ParsedInputs(opts.model, inputs, finetune=opts.finetune)
    raise InputError(f"unsupported content type {kind!r}", reason="unsupported_media_type", status_code=415)


def _ints(fields: dict[str, str], *names: str) -> dict[str, object]:
    """Form fields that must be integers (left as strings if not, so that validation names them)."""
    out: dict[str, object] = {}
    for name in names:
        if name in fields and fields[name] != "":
            value = fields[name]
            out[name] = int(value) if value.lstrip("-").isdigit() else value
    return out
