"""HTTP errors, the HTTP status of each domain error, and the handlers that turn every error into JSON.

Every error body has the shape ``{"detail": {"reason": "<reason>", "message": "<text>"}}``; under
``/v2`` (the Open Inference Protocol) it is the protocol's ``{"error": "<text>"}``, with the same
``reason`` beside it and the same status. Bad input always maps to a 4xx; an unexpected exception
is logged and answered with a JSON 500 (``internal_error``) that carries no traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from store.errors import (
    ConflictError,
    DomainError,
    InvalidInputError,
    LimitExceededError,
    NotFoundError,
    UnavailableError,
)

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error of the HTTP layer itself (auth, media type, multipart framing), with its status."""

    status_code = 400
    reason = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        status_code: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        if status_code is not None:
            self.status_code = status_code
        self.headers = headers


class AuthError(ServiceError):
    status_code = 401
    reason = "missing_token"


# the HTTP status of each domain error class (the first match along the class's MRO wins)
DOMAIN_STATUS: dict[type[DomainError], int] = {
    InvalidInputError: 422,
    LimitExceededError: 413,
    NotFoundError: 404,
    ConflictError: 409,
    UnavailableError: 503,
    DomainError: 400,
}


def status_of(exc: DomainError) -> int:
    """The HTTP status for a domain error."""
    for cls in type(exc).__mro__:
        if cls in DOMAIN_STATUS:
            return DOMAIN_STATUS[cls]
    return 400


def error_body(reason: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"detail": {"reason": reason, "message": message, **extra}}


V2_PREFIX = "/v2"  # the Open Inference Protocol's routes


def error_content(path: str, reason: str, message: str, **extra: Any) -> dict[str, Any]:
    """The error body of a request to ``path``: the protocol's ``{"error", "reason"}`` under
    ``/v2``, else ``{"detail": {"reason", "message", ...}}``."""
    if path == V2_PREFIX or path.startswith(V2_PREFIX + "/"):
        return {"error": message, "reason": reason}
    return error_body(reason, message, **extra)


_STATUS_REASONS = {
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def install_error_handlers(app: FastAPI) -> None:
    """Map domain errors, validation errors, HTTP errors and anything unexpected to JSON."""

    def answer(
        request: Request, status: int, reason: str, message: str, headers: Mapping[str, str] | None = None
    ) -> JSONResponse:
        return JSONResponse(error_content(request.url.path, reason, message), status, headers=headers)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return answer(request, exc.status_code, exc.reason, exc.message, exc.headers)

    @app.exception_handler(DomainError)
    async def _domain_error(request: Request, exc: DomainError) -> JSONResponse:
        return answer(request, status_of(exc), exc.reason, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = validation_body(exc.errors())["detail"]
        content = error_content(
            request.url.path, "invalid_request", detail["message"], errors=detail["errors"]
        )
        return JSONResponse(content, 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # a body the framework could not parse: an invalid request
            return answer(request, 422, "invalid_request", str(exc.detail))
        reason = _STATUS_REASONS.get(exc.status_code, "http_error")
        return answer(request, exc.status_code, reason, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return answer(request, 500, "internal_error", "internal error (logged)")


def validation_body(errors: Any) -> dict[str, Any]:
    """A 422 body for pydantic errors, keeping only JSON-safe fields of each error."""
    items = [
        {"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg", "")), "type": err.get("type")}
        for err in list(errors)[:20]
    ]
    message = "; ".join(f"{'.'.join(i['loc'])}: {i['msg']}" for i in items[:3]) or "invalid request"
    return error_body("invalid_request", message, errors=items)
