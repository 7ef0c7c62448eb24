"""Traces through the batcher, received by a real OTLP/HTTP collector (tests/support/otlp.py): each request's
spans, the batch span linked to exactly the requests it served and back, the caller's trace continued, request
ids on every answer; and a collector that is down costs the requests nothing."""

from __future__ import annotations

import base64
import io
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from service import create_app
from tests.support.gated import GatedBackend, wait_for
from tests.support.images import sample_images
from tests.support.otlp import SPAN_KIND_SERVER, STATUS_ERROR, OtlpReceiver, ReceivedSpan, tracing_env
from tests.support.server import metric, running, serving, settings_for

CALLER_TRACE, CALLER_SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
INFER_ROUTE = "/v2/models/{name}/infer"


def post_classify(url: str, image: bytes, headers: dict | None = None, **params) -> httpx.Response:
    files = [("file", ("image.png", image, "image/png"))]
    return httpx.post(f"{url}/classify", files=files, params=params, headers=headers or {}, timeout=120)


def post_v2(url: str, model: str, image: bytes) -> httpx.Response:
    tensor = {"name": "image_bytes", "shape": [1, 1], "datatype": "BYTES", "data": [base64.b64encode(image).decode()]}
    return httpx.post(f"{url}/v2/models/{model}/infer", json={"inputs": [tensor]}, timeout=120)


def server_span(spans: list[ReceivedSpan], request_id: str) -> ReceivedSpan:
    (found,) = [s for s in spans if s.kind == SPAN_KIND_SERVER and s.attributes.get("vitae.request_id") == request_id]
    return found


def children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> dict[str, list[ReceivedSpan]]:
    out: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        if span.parent_id == parent.span_id and span.trace_id == parent.trace_id:
            out.setdefault(span.name, []).append(span)
    return out


@pytest.fixture
def receiver(monkeypatch):
    with OtlpReceiver() as receiver:
        for name, value in tracing_env(receiver.endpoint).items():
            monkeypatch.setenv(name, value)
        yield receiver


def test_requests_that_share_a_batch_are_linked_to_it_and_back(artifacts, receiver):
    backend = GatedBackend(artifacts)
    app = create_app(settings_for(artifacts, max_batch_size=8, max_delay_ms=5), backend=backend)
    images = sample_images(4)
    with running(app) as url, ThreadPoolExecutor(4) as pool:
        runtime = app.state.service.runtime
        backend.gate.clear()
        first = pool.submit(post_classify, url, images[0], {"X-Request-ID": "first-1"})
        wait_for(lambda: backend.waiting == 1, "the first request's batch held at the gate")
        traceparent = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
        with_cam = pool.submit(post_classify, url, images[1], {"traceparent": traceparent}, cam="true")
        plain = pool.submit(post_classify, url, images[2], {"X-Request-ID": "plain.2"})
        over_v2 = pool.submit(post_v2, url, runtime.served.name, images[3])
        wait_for(lambda: runtime.classifier.depth == 3, "three requests queued behind the first batch")
        backend.gate.set()
        answers = [f.result(timeout=120) for f in (first, with_cam, plain, over_v2)]
        assert [a.status_code for a in answers] == [200] * 4
        ids = [a.headers["x-request-id"] for a in answers]
        assert ids[0] == "first-1" and ids[2] == "plain.2"
        assert re.fullmatch(r"[0-9a-f]{32}", ids[1]) and re.fullmatch(r"[0-9a-f]{32}", ids[3])

        def received() -> bool:
            spans = receiver.snapshot()
            batches = [s for s in spans if s.name == "batch classify"]
            servers = [s for s in spans if s.attributes.get("vitae.request_id") in ids]
            return len(batches) == 2 and len(servers) == 4

        wait_for(received, "the four requests' server spans and both batch spans at the collector")
    spans = receiver.snapshot()
    requests = [server_span(spans, request_id) for request_id in ids]
    check_request_spans(spans, requests, images)
    check_batches(spans, requests, runtime)


def check_request_spans(spans: list[ReceivedSpan], requests: list[ReceivedSpan], images: list[bytes]) -> None:
    first, with_cam, plain, over_v2 = requests
    assert {s.service for s in spans} == {"vitae-test"}
    assert (with_cam.trace_id, with_cam.parent_id) == (CALLER_TRACE, CALLER_SPAN)  # the caller's trace continued
    assert first.parent_id == plain.parent_id == over_v2.parent_id == ""
    assert len({s.trace_id for s in requests}) == 4
    for request in (first, with_cam, plain):
        assert request.name == "POST /classify" and request.attributes["http.route"] == "/classify"
    assert over_v2.name == f"POST {INFER_ROUTE}"
    for request, image in zip(requests, images, strict=True):
        assert request.attributes["http.response.status_code"] == 200 and "error.type" not in request.attributes
        steps = children(spans, request)
        (decode,) = steps["decode"]
        width, height = Image.open(io.BytesIO(image)).size
        assert (decode.attributes["vitae.image.width"], decode.attributes["vitae.image.height"]) == (width, height)
        assert len(steps["queue wait"]) == len(steps["inference"]) == 1
        assert steps["queue wait"][0].end_ns <= steps["inference"][0].start_ns
        assert request.start_ns <= decode.start_ns and steps["inference"][0].end_ns <= request.end_ns
    expected = {"read upload", "decode", "queue wait", "inference"}
    assert set(children(spans, first)) == set(children(spans, plain)) == expected
    assert set(children(spans, with_cam)) == expected | {"cam"}
    assert set(children(spans, over_v2)) == {
        "read body",
        "parse body",
        "decode",
        "queue wait",
        "inference",
        "encode response",
    }


