"""The service's pure pieces and its batcher, without HTTP."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from PIL import Image
from test_service_support import drawn_image, encode

from model import Preprocessing
from model.preprocess import ImageTooLargeError, decode_image, preprocess, resize_size
from service.batcher import Batcher, BatchFailedError, DeadlineExceeded, QueueFullError, ShuttingDownError
from service.inference import prepare_image
from service.metrics import Metrics
from service.postprocess import jet, last_cell_cam, normalize_cam, render_cam, softmax, top_k, upsample
from service.settings import Settings, get_settings

# ------------------------------------------------------------------ settings


def test_settings_come_from_vitae_environment_variables(monkeypatch):
    monkeypatch.setenv("VITAE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("VITAE_BACKEND", "torch")
    monkeypatch.setenv("VITAE_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("VITAE_API_KEY", "k")
    settings = get_settings()
    assert settings.max_batch_size == 7 and settings.backend == "torch"
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert settings.api_key.get_secret_value() == "k"
    assert get_settings(max_batch_size=3).max_batch_size == 3  # explicit values win


def test_settings_defaults_serve_the_demo_model_on_port_8000(monkeypatch):
    for name in list(Settings.model_fields):
        monkeypatch.delenv(f"VITAE_{name.upper()}", raising=False)
    settings = get_settings()
    assert (settings.host, settings.port, settings.backend) == ("0.0.0.0", 8000, "auto")
    assert str(settings.artifacts) == "artifacts"
    assert str(settings.checkpoint) == "demo/model/vitae_fmnist.safetensors"
    assert settings.api_key is None and settings.cors_origins == []


def test_an_invalid_setting_is_refused(monkeypatch):
    monkeypatch.setenv("VITAE_BACKEND", "tensorflow")
    with pytest.raises(ValueError, match="backend"):
        get_settings()


# ------------------------------------------------------------------ pure functions


def test_top_k_is_sorted_softmax_with_labels():
    logits = np.array([0.5, 3.0, -1.0, 2.0], np.float32)
    predictions = top_k(logits, ["a", "b", "c", "d"], 3)
    assert [p.label for p in predictions] == ["b", "d", "a"]
    assert predictions[0].score == pytest.approx(softmax(logits)[1])
    assert softmax(np.array([1000.0, 1000.0])).tolist() == [0.5, 0.5]  # no overflow


def test_last_cell_cam_sums_to_logit_minus_bias():
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(3, 16, 8)).astype(np.float32)  # (B, N, D)
    weight, bias = rng.normal(size=(5, 8)), rng.normal(size=5)
    logits = tokens.mean(axis=1) @ weight.T + bias  # what a mean-pooled head computes
    targets = np.array([0, 4, 2])
    raw = last_cell_cam(tokens, weight, targets, (4, 4))
    assert raw.shape == (3, 4, 4)
    np.testing.assert_allclose(raw.sum(axis=(1, 2)), logits[np.arange(3), targets] - bias[targets], atol=1e-6)


def test_normalize_cam_is_relu_then_min_max_per_image():
    raw = np.array([[[-2.0, 0.0], [1.0, 3.0]], [[5.0, 5.0], [5.0, 5.0]]])
    cam = normalize_cam(raw)
    np.testing.assert_allclose(cam[0], [[0.0, 0.0], [1 / 3, 1.0]])
    np.testing.assert_array_equal(cam[1], np.zeros((2, 2)))  # a flat map has nothing to show


def test_jet_runs_from_blue_to_red():
    colours = jet(np.array([[0.0, 0.5, 1.0]]))
    assert colours.dtype == np.uint8 and colours.shape == (1, 3, 3)
    blue, green, red = colours[0]
    assert blue[2] > 100 and blue[0] == 0
    assert green[1] == 255
    assert red[0] > 100 and red[2] == 0


def test_upsampling_is_bilinear_at_the_requested_size():
    grid = np.array([[0.0, 1.0]])
    up = upsample(grid, (8, 3))
    assert up.shape == (3, 8)
    assert np.all(np.diff(up[1]) >= 0) and 0.0 <= up.min() and up.max() <= 1.0


def test_render_cam_draws_pngs_at_the_original_size():
    images = render_cam(np.eye(4), drawn_image(0, size=(50, 20), mode="L"))
    assert (images.width, images.height) == (50, 20)
    assert images.grid == np.eye(4).tolist()
    assert images.heatmap_png and images.overlay_png


PREP = Preprocessing(img_size=32, in_chans=1, mean=(0.3,), std=(0.35,), crop_pct=1.0, interpolation="bilinear")


@pytest.mark.parametrize(
    ("mode", "fmt"), [("L", "PNG"), ("RGB", "JPEG"), ("RGBA", "PNG"), ("P", "GIF"), ("CMYK", "TIFF"), ("RGB", "WEBP")]
)
def test_prepare_image_is_the_trainers_preprocess(mode, fmt):
    data = encode(drawn_image(1, size=(64, 48), mode=mode), fmt)
    prepared = prepare_image(data, PREP, max_pixels=10**6, keep_original=True)
    expected = preprocess(decode_image(data, target_size=resize_size(PREP)), PREP)
    np.testing.assert_array_equal(prepared.pixels, expected)
    assert prepared.pixels.shape == (1, 32, 32) and prepared.original.size == (64, 48)


def test_a_large_jpeg_keeps_its_full_size_for_the_overlay():
    data = encode(drawn_image(2, size=(800, 600), mode="RGB"), "JPEG")
    prepared = prepare_image(data, PREP, max_pixels=10**7, keep_original=True)
    assert prepared.original.size == (800, 600)
    assert prepare_image(data, PREP, max_pixels=10**7, keep_original=False).original is None


def test_prepare_image_refuses_too_many_pixels():
    with pytest.raises(ImageTooLargeError):
        prepare_image(encode(Image.new("L", (100, 100)), "PNG"), PREP, max_pixels=99 * 100, keep_original=False)


# ------------------------------------------------------------------ batcher


def run(coro):
    return asyncio.run(coro)


class Recorder:
    """run_batch that doubles its inputs and remembers the batches it saw."""

    def __init__(self, fail_when=None, delay_s: float = 0.0):
        self.batches: list[list[int]] = []
        self.fail_when = fail_when
        self.delay_s = delay_s
        self.threads: set[str] = set()

    def __call__(self, items):
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(items))
        time.sleep(self.delay_s)
        if self.fail_when is not None and self.fail_when in items:
            raise RuntimeError("boom")
        return [2 * x for x in items]


def test_every_job_gets_exactly_its_own_answer_in_batches_of_at_most_max():
    async def scenario():
        recorder = Recorder()
        batcher = Batcher(recorder, max_batch_size=4, max_delay_s=0.05, capacity=100)
        batcher.start()
        jobs = [batcher.submit(i, timeout_s=10) for i in range(10)]
        outcomes = await asyncio.gather(*(job.future for job in jobs))
        await batcher.close()
        return recorder, outcomes

    recorder, outcomes = run(scenario())
    assert [o.result for o in outcomes] == [2 * i for i in range(10)]
    assert [len(b) for b in recorder.batches] == [4, 4, 2]  # full batches flush at once, the rest at the delay
    assert sorted(x for b in recorder.batches for x in b) == list(range(10))
    assert len(recorder.threads) == 1 and next(iter(recorder.threads)).startswith("vitae-")


def test_a_lone_job_waits_at_most_the_max_delay():
    async def scenario():
        batcher = Batcher(Recorder(), max_batch_size=8, max_delay_s=0.2, capacity=10)
        batcher.start()
        started = time.monotonic()
        outcome = await batcher.submit(1, timeout_s=10).future
        waited = time.monotonic() - started
        await batcher.close()
        return outcome, waited

    outcome, waited = run(scenario())
    assert 0.18 <= waited < 1.0
    assert outcome.batch_size == 1 and outcome.queue_s >= 0.18


def test_jobs_arriving_during_the_delay_join_the_batch():
    async def scenario():
        recorder = Recorder()
        batcher = Batcher(recorder, max_batch_size=8, max_delay_s=0.3, capacity=10)
        batcher.start()
        first = batcher.submit(1, timeout_s=10)
        await asyncio.sleep(0.05)
        second = batcher.submit(2, timeout_s=10)
        await asyncio.gather(first.future, second.future)
        await batcher.close()
        return recorder

    assert run(scenario()).batches == [[1, 2]]


def test_queue_full_is_refused_at_once_with_a_retry_hint():
    async def scenario():
        batcher = Batcher(Recorder(), max_batch_size=2, max_delay_s=0.2, capacity=2)
        batcher.start()
        jobs = [batcher.submit(i, timeout_s=10) for i in range(2)]
        with pytest.raises(QueueFullError) as refused:
            batcher.submit(3, timeout_s=10)
        await asyncio.gather(*(j.future for j in jobs))
        await batcher.close()
        return refused.value

    assert run(scenario()).retry_after_s >= 1


def test_cancelled_and_expired_jobs_are_never_computed():
    async def scenario():
        metrics = Metrics()
        recorder = Recorder()
        batcher = Batcher(recorder, max_batch_size=8, max_delay_s=0.2, capacity=10, metrics=metrics)
        batcher.start()
        cancelled = batcher.submit(1, timeout_s=10)
        expired = batcher.submit(2, timeout_s=0.05)
        kept = batcher.submit(3, timeout_s=10)
        cancelled.future.cancel()
        await asyncio.sleep(0)  # done-callbacks run on the next loop iteration
        assert batcher.depth == 2  # the cancelled one left the queue at once
        result = await kept.future
        with pytest.raises(DeadlineExceeded):
            await expired.future
        await batcher.close()
        return recorder, result, metrics

    recorder, result, metrics = run(scenario())
    assert recorder.batches == [[3]] and result.result == 6
    assert metrics.dropped.labels("model", "cancelled")._value.get() == 1
    assert metrics.dropped.labels("model", "deadline")._value.get() == 1


def test_a_failing_batch_fails_only_its_own_jobs():
    async def scenario():
        batcher = Batcher(Recorder(fail_when=13), max_batch_size=2, max_delay_s=0.01, capacity=10)
        batcher.start()
        doomed = [batcher.submit(i, timeout_s=10) for i in (12, 13)]
        results = await asyncio.gather(*(j.future for j in doomed), return_exceptions=True)
        later = await batcher.submit(5, timeout_s=10).future
        await batcher.close()
        return results, later

    results, later = run(scenario())
    assert all(isinstance(r, BatchFailedError) and "boom" in str(r) for r in results)
    assert later.result == 10


def test_close_drains_everything_queued_and_then_refuses():
    async def scenario():
        recorder = Recorder(delay_s=0.05)
        batcher = Batcher(recorder, max_batch_size=2, max_delay_s=1.0, capacity=100)
        batcher.start()
        jobs = [batcher.submit(i, timeout_s=10) for i in range(5)]
        started = time.monotonic()
        await batcher.close()  # does not wait out the 1 s delay, but computes all five
        elapsed = time.monotonic() - started
        with pytest.raises(ShuttingDownError):
            batcher.submit(9, timeout_s=10)
        return [j.future.result().result for j in jobs], elapsed

    results, elapsed = run(scenario())
    assert results == [0, 2, 4, 6, 8]
    assert elapsed < 0.9
