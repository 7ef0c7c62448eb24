"""Pure ASGI middleware (no BaseHTTPMiddleware, which would buffer bodies and hide disconnects)."""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import logs
from .metrics import Metrics
from .tracing import Tracing, end_server_span

log = logging.getLogger("service")
request_log = logging.getLogger("service.requests")

CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that went away before the answer


class BodyTooLarge(Exception):
    """The request body passed the byte limit while it was being read."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than the limit of {limit} bytes (VITAE_MAX_UPLOAD_BYTES)")
        self.limit = limit


class BodyTimeout(Exception):
    """The request body did not arrive in full within the body timeout."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the request body did not arrive within {timeout_s:g} s (VITAE_BODY_TIMEOUT_S)")


def protocol_key(path: str) -> str:
    """The error body's key: "error" under /v2 (KServe v2), else "detail"."""
    return "error" if path == "/v2" or path.startswith("/v2/") else "detail"


def too_large_response(limit: int, path: str = "") -> JSONResponse:
    """413 in the error body of the route's protocol: {"error": ...} under /v2 (KServe v2), else {"detail": ...}."""
    # Connection: close, so the server drops the rest of an upload instead of reading it for keep-alive.
    body = {protocol_key(path): str(BodyTooLarge(limit))}
    return JSONResponse(body, status_code=413, headers={"Connection": "close"})


def body_timeout_response(exc: BodyTimeout, path: str = "") -> JSONResponse:
    """408 in the error body of the route's protocol, like too_large_response."""
    return JSONResponse({protocol_key(path): str(exc)}, status_code=408, headers={"Connection": "close"})


class BodyLimitMiddleware:
    """Bound the request body in bytes and in time.

    413 from Content-Length alone when it is over the limit; otherwise bytes are counted as they stream in.
    The whole body must arrive within `timeout_s` of the request's start (a slow or stalled client gets 408).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = float("inf")) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

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
        body_done = False
        deadline = time.monotonic() + self.timeout_s

        async def counting_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # only http.disconnect can come now, whenever the client leaves: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise BodyTimeout(self.timeout_s) from None  # a 408 by the app's exception handler
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)  # turned into a 413 by the app's exception handler
                body_done = not message.get("more_body", False)
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
        except ClientDisconnect:
            # The client left mid-upload: nobody to answer, nothing wrong with the server. One line, no traceback.
            status = CLIENT_CLOSED_REQUEST
            log.info(
                "%s %s: the client disconnected before its request body was complete", scope["method"], scope["path"]
            )
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


class RequestContextMiddleware:
    """The outermost layer: the request's id, its server span and its one log line.

    The id is the client's valid X-Request-ID or a new one (service.logs); it is on every answer, errors
    included, and on every log line written while the request runs, with the trace id when tracing is on. An
    error nothing else answered is answered here (500, naming the id) and logged with its traceback.
    """

    def __init__(self, app: ASGIApp, tracing: Tracing) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        info = logs.RequestInfo(logs.request_id(scope["headers"]))
        id_header = (b"x-request-id", info.request_id.encode())
        started = time.perf_counter()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), id_header]}
            await send(message)

        with self.tracing.server_span(scope) as span, logs.request_context(info):
            if span.get_span_context().is_valid:
                info.trace_id = format(span.get_span_context().trace_id, "032x")
                span.set_attribute("vitae.request_id", info.request_id)
            try:
                await self.app(scope, receive, send_with_id)
            except Exception as exc:
                info.error_kind = info.error_kind or type(exc).__name__
                log.exception("%s %s failed", scope["method"], scope["path"])
                if status:
                    raise  # the answer had begun: only the connection can end it now
                detail = f"internal error ({type(exc).__name__}); request id {info.request_id}"
                await JSONResponse({protocol_key(scope["path"]): detail}, 500)(scope, receive, send_with_id)
            finally:
                status = status or CLIENT_CLOSED_REQUEST  # no answer: the client left first
                end_server_span(span, getattr(scope.get("route"), "path", None), status, info.error_kind)
                self._log(scope, status, time.perf_counter() - started, info)

    @staticmethod
    def _log(scope: Scope, status: int, elapsed_s: float, info: logs.RequestInfo) -> None:
        fields = {"method": scope["method"], "path": scope["path"], "status": status}
        fields |= {"duration_ms": round(elapsed_s * 1000, 3), "error_kind": info.error_kind}
        text = "%(method)s %(path)s %(status)d in %(duration_ms).1f ms"
        if info.queue_ms is not None:
            fields |= {"queue_ms": info.queue_ms, "inference_ms": info.inference_ms}
            text += " (queue %(queue_ms).1f ms, inference %(inference_ms).1f ms)"
        request_log.info(text, fields, extra=fields)
