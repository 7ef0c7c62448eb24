"""The Open Inference Protocol (KServe v2) routes, spoken by NVIDIA's own tritonclient to the real running service."""

from __future__ import annotations

import base64
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from support.checkpoints import FASHION_CLASSES
from support.gated import GatedBackend, wait_for
from support.images import drawn_image, encode, sample_images
from support.optional import DEV_ONLY
from support.server import metric, serving

from model import Preprocessing
from model.preprocess import decode_image, preprocess, resize_size

triton = pytest.importorskip("tritonclient.http", reason=f"tritonclient is {DEV_ONLY}")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

MODEL = "vitae_fmnist"


@pytest.fixture(scope="module")
def url(artifacts):
    # ONNX Runtime fp32 (settings_for's backend), so that the answers can be held to ONNX Runtime's within 1e-4.
    with serving(artifacts, max_batch_size=16) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def version(url):
    return httpx.get(f"{url}/readyz").json()["version"]


@pytest.fixture(scope="module")
def onnx(artifacts):
    meta = json.loads((artifacts / "metadata.json").read_text())
    session = ort.InferenceSession(str(artifacts / meta["files"]["onnx"]), providers=["CPUExecutionProvider"])
    prep = Preprocessing.from_dict(meta["preprocessing"])
    return session, prep


def pixels_of(images: list[bytes], prep: Preprocessing) -> np.ndarray:
    """The model input through model.preprocess, the trainer's and the service's functions: (B, C, S, S)."""
    return np.stack([preprocess(decode_image(data, target_size=resize_size(prep)), prep) for data in images])


