"""Step 3 of a request (service/decoding.py): the device decoder wired into /classify and v2's `image_bytes`, run
here with device="cpu" (the tensor steps the GPU runs; PIL stands in for nvJPEG), and the decode pool shared fairly
between requests."""

from __future__ import annotations

import asyncio
import base64
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from support.images import drawn_image, encode
from support.server import running, settings_for

from service import create_app
from service.artifacts import read_artifacts
from service.backends import OnnxRuntimeBackend, TorchBackend
from service.decoding import DecodeShares
from service.gpu_decode import GpuDecoder
from service.jobs import Priority
from service.postprocess import top_k
from service.runtime import image_decoder

MODEL = "vitae_fmnist"
JPEGS = [encode(drawn_image(seed, size=(60, 44)), "JPEG") for seed in range(3)]
PNG = encode(drawn_image(7), "PNG")


class TorchSeeingBatches(TorchBackend):
    """The real PyTorch backend on CPU, recording what kind of batch each call gets."""

    def __init__(self, served) -> None:
        super().__init__(served, device="cpu", threads=1)
        self.batches: list[str] = []

    def infer(self, images, token_rows=None):
        self.batches.append(type(images).__name__)
        return super().infer(images, token_rows)


class CountingDecoder(GpuDecoder):
    """service.gpu_decode's decoder on the CPU, counting its calls; `gate` (when set) holds each call."""

    calls: list[int]
    gate: threading.Event | None

    def __call__(self, uploads):
        self.calls.append(len(uploads))
        if self.gate is not None:
            self.gate.wait(timeout=120)
        return super().__call__(uploads)


def with_decoder(app, gate: threading.Event | None = None) -> CountingDecoder:
    runtime = app.state.service.runtime
    decoder = CountingDecoder(runtime.served.preprocessing, "cpu", app.state.service.settings.max_image_pixels)
    object.__setattr__(decoder, "calls", [])
    object.__setattr__(decoder, "gate", gate)
    runtime.decoder = decoder
    return decoder


def classify(url: str, *images: bytes, **params) -> httpx.Response:
    files = [("file", (f"{i}.jpg", image, "application/octet-stream")) for i, image in enumerate(images)]
    return httpx.post(f"{url}/classify", files=files, params={"top_k": 3, **params}, timeout=120)


@pytest.fixture(scope="module")
def served(artifacts):
    return read_artifacts(artifacts)


def test_jpegs_are_decoded_by_the_device_decoder_and_the_batch_stacks_its_tensors(artifacts, served):
    backend = TorchSeeingBatches(served)
    app = create_app(settings_for(artifacts, max_delay_ms=200), backend=backend)
    with running(app) as url:
        decoder = with_decoder(app)
        answer = classify(url, JPEGS[0], PNG, b"not an image", JPEGS[1])
        assert answer.status_code == 200, answer.text
        results = answer.json()["results"]
        assert decoder.calls == [4] and backend.batches[-1] == "Tensor"
        assert results[2]["error"]["status"] == 400 and "accepted formats" in results[2]["error"]["detail"]
        expected_pixels = GpuDecoder(served.preprocessing, "cpu")([JPEGS[0], JPEGS[1]])
        logits, _ = backend.infer(torch.stack(expected_pixels))
        for got, row in zip([results[0], results[3]], logits, strict=True):
            expected = top_k(row, served.class_names, 3)
            assert [p["index"] for p in got["predictions"]] == [p.index for p in expected]
            assert [p["score"] for p in got["predictions"]] == pytest.approx([p.score for p in expected], abs=1e-5)
        assert results[1]["predictions"]  # the PNG went to the PIL path, in the same request


