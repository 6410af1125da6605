"""HTTP errors, the HTTP status of each domain error, and the handlers that turn every error into JSON.

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

    @app.exception_handler(DomainError)
    async def _domain_error(_: Request, exc: DomainError) -> JSONResponse:
        return JSONResponse(error_body(exc.reason, exc.message), status_of(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(validation_body(exc.errors()), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # a body the framework could not parse: an invalid request
            return JSONResponse(error_body("invalid_request", str(exc.detail)), 422)
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
