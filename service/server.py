"""The HTTP server: uvicorn with httptools, bounded request heads, and a drain that load balancers can see.

Why httptools with a guard rather than h11: the C parser is the fast path, but uvicorn sets it no limit on the
request line or headers (one 100 MB header held every other client up for seconds), and h11's
`h11_max_incomplete_event_size` answers a plain-text 400 only. The guard counts head bytes as they arrive and
answers JSON: 414 for a long URL, 431 for a long head, 408 for a head that does not arrive in time. Slow bodies
are timed by `middleware.BodyLimitMiddleware` (an ASGI-level 408, so the app answers it like any other error).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import FrameType
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from .settings import Settings

log = logging.getLogger("service.http")

LINGER_S = 2.0  # how long a refused connection's remaining input is read and dropped before closing


@dataclass(frozen=True)
class HeadLimits:
    max_head_bytes: int  # request line + headers
    max_url_bytes: int
    head_timeout_s: float


class _Refused(Exception):
    """Raised from a parser callback to stop parsing; the refusal itself is on the protocol."""


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounded request heads and JSON refusals.

    Per connection: the head timer runs from the connection's start (or from the first byte of the next
    request on a kept-alive connection) until the headers are complete. Head bytes are counted as they
    arrive, before the parser buffers them.
    """

    def __init__(self, *args: Any, limits: HeadLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._in_body = False  # between headers complete and message complete
        self._head_bytes = 0  # bytes received while this request's head is incomplete
        self._header_bytes = 0  # bytes of this request's complete header lines
        self._head_timer: asyncio.TimerHandle | None = None
        self._refusal: tuple[int, str] | None = None
        self._refusal_sent = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refusal_sent or self.transport.is_closing():
            return  # the rest of a refused request, read and dropped until the lingering close
        if not self._in_body:
            self._head_bytes += len(data)
            self._arm_head_timer()
        super().data_received(data)  # parser errors, ours included, end in send_400_response
        if not (self._in_body or self._refusal_sent) and self._head_bytes > self.limits.max_head_bytes:
            self.refuse(431, self._head_too_large())

    # Parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_url_bytes:
            self._refusal = (
                414,
                f"the request target is longer than {self.limits.max_url_bytes} bytes (VITAE_MAX_URL_BYTES)",
            )
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        # Counted exactly here: the bytes of a chunk that also holds the start of the body are not all head.
        self._header_bytes += len(name) + len(value) + 4  # ": " and CRLF
        if len(self.url) + self._header_bytes > self.limits.max_head_bytes:
            self._refusal = (431, self._head_too_large())
            raise _Refused

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        self._in_body = True
        self._head_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        super().on_message_complete()

    # Refusals
    def _head_too_large(self) -> str:
        return (
            f"the request line and headers are larger than {self.limits.max_head_bytes} bytes (VITAE_MAX_HEADER_BYTES)"
        )

    def send_400_response(self, msg: str) -> None:
        """uvicorn calls this for every parse error; answer ours with their status, the parser's as JSON 400."""
        if self._refusal is not None:
            self.refuse(*self._refusal)
            return
        cause = sys.exc_info()[1]
        self.refuse(400, f"malformed HTTP request ({cause or msg})")

    def refuse(self, status: int, detail: str) -> None:
        """Answer a protocol-level error as JSON and close the connection (the app never sees the request)."""
        self._disarm_head_timer()
        if self._refusal_sent or self.transport.is_closing():
            return
        body = json.dumps({"detail": detail}).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self._refusal_sent = True
        # A lingering close, as nginx does: closing with the client's bytes unread would send a reset, which
        # can destroy the answer before the client reads it. Stop writing, drop what still comes, close later.
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()
        log.debug("refused %s with %d: %s", self.client, status, detail)

    # Head timer
    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.head_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_body or self._refusal_sent or self.transport.is_closing():
            return
        if self._head_bytes == 0:  # an idle connection, not a request: close it quietly
            self.transport.close()
            return
        self.refuse(
            408, f"the request headers did not arrive within {self.limits.head_timeout_s:g} s (VITAE_HEADER_TIMEOUT_S)"
        )


class DrainingServer(uvicorn.Server):
    """uvicorn's server with a pre-stop grace on SIGTERM.

    1. SIGTERM turns /readyz 503 (`on_drain`) while the port stays open and requests are served as usual,
       for `grace_s` seconds: time for a load balancer to see the 503 and send no more traffic.
    2. Then uvicorn stops accepting, waits for the open requests (whose images the batcher keeps computing)
       and runs the lifespan shutdown, which drains whatever is still queued.
    A second signal during the grace, or SIGINT (Ctrl+C) at any time, goes straight to step 2.
    """

    def __init__(self, config: uvicorn.Config, on_drain: Callable[[], None], grace_s: float) -> None:
        super().__init__(config)
        self._on_drain = on_drain
        self._grace_s = grace_s
        self._close_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # SIGTERM is how orchestrators stop a pod; SIGINT is a person at a terminal, who need not wait.
        if sig == signal.SIGTERM and self._close_at is None and self._grace_s > 0:
            self._close_at = time.monotonic() + self._grace_s
            self._on_drain()
            log.info("signal %d: not ready; closing the port in %.1f s", sig, self._grace_s)
            return
        self._on_drain()
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self._close_at is not None and time.monotonic() >= self._close_at and not self.should_exit:
            self.should_exit = True
        return await super().on_tick(counter)


def server_config(
    app: FastAPI, settings: Settings, *, host: str | None = None, port: int | None = None
) -> uvicorn.Config:
    """The uvicorn configuration of the service: guarded httptools, no websockets, limits from settings."""
    limits = HeadLimits(settings.max_header_bytes, settings.max_url_bytes, settings.header_timeout_s)
    return uvicorn.Config(
        app,
        host=settings.host if host is None else host,
        port=settings.port if port is None else port,
        http=partial(GuardedHttpProtocol, limits=limits),  # type: ignore[arg-type]
        ws="none",
        log_level=settings.log_level,
        # uvicorn's lines go to the root logger (service.logs formats them); the middleware logs each request,
        # with its id, in place of uvicorn's access line.
        log_config=None,
        access_log=False,
        lifespan="on",
        # Requests cannot outlive their deadline, so waiting a little longer than it is enough.
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )


def serve(app: FastAPI, settings: Settings) -> None:
    """Serve the app until SIGTERM/SIGINT, then drain and return (exit status 0)."""
    server = DrainingServer(server_config(app, settings), app.state.service.begin_drain, settings.drain_grace_s)
    # uvicorn re-raises the captured signal after a graceful shutdown; with this no-op handler in place
    # that re-raise does not kill the process, so a drained shutdown exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
