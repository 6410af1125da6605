"""Pure ASGI middleware: a body-size limit (413 with a JSON reason) and request metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_content
from app.metrics import ServiceMetrics
from store.errors import LimitExceededError


class BodyLimitMiddleware:
    """Refuse a body larger than ``limit_for(path)`` bytes: by Content-Length, or while streaming."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        for key, value in scope.get("headers", ()):
            if key == b"content-length" and value.isdigit() and int(value) > limit:
                await _send_413(send, scope["path"], limit)
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise LimitExceededError(f"request body exceeds {limit} bytes", reason="body_too_large")
            return message

        await self.app(scope, limited, send)


async def _send_413(send: Send, path: str, limit: int) -> None:
    content = error_content(path, "body_too_large", f"request body exceeds {limit} bytes")
    body = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    """The method as a metric label: the standard ones as they are, anything else ``other``."""
    return method if method in METHODS else "other"


class MetricsMiddleware:
    """Count requests and time them per route template and model (routes set ``request.state.model``).

    Every label has a bounded set of values: routes are the app's templates (``unmatched``
    otherwise), methods the standard ones (``other`` otherwise), models those the process serves.
    """

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/metrics":
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, observed)
        finally:
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", "unmatched")
            model = str((scope.get("state") or {}).get("model", ""))
            method = method_label(str(scope["method"]))
            self.metrics.requests.labels(route=route, method=method, model=model, status=str(status)).inc()
            self.metrics.latency.labels(route=route, method=method, model=model).observe(
                time.perf_counter() - start
            )
