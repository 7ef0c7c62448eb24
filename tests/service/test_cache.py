"""The response cache on the real service: what a hit answers, what it never answers, and single-flight.

Every test counts what the real backend computed (GatedBackend.batches) rather than timing anything.
"""

from __future__ import annotations

import asyncio
import base64
import threading

import httpx
import pytest
from support.checkpoints import FASHION_CLASSES, exported, tiny_model
from support.gated import GatedBackend, wait_for
from support.images import sample_images
from support.server import metric, running, serving, settings_for

from benchmarks.harness import publish_version
from model.checkpoint import checkpoint_metadata, save_checkpoint
from service import create_app
from service.cache import ENTRY_OVERHEAD, ResponseCache
from service.metrics import Metrics

CACHE_ON = dict(cache_mb=8)


def classify(url: str, image: bytes, headers: dict | None = None, **params) -> httpx.Response:
    files = [("file", ("i.png", image, "image/png"))]
    return httpx.post(f"{url}/classify", files=files, params=params, headers=headers, timeout=120)


def v2_infer(url: str, image: bytes, **parameters) -> httpx.Response:
    body = {
        "id": "same",
        "inputs": [
            {"name": "image_bytes", "shape": [1, 1], "datatype": "BYTES", "data": [base64.b64encode(image).decode()]}
        ],
        "outputs": [{"name": "logits"}, {"name": "cam"}],
        "parameters": parameters,
    }
    return httpx.post(f"{url}/v2/models/vitae_fmnist/infer", json=body, timeout=120)


@pytest.mark.parametrize("params", [{}, {"cam": "true", "top_k": "3"}], ids=["top-5", "cam"])
def test_a_cached_answer_is_the_computed_one_byte_for_byte_but_the_flag(artifacts, params):
    backend = GatedBackend(artifacts)
    with serving(artifacts, backend=backend, **CACHE_ON) as url:
        image = sample_images(1)[0]
        computed = classify(url, image, **params)
        computed_batches = len(backend.batches)
        cached = classify(url, image, **params)
        assert computed.status_code == cached.status_code == 200
        assert (computed.headers["x-cache"], cached.headers["x-cache"]) == ("miss", "hit")
        assert cached.content == computed.content
        assert len(backend.batches) == computed_batches  # the hit computed nothing
        text = httpx.get(f"{url}/metrics").text
        assert metric(text, "vitae_cache_hits_total") == 1 and metric(text, "vitae_cache_misses_total") == 1
        assert metric(text, "vitae_cache_bytes") > len(computed.content)


def test_another_option_or_no_cache_computes_afresh(artifacts):
    backend = GatedBackend(artifacts)
    with serving(artifacts, backend=backend, **CACHE_ON) as url:
        image = sample_images(1)[0]
        assert classify(url, image, top_k="2").headers["x-cache"] == "miss"
        before = len(backend.batches)
        assert classify(url, image, top_k="3").headers["x-cache"] == "miss"  # top_k is part of the key
        fresh = classify(url, image, headers={"Cache-Control": "no-cache"}, top_k="3")
        assert fresh.status_code == 200 and fresh.headers["x-cache"] == "bypass"
        assert len(backend.batches) == before + 2
        assert classify(url, image, top_k="3").headers["x-cache"] == "hit"


def test_v2_encoded_images_are_answered_from_the_cache_byte_for_byte(artifacts):
    backend = GatedBackend(artifacts)
    with serving(artifacts, backend=backend, **CACHE_ON) as url:
        image = sample_images(2)[1]
        computed = v2_infer(url, image)
        before = len(backend.batches)
        cached = v2_infer(url, image)
        assert computed.status_code == cached.status_code == 200, computed.text
        assert (computed.headers["x-cache"], cached.headers["x-cache"]) == ("miss", "hit")
        assert cached.content == computed.content and len(backend.batches) == before


def test_the_cache_off_computes_every_request(artifacts):
    backend = GatedBackend(artifacts)
    with serving(artifacts, backend=backend, cache_mb=0) as url:
        image = sample_images(1)[0]
        answers = [classify(url, image) for _ in range(2)]
        before = len(backend.batches)
        assert [a.headers["x-cache"] for a in answers] == ["off", "off"]
        assert classify(url, image).status_code == 200 and len(backend.batches) == before + 1


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    """Artifacts of the same variant, name and version as `artifacts` but other weights."""
    model = tiny_model(seed=7)
    meta = checkpoint_metadata(model, variant="vitae_fmnist", class_names=FASHION_CLASSES)
    return exported(save_checkpoint(model, tmp_path_factory.mktemp("other") / "tiny", meta))


