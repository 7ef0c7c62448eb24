"""The real app over real HTTP (uvicorn, lifespan on) with a real small model exported by the export stage."""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from support.images import drawn_image, encode, sample_images
from support.server import metric, running, serving, settings_for, wait_ready

from model.checkpoint import load_checkpoint
from model.preprocess import decode_image, preprocess, resize_size
from service import classify_flow
from service.postprocess import render_cam

FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@pytest.fixture(scope="module")
def url(artifacts):
    with serving(artifacts, max_batch_size=16) as base:
        yield base


def classify(url: str, image: bytes, **params) -> httpx.Response:
    return httpx.post(f"{url}/classify", params=params, files=[("file", ("image.png", image, "image/png"))])


# ------------------------------------------------------------------ answers


def test_one_image_answers_model_predictions_and_timing(url):
    response = classify(url, sample_images(1)[0])
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"model", "predictions", "timing_ms"}
    assert set(body["model"]) == {"name", "version"} and body["model"]["name"] == "vitae_fmnist"
    predictions = body["predictions"]
    assert len(predictions) == 5
    assert [p["score"] for p in predictions] == sorted((p["score"] for p in predictions), reverse=True)
    assert all(p["label"] == FASHION[p["index"]] for p in predictions)
    assert set(body["timing_ms"]) == {"queue", "inference", "total"}
    assert body["timing_ms"]["total"] >= body["timing_ms"]["queue"]


def test_scores_over_all_classes_are_a_softmax(url):
    predictions = classify(url, sample_images(1)[0], top_k=10).json()["predictions"]
    assert sorted(p["index"] for p in predictions) == list(range(10))
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0, abs=1e-9)


def test_raw_image_body_answers_like_multipart(url):
    image = sample_images(1)[0]
    raw = httpx.post(f"{url}/classify", content=image, headers={"content-type": "image/png"})
    assert raw.status_code == 200
    assert raw.json()["predictions"] == classify(url, image).json()["predictions"]


