"""How a span says it failed: one helper for request spans (service.tracing) and batch spans (service.batch_spans)."""

from __future__ import annotations

from opentelemetry.trace import Span, Status, StatusCode


def mark_error(span: Span, kind: str, message: str = "") -> None:
    """The span's status ERROR with `message` (at most 200 characters, else `kind`), and `error.type` = `kind`."""
    span.set_status(Status(StatusCode.ERROR, message[:200] or kind))
    span.set_attribute("error.type", kind)