def test_another_model_under_the_same_cache_never_gets_the_old_answer(artifacts, other_weights):
    first, second = (create_app(settings_for(a, **CACHE_ON)) for a in (artifacts, other_weights))
    second.state.cache = first.state.cache  # one cache, the served model replaced under it
    image = sample_images(1)[0]
    with running(first) as url:
        old = classify(url, image)
        assert classify(url, image).headers["x-cache"] == "hit"
    with running(second) as url:
        new = classify(url, image)
        again = classify(url, image)
    assert old.status_code == new.status_code == 200
    assert new.headers["x-cache"] == "miss" and again.headers["x-cache"] == "hit"
    assert new.json()["predictions"] != old.json()["predictions"]
    assert len(first.state.cache) == 2


def test_a_new_version_put_live_never_gets_the_old_versions_answer(tmp_path, artifacts, other_weights):
    repo = tmp_path / "repo"
    (repo / "tiny").mkdir(parents=True)
    publish_version(repo, "tiny", "1", artifacts)
    image = sample_images(1)[0]
    with serving(artifacts, model_repository=repo, model_poll_s=0.1, **CACHE_ON) as url:
        old = classify(url, image)
        assert classify(url, image).headers["x-cache"] == "hit"
        publish_version(repo, "tiny", "2", other_weights)

        def live_version() -> str:
            return next(m for m in httpx.get(f"{url}/models").json()["models"] if m["name"] == "tiny")["version"]

        wait_for(lambda: live_version() == "2", "version 2 live")
        new = classify(url, image)
    assert old.json()["model"]["version"] == "1" and new.json()["model"]["version"] == "2"
    assert new.headers["x-cache"] == "miss"
    assert new.json()["predictions"] != old.json()["predictions"]


def test_concurrent_identical_requests_are_computed_once(artifacts):
    backend = GatedBackend(artifacts)
    app = create_app(settings_for(artifacts, **CACHE_ON), backend=backend)
    with running(app) as url:
        image, count = sample_images(3)[2], 4
        before = len(backend.batches)
        backend.gate.clear()
        answers: list = [None] * count

        def send(i: int) -> None:
            answers[i] = classify(url, image)

        senders = [threading.Thread(target=send, args=(i,)) for i in range(count)]
        for sender in senders:
            sender.start()
        try:
            wait_for(lambda: backend.waiting == 1, "the first request at the backend")
            wait_for(lambda: app.state.cache.waiting == count - 1, "the others waiting for it")
        finally:
            backend.gate.set()
        for sender in senders:
            sender.join(timeout=120)
    assert [a.status_code for a in answers] == [200] * count
    assert sorted(a.headers["x-cache"] for a in answers) == ["hit"] * (count - 1) + ["miss"]
    assert len({a.content for a in answers}) == 1
    assert len(backend.batches) == before + 1


def test_the_least_recently_used_answers_are_evicted_to_fit_the_bytes():
    async def scenario():
        metrics = Metrics()
        keys = [bytes([i]) * 32 for i in range(4)]  # a, b, c, d
        cache = ResponseCache(3 * (100 + 32 + ENTRY_OVERHEAD), metrics)

        async def compute(value=b"x" * 100):
            return value, len(value)

        for key in keys[:3]:
            await cache.answer(key, compute)
        assert (await cache.answer(keys[0], compute))[1] == "hit"  # a is now the most recently used
        await cache.answer(keys[3], compute)  # d evicts b, the least recently used
        sources = [(await cache.answer(key, compute))[1] for key in (keys[0], keys[2], keys[3], keys[1])]
        return sources, cache, metrics

    sources, cache, metrics = asyncio.run(scenario())
    assert sources == ["hit", "hit", "hit", "miss"]
    assert cache.bytes <= cache.max_bytes and len(cache) == 3
    assert metrics.cache_evictions._value.get() == 2  # b, then a when b came back
    assert metrics.cache_bytes._value.get() == cache.bytes
