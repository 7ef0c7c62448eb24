"""OpenTelemetry traces, configured by the standard OTEL_* variables; off (and free) unless they turn it on.

1. Tracing.from_environment   create_app reads OTEL_SDK_DISABLED, OTEL_TRACES_EXPORTER (none by default: off),
                              OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL; a value it cannot serve stops the start
2. start                      the lifespan builds the SDK (imported only then): a TracerProvider with the
                              sampler of OTEL_TRACES_SAMPLER[_ARG], the resource of OTEL_SERVICE_NAME, one bounded
                              BatchSpanProcessor (OTEL_BSP_*) and the exporter (OTEL_EXPORTER_OTLP_*)
3. server_span / step         the request's server span (W3C traceparent honoured), then `step(name)` anywhere
                              under it opens a child (a no-op when off: the request carries no tracer)
4. observe                    a runtime's batchers get their observer (service.batch_spans): one span per batch,
                              linked both ways to the requests it served
5. shutdown                   the lifespan flushes what is queued, within span_export.SHUTDOWN_TIMEOUT_MS
Spans that never reach the collector are counted in vitae_trace_spans_dropped{reason}: queue_full (the processor's
bounded queue overflowed) and export_failed (the collector refused or could not be reached).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from importlib.util import find_spec
from typing import Any

from opentelemetry import trace
from opentelemetry.propagators.textmap import DefaultGetter
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.exceptions import HTTPException

from . import logs
from .metrics import Metrics
from .spans import mark_error

log = logging.getLogger("service")

EXPORTERS = ("otlp", "console")
PROTOCOLS = ("http/protobuf", "grpc")
DEFAULT_SERVICE_NAME = "vitae-serve"
_OFF = nullcontext(INVALID_SPAN)  # what span() gives when tracing is off: a span whose setters do nothing
_W3C = TraceContextTextMapPropagator()
_request_tracer: ContextVar[trace.Tracer | None] = ContextVar("vitae_tracer", default=None)


def error_kind(exc: BaseException) -> str:
    """The kind of an error as traces and logs name it: the cause's class when an HTTP error wraps one."""
    cause = exc.__cause__ if isinstance(exc, HTTPException) and exc.__cause__ is not None else exc
    return "cancelled" if isinstance(cause, asyncio.CancelledError) else type(cause).__name__


class Tracing:
    """The service's tracer, on `ServiceState.tracing`; every method is a no-op while it is off or not started."""

    def __init__(
        self, exporters: tuple[str, ...] = (), protocol: str = "http/protobuf", metrics: Metrics | None = None
    ) -> None:
        self.exporters = exporters
        self.protocol = protocol
        self.metrics = metrics
        self.tracer: trace.Tracer | None = None  # set by start(): tracing is on exactly when this is set
        self._provider: Any = None

    @classmethod
    def from_environment(cls, metrics: Metrics, environ: Mapping[str, str] = os.environ) -> Tracing:
        """Read the standard variables; ValueError naming the variable when a value cannot be served."""
        disabled = environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
        names = tuple(n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "none").split(",") if n.strip())
        exporters = () if disabled else tuple(n for n in names if n != "none")
        unknown = [n for n in exporters if n not in EXPORTERS]
        if unknown:
            raise ValueError(f"OTEL_TRACES_EXPORTER={unknown[0]} is not served; use one of otlp, console, none")
        protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        protocol = (protocol or "http/protobuf").strip().lower()
        if "otlp" in exporters and protocol not in PROTOCOLS:
            raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol} is not served; use http/protobuf or grpc")
        if "otlp" in exporters and protocol == "grpc" and find_spec("opentelemetry.exporter.otlp.proto.grpc") is None:
            raise ValueError(
                "OTEL_EXPORTER_OTLP_PROTOCOL=grpc needs opentelemetry-exporter-otlp-proto-grpc; or use http/protobuf"
            )
        return cls(exporters, protocol, metrics)

    @property
    def enabled(self) -> bool:
        return bool(self.exporters)

    def start(self) -> None:
        """Build the SDK's provider, processor and exporter (the lifespan calls this; a no-op when off)."""
        if not self.exporters or self.tracer is not None:
            return
        from . import span_export  # the SDK and the exporter are imported only when tracing is on

        self._provider = span_export.build_provider(self.exporters, self.protocol, self.metrics, DEFAULT_SERVICE_NAME)
        self.tracer = self._provider.get_tracer("service")
        log.info("tracing on: %s over %s", ", ".join(self.exporters), self.protocol)

    async def shutdown(self) -> None:
        """Export what is queued (for at most span_export.SHUTDOWN_TIMEOUT_MS) and stop the processor's thread."""
        provider, self._provider, self.tracer = self._provider, None, None
        if provider is not None:
            await asyncio.to_thread(provider.shutdown)

    def server_span(self, scope: Mapping[str, Any]) -> Any:
        """The request's server span, a child of the caller's span when a valid `traceparent` came with it."""
        if self.tracer is None:
            return _OFF
        carrier: dict[str, list[str]] = {}
        for name, value in scope["headers"]:
            if name in (b"traceparent", b"tracestate"):
                carrier.setdefault(name.decode(), []).append(value.decode("latin-1"))
        _request_tracer.set(self.tracer)  # the request's task (and the tasks it starts) open steps with it
        return self.tracer.start_as_current_span(
            scope["method"],
            context=_W3C.extract(carrier, getter=DefaultGetter()),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": scope["method"], "url.path": scope["path"]},
            record_exception=False,
            set_status_on_exception=False,
        )

    def observe(self, runtime: Any) -> None:
        """Give a runtime's batchers the observer that traces their batches (nothing when tracing is off)."""
        if self.tracer is None:
            return
        from .backends import precision_of
        from .batch_spans import BatchSpans

        served, backend = runtime.served, runtime.backend
        model = {"vitae.model.name": served.name, "vitae.model.version": served.version}
        engine = {"vitae.backend": backend.name, "vitae.device": backend.device}
        runtime.classifier.observer = BatchSpans(
            self.tracer, "classify", model | engine | {"vitae.precision": precision_of(backend)}
        )
        if runtime.explainer is not None:  # autograd Grad-CAM: PyTorch in fp32 on the CPU
            runtime.explainer.observer = BatchSpans(
                self.tracer, "gradcam", model | {"vitae.backend": "torch", "vitae.precision": "fp32"}
            )


def step(name: str, **attributes: Any) -> Any:
    """A child of the current span for the duration of a `with` block, recording the error that leaves it.

    The tracer is the one the request's server span set; outside a traced request this is a no-op.
    """
    tracer = _request_tracer.get()
    return _OFF if tracer is None else _step(tracer, name, attributes)


@contextmanager
def _step(tracer: trace.Tracer, name: str, attributes: dict[str, Any]) -> Iterator[Span]:
    with tracer.start_as_current_span(
        name, attributes=attributes, record_exception=False, set_status_on_exception=False
    ) as span:
        try:
            yield span
        except BaseException as exc:
            kind = error_kind(exc)
            mark_error(span, kind, str(exc))
            if kind != "cancelled":  # a cancelled step follows from another error: the deadline, a disconnect
                logs.note(error_kind=kind)
            raise


def end_server_span(span: Span, route: str | None, status: int, kind: str | None) -> None:
    """Name the server span by its route template and record the answer's status (and the error's kind)."""
    if not span.is_recording():
        return
    if route:
        span.update_name(f"{span.name} {route}")  # "POST /classify", as the HTTP conventions name server spans
        span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    if status >= 400 or kind:
        span.set_attribute("error.type", kind or str(status))
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR, kind or str(status)))