def test_several_images_answer_in_the_order_sent(url):
    images = sample_images(3)
    files = [("file", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    response = httpx.post(f"{url}/classify", files=files, params={"top_k": 3})
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == 3
    for data, result in zip(images, results, strict=True):
        single = classify(url, data, top_k=3).json()
        assert [p["index"] for p in result["predictions"]] == [p["index"] for p in single["predictions"]]
        np.testing.assert_allclose(
            [p["score"] for p in result["predictions"]], [p["score"] for p in single["predictions"]], atol=1e-6
        )


def test_a_bad_file_among_several_fails_alone(url):
    files = [("file", ("a.png", sample_images(1)[0], "image/png")), ("file", ("b.txt", b"not an image", "text/plain"))]
    results = httpx.post(f"{url}/classify", files=files).json()["results"]
    assert "predictions" in results[0]
    assert results[1]["error"]["status"] == 400 and "PNG" in results[1]["error"]["detail"]


def decode_png(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_cam_off_by_default_and_on_when_asked(url):
    image = encode(drawn_image(3, size=(40, 30)), "PNG")
    assert "cam" not in classify(url, image).json()
    body = classify(url, image, cam="true").json()
    cam = body["cam"]
    assert cam["class_index"] == body["predictions"][0]["index"]  # default target: top-1
    assert cam["label"] == FASHION[cam["class_index"]]
    grid = np.array(cam["grid"])
    assert grid.shape == (4, 4)
    assert grid.min() == 0.0 and grid.max() == pytest.approx(1.0)
    assert (cam["width"], cam["height"]) == (40, 30)  # under VITAE_CAM_MAX_SIDE: the image's own size
    heatmap, overlay = decode_png(cam["heatmap_png"]), decode_png(cam["overlay_jpeg"])
    assert (heatmap.format, overlay.format) == ("PNG", "JPEG")
    assert heatmap.size == overlay.size == (40, 30) and overlay.mode == "RGB"


def test_cam_pictures_are_drawn_on_the_cam_pool_not_in_the_decode_pool(url, monkeypatch):
    """Drawn in the decode pool they held its places while uploads waited, and batches went out smaller."""
    drawn_on = []

    def render_and_note_thread(*args):
        drawn_on.append(threading.current_thread().name)
        return render_cam(*args)

    monkeypatch.setattr(classify_flow, "render_cam", render_and_note_thread)
    images = [encode(drawn_image(i, size=(40, 30)), "PNG") for i in range(3)]
    files = [("file", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)]
    body = httpx.post(f"{url}/classify", params={"cam": "true"}, files=files).json()
    assert all(item["cam"]["width"] == 40 for item in body["results"])
    assert len(drawn_on) == 3 and all(name.startswith("vitae-cam") for name in drawn_on), drawn_on


def test_cam_class_by_label_or_index_gives_the_same_map(url):
    image = sample_images(1)[0]
    by_label = classify(url, image, cam="true", cam_class="Sneaker").json()["cam"]
    by_index = classify(url, image, cam="true", cam_class="7").json()["cam"]
    assert by_label["class_index"] == by_index["class_index"] == 7
    assert by_label["grid"] == by_index["grid"]


def test_cam_at_an_earlier_cell_uses_that_cells_grid(url):
    cells = httpx.get(f"{url}/model").json()["cam_layers"]
    assert cells[0] == "layers.0.RC"
    body = classify(url, sample_images(1)[0], cam="true", cam_layer="layers.0.RC").json()
    assert np.array(body["cam"]["grid"]).shape == (16, 16)  # 32 px / 2
    assert body["cam"]["class_index"] == body["predictions"][0]["index"]
    last = classify(url, sample_images(1)[0], cam="true", cam_layer=str(len(cells) - 1)).json()["cam"]
    default = classify(url, sample_images(1)[0], cam="true").json()["cam"]
    np.testing.assert_allclose(last["grid"], default["grid"], atol=1e-4)


def test_64_concurrent_requests_equal_the_same_images_one_at_a_time(url):
    images = sample_images(16) * 4
    sequential = [classify(url, image, top_k=10).json()["predictions"] for image in images[:16]] * 4

    async def all_at_once():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post("/classify", params={"top_k": 10}, files=[("file", ("i.png", im, "image/png"))])
                    for im in images
                )
            )

    before = httpx.get(f"{url}/metrics").text
    responses = asyncio.run(all_at_once())
    after = httpx.get(f"{url}/metrics").text
    assert [r.status_code for r in responses] == [200] * 64
    for response, expected in zip(responses, sequential, strict=True):
        got = response.json()["predictions"]
        assert [p["index"] for p in got] == [p["index"] for p in expected]
        np.testing.assert_allclose([p["score"] for p in got], [p["score"] for p in expected], atol=1e-6)
    batches = metric(after, "vitae_batch_size_count", model="classify") - metric(
        before, "vitae_batch_size_count", model="classify"
    )
    assert batches < 64, "concurrent requests were not batched together"


def test_service_path_gives_the_logits_of_model_preprocess_and_pytorch(url, tiny_checkpoint):
    """Train/serve skew: the service's probabilities equal those of the trainer's functions + PyTorch."""
    model, meta = load_checkpoint(tiny_checkpoint)
    from model import Preprocessing

    prep = Preprocessing.from_dict(meta["preprocessing"])
    photo = encode(drawn_image(5, size=(300, 220), mode="RGB"), "JPEG", quality=90)  # large: draft mode applies
    for data in (sample_images(1)[0], photo):
        pixels = preprocess(decode_image(data, target_size=resize_size(prep)), prep)
        with torch.no_grad():
            logits = model(torch.from_numpy(pixels)[None]).double()
        expected = torch.softmax(logits, dim=1)[0].numpy()
        served = classify(url, data, top_k=10).json()["predictions"]
        got = np.zeros(10)
        for p in served:
            got[p["index"]] = p["score"]
        np.testing.assert_allclose(got, expected, atol=1e-6)
        # Equal probabilities mean equal logits up to one constant: compare log-ratios too.
        np.testing.assert_allclose(np.log(got) - np.log(got[0]), (logits[0] - logits[0, 0]).numpy(), atol=1e-4)


# ------------------------------------------------------------------ operations


def test_health_ready_metrics_and_docs(url):
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{url}/readyz").json()
    assert ready["status"] == "ready" and ready["backend"] == "onnxruntime" and ready["device"] == "cpu"
    classify(url, sample_images(1)[0])
    text = httpx.get(f"{url}/metrics").text
    for family in (
        "vitae_requests_total",
        "vitae_request_latency_seconds_bucket",
        "vitae_queue_wait_seconds_bucket",
        "vitae_batch_size_bucket",
        "vitae_inference_seconds_bucket",
        "vitae_queue_depth",
    ):
        assert family in text
    assert metric(text, "vitae_requests_total", route="/classify", status="200") >= 1
    assert httpx.get(f"{url}/docs").status_code == 200
    spec = httpx.get(f"{url}/openapi.json").json()["paths"]["/classify"]["post"]
    assert {"multipart/form-data", "image/jpeg"} <= set(spec["requestBody"]["content"])
    assert spec["responses"]["200"]["content"]["application/json"]["example"]["predictions"]


# ------------------------------------------------------------------ bad input


def test_not_an_image_is_400_and_names_the_accepted_formats(url):
    response = classify(url, b"GIF89a but not really")
    assert response.status_code == 400
    assert "JPEG" in response.json()["detail"] and "PNG" in response.json()["detail"]


def test_a_non_image_content_type_is_415(url):
    response = httpx.post(f"{url}/classify", content=b"{}", headers={"content-type": "application/json"})
    assert response.status_code == 415
    assert "multipart/form-data" in response.json()["detail"]


def test_empty_body_and_form_without_file_are_400(url):
    assert httpx.post(f"{url}/classify", content=b"", headers={"content-type": "image/png"}).status_code == 400
    assert httpx.post(f"{url}/classify", data={"other": "x"}, files=[("x", ("x", b"1"))]).status_code == 400


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"top_k": 11}, "between 1 and 10"),
        ({"top_k": 0}, "top_k"),
        ({"cam": "true", "cam_class": "Cat"}, "Sneaker"),
        ({"cam": "true", "cam_layer": "layers.9"}, "layers.0.RC"),
        ({"cam_layer": "999"}, "layers.0.RC"),  # checked even with cam=false, like cam_class
        ({"cam_class": "Cat"}, "Sneaker"),
    ],
)
def test_bad_parameters_are_422_with_what_is_accepted(url, params, fragment):
    response = classify(url, sample_images(1)[0], **params)
    assert response.status_code == 422
    assert fragment in str(response.json()["detail"])