def test_v2_image_bytes_take_the_device_decoder_and_cam_requests_the_pil_path(artifacts, served):
    app = create_app(settings_for(artifacts), backend=TorchBackend(served, device="cpu", threads=1))
    data = [base64.b64encode(jpeg).decode() for jpeg in JPEGS[:2]]
    body = {"inputs": [{"name": "image_bytes", "shape": [2, 1], "datatype": "BYTES", "data": data}]}
    with running(app) as url:
        decoder = with_decoder(app)
        answer = httpx.post(f"{url}/v2/models/{MODEL}/infer", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        assert decoder.calls == [2]
        cam = classify(url, JPEGS[2], cam="true")
        assert cam.status_code == 200 and cam.json()["cam"]["overlay_jpeg"], cam.text
        assert decoder.calls == [2]  # the overlay needs the picture: PIL decoded it


def test_a_cache_hit_skips_the_device_decoder(artifacts, served):
    app = create_app(settings_for(artifacts, cache_mb=4), backend=TorchBackend(served, device="cpu", threads=1))
    with running(app) as url:
        decoder = with_decoder(app)
        first, second = classify(url, JPEGS[0]), classify(url, JPEGS[0])
        assert [first.headers["x-cache"], second.headers["x-cache"]] == ["miss", "hit"]
        assert first.content == second.content and decoder.calls == [1]


def test_the_deadline_covers_device_decoding(artifacts, served):
    gate = threading.Event()
    app = create_app(settings_for(artifacts), backend=TorchBackend(served, device="cpu", threads=1))
    with running(app) as url:
        decoder = with_decoder(app, gate)
        try:
            answer = httpx.post(
                f"{url}/classify",
                files=[("file", ("a.jpg", JPEGS[0], "image/jpeg"))],
                headers={"X-Request-Timeout": "0.5"},
                timeout=120,
            )
            assert answer.status_code == 504, answer.text
            assert decoder.calls == [1]
        finally:
            gate.set()


def test_only_pytorch_on_cuda_gets_a_device_decoder(artifacts, served):
    settings = settings_for(artifacts)
    assert image_decoder(settings, TorchBackend(served, device="cpu", threads=1), served) is None
    assert image_decoder(settings, OnnxRuntimeBackend(served, gpu=False, threads=1), served) is None


class Gated:
    """A stand-in decode that records when it starts and holds its thread until its gate opens."""

    def __init__(self, names: list[str]) -> None:
        self.started: list[str] = []
        self.threads: dict[str, str] = {}
        self.gates = {name: threading.Event() for name in names}

    def __call__(self, name: str) -> str:
        self.started.append(name)
        self.threads[name] = threading.current_thread().name
        self.gates[name].wait(timeout=120)
        return name

    async def until(self, condition, what: str) -> None:
        for _ in range(6000):  # 60 s at most
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"gave up waiting for {what}; started: {self.started}")


def test_a_request_over_its_share_of_the_pool_lets_another_requests_decode_start_first():
    """Two threads, a request of 8 images holding both: once a second request arrives, the next thread that frees
    goes to the second request's one image, not to the first request's third."""
    decode = Gated([f"big{i}" for i in range(8)] + ["small"])

    async def request(shares: DecodeShares, names: list[str]) -> list[str]:
        async with shares.request() as run:
            return await asyncio.gather(*(run(decode, name) for name in names))

    async def scenario() -> list[str]:
        with ThreadPoolExecutor(max_workers=2) as pool:
            shares = DecodeShares(pool, 2)
            big = asyncio.create_task(request(shares, [f"big{i}" for i in range(8)]))
            await decode.until(lambda: len(decode.started) == 2, "the big request to hold both threads")
            small = asyncio.create_task(request(shares, ["small"]))
            await decode.until(lambda: len(shares.main.running) == 2, "the small request to join")
            decode.gates["big0"].set()
            await decode.until(lambda: len(decode.started) == 3, "a third decode to start")
            for gate in decode.gates.values():
                gate.set()
            assert await small == ["small"] and len(await big) == 8
            return decode.started

    order = asyncio.run(scenario())
    assert order[2] == "small", order
    assert sorted(order) == sorted(decode.gates)


async def one_request(shares: DecodeShares, decode: Gated, name: str, priority=Priority.NORMAL) -> str:
    async with shares.request(priority) as run:
        return await run(decode, name)