def fp32_input(pixels: np.ndarray, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("images", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    return tensor


def bytes_input(images: list[bytes], binary: bool) -> triton.InferInput:
    # JSON cannot carry raw bytes: as JSON data an encoded image is its base64 text.
    items = images if binary else [base64.b64encode(data) for data in images]
    tensor = triton.InferInput("image_bytes", [len(items), 1], "BYTES")
    tensor.set_data_from_numpy(np.array(items, dtype=object).reshape(-1, 1), binary_data=binary)
    return tensor


def outputs(*names: str, binary: bool = True) -> list[triton.InferRequestedOutput]:
    return [triton.InferRequestedOutput(name, binary_data=binary) for name in names]


def classify_logits(url: str, image: bytes) -> np.ndarray:
    """/classify's answer as log-probabilities over all classes (logits up to one constant)."""
    predictions = httpx.post(
        f"{url}/classify", params={"top_k": 10}, files=[("file", ("i.png", image, "image/png"))], timeout=60
    ).json()["predictions"]
    scores = np.zeros(10)
    for p in predictions:
        scores[p["index"]] = p["score"]
    return np.log(scores)


def same_up_to_a_constant(a: np.ndarray, b: np.ndarray, atol: float) -> None:
    np.testing.assert_allclose(a - a[..., :1], b - b[..., :1], atol=atol)


# ------------------------------------------------------------------ health and metadata


def test_server_is_live_ready_and_lists_its_extensions(client):
    assert client.is_server_live() and client.is_server_ready()
    server = client.get_server_metadata()
    assert server["name"] == "vitae-serve"
    assert {"binary_tensor_data", "classification", "model_configuration", "statistics"} <= set(server["extensions"])


def test_model_is_ready_by_name_and_version_and_unknown_ones_are_not(client, version):
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, version)
    assert not client.is_model_ready("resnet50")
    assert not client.is_model_ready(MODEL, "0" * 12)


def test_model_metadata_names_both_inputs_and_every_output(client, version):
    meta = client.get_model_metadata(MODEL)
    assert meta == client.get_model_metadata(MODEL, version)
    assert meta["name"] == MODEL and meta["versions"] == [version]
    assert meta["inputs"] == [
        {"name": "images", "datatype": "FP32", "shape": [-1, 1, 32, 32]},
        {"name": "image_bytes", "datatype": "BYTES", "shape": [-1, 1]},
    ]
    assert meta["outputs"] == [
        {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "tokens", "datatype": "FP32", "shape": [-1, 16, 32]},
        {"name": "cam", "datatype": "FP32", "shape": [-1, 4, 4]},
    ]
    rules = meta["parameters"]
    assert "exactly one" in rules["inputs"] and "base64" in rules["inputs"]
    assert rules["preprocessing"]["img_size"] == 32 and rules["class_names"][7] == "Sneaker"


def test_model_config_sizes_requests_like_a_triton_config(client):
    config = client.get_model_config(MODEL)
    assert config["name"] == MODEL and config["backend"] == "onnxruntime"
    assert config["max_batch_size"] == 64  # VITAE_MAX_FILES: the most images one request may hold
    images, image_bytes = config["input"]
    assert images == {"name": "images", "data_type": "TYPE_FP32", "dims": [1, 32, 32], "optional": True} | {
        "format": "FORMAT_NCHW"
    }
    assert image_bytes == {"name": "image_bytes", "data_type": "TYPE_STRING", "dims": [1], "optional": True}
    assert config["output"][0] == {"name": "logits", "data_type": "TYPE_FP32", "dims": [10]}
    assert config["dynamic_batching"] == {"preferred_batch_size": [16], "max_queue_delay_microseconds": 5000}
    assert config["instance_group"][0]["kind"] == "KIND_CPU"


# ------------------------------------------------------------------ inference


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_fp32_input_gives_onnxruntimes_logits_and_classifys(client, url, onnx, binary):
    session, prep = onnx
    image = sample_images(1)[0]
    pixels = pixels_of([image], prep)
    result = client.infer(MODEL, [fp32_input(pixels, binary)], outputs=outputs("logits", binary=binary))
    logits = result.as_numpy("logits")
    assert logits.shape == (1, 10) and logits.dtype == np.float32
    (expected,) = session.run(["logits"], {"images": pixels})
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    same_up_to_a_constant(logits[0].astype(np.float64), classify_logits(url, image), atol=1e-4)
    parameters = result.get_output("logits").get("parameters", {})
    assert ("binary_data_size" in parameters) is binary


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "base64-json"])
def test_encoded_image_bytes_are_preprocessed_like_classify(client, url, onnx, binary):
    session, prep = onnx
    photo = encode(drawn_image(5, size=(300, 220), mode="RGB"), "JPEG", quality=90)  # draft-mode decode applies
    images = [sample_images(1)[0], photo]
    result = client.infer(MODEL, [bytes_input(images, binary)], outputs=outputs("logits", binary=binary))
    logits = result.as_numpy("logits")
    (expected,) = session.run(["logits"], {"images": pixels_of(images, prep)})
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    for row, image in zip(logits, images, strict=True):
        same_up_to_a_constant(row.astype(np.float64), classify_logits(url, image), atol=1e-4)


def test_a_batch_of_8_in_one_request_answers_each_image_in_order(client, onnx):
    session, prep = onnx
    images = [encode(drawn_image(seed), "PNG") for seed in range(8)]
    pixels = pixels_of(images, prep)
    (expected,) = session.run(["logits"], {"images": pixels})
    by_pixels = client.infer(MODEL, [fp32_input(pixels, True)]).as_numpy("logits")
    by_bytes = client.infer(MODEL, [bytes_input(images, True)]).as_numpy("logits")
    assert by_pixels.shape == by_bytes.shape == (8, 10)
    np.testing.assert_allclose(by_pixels, expected, atol=1e-4)
    np.testing.assert_allclose(by_bytes, expected, atol=1e-4)
    assert len({row.tobytes() for row in expected}) == 8  # distinct answers, so a swap could not go unseen


def test_without_an_outputs_list_only_logits_come_back(client, onnx):
    _, prep = onnx
    result = client.infer(MODEL, [fp32_input(pixels_of(sample_images(1), prep), True)])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["logits"]


