"""Overload, deadlines and disconnects on the real service, asserted by counts rather than by timings.

Every admitted request is answered exactly once and correctly, refused ones get 503/504 without waiting for
inference, and /metrics counts what the clients saw. The backend is the real one behind a gate the test
closes and opens, so that "the queue is full" or "inference is running" are states, not timing windows.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import threading
import time

import httpx
import pytest
from PIL import Image
from support.gated import GatedBackend, wait_for
from support.images import encode, sample_images
from support.raw_http import host_port, multipart
from support.server import metric, running, serving, settings_for

from service import create_app


def metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics").text


def classify_count(url: str, status: int) -> float:
    return metric(metrics(url), "vitae_requests_total", route="/classify", method="POST", status=str(status))


def post(url: str, image: bytes, **params) -> httpx.Response:
    return httpx.post(f"{url}/classify", files=[("file", ("i.png", image, "image/png"))], params=params, timeout=120)


def scores(answer: dict) -> dict[int, float]:
    return {p["index"]: p["score"] for p in answer["predictions"]}


def test_overload_answers_every_admitted_request_once_and_refuses_the_rest_without_waiting(artifacts):
    backend = GatedBackend(artifacts)
    with serving(artifacts, backend=backend, queue_capacity=4, max_batch_size=4, max_delay_ms=1) as url:
        images = sample_images(8)
        expected = [scores(post(url, image).json()) for image in images]
        count = 32
        answers: list[list] = [[] for _ in range(count)]  # each sender's answers: exactly one is the contract

        def send(i: int) -> None:
            try:
                answers[i].append((time.monotonic(), post(url, images[i % len(images)])))
            except Exception as exc:  # recorded, asserted below
                answers[i].append((time.monotonic(), exc))

        backend.gate.clear()
        senders = [threading.Thread(target=send, args=(i,)) for i in range(count)]
        for sender in senders:
            sender.start()
        # The device is busy: every sender ends up held at the gate, queued, or refused.
        queued = lambda: metric(metrics(url), "vitae_queue_depth", model="classify")  # noqa: E731
        wait_for(lambda: sum(map(len, answers)) + queued() + backend.waiting == count, "every sender to settle")
        admitted = queued() + backend.waiting
        opened_at = time.monotonic()
        backend.gate.set()
        for sender in senders:
            sender.join(timeout=120)
        text = metrics(url)

    assert all(len(a) == 1 for a in answers), "a sender got no answer, or more than one"
    assert all(isinstance(a[0][1], httpx.Response) for a in answers), answers
    statuses = [a[0][1].status_code for a in answers]
    assert statuses.count(200) == admitted and statuses.count(503) == count - admitted
    assert 1 <= admitted <= 8  # at most a batch at the gate plus a full queue
    for i, (answered_at, response) in enumerate(a[0] for a in answers):
        if response.status_code == 200:
            assert scores(response.json()) == pytest.approx(expected[i % len(images)], abs=1e-5)
        else:
            assert int(response.headers["retry-after"]) >= 1 and "full" in response.json()["detail"]
            assert answered_at < opened_at, "a refusal waited for inference"
    # /metrics counts what the clients saw (the 8 reference answers included).
    route = dict(route="/classify", method="POST")
    assert metric(text, "vitae_requests_total", **route, status="200") == admitted + len(images)
    assert metric(text, "vitae_requests_total", **route, status="503") == count - admitted
    assert metric(text, "vitae_queue_depth", model="classify") == 0


def test_a_deadline_passed_in_the_queue_is_504_and_the_image_is_not_computed(artifacts):
    backend = GatedBackend(artifacts)
    with serving(artifacts, backend=backend, request_timeout_s=2.0, max_batch_size=1, max_delay_ms=1) as url:
        images = sample_images(3)
        backend.gate.clear()
        results: list[httpx.Response] = []
        senders = [threading.Thread(target=lambda d=d: results.append(post(url, d))) for d in images]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(timeout=120)  # the gate stays closed: every deadline passes
        backend.gate.set()
        assert [r.status_code for r in results] == [504, 504, 504]
        assert all("VITAE_REQUEST_TIMEOUT_S" in r.json()["detail"] for r in results)
        wait_for(lambda: classify_count(url, 504) == 3, "three 504s in /metrics")
        assert post(url, images[0]).status_code == 200  # and the service carries on


def test_the_deadline_covers_decoding_not_only_inference(artifacts):
    # Eight 36-megapixel PNGs of a few kB each: decoding them takes seconds of CPU, far past a 0.3 s deadline.
    big = encode(Image.new("L", (6000, 6000), 128), "PNG")
    body, content_type = multipart(*[big] * 8)
    with serving(artifacts, request_timeout_s=0.3) as url:
        response = httpx.post(f"{url}/classify", content=body, headers={"content-type": content_type}, timeout=120)
        assert response.status_code == 504
        assert "VITAE_REQUEST_TIMEOUT_S" in response.json()["detail"]
        text = metrics(url)
        # Cut short while decoding: nothing reached the batcher, not even to expire there.
        assert nothing_queued(text)


def nothing_queued(text: str) -> bool:
    """No image reached the classify batcher: none batched, none dropped from its queue for any reason."""
    dropped = [
        metric(text, "vitae_dropped_images_total", model="classify", reason=r) for r in ("deadline", "cancelled")
    ]
    return metric(text, "vitae_batch_size_count", model="classify") == 0 and dropped == [0, 0]


def test_the_v2_deadline_covers_decoding_image_bytes(artifacts):
    big = encode(Image.new("L", (6000, 6000), 128), "PNG")
    header = {"inputs": [{"name": "image_bytes", "shape": [8, 1], "datatype": "BYTES"}]}
    payload = b"".join(len(big).to_bytes(4, "little") + big for _ in range(8))
    header["inputs"][0]["parameters"] = {"binary_data_size": len(payload)}
    head = json.dumps(header).encode()
    headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}
    with serving(artifacts, request_timeout_s=0.3) as url:
        response = httpx.post(
            f"{url}/v2/models/vitae_fmnist/infer", content=head + payload, headers=headers, timeout=120
        )
        assert response.status_code == 504, response.text
        assert "VITAE_REQUEST_TIMEOUT_S" in response.json()["error"]
        assert nothing_queued(metrics(url)), "the deadline passed while decoding, yet images were queued"


def test_json_nested_thousands_deep_is_a_400_in_the_protocols_error_body_without_a_traceback(artifacts, caplog):
    deep_array, deep_object = "[" * 5000 + "]" * 5000, '{"a":' * 5000 + "1" + "}" * 5000

    def image(data: str) -> str:
        return '{"name": "images", "shape": [1], "datatype": "FP32", "data": ' + data + "}"

    bodies = [  # deep in 'data', in 'parameters', in 'id'
        '{"inputs": [' + image(deep_array) + "]}",
        '{"inputs": [' + image("[0]") + '], "parameters": {"x": ' + deep_array + "}}",
        '{"id": ' + deep_object + ', "inputs": [' + image("[0]") + "]}",
    ]
    with caplog.at_level(logging.INFO), serving(artifacts) as url:
        for body in bodies:
            response = httpx.post(f"{url}/v2/models/vitae_fmnist/infer", content=body, timeout=120)
            assert response.status_code == 400, response.text[:300]
            assert "nests" in response.json()["error"], response.text[:300]
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


def test_cam_for_a_huge_image_is_drawn_within_cam_max_side(artifacts):
    big = encode(Image.new("L", (6000, 4000), 128), "PNG")
    with serving(artifacts, cam_max_side=256) as url:
        cam = post(url, big, cam="true").json()["cam"]
    assert (cam["width"], cam["height"]) == (256, 171)
    for picture in (cam["heatmap_png"], cam["overlay_jpeg"]):
        assert Image.open(io.BytesIO(base64.b64decode(picture))).size == (256, 171)


def disconnect_mid_upload(url: str) -> None:
    """Headers and half of a multipart body, then gone."""
    body, content_type = multipart(sample_images(1)[0])
    head = f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(host_port(url)) as sock:
        sock.sendall(head.encode() + body[: len(body) // 2])
        time.sleep(0.2)  # let the server start reading it


def test_a_client_gone_mid_upload_is_a_499_with_one_log_line_and_no_traceback(artifacts, caplog):
    with caplog.at_level(logging.INFO), serving(artifacts) as url:
        for _ in range(5):
            disconnect_mid_upload(url)
        wait_for(lambda: classify_count(url, 499) == 5, "five 499s in /metrics")
        assert classify_count(url, 500) == 0
        assert post(url, sample_images(1)[0]).status_code == 200
    about_it = [r for r in caplog.records if "disconnect" in r.getMessage().lower()]
    assert len(about_it) == 5
    assert not [r for r in caplog.records if r.exc_info or "Exception in ASGI" in r.getMessage()]


def test_a_client_gone_mid_inference_is_a_499_and_its_image_is_not_computed(artifacts):
    backend = GatedBackend(artifacts)
    with serving(artifacts, backend=backend, max_batch_size=1, max_delay_ms=1) as url:
        body, content_type = multipart(sample_images(1)[0])
        head = f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}"
        backend.gate.clear()
        held = threading.Thread(target=post, args=(url, sample_images(2)[1]))
        held.start()
        wait_for(lambda: backend.waiting == 1, "an image held at the gate")
        with socket.create_connection(host_port(url)) as sock:
            sock.sendall(head.encode() + b"\r\n\r\n" + body)
            wait_for(lambda: metric(metrics(url), "vitae_queue_depth", model="classify") == 1, "the image queued")
        wait_for(lambda: classify_count(url, 499) == 1, "a 499 in /metrics")
        backend.gate.set()
        held.join(timeout=120)
        text = metrics(url)
        assert metric(text, "vitae_dropped_images_total", model="classify", reason="cancelled") == 1
        assert classify_count(url, 500) == 0


READINESS_ROUTES = ("/readyz", "/v2/health/ready", "/v2/models/vitae_fmnist/ready")


def test_every_readiness_route_turns_503_together_when_the_service_drains(artifacts):
    app = create_app(settings_for(artifacts))
    with running(app) as url:
        assert [httpx.get(url + path).status_code for path in READINESS_ROUTES] == [200, 200, 200]
        app.state.service.begin_drain()  # what the SIGTERM handler calls (service.server.DrainingServer)
        answers = [httpx.get(url + path) for path in READINESS_ROUTES]
        assert [a.status_code for a in answers] == [503, 503, 503]
        assert answers[0].json()["status"] == "draining"
        assert all("draining" in a.json()["error"] for a in answers[1:]), [a.text for a in answers]
        assert post(url, sample_images(1)[0]).status_code == 200  # still serving through the grace
