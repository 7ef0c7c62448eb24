"""Pure ASGI middleware (no BaseHTTPMiddleware, which would buffer bodies and hide disconnects)."""

from __future__ import annotations

import time

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .metrics import Metrics


class BodyTooLarge(Exception):
    """The request body passed the byte limit while it was being read."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than the limit of {limit} bytes (VITAE_MAX_UPLOAD_BYTES)")
        self.limit = limit


def too_large_response(limit: int, path: str = "") -> JSONResponse:
    """413 in the error body of the route's protocol: {"error": ...} under /v2 (KServe v2), else {"detail": ...}."""
    key = "error" if path == "/v2" or path.startswith("/v2/") else "detail"
    # Connection: close, so the server drops the rest of an upload instead of reading it for keep-alive.
    return JSONResponse({key: str(BodyTooLarge(limit))}, status_code=413, headers={"Connection": "close"})


class BodyLimitMiddleware:
    """413 from Content-Length alone when it is over the limit; otherwise count bytes as they stream in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await too_large_response(self.max_bytes, scope["path"])(scope, receive, send)
                    return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)  # turned into a 413 by the app's exception handler
            return message

        await self.app(scope, counting_receive, send)


class MetricsMiddleware:
    """Requests by route template (not raw path, to bound label cardinality), method and status; latency."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
