"""Request ids on log lines: `python -m service` with VITAE_LOG_FORMAT=json writes one JSON object a line, each
line about a request naming its id and trace id; the default text names them in brackets."""

from __future__ import annotations

import io
import json
import logging
import sys

import httpx

from benchmarks.harness import free_port, service_env, start, stop
from service import logs
from tests.support.gated import wait_for
from tests.support.images import sample_images
from tests.support.otlp import SPAN_KIND_SERVER, OtlpReceiver, tracing_env


def test_json_log_lines_name_the_request_and_its_trace(artifacts, tmp_path):
    port, log = free_port(), tmp_path / "service.log"
    env = service_env(artifacts, port, backend="onnxruntime", device="cpu", threads=1, log_level="info")
    with OtlpReceiver() as receiver:
        env |= tracing_env(receiver.endpoint) | {"VITAE_LOG_FORMAT": "json"}
        process = start([sys.executable, "-m", "service"], env, port, log, "/readyz", timeout=120)
        try:
            url = f"http://127.0.0.1:{port}"
            files = [("file", ("i.png", sample_images(1)[0], "image/png"))]
            answer = httpx.post(f"{url}/classify", files=files, headers={"X-Request-ID": "logs-1"}, timeout=60)
            assert answer.status_code == 200 and answer.headers["x-request-id"] == "logs-1"
            model = answer.json()["model"]
            refused = httpx.post(f"{url}/classify", content=b"x", headers={"content-type": "text/plain"})
            assert refused.status_code == 415
        finally:
            stop(process)
        wait_for(lambda: any(s.attributes.get("vitae.request_id") == "logs-1" for s in receiver.snapshot()), "span")
        (server,) = [s for s in receiver.snapshot() if s.kind == SPAN_KIND_SERVER and "logs-1" in s.attributes.values()]
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]  # every line is JSON
    assert {"timestamp", "level", "logger", "message", "request_id", "trace_id"} <= set(entries[0])
    (line,) = [e for e in entries if e["request_id"] == "logs-1" and e["logger"] == "service.requests"]
    assert line["trace_id"] == server.trace_id
    assert line["model"] == f"{model['name']}:{model['version']}"
    assert (line["status"], line["method"], line["path"]) == (200, "POST", "/classify")
    assert line["duration_ms"] > 0 and line["queue_ms"] >= 0 and line["inference_ms"] > 0
    (refusal,) = [e for e in entries if e.get("status") == 415]
    assert refusal["request_id"] == refused.headers["x-request-id"] and refusal["trace_id"]
    assert any(e["logger"].startswith("uvicorn") for e in entries)  # uvicorn's own lines are JSON too


def test_text_lines_name_the_request_in_brackets_only_within_one():
    stream, root = io.StringIO(), logging.getLogger()
    handlers, level = root.handlers[:], root.level
    logs.configure_logging("info", "text", stream)
    try:
        logging.getLogger("service").info("outside")
        with logs.request_context(logs.RequestInfo("abc", trace_id="0af7651916cd43dd8448eb211c80319c")):
            logging.getLogger("service").info("inside")
    finally:
        root.handlers[:] = handlers  # the test runner's own handlers back
        root.setLevel(level)
    outside, inside = stream.getvalue().splitlines()
    assert outside.endswith("INFO service: outside")
    assert inside.endswith("INFO service [request=abc trace=0af7651916cd43dd8448eb211c80319c]: inside")


def test_a_request_id_is_kept_only_when_short_and_safe():
    assert logs.request_id([(b"x-request-id", b"order-42/retry.1")]) == "order-42/retry.1"
    for bad in (b"", b"has space", b"x" * 129, b"semi;colon", "é".encode()):
        made = logs.request_id([(b"x-request-id", bad)])
        assert made != bad.decode("latin-1") and len(made) == 32
