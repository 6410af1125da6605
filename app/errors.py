"""Domain errors with a machine-readable reason, and the handlers that turn every error into JSON.

Every error body has the shape ``{"detail": {"reason": "<reason>", "message": "<text>"}}``.
Bad input always maps to a 4xx; an unexpected exception is logged and answered with a JSON 500
(``internal_error``) that carries no traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error with an HTTP status and a machine-readable reason."""

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


class InputError(ServiceError):
    """The request's data cannot be used (shape, decoding, range, NaN/inf)."""

    status_code = 422
    reason = "invalid_input"


class TooLargeError(ServiceError):
    """Too many inputs or too large a body."""

    status_code = 413
    reason = "too_many_inputs"


class NotFoundError(ServiceError):
    status_code = 404
    reason = "not_found"


class UnavailableError(ServiceError):
    """A dependency (a model, the job queue) is not available right now."""

    status_code = 503
    reason = "unavailable"


class ConflictError(ServiceError):
    status_code = 409
    reason = "conflict"


class AuthError(ServiceError):
    status_code = 401
    reason = "missing_token"


def error_body(reason: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"detail": {"reason": reason, "message": message, **extra}}


_STATUS_REASONS = {
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


def install_error_handlers(app: FastAPI) -> None:
    """Map domain errors, validation errors, HTTP errors and anything unexpected to JSON."""

    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(error_body(exc.reason, exc.message), exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_body(exc.errors()), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = _STATUS_REASONS.get(exc.status_code, "http_error")
        return JSONResponse(error_body(reason, str(exc.detail)), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body("internal_error", "internal error (logged)"), 500)


def validation_body(errors: Any) -> dict[str, Any]:
    """A 422 body for pydantic errors, keeping only JSON-safe fields of each error."""
    items = [
        {"loc": [str(p) for p in err.get("loc", ())], "msg": str(err.get("msg", "")), "type": err.get("type")}
        for err in list(errors)[:20]
    ]
    message = "; ".join(f"{'.'.join(i['loc'])}: {i['msg']}" for i in items[:3]) or "invalid request"
    return error_body("invalid_request", message, errors=items)
