"""The batcher's observer when tracing is on: one span per batch, linked both ways to the requests it served.

The batcher calls it on the event loop at two points of a job's path (see service.batcher):
1. submitted   on the request's own task: the job keeps the request's span context (and its log info)
2. finished    once the batch has run: the batch span (a root, from dispatch to answer) with one link per
               request it served and the model, version, backend and precision; then, under each request's
               span, its job's `queue wait` (submit -> dispatch) and `inference` (dispatch -> answer, linked to
               the batch span), stamped with the times they happened; each marked with the error's kind when
               the batch failed
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, NonRecordingSpan, Span, SpanContext

from . import logs
from .jobs import BatchObserver, Job
from .spans import mark_error


class BatchSpans(BatchObserver):
    """Spans of one batcher's batches; `attributes` name its model, version, backend and precision."""

    def __init__(self, tracer: trace.Tracer, batcher: str, attributes: dict[str, Any]) -> None:
        self.tracer = tracer
        self.batcher = batcher
        self.attributes = {"vitae.batcher": batcher, **attributes}
        self.prefix = "" if batcher == "classify" else f"{batcher} "  # "gradcam inference" beside "inference"

    def submitted(self, job: Job) -> None:
        job.context = (trace.get_current_span().get_span_context(), logs.current())

    def finished(self, jobs: Sequence[Job], dispatched: float, error: BaseException | None) -> None:
        now_s, now_ns = time.monotonic(), time.time_ns()

        def ns(monotonic_s: float) -> int:  # a time.monotonic() instant in the epoch nanoseconds of spans
            return now_ns - int((now_s - monotonic_s) * 1e9)

        batch = self._batch_span(jobs, ns(dispatched))
        link = [Link(batch.get_span_context())]
        for index, job in enumerate(jobs):
            ctx, info = job.context if job.context is not None else (None, None)
            if error is not None and info is not None:
                info.error_kind = info.error_kind or type(error).__name__
            if ctx is None or not ctx.is_valid:
                continue
            parent = trace.set_span_in_context(NonRecordingSpan(ctx))
            queued = self.tracer.start_span(f"{self.prefix}queue wait", context=parent, start_time=ns(job.submitted_at))
            queued.end(end_time=ns(dispatched))
            span = self.tracer.start_span(
                f"{self.prefix}inference",
                context=parent,
                links=link,
                attributes={"vitae.batch.size": len(jobs), "vitae.batch.index": index},
                start_time=ns(dispatched),
            )
            if error is not None:
                mark_error(span, type(error).__name__, str(error))
            span.end(end_time=now_ns)
        if error is not None:
            mark_error(batch, type(error).__name__, str(error))
        batch.end(end_time=now_ns)

    def _batch_span(self, jobs: Sequence[Job], start_ns: int) -> Span:
        """The batch's span, linked once to each request it served (`vitae.images`: that request's images in it)."""
        requests: dict[tuple[int, int], SpanContext] = {}
        images: Counter[tuple[int, int]] = Counter()
        for job in jobs:
            ctx = job.context[0] if job.context is not None else None
            if ctx is not None and ctx.is_valid:
                requests.setdefault((ctx.trace_id, ctx.span_id), ctx)
                images[ctx.trace_id, ctx.span_id] += 1
        return self.tracer.start_span(
            f"batch {self.batcher}",
            context=Context(),  # a root: a batch serves several traces, each joined by a link
            links=[Link(ctx, {"vitae.images": images[key]}) for key, ctx in requests.items()],
            attributes={**self.attributes, "vitae.batch.size": len(jobs), "vitae.batch.requests": len(requests)},
            start_time=start_ns,
        )
