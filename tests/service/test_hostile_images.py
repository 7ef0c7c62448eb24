"""Hostile images (support/hostile_images.py) against the real service: each gets its own right answer, with
a JSON detail when refused, never costs the other images of its request their answers, and leaves the
service healthy."""

from __future__ import annotations

import httpx
import pytest
from support.checkpoints import exported
from support.hostile_images import MULTI_FRAME, first_frame_png, hostile_images
from support.images import sample_images
from support.server import metric, serving

CORPUS = {image.name: image for image in hostile_images()}


@pytest.fixture(scope="module")
def url(tiny_checkpoint):
    with serving(exported(tiny_checkpoint), max_batch_size=8) as base:
        yield base


@pytest.fixture(scope="module")
def good(url) -> list[tuple[bytes, dict]]:
    """Two good images and their answers alone."""
    return [(data, post(url, data).json()) for data in sample_images(2)]


def post(url: str, *images: bytes, **params) -> httpx.Response:
    files = [("file", (f"i{i}", data, "application/octet-stream")) for i, data in enumerate(images)]
    return httpx.post(f"{url}/classify", files=files, params=params, timeout=60)


def scores(result: dict) -> dict[int, float]:
    return {p["index"]: p["score"] for p in result["predictions"]}


@pytest.mark.parametrize("name", CORPUS)
def test_a_hostile_image_alone_gets_its_status_and_a_json_detail(url, name):
    image = CORPUS[name]
    response = post(url, image.data)
    assert response.status_code == image.status, response.text
    assert response.headers["content-type"] == "application/json"
    if image.status == 200:
        assert len(response.json()["predictions"]) == 5
    else:
        assert image.fragment.lower() in response.json()["detail"].lower()


@pytest.mark.parametrize("name", CORPUS)
def test_a_hostile_image_among_good_ones_fails_alone(url, good, name):
    image = CORPUS[name]
    (before, before_alone), (after, after_alone) = good
    response = post(url, before, image.data, after)
    assert response.status_code == 200, response.text
    first, middle, last = response.json()["results"]
    assert scores(first) == pytest.approx(scores(before_alone), abs=1e-5)
    assert scores(last) == pytest.approx(scores(after_alone), abs=1e-5)
    if image.status == 200:
        assert "predictions" in middle
    else:
        assert middle["error"]["status"] == image.status and image.fragment.lower() in middle["error"]["detail"].lower()


@pytest.mark.parametrize("name", MULTI_FRAME)
def test_a_multi_frame_file_is_classified_as_its_first_frame(url, name):
    data = CORPUS[name].data
    expected = post(url, first_frame_png(data)).json()
    assert scores(post(url, data).json()) == pytest.approx(scores(expected), abs=1e-5)


def test_exif_orientation_is_applied_before_classifying_and_drawing(url):
    cam = post(url, CORPUS["exif-rotated-jpeg"].data, cam="true").json()["cam"]
    assert (cam["width"], cam["height"]) == (24, 48)  # stored 48x24, upright 24x48


def test_after_the_corpus_the_service_is_healthy_and_no_request_was_a_server_error(url):
    for image in CORPUS.values():
        post(url, image.data)
    assert httpx.get(f"{url}/healthz").status_code == 200
    assert httpx.get(f"{url}/readyz").status_code == 200
    assert post(url, sample_images(1)[0]).status_code == 200
    text = httpx.get(f"{url}/metrics").text
    assert metric(text, "vitae_requests_total", route="/classify", method="POST", status="500") == 0
