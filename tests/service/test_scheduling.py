"""Priorities and per-request deadlines on the real service, gated on a held backend and asserted by counts.

The backend holds its first batch at a gate, so "the queue holds these jobs" is a state the test waits for,
and what the backend computed (GatedBackend.batches, in order) says who was served first and who never was.
"""

from __future__ import annotations

import base64
import threading

import httpx
import numpy as np
import pytest
from support.gated import GatedBackend, wait_for
from support.images import sample_images
from support.server import metric, serving

from service.artifacts import read_artifacts
from service.inference import prepare_image

# One worker, one image per batch, so the order of batches is the order of service.
ONE_AT_A_TIME = dict(infer_streams=1, max_batch_size=1, max_delay_ms=0, request_timeout_s=120)


def classify(url: str, image: bytes, **headers: str) -> httpx.Response:
    headers = {name.replace("_", "-"): value for name, value in headers.items()}
    return httpx.post(f"{url}/classify", files=[("file", ("i.png", image, "image/png"))], headers=headers, timeout=120)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def queue_depth(url: str) -> float:
    return metric(httpx.get(f"{url}/metrics").text, "vitae_queue_depth")


class Senders:
    """Requests sent from threads, each answer kept under its name."""

    def __init__(self, url: str) -> None:
        self.url, self.answers, self.threads = url, {}, []

    def send(self, name: str, image: bytes, **headers: str) -> None:
        def run() -> None:
            self.answers[name] = classify(self.url, image, **headers)

        thread = threading.Thread(target=run)
        thread.start()
        self.threads.append(thread)

    def join(self) -> dict[str, httpx.Response]:
        for thread in self.threads:
            thread.join(timeout=120)
        return self.answers


def served_order(backend: GatedBackend, artifacts, images: dict[str, bytes]) -> list[str]:
    """Which named image each batch the backend computed held (warm-up batches left out)."""
    prep = read_artifacts(artifacts).preprocessing
    pixels = {
        name: prepare_image(data, prep, max_pixels=10**8, cam_max_side=None).pixels for name, data in images.items()
    }
    order = []
    for batch in backend.batches:
        order += [name for name, p in pixels.items() if len(batch) == 1 and np.array_equal(batch[0], p)]
    return order


def test_a_high_priority_request_overtakes_queued_normal_ones(artifacts):
    backend = GatedBackend(artifacts)
    names = ["busy", "normal1", "normal2", "high"]
    images = dict(zip(names, sample_images(len(names)), strict=True))
    with serving(artifacts, backend=backend, **ONE_AT_A_TIME) as url:
        backend.gate.clear()
        senders = Senders(url)
        try:
            senders.send("busy", images["busy"])
            wait_for(lambda: backend.waiting == 1, "the first request held at the backend")
            for depth, name in enumerate(["normal1", "normal2"], start=1):
                senders.send(name, images[name], x_priority="normal")
                wait_for(lambda d=depth: queue_depth(url) == d, f"{name} queued")
            senders.send("high", images["high"], x_priority="HIGH")
            wait_for(lambda: queue_depth(url) == 3, "the high-priority request queued")
        finally:
            backend.gate.set()
        answers = senders.join()
    assert {name: a.status_code for name, a in answers.items()} == dict.fromkeys(names, 200)
    assert served_order(backend, artifacts, images) == ["busy", "high", "normal1", "normal2"]


def test_a_full_queue_sheds_the_lowest_priority_first(artifacts):
    backend = GatedBackend(artifacts)
    names = ["busy", "low", "normal", "high", "late_low"]
    images = dict(zip(names, sample_images(len(names)), strict=True))
    with serving(artifacts, backend=backend, queue_capacity=2, **ONE_AT_A_TIME) as url:
        backend.gate.clear()
        senders = Senders(url)
        try:
            senders.send("busy", images["busy"])
            wait_for(lambda: backend.waiting == 1, "the first request held at the backend")
            senders.send("low", images["low"], x_priority="low")
            wait_for(lambda: queue_depth(url) == 1, "the low-priority request queued")
            senders.send("normal", images["normal"])
            wait_for(lambda: queue_depth(url) == 2, "the queue full")
            senders.send("high", images["high"], x_priority="high")  # takes the low one's place
            wait_for(lambda: "low" in senders.answers, "the low-priority request shed")
            late = classify(url, images["late_low"], x_priority="low")  # nothing less urgent left to shed
        finally:
            backend.gate.set()
        answers = senders.join()
    shed = answers["low"]
    assert shed.status_code == 503 and int(shed.headers["retry-after"]) >= 1 and "more urgent" in shed.json()["detail"]
    assert late.status_code == 503 and int(late.headers["retry-after"]) >= 1
    assert [answers[name].status_code for name in ("busy", "normal", "high")] == [200, 200, 200]
    assert served_order(backend, artifacts, images) == ["busy", "high", "normal"]


@pytest.mark.parametrize("how", ["header", "v2 parameter"])
def test_a_request_past_its_own_deadline_is_504_and_never_reaches_the_backend(artifacts, how):
    backend = GatedBackend(artifacts)
    busy, late = sample_images(2)
    with serving(artifacts, backend=backend, **ONE_AT_A_TIME) as url:
        backend.gate.clear()
        senders = Senders(url)
        try:
            senders.send("busy", busy)
            wait_for(lambda: backend.waiting == 1, "the first request held at the backend")
            computed = len(backend.batches)
            if how == "header":
                answer = classify(url, late, x_request_timeout="0.5")
            else:
                body = {
                    "inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [b64(late)]}],
                    "parameters": {"timeout": 0.5, "priority": "high"},
                }
                answer = httpx.post(f"{url}/v2/models/vitae_fmnist/infer", json=body, timeout=120)
        finally:
            backend.gate.set()
        assert senders.join()["busy"].status_code == 200
        wait_for(lambda: queue_depth(url) == 0, "the queue empty")
    assert answer.status_code == 504, answer.text
    assert "X-Request-Timeout" in answer.text
    assert len(backend.batches) == computed  # the late request was never computed


@pytest.mark.parametrize(
    ("headers", "named"),
    [
        ({"X-Priority": "urgent"}, "X-Priority header must be one of high, normal, low"),
        ({"X-Request-Timeout": "soon"}, "X-Request-Timeout header must be a number of seconds greater than 0"),
        ({"X-Request-Timeout": "-1"}, "X-Request-Timeout header must be a number of seconds greater than 0"),
    ],
)
def test_a_bad_priority_or_timeout_header_is_400_naming_it(artifacts, headers, named):
    with serving(artifacts) as url:
        answer = httpx.post(
            f"{url}/classify", files=[("file", ("i.png", sample_images(1)[0], "image/png"))], headers=headers
        )
        v2 = httpx.post(f"{url}/v2/models/vitae_fmnist/infer", json={"inputs": []}, headers=headers)
    assert answer.status_code == 400 and named in answer.json()["detail"]
    assert v2.status_code == 400 and named in v2.json()["error"]


@pytest.mark.parametrize(
    ("parameters", "named"),
    [({"priority": 1}, "parameters.priority must be one of"), ({"timeout": "nan"}, "parameters.timeout must be")],
)
def test_a_bad_v2_priority_or_timeout_parameter_is_400_naming_it(artifacts, parameters, named):
    image = b64(sample_images(1)[0])
    body = {
        "inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [image]}],
        "parameters": parameters,
    }
    with serving(artifacts) as url:
        answer = httpx.post(f"{url}/v2/models/vitae_fmnist/infer", json=body)
    assert answer.status_code == 400 and named in answer.json()["error"]