def test_tokens_and_cam_when_asked_equal_onnxruntime_and_classifys_cam(client, url, onnx):
    session, prep = onnx
    image = sample_images(1)[0]
    pixels = pixels_of([image], prep)
    result = client.infer(MODEL, [fp32_input(pixels, True)], outputs=outputs("cam", "tokens", "logits"))
    assert [o["name"] for o in result.get_response()["outputs"]] == ["cam", "tokens", "logits"]
    logits, tokens = session.run(["logits", "tokens"], {"images": pixels})
    np.testing.assert_allclose(result.as_numpy("tokens"), tokens, atol=1e-4)
    classify_cam = httpx.post(
        f"{url}/classify", params={"cam": "true"}, files=[("file", ("i.png", image, "image/png"))], timeout=60
    ).json()["cam"]
    assert classify_cam["class_index"] == int(np.argmax(logits[0]))
    cam = result.as_numpy("cam")
    assert cam.shape == (1, 4, 4) and cam.min() == 0.0 and cam.max() == pytest.approx(1.0)
    np.testing.assert_allclose(cam[0], classify_cam["grid"], atol=1e-4)


def test_cam_class_parameter_picks_the_explained_class(client, url):
    image = sample_images(1)[0]
    request = [bytes_input([image], True)]
    v2_cam = client.infer(MODEL, request, outputs=outputs("cam"), parameters={"cam_class": "Sneaker"})
    classify_cam = httpx.post(
        f"{url}/classify",
        params={"cam": "true", "cam_class": "7"},
        files=[("file", ("i.png", image, "image/png"))],
        timeout=60,
    ).json()["cam"]
    np.testing.assert_allclose(v2_cam.as_numpy("cam")[0], classify_cam["grid"], atol=1e-4)


def test_classification_extension_answers_the_top_classes_as_strings(client, onnx):
    session, prep = onnx
    pixels = pixels_of(sample_images(2), prep)
    wanted = [triton.InferRequestedOutput("logits", binary_data=True, class_count=3)]
    top = client.infer(MODEL, [fp32_input(pixels, True)], outputs=wanted).as_numpy("logits")
    assert top.shape == (2, 3)
    (logits,) = session.run(["logits"], {"images": pixels})
    for row, expected in zip(top, logits, strict=True):
        score, index, label = row[0].decode().split(":")
        assert int(index) == int(np.argmax(expected)) and float(score) == pytest.approx(expected.max(), abs=1e-4)
        assert label == FASHION_CLASSES[int(index)]


def test_request_id_is_echoed(client, onnx):
    _, prep = onnx
    result = client.infer(MODEL, [fp32_input(pixels_of(sample_images(1), prep), True)], request_id="req-42")
    assert result.get_response()["id"] == "req-42"


# ------------------------------------------------------------------ errors


def infer_error(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value


def test_wrong_shape_is_400_naming_the_accepted_shape(client):
    error = infer_error(lambda: client.infer(MODEL, [fp32_input(np.zeros((1, 3, 32, 32), np.float32), True)]))
    assert error.status() == "400"
    assert "shape [1, 3, 32, 32]" in error.message() and "[-1, 1, 32, 32]" in error.message()


def test_wrong_datatype_is_400_naming_fp32(client):
    tensor = triton.InferInput("images", [1, 1, 32, 32], "FP64")
    tensor.set_data_from_numpy(np.zeros((1, 1, 32, 32), np.float64))
    error = infer_error(lambda: client.infer(MODEL, [tensor]))
    assert error.status() == "400" and "FP64" in error.message() and "takes FP32" in error.message()


def test_unknown_input_or_output_is_400_naming_the_accepted_ones(client):
    tensor = triton.InferInput("pixels", [1, 1, 32, 32], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 1, 32, 32), np.float32))
    error = infer_error(lambda: client.infer(MODEL, [tensor]))
    assert error.status() == "400" and "'pixels'" in error.message() and "'image_bytes'" in error.message()
    good = fp32_input(np.zeros((1, 1, 32, 32), np.float32), True)
    error = infer_error(lambda: client.infer(MODEL, [good], outputs=outputs("probabilities")))
    assert error.status() == "400" and "'probabilities'" in error.message() and "'logits'" in error.message()


def test_an_unknown_cam_class_is_400_naming_the_classes(client):
    request = [bytes_input(sample_images(1), True)]
    error = infer_error(lambda: client.infer(MODEL, request, outputs=outputs("cam"), parameters={"cam_class": "Cat"}))
    assert error.status() == "400" and "cam_class" in error.message() and "Sneaker" in error.message()


