"""The OpenTelemetry SDK's side of tracing, imported only when tracing is on: provider, processor, exporter.

One bounded BatchSpanProcessor (OTEL_BSP_MAX_QUEUE_SIZE, 2048 by default) between the request path and the
exporter's thread, so a slow or unreachable collector never holds a request up: when the queue is full the
oldest span is dropped. Both ways a span can be lost are counted in `vitae_trace_spans_dropped{reason}`.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter, SpanExportResult

from .metrics import Metrics

SHUTDOWN_TIMEOUT_MS = 5000  # spans still queued at shutdown get this long to leave; the rest are lost


class CountingExporter(SpanExporter):
    """An exporter that counts the spans of every batch it failed to deliver."""

    def __init__(self, inner: SpanExporter, metrics: Metrics | None) -> None:
        self.inner = inner
        self.metrics = metrics

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:  # an exporter bug must not end the processor's thread
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS and self.metrics:
            self.metrics.spans_dropped.labels("export_failed").inc(len(spans))
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """The SDK's BatchSpanProcessor, counting the spans its full queue drops, with a bounded shutdown."""

    def __init__(self, exporter: SpanExporter, metrics: Metrics | None) -> None:
        super().__init__(exporter)  # sizes and delays from OTEL_BSP_*
        self.metrics = metrics

    def on_end(self, span: ReadableSpan) -> None:
        # The SDK keeps the queue as a deque of fixed maxlen and only logs a drop; the count is read from it here.
        queue = getattr(self._batch_processor, "_queue", None)
        sampled = span.context is not None and span.context.trace_flags.sampled
        if sampled and self.metrics and queue is not None and len(queue) >= (queue.maxlen or len(queue) + 1):
            self.metrics.spans_dropped.labels("queue_full").inc()
        super().on_end(span)

    def shutdown(self) -> None:
        # The SDK waits 30 s for a stuck export; the service's shutdown should not.
        self._batch_processor.shutdown(timeout_millis=SHUTDOWN_TIMEOUT_MS)


def span_exporter(name: str, protocol: str) -> SpanExporter:
    """The exporter named by OTEL_TRACES_EXPORTER; the OTLP ones read OTEL_EXPORTER_OTLP_* themselves."""
    if name == "console":
        return ConsoleSpanExporter()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter()


def build_provider(exporters: tuple[str, ...], protocol: str, metrics: Metrics | None, default_name: str):
    """A TracerProvider (sampler from OTEL_TRACES_SAMPLER[_ARG]) with one batch processor per exporter."""
    resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": default_name}))
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)  # the lifespan shuts it down
    for name in exporters:
        exporter = CountingExporter(span_exporter(name, protocol), metrics)
        provider.add_span_processor(CountingBatchSpanProcessor(exporter, metrics))
    return provider
