"""NaN and infinity never reach an answer: extreme inputs are refused up front, non-finite outputs are recomputed
at fp32 (a reduced-precision backend) or answered 500 naming the cause; logged once, counted in /metrics."""

from __future__ import annotations

import base64
import json
import logging
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from support.images import encode, sample_images
from support.server import metric, serving

from model import Preprocessing
from service.artifacts import read_artifacts
from service.backends import OnnxRuntimeBackend
from service.metrics import Metrics
from service.numerics import NonFiniteGuard, accepted_range, range_problem

MODEL = "vitae_fmnist"
FLAT = encode(Image.new("L", (28, 28), 128), "PNG")


class FlatImagesOverflow:
    """The real ONNX Runtime backend, computing as issue 45's bf16 model did on AMX: flat images come out NaN.

    It reports `precision`, which decides whether the service may recompute those images at fp32.
    """

    def __init__(self, artifacts, precision: str) -> None:
        self.real = OnnxRuntimeBackend(read_artifacts(artifacts), gpu=False, threads=1)
        self.name, self.device, self.precision = "overflowing", "cpu", precision

    def infer(self, images):
        logits, tokens = self.real.infer(images)
        flat = np.ptp(images.reshape(len(images), -1), axis=1) == 0  # every pixel the same
        logits[flat], tokens[flat] = np.nan, np.inf
        return logits, tokens

    def close(self) -> None:
        self.real.close()


def classify(url: str, *images: bytes) -> httpx.Response:
    files = [("file", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)]
    return httpx.post(f"{url}/classify", files=files, params={"top_k": 3}, timeout=120)


def nonfinite(url: str, outcome: str) -> float:
    return metric(httpx.get(f"{url}/metrics").text, "vitae_nonfinite_images_total", outcome=outcome)


def warnings_about_it(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and "non-finite" in r.getMessage()]


def test_images_a_reduced_precision_backend_cannot_compute_are_recomputed_at_fp32(artifacts, caplog):
    natural = sample_images(1)[0]
    with serving(artifacts) as url:
        expected = [classify(url, image).json()["predictions"] for image in (natural, FLAT)]
    with caplog.at_level(logging.INFO), serving(artifacts, backend=FlatImagesOverflow(artifacts, "bf16")) as url:
        answers = [classify(url, natural, FLAT) for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 200], answers[0].text
        for answer in answers:
            got = [result["predictions"] for result in answer.json()["results"]]
            for got_one, expected_one in zip(got, expected, strict=True):
                assert [p["index"] for p in got_one] == [p["index"] for p in expected_one]
                assert [p["score"] for p in got_one] == pytest.approx([p["score"] for p in expected_one], abs=1e-5)
        assert nonfinite(url, "recomputed_fp32") == 3 and nonfinite(url, "refused") == 0
    assert len(warnings_about_it(caplog)) == 1, [r.getMessage() for r in caplog.records]


def test_non_finite_outputs_of_an_fp32_backend_are_a_500_naming_the_cause_on_both_protocols(artifacts, caplog):
    flat = base64.b64encode(FLAT).decode()
    request = {"inputs": [{"name": "image_bytes", "shape": [1, 1], "datatype": "BYTES", "data": [flat]}]}
    with caplog.at_level(logging.INFO), serving(artifacts, backend=FlatImagesOverflow(artifacts, "fp32")) as url:
        answers = [classify(url, FLAT) for _ in range(2)]
        answers.append(httpx.post(f"{url}/v2/models/{MODEL}/infer", json=request, timeout=120))
        assert [a.status_code for a in answers] == [500, 500, 500]
        for detail in [a.json()["detail"] for a in answers[:2]] + [answers[2].json()["error"]]:
            assert "not finite" in detail and "fp32" in detail, detail
        assert classify(url, sample_images(1)[0]).status_code == 200  # other images are still answered
        assert nonfinite(url, "refused") == 3
    assert len(warnings_about_it(caplog)) == 1, [r.getMessage() for r in caplog.records]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_v2_pixels_far_outside_the_preprocessings_range_are_refused_up_front_with_the_range(artifacts):
    prep = read_artifacts(artifacts).preprocessing
    shape = [1, prep.in_chans, prep.img_size, prep.img_size]
    pixels = np.full(shape, 3.4e38, np.float32)  # finite in float32, overflows inside the model
    request = {"inputs": [{"name": "images", "shape": shape, "datatype": "FP32", "data": pixels.ravel().tolist()}]}
    with serving(artifacts) as url:
        answer = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=request, timeout=120)
        assert answer.status_code == 400, answer.text
        error = json.loads(answer.text)["error"]
        assert "input 'images'" in error and "accepted per channel" in error, error
        assert nonfinite(url, "refused") == 0


def test_the_accepted_range_takes_every_image_the_preprocessing_makes_and_refuses_beyond_its_margin():
    prep = Preprocessing(
        img_size=4, in_chans=3, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.1), crop_pct=1, interpolation="bilinear"
    )
    low, high = accepted_range(prep)
    raw = np.stack([np.zeros((3, 4, 4)), np.ones((3, 4, 4))])  # black and white images
    normalised = ((raw - np.reshape(prep.mean, (3, 1, 1))) / np.reshape(prep.std, (3, 1, 1))).astype(np.float32)
    assert range_problem(normalised, prep, "images") is None
    beyond = normalised.copy()
    beyond[1, 2, 0, 0] = high[2] + 0.5
    assert "image 1 channel 2" in range_problem(beyond, prep, "images")
    beyond[1, 2, 0, 0] = np.nan
    assert "NaN" in range_problem(beyond, prep, "images")


class Waiting:
    """The real ONNX Runtime backend's outputs after `wait_s` of waiting, as for an engine computing elsewhere."""

    def __init__(self, real: OnnxRuntimeBackend, wait_s: float) -> None:
        self.real, self.wait_s = real, wait_s
        self.name, self.device, self.precision = "waiting", "cpu", "fp32"

    def infer(self, images):
        outputs = self.real.infer(images)
        time.sleep(self.wait_s)
        return outputs


def test_the_guard_counts_the_runtimes_cpu_on_the_calling_thread_and_not_its_waits(artifacts):
    served = read_artifacts(artifacts)
    prep = served.preprocessing
    images = np.random.default_rng(0).normal(0, 1, (8, prep.in_chans, prep.img_size, prep.img_size)).astype("f4")
    metrics = Metrics()
    # One intra-op thread: ONNX Runtime computes on the calling thread, as OpenVINO's sync infer partly does.
    computing = OnnxRuntimeBackend(served, gpu=False, threads=1)
    guard = NonFiniteGuard(computing, lambda: None, metrics, "demo")
    started = time.thread_time()
    for _ in range(5):
        guard(images)
    spent = time.thread_time() - started
    counted = metric(metrics.exposition().decode(), "vitae_inference_thread_cpu_seconds_total", model="demo")
    assert 0.8 * spent <= counted <= spent, (counted, spent)

    waiting = NonFiniteGuard(Waiting(computing, 0.05), lambda: None, metrics, "waits")
    started = time.perf_counter()
    waiting(images)
    assert time.perf_counter() - started >= 0.05
    counted = metric(metrics.exposition().decode(), "vitae_inference_thread_cpu_seconds_total", model="waits")
    assert counted < 0.025, counted  # its compute (~2 ms here) only, not the 50 ms wait
