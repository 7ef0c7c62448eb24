"""Request ids and log lines: every line logged while a request runs names it, in readable text or in JSON.

1. request_id        the client's X-Request-ID when it is valid (1..128 safe characters), else a new one
2. request_context   the request's RequestInfo in a context variable, for as long as the request runs
3. RequestFields     a logging filter that copies the request's id, trace id and model onto each record
4. configure_logging one handler on the root logger: readable text (default) or one JSON object a line
"""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID = 128
_SAFE_ID = re.compile(rf"[A-Za-z0-9._~:@+=/-]{{1,{MAX_REQUEST_ID}}}")

# Fields a log call may add with `extra=`; the JSON format writes each one present (the text has them in its message).
EXTRA_FIELDS = ("method", "path", "status", "duration_ms", "queue_ms", "inference_ms", "images", "error_kind")


@dataclass
class RequestInfo:
    """What the log lines of one request carry; filled in as the request goes (model once it is known)."""

    request_id: str
    trace_id: str | None = None  # 32 hex digits when tracing is on
    model: str | None = None  # "name:version"
    queue_ms: float | None = None  # the longest an image of the request waited for its batch
    inference_ms: float | None = None  # the longest batch the request's images rode in
    error_kind: str | None = None  # the first error's kind, e.g. ImageDecodeError, BatchFailedError


_current: ContextVar[RequestInfo | None] = ContextVar("vitae_request", default=None)


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID when it is 1..128 safe characters (letters, digits, ._~:@+=/-), else a new one."""
    for name, value in headers:
        if name == b"x-request-id":
            given = value.decode("latin-1").strip()
            if _SAFE_ID.fullmatch(given):
                return given
            break
    return uuid.uuid4().hex


def current() -> RequestInfo | None:
    """The running request's info, or None outside a request."""
    return _current.get()


@contextmanager
def request_context(info: RequestInfo) -> Iterator[RequestInfo]:
    token = _current.set(info)
    try:
        yield info
    finally:
        _current.reset(token)


def note(**fields: str | float | None) -> None:
    """Set fields of the running request's info (model, durations, error_kind); a no-op outside a request."""
    info = _current.get()
    if info is not None:
        for name, value in fields.items():
            if name == "error_kind" and info.error_kind is not None:
                continue  # the first error is the cause; later ones follow from it
            setattr(info, name, value)


class RequestFields(logging.Filter):
    """Copies the running request's id, trace id and model onto every record (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        info = _current.get()
        record.request_id = info.request_id if info else None
        record.trace_id = info.trace_id if info else None
        record.model = info.model if info else None
        return True


class TextFormatter(logging.Formatter):
    """`time LEVEL logger [request=... trace=...]: message`, the brackets only on lines about a request."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s%(request)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        ids = [f"request={record.request_id}"] if getattr(record, "request_id", None) else []
        if getattr(record, "trace_id", None):
            ids.append(f"trace={record.trace_id}")
        record.request = f" [{' '.join(ids)}]" if ids else ""
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: timestamp, level, logger, message, request_id, trace_id, model and the extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "trace_id": getattr(record, "trace_id", None),
            "model": getattr(record, "model", None),
        }
        entry |= {name: getattr(record, name) for name in EXTRA_FIELDS if hasattr(record, name)}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, fmt: str = "text", stream: TextIO | None = None) -> None:
    """Replace the root logger's handlers with one that writes `fmt` ("text" or "json") to `stream` (stderr)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestFields())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