def test_both_inputs_at_once_is_400(client):
    both = [fp32_input(np.zeros((1, 1, 32, 32), np.float32), True), bytes_input(sample_images(1), True)]
    error = infer_error(lambda: client.infer(MODEL, both))
    assert error.status() == "400" and "exactly one input" in error.message()


def test_unknown_model_or_version_is_404(client):
    tensor = fp32_input(np.zeros((1, 1, 32, 32), np.float32), True)
    error = infer_error(lambda: client.infer("resnet50", [tensor]))
    assert error.status() == "404" and "'resnet50'" in error.message() and MODEL in error.message()
    error = infer_error(lambda: client.infer(MODEL, [tensor], model_version="7"))
    assert error.status() == "404" and "'7'" in error.message()
    assert infer_error(lambda: client.get_model_metadata("resnet50")).status() == "404"


def test_a_bad_image_is_400_naming_its_element_and_the_accepted_formats(client):
    images = [sample_images(1)[0], b"GIF89a but not really"]
    error = infer_error(lambda: client.infer(MODEL, [bytes_input(images, True)]))
    assert error.status() == "400"
    assert "element 1" in error.message() and "PNG" in error.message() and "JPEG" in error.message()
    error = infer_error(lambda: client.infer(MODEL, [bytes_input_raw_json([b"%%% not base64"])]))
    assert error.status() == "400" and "base64" in error.message()


def bytes_input_raw_json(items: list[bytes]) -> triton.InferInput:
    tensor = triton.InferInput("image_bytes", [len(items)], "BYTES")
    tensor.set_data_from_numpy(np.array(items, dtype=object), binary_data=False)
    return tensor


def test_malformed_requests_are_400_in_the_protocols_error_body(url):
    endpoint = f"{url}/v2/models/{MODEL}/infer"
    head = b'{"inputs": [{"name": "images", "shape": [1, 1, 2, 2], "datatype": "FP32",'
    head += b' "parameters": {"binary_data_size": 16}}]}'
    short_data = b'{"inputs": [{"name": "images", "shape": [1, 1, 32, 32], "datatype": "FP32", "data": [1, 2]}]}'
    cases = [
        (b"not json", {}, "not valid JSON"),
        (b'{"inputs": []}', {}, "non-empty 'inputs'"),
        (short_data, {}, "needs 1024 values"),
        (head, {"Inference-Header-Content-Length": "999"}, "Inference-Header-Content-Length is 999"),
        (head + b"\0" * 8, {"Inference-Header-Content-Length": str(len(head))}, "runs past the end"),
        (head + b"\0" * 20, {"Inference-Header-Content-Length": str(len(head))}, "4 bytes of binary data"),
    ]
    for body, headers, fragment in cases:
        response = httpx.post(endpoint, content=body, headers=headers)
        assert response.status_code == 400, body
        assert set(response.json()) == {"error"} and fragment in response.json()["error"], response.json()


def test_too_many_images_in_one_request_is_400_naming_the_limit(artifacts):
    with serving(artifacts, max_files=2) as base:
        with triton.InferenceServerClient(base.removeprefix("http://")) as small:
            error = infer_error(lambda: small.infer(MODEL, [bytes_input(sample_images(3), True)]))
    assert error.status() == "400" and "1..2" in error.message() and "VITAE_MAX_FILES" in error.message()


def test_api_key_401_and_body_limit_413_answer_the_protocols_error_body(artifacts):
    with serving(artifacts, api_key="s3cret", max_upload_bytes=20_000) as base:
        with triton.InferenceServerClient(base.removeprefix("http://")) as keyed:
            assert keyed.is_server_live() and keyed.is_server_ready()  # probes stay open
            error = infer_error(lambda: keyed.get_model_metadata(MODEL))
            assert error.status() == "401" and "API key" in error.message()
            error = infer_error(lambda: keyed.infer(MODEL, [bytes_input(sample_images(1), True)]))
            assert error.status() == "401"
            result = keyed.infer(MODEL, [bytes_input(sample_images(1), True)], headers={"X-API-Key": "s3cret"})
            assert result.as_numpy("logits").shape == (1, 10)
            big = np.zeros((8, 1, 32, 32), np.float32)  # 32 KB of binary data
            error = infer_error(lambda: keyed.infer(MODEL, [fp32_input(big, True)], headers={"X-API-Key": "s3cret"}))
            assert error.status() == "413" and "20000" in error.message()
        over = httpx.post(f"{base}/v2/models/{MODEL}/infer", content=b"\0" * 50_000, headers={"X-API-Key": "s3cret"})
        assert over.status_code == 413 and "error" in over.json()


