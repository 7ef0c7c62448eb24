"""The batch path asks the backend for the last-cell tokens of the images whose request wants them (a CAM, v2's
`tokens` output) and no others; the non-finite guard checks and recomputes only what came back."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from PIL import Image
from support.images import encode, sample_images
from support.server import serving

from service.artifacts import read_artifacts
from service.backends import OnnxRuntimeBackend, TorchBackend
from service.inference import ClassifyInput, classify_batch
from service.metrics import Metrics
from service.numerics import NonFiniteGuard
from service.postprocess import last_cell_cam

MODEL = "vitae_fmnist"


class RecordingTorch(TorchBackend):
    """The real PyTorch backend (CPU, eager), recording the `token_rows` of every call."""

    def __init__(self, served) -> None:
        super().__init__(served, device="cpu", threads=1)
        self.asked: list[list[int] | None] = []

    def infer(self, images, token_rows=None):
        self.asked.append(None if token_rows is None else list(token_rows))
        return super().infer(images, token_rows)


@pytest.fixture(scope="module")
def served(artifacts):
    return read_artifacts(artifacts)


@pytest.fixture(scope="module")
def pixels(served) -> np.ndarray:
    rng = np.random.default_rng(0)
    prep = served.preprocessing
    return rng.normal(0, 1, (4, prep.in_chans, prep.img_size, prep.img_size)).astype(np.float32)


def test_the_batch_asks_for_the_tokens_of_cam_and_tokens_images_only(served, pixels):
    backend = RecordingTorch(served)
    inputs = [
        ClassifyInput(pixels[0], cam=True, cam_class=None),
        ClassifyInput(pixels[1], cam=False, cam_class=None),
        ClassifyInput(pixels[2], cam=False, cam_class=None, tokens=True),
        ClassifyInput(pixels[3], cam=False, cam_class=None),
    ]
    out = classify_batch(backend, served, inputs, NonFiniteGuard(backend, lambda: None, Metrics()))
    assert backend.asked == [[0, 2]]
    reference = OnnxRuntimeBackend(served, gpu=False, threads=1)
    logits, tokens = reference.infer(pixels)  # every row's, for comparison
    assert out[1].tokens is None and out[3].tokens is None and out[1].cam_raw is None
    np.testing.assert_allclose(out[2].tokens, tokens[2], atol=1e-4)
    np.testing.assert_allclose(np.stack([o.logits for o in out]), logits, atol=1e-4)
    expected_cam = last_cell_cam(tokens[[0]], served.head_weight, np.array([out[0].cam_class]), served.grid)[0]
    np.testing.assert_allclose(out[0].cam_raw, expected_cam, atol=1e-4)


class NanTokensForFlatImages:
    """The real ONNX Runtime backend computing "in bf16" whose tokens (only) are NaN for flat images, and that
    returns the tokens of `token_rows` only, as the PyTorch-CUDA backend does."""

    name, device, precision, selects_tokens = "nan-tokens", "cpu", "bf16", True

    def __init__(self, served) -> None:
        self.real = OnnxRuntimeBackend(served, gpu=False, threads=1)

    def infer(self, images, token_rows=None):
        logits, tokens = self.real.infer(images)
        tokens[np.ptp(images.reshape(len(images), -1), axis=1) == 0] = np.nan
        return logits, tokens if token_rows is None else tokens[list(token_rows)]

    def close(self) -> None:
        self.real.close()


def test_the_guard_recomputes_only_rows_whose_returned_outputs_are_not_finite(served, pixels):
    batch = pixels.copy()
    batch[1] = 0.0  # flat: its tokens come out NaN
    recomputed: list[int] = []

    class CountingFallback(OnnxRuntimeBackend):
        def infer(self, images, token_rows=None):
            recomputed.append(len(images))
            return super().infer(images)

    guard = NonFiniteGuard(
        NanTokensForFlatImages(served), lambda: CountingFallback(served, gpu=False, threads=1), Metrics()
    )
    quiet = guard(batch, [0, 2])  # the flat image's tokens are not asked for: nothing to recompute
    assert recomputed == [] and quiet.failed == {} and np.isfinite(quiet.tokens).all()
    asked = guard(batch, [1, 2])  # now they are: that row alone is recomputed at fp32
    assert recomputed == [1] and asked.failed == {}
    _, expected = OnnxRuntimeBackend(served, gpu=False, threads=1).infer(batch)
    np.testing.assert_allclose(asked.tokens_of(1), expected[1], atol=1e-5)
    assert asked.tokens_of(0) is None


def test_v2_tokens_and_classify_cam_are_answered_through_a_backend_that_selects_token_rows(artifacts):
    image = sample_images(1)[0]
    body = {
        "inputs": [
            {"name": "image_bytes", "shape": [1, 1], "datatype": "BYTES", "data": [base64.b64encode(image).decode()]}
        ],
        "outputs": [{"name": "tokens", "parameters": {"binary_data": False}}, {"name": "logits"}],
    }
    flat = encode(Image.new("L", (28, 28), 128), "PNG")
    backend = RecordingTorch(read_artifacts(artifacts))
    with serving(artifacts, backend=backend) as url:
        answer = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        tokens = next(o for o in answer.json()["outputs"] if o["name"] == "tokens")
        assert np.isfinite(tokens["data"]).all() and tokens["shape"][0] == 1
        files = [("file", ("a.png", image, "image/png")), ("file", ("b.png", flat, "image/png"))]
        cam = httpx.post(f"{url}/classify", files=files, params={"cam": "true"}, timeout=120)
        assert cam.status_code == 200 and all(r["cam"] for r in cam.json()["results"]), cam.text
        plain = httpx.post(f"{url}/classify", files=files[:1], timeout=120)
        assert plain.status_code == 200, plain.text
    calls = [rows for rows in backend.asked[-3:]]  # after the warm-up's calls
    assert calls == [[0], [0, 1], []], backend.asked