def check_batches(spans: list[ReceivedSpan], requests: list[ReceivedSpan], runtime) -> None:
    batches = {s.span_id: s for s in spans if s.name == "batch classify"}
    served = {
        span_id: {(trace_id, linked) for trace_id, linked, _ in batch.links} for span_id, batch in batches.items()
    }
    alone = {(requests[0].trace_id, requests[0].span_id)}
    together = {(r.trace_id, r.span_id) for r in requests[1:]}
    assert sorted(served.values(), key=len) == [alone, together]  # links to exactly the requests each served
    for batch in batches.values():
        assert batch.parent_id == "" and batch.attributes["vitae.batch.size"] == len(batch.links)
        assert batch.attributes["vitae.model.name"] == runtime.served.name
        assert batch.attributes["vitae.model.version"] == runtime.served.version
        assert batch.attributes["vitae.backend"] == "onnxruntime"
        assert batch.attributes["vitae.precision"] == "unreported"  # the test's own backend does not say
    for request in requests:  # and each request's inference span links back to the batch it rode in
        (inference,) = children(spans, request)["inference"]
        ((trace_id, batch_id, _),) = inference.links
        assert (request.trace_id, request.span_id) in served[batch_id]
        assert batches[batch_id].trace_id == trace_id
        assert inference.attributes["vitae.batch.size"] == batches[batch_id].attributes["vitae.batch.size"]


def test_an_error_names_its_kind_on_the_request_and_its_step(artifacts, receiver):
    with serving(artifacts) as url:
        answer = post_classify(url, b"not an image at all", {"X-Request-ID": "has spaces, so it is replaced"})
        assert answer.status_code == 400
        request_id = answer.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", request_id)
        wait_for(lambda: any(s.attributes.get("vitae.request_id") == request_id for s in receiver.snapshot()), "span")
    spans = receiver.snapshot()
    request = server_span(spans, request_id)
    assert request.attributes["http.response.status_code"] == 400
    assert request.attributes["error.type"] == "ImageDecodeError"
    (decode,) = children(spans, request)["decode"]
    assert decode.status == STATUS_ERROR and decode.attributes["error.type"] == "ImageDecodeError"
    assert "queue wait" not in children(spans, request)  # never queued


def test_requests_answer_while_the_collector_is_down(artifacts, monkeypatch):
    with OtlpReceiver() as gone:
        endpoint = gone.endpoint  # a port that nothing listens on once the block ends
    env = tracing_env(endpoint, OTEL_BSP_MAX_QUEUE_SIZE="4", OTEL_BSP_MAX_EXPORT_BATCH_SIZE="2")
    for name, value in (env | {"OTEL_EXPORTER_OTLP_TIMEOUT": "10"}).items():
        monkeypatch.setenv(name, value)
    app = create_app(settings_for(artifacts))
    images = sample_images(8)
    with running(app) as url:
        for image in images:
            with httpx.Client(timeout=10) as client:  # each answered well within the exporter's 10 s timeout
                answer = client.post(f"{url}/classify", files=[("file", ("i.png", image, "image/png"))])
            assert answer.status_code == 200 and answer.headers["x-request-id"]
    # 8 requests of 5 spans each through a queue of 4 that the stuck exporter does not empty
    exposition = app.state.service.metrics.exposition().decode()
    assert metric(exposition, "vitae_trace_spans_dropped_total", reason="queue_full") > 0
    assert metric(exposition, "vitae_trace_spans_dropped_total", reason="export_failed") > 0


def test_with_tracing_off_every_answer_still_has_a_request_id(artifacts, monkeypatch):
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    app = create_app(settings_for(artifacts))
    assert app.state.service.tracing.tracer is None
    with running(app) as url:
        for answer in (
            httpx.get(f"{url}/nothing-here"),
            httpx.post(f"{url}/classify", content=b"x", headers={"content-type": "text/plain"}),
            post_classify(url, sample_images(1)[0], {"X-Request-ID": "abc-123"}),
        ):
            assert answer.headers["x-request-id"]
        assert answer.status_code == 200 and answer.headers["x-request-id"] == "abc-123"
        assert type(app.state.service.runtime.classifier.observer).__name__ == "BatchObserver"  # does nothing