def test_a_high_upload_enters_the_pool_before_normal_uploads_that_arrived_first():
    """One thread, no urgent lane: n0 runs, n1 waits in the pool's own queue (two places), n2..n4 wait for a place.
    A high upload arriving now takes the next place, then a low one arriving before n4 still goes after it."""
    decode = Gated(["n0", "n1", "n2", "n3", "n4", "high", "low"])

    async def scenario() -> None:
        with ThreadPoolExecutor(max_workers=1) as pool:
            shares = DecodeShares(pool, 1)
            tasks = []
            for name in ["n0", "n1", "n2", "n3"]:
                tasks.append(asyncio.create_task(one_request(shares, decode, name)))
                await asyncio.sleep(0.01)  # arrival order
            low = asyncio.create_task(one_request(shares, decode, "low", Priority.LOW))
            await asyncio.sleep(0.01)
            tasks.append(asyncio.create_task(one_request(shares, decode, "n4")))
            high = asyncio.create_task(one_request(shares, decode, "high", Priority.HIGH))
            await decode.until(lambda: decode.started == ["n0"] and len(shares.main.waiting) == 5, "the queue")
            assert shares.main.in_pool == 2  # n0 running, n1 queued in the executor
            for gate in decode.gates.values():
                gate.set()
            await asyncio.gather(*tasks, low, high)
            assert shares.main.in_pool == 0 and not shares.main.running and not shares.main.waiting

    asyncio.run(scenario())
    assert decode.started == ["n0", "n1", "high", "n2", "n3", "n4", "low"], decode.started


def test_a_high_upload_decodes_in_its_own_lane_while_the_pool_is_full():
    """Both pool threads busy and a queue behind them: a high request's upload starts at once, on the urgent thread,
    which runs at normal scheduling priority (the pool's run lowered)."""
    decode = Gated(["n0", "n1", "n2", "n3", "n4", "high"])

    async def scenario() -> None:
        with (
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="pool") as pool,
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="urgent") as urgent,
        ):
            shares = DecodeShares(pool, 2, urgent=urgent)
            normal = [asyncio.create_task(one_request(shares, decode, f"n{i}")) for i in range(5)]
            await decode.until(lambda: len(decode.started) == 2, "the pool's two threads to be taken")
            high = asyncio.create_task(one_request(shares, decode, "high", Priority.HIGH))
            await decode.until(lambda: "high" in decode.started, "the high upload to start")
            assert decode.started[2] == "high" and decode.threads["high"].startswith("urgent")
            assert not any(decode.threads[n].startswith("urgent") for n in decode.started[:2])
            for gate in decode.gates.values():
                gate.set()
            await asyncio.gather(*normal, high)
            assert not any(decode.threads[f"n{i}"].startswith("urgent") for i in range(5))

    asyncio.run(scenario())


def test_an_upload_cancelled_while_waiting_gives_its_place_back():
    """A request that goes away (client gone, deadline) while its upload waits leaves no place taken: after the rest
    finish, the pool is empty and a new upload starts at once."""
    decode = Gated(["n0", "n1", "gone", "after", "later"])

    async def scenario() -> None:
        with ThreadPoolExecutor(max_workers=1) as pool:
            shares = DecodeShares(pool, 1)
            first = [asyncio.create_task(one_request(shares, decode, n)) for n in ["n0", "n1"]]
            await asyncio.sleep(0.01)
            gone = asyncio.create_task(one_request(shares, decode, "gone"))
            after = asyncio.create_task(one_request(shares, decode, "after"))
            await decode.until(lambda: len(shares.main.waiting) == 2, "two uploads to wait for a place")
            gone.cancel()
            for name in ["n0", "n1", "after", "later"]:
                decode.gates[name].set()
            await asyncio.gather(*first, after)
            assert (await asyncio.gather(gone, return_exceptions=True))[0].__class__ is asyncio.CancelledError
            assert shares.main.in_pool == 0 and not shares.main.running
            assert await one_request(shares, decode, "later") == "later"

    asyncio.run(scenario())
    assert "gone" not in decode.started