def test_queue_full_is_503_and_a_deadline_is_504_in_the_protocols_error_body(artifacts):
    # Gated on events, not timing: the first request holds the backend, the second waits in the one-place queue
    # until the 1 s deadline passes there (however slow the machine), the third finds the queue full.
    backend = GatedBackend(artifacts)
    body = {"inputs": [{"name": "images", "shape": [1, 1, 32, 32], "datatype": "FP32", "data": [0.0] * 1024}]}
    with serving(artifacts, backend, queue_capacity=1, max_batch_size=1, request_timeout_s=1.0) as base:
        endpoint = f"{base}/v2/models/{MODEL}/infer"
        answers: dict = {}
        backend.gate.clear()  # after the warm-up, which runs through the backend too

        def send(name: str) -> None:
            answers[name] = httpx.post(endpoint, json=body, timeout=60)

        held = threading.Thread(target=send, args=("held",))
        held.start()
        wait_for(lambda: backend.waiting == 1, "the first request at the backend's gate")
        queued = threading.Thread(target=send, args=("queued",))
        queued.start()
        wait_for(lambda: queue_depth(base) == 1, "the second request in the queue")
        full = httpx.post(endpoint, json=body)
        assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
        assert "full" in full.json()["error"]
        queued.join(60)
        assert answers["queued"].status_code == 504 and "deadline" in answers["queued"].json()["error"]
        backend.gate.set()  # the held request's deadline passed at the gate, before the queued one's
        held.join(60)
        assert answers["held"].status_code == 504


def queue_depth(base: str) -> float:
    return metric(httpx.get(f"{base}/metrics").text, "vitae_queue_depth", model="classify")


# ------------------------------------------------------------------ shared traffic


def test_concurrent_v2_and_classify_traffic_loses_and_swaps_no_answer(client, url, onnx):
    session, prep = onnx
    images = [encode(drawn_image(seed), "PNG") for seed in range(24)]
    (expected,) = session.run(["logits"], {"images": pixels_of(images, prep)})
    before = httpx.get(f"{url}/metrics").text

    def v2_call(i: int) -> np.ndarray:
        with triton.InferenceServerClient(url.removeprefix("http://"), network_timeout=120) as own:
            if i % 2:
                request = [fp32_input(pixels_of([images[i]], prep), binary=i % 4 == 1)]
            else:
                request = [bytes_input([images[i]], binary=i % 4 == 0)]
            return own.infer(MODEL, request).as_numpy("logits")[0].astype(np.float64)

    with ThreadPoolExecutor(max_workers=16) as pool:
        v2_answers = [pool.submit(v2_call, i) for i in range(24)]
        classify_answers = [pool.submit(classify_logits, url, images[i]) for i in range(24)]
        for i in range(24):
            np.testing.assert_allclose(v2_answers[i].result(), expected[i], atol=1e-4)
            same_up_to_a_constant(classify_answers[i].result(), expected[i].astype(np.float64), atol=1e-4)

    after = httpx.get(f"{url}/metrics").text
    images_run = metric(after, "vitae_batch_size_sum", model="classify") - metric(
        before, "vitae_batch_size_sum", model="classify"
    )
    assert images_run == 48  # every image computed exactly once
    stats = client.get_inference_statistics()["model_stats"][0]
    assert stats["name"] == MODEL and stats["inference_count"] >= 48
    assert 0 < stats["execution_count"] <= stats["inference_count"]
    assert metric(after, "vitae_requests_total", route="/v2/models/{name}/infer", status="200") >= 24