@pytest.fixture(scope="module")
def strict_url(artifacts):
    limits = dict(max_upload_bytes=20_000, max_image_pixels=100 * 100)
    with serving(artifacts, api_key="s3cret", cors_origins=["https://ui.example"], **limits) as base:
        yield base


def test_api_key_is_required_when_configured(strict_url):
    image = sample_images(1)[0]
    files = [("file", ("i.png", image, "image/png"))]
    assert httpx.post(f"{strict_url}/classify", files=files).status_code == 401
    wrong = httpx.post(f"{strict_url}/classify", files=files, headers={"X-API-Key": "nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert httpx.post(f"{strict_url}/classify", files=files, headers={"X-API-Key": "s3cret"}).status_code == 200
    bearer = {"Authorization": "Bearer s3cret"}
    assert httpx.post(f"{strict_url}/classify", files=files, headers=bearer).status_code == 200
    assert httpx.get(f"{strict_url}/readyz").status_code == 200  # probes stay open


KEY = {"X-API-Key": "s3cret"}


def test_body_over_the_limit_is_413_from_content_length(strict_url):
    response = httpx.post(f"{strict_url}/classify", content=b"\0" * 50_000, headers={"content-type": "image/png"} | KEY)
    assert response.status_code == 413
    assert "20000" in response.json()["detail"]


def test_streamed_body_over_the_limit_is_413_without_reading_it_all(strict_url):
    sent = 0

    def chunks():
        nonlocal sent
        for _ in range(10_000):  # 80 MB if it were all read
            sent += 8192
            yield b"\0" * 8192

    try:
        status = httpx.post(
            f"{strict_url}/classify", content=chunks(), headers={"content-type": "image/png"} | KEY, timeout=30
        ).status_code
    except httpx.HTTPError:
        status = None  # the server answered and closed while the client was still sending
    assert status in (413, None)
    assert sent < 10_000 * 8192


def test_too_many_pixels_is_413(strict_url):
    big = encode(Image.new("L", (200, 200), 128), "PNG")
    response = httpx.post(f"{strict_url}/classify", files=[("file", ("big.png", big, "image/png"))], headers=KEY)
    assert response.status_code == 413
    assert "10000" in response.json()["detail"]


# ------------------------------------------------------------------ overload, deadlines, disconnects


# Generous times: this machine may be busy. A queued job's batch is due only after VITAE_MAX_DELAY_MS, far
# beyond what each test waits, so nothing here is computed unless the service gets it wrong; the tests wait
# for metrics by polling with wide bounds instead of sleeping for fixed times.
NEVER_FLUSHED = dict(max_batch_size=8, max_delay_ms=120_000, batch_wait_when_idle=True)


def wait_for_metric(base: str, name: str, value: float, timeout: float = 30.0, **labels: str) -> None:
    deadline = time.monotonic() + timeout
    while metric(httpx.get(f"{base}/metrics").text, name, **labels) < value:
        assert time.monotonic() < deadline, f"{name}{labels} did not reach {value}"
        time.sleep(0.01)


@contextmanager
def queued_request(base: str, image: bytes) -> Iterator[None]:
    """A /classify request sent over a raw socket and left waiting in the queue; leaving the block disconnects."""
    body = b'--b\r\nContent-Disposition: form-data; name="file"; filename="i.png"\r\n\r\n' + image + b"\r\n--b--\r\n"
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        head = "POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
        sock.sendall(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_for_metric(base, "vitae_queue_depth", 1, model="classify")
        yield


def test_a_full_queue_is_503_with_a_retry_hint(artifacts):
    with serving(artifacts, queue_capacity=1, request_timeout_s=60, **NEVER_FLUSHED) as base:
        image = sample_images(1)[0]
        with queued_request(base, image):
            full = classify(base, image)
        assert full.status_code == 503
        assert int(full.headers["retry-after"]) >= 1 and "full" in full.json()["detail"]


def test_a_request_past_its_deadline_is_504_and_not_computed(artifacts):
    with serving(artifacts, request_timeout_s=1.0, **NEVER_FLUSHED) as base:
        assert (
            httpx.post(
                f"{base}/classify", files=[("file", ("i.png", sample_images(1)[0], "image/png"))], timeout=60
            ).status_code
            == 504
        )
        text = httpx.get(f"{base}/metrics").text
        assert metric(text, "vitae_dropped_images_total", model="classify", reason="cancelled") == 1
        assert metric(text, "vitae_batch_size_count", model="classify") == 0
        assert metric(text, "vitae_queue_depth", model="classify") == 0


def test_a_client_that_disconnects_while_queued_is_not_computed(artifacts):
    with serving(artifacts, request_timeout_s=60, **NEVER_FLUSHED) as base:
        with queued_request(base, sample_images(1)[0]):
            pass
        wait_for_metric(base, "vitae_dropped_images_total", 1, model="classify", reason="cancelled")
        text = httpx.get(f"{base}/metrics").text
        assert metric(text, "vitae_dropped_images_total", model="classify", reason="cancelled") == 1
        assert metric(text, "vitae_batch_size_count", model="classify") == 0
        assert metric(text, "vitae_queue_depth", model="classify") == 0
        assert httpx.get(f"{base}/readyz").status_code == 200  # and the service is still up


class FlakyBackend:
    """The real backend, failing the batches the test asks to fail, or holding warm-up until released."""

    def __init__(self, real, fail: threading.Event | None = None, hold: threading.Event | None = None):
        self.real, self.fail, self.hold = real, fail or threading.Event(), hold
        self.name, self.device = real.name, real.device

    def infer(self, images):
        if self.hold is not None:
            assert self.hold.wait(30)
        if self.fail.is_set():
            self.fail.clear()
            raise RuntimeError("simulated device error")
        return self.real.infer(images)

    def close(self):
        self.real.close()


def real_backend(artifacts):
    from service.artifacts import read_artifacts
    from service.backends import OnnxRuntimeBackend

    return OnnxRuntimeBackend(read_artifacts(artifacts), gpu=False, threads=1)


def test_a_backend_exception_fails_only_that_batch(artifacts):
    fail = threading.Event()
    with serving(artifacts, backend=FlakyBackend(real_backend(artifacts), fail=fail)) as base:
        fail.set()
        broken = classify(base, sample_images(1)[0])
        assert broken.status_code == 500
        assert "simulated device error" in broken.json()["detail"]
        assert classify(base, sample_images(1)[0]).status_code == 200
        assert httpx.get(f"{base}/readyz").status_code == 200


def test_not_ready_until_loaded_and_warmed_up(artifacts):
    hold = threading.Event()
    with serving(artifacts, backend=FlakyBackend(real_backend(artifacts), hold=hold), ready=False) as base:
        assert httpx.get(f"{base}/healthz").status_code == 200
        loading = httpx.get(f"{base}/readyz")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        early = classify(base, sample_images(1)[0])
        assert early.status_code == 503 and "Retry-After" in early.headers
        hold.set()
        assert wait_ready(base)["status"] == "ready"
        assert classify(base, sample_images(1)[0]).status_code == 200


def test_missing_artifacts_fail_readiness_with_a_message(tmp_path):
    from service import create_app

    app = create_app(settings_for(tmp_path / "nothing", checkpoint=tmp_path / "none.safetensors"))
    with running(app, ready=False) as base:
        deadline = time.monotonic() + 10
        while httpx.get(f"{base}/readyz").json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        failed = httpx.get(f"{base}/readyz").json()
        assert failed["status"] == "failed" and "VITAE_ARTIFACTS" in failed["detail"]
        assert httpx.get(f"{base}/healthz").status_code == 503


def test_cors_is_off_by_default_and_on_for_configured_origins(url, strict_url):
    preflight = {"Origin": "https://ui.example", "Access-Control-Request-Method": "POST"}
    assert "access-control-allow-origin" not in httpx.options(f"{url}/classify", headers=preflight).headers
    allowed = httpx.options(f"{strict_url}/classify", headers=preflight)
    assert allowed.headers["access-control-allow-origin"] == "https://ui.example"
    other = httpx.options(f"{strict_url}/classify", headers=preflight | {"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


def test_the_openapi_schema_names_each_key_header_where_it_applies(artifacts):
    from service import create_app

    schema = create_app(settings_for(artifacts, api_key="k", admin_key="a")).openapi()
    schemes = schema["components"]["securitySchemes"]
    headers = {name: scheme.get("name") for name, scheme in schemes.items() if scheme["type"] == "apiKey"}
    classify = {name for option in schema["paths"]["/classify"]["post"]["security"] for name in option}
    assert {headers[name] for name in classify if name in headers} == {"X-API-Key"}  # not the admin key
    admin = next(op for path, ops in schema["paths"].items() if path.startswith("/admin/") for op in ops.values())
    assert {headers[name] for option in admin["security"] for name in option} == {"X-Admin-Key"}


def test_a_lone_request_on_an_idle_service_does_not_wait_for_a_batch_to_fill(artifacts):
    # With a delay of two minutes, a request that waited for company would be answered only after it (or 504).
    with serving(artifacts, max_batch_size=8, max_delay_ms=120_000, request_timeout_s=60) as base:
        image = sample_images(1)[0]
        answers = [classify(base, image) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert all(a.json()["timing_ms"]["queue"] < 10_000 for a in answers)
