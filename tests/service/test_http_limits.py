"""The HTTP layer's limits (service/server.py) on a real server: heads, URLs, slow clients, JSON refusals."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
from support.checkpoints import exported
from support.images import drawn_image, encode, sample_images
from support.raw_http import host_port, multipart, raw_request, read_response
from support.server import metric, serving

LIMITS = dict(max_header_bytes=16 * 1024, max_url_bytes=2048, header_timeout_s=1.5, body_timeout_s=2.0)


@pytest.fixture(scope="module")
def url(tiny_checkpoint):
    with serving(exported(tiny_checkpoint), **LIMITS) as base:
        yield base


def healthy(url: str) -> bool:
    image = sample_images(1)[0]
    answer = httpx.post(f"{url}/classify", files=[("file", ("i.png", image, "image/png"))], timeout=30)
    return answer.status_code == 200 and bool(answer.json()["predictions"])


def test_a_header_over_the_limit_is_431_json_and_others_are_served(url):
    results: dict = {}
    other = threading.Thread(target=lambda: results.update(ok=healthy(url)))
    other.start()
    huge = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n"
    answer = raw_request(url, huge)
    other.join()
    assert answer is not None and answer.status == 431
    assert answer.headers["content-type"] == "application/json"
    assert "VITAE_MAX_HEADER_BYTES" in answer.json()["detail"]
    assert results["ok"]


def test_many_small_headers_over_the_limit_are_431(url):
    headers = b"".join(f"X-H{i}: {'v' * 100}\r\n".encode() for i in range(200))  # ~21 kB
    answer = raw_request(url, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert answer is not None and answer.status == 431
    assert "16384 bytes" in answer.json()["detail"]


def test_headers_under_the_limit_are_served(url):
    answer = httpx.get(f"{url}/healthz", headers={f"X-H{i}": "v" * 100 for i in range(50)})  # ~5.5 kB
    assert answer.status_code == 200


def test_a_long_url_is_414_json(url):
    answer = raw_request(url, b"GET /healthz?q=" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer is not None and answer.status == 414
    assert "VITAE_MAX_URL_BYTES" in answer.json()["detail"]


def test_a_malformed_request_is_400_json(url):
    answer = raw_request(url, b"NOT HTTP AT ALL\r\n\r\n")
    assert answer is not None and answer.status == 400
    assert "malformed HTTP request" in answer.json()["detail"]


def test_headers_that_never_end_get_408_and_the_connection_closes(url):
    with socket.create_connection(host_port(url)) as sock:
        sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nX-Slow: still typing")
        answer = read_response(sock)  # the server closes it, after header_timeout_s
    assert answer is not None and answer.status == 408
    assert "VITAE_HEADER_TIMEOUT_S" in answer.json()["detail"]


def test_many_connections_with_half_sent_headers_are_all_closed_after_the_header_timeout(url):
    sockets = [socket.create_connection(host_port(url)) for _ in range(100)]
    try:
        for sock in sockets:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Half: ")
        # Each is answered 408 and closed by the server (read_response returns once it closes; 30 s would be a hang).
        answers = [read_response(sock) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    assert [a.status if a else None for a in answers] == [408] * len(sockets)
    assert healthy(url)


def test_an_idle_connection_is_closed_quietly(url):
    with socket.create_connection(host_port(url)) as sock:
        assert read_response(sock) is None  # closed without an answer: there was no request


def test_a_body_shorter_than_its_content_length_gets_408(url):
    body, content_type = multipart(sample_images(1)[0])
    head = f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {len(body) + 1000}"
    with socket.create_connection(host_port(url)) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        answer = read_response(sock)
    assert answer is not None and answer.status == 408
    assert "VITAE_BODY_TIMEOUT_S" in answer.json()["detail"]


def test_a_body_trickling_in_past_the_timeout_gets_408(url):
    body, content_type = multipart(sample_images(1)[0])
    head = f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}"
    with socket.create_connection(host_port(url)) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n")
        started = time.monotonic()
        try:
            for byte in body:  # one byte every 0.1 s: the whole body would take minutes
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
                if time.monotonic() - started > 60:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and stopped reading
        answer = read_response(sock)
    assert answer is not None and answer.status == 408


def test_protocol_refusals_leave_the_service_healthy_and_counted_apart(url):
    for _ in range(20):
        raw_request(url, b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n")
    assert healthy(url)
    text = httpx.get(f"{url}/metrics").text
    assert metric(text, "vitae_requests_total", route="/classify", method="POST", status="500") == 0


def test_a_large_body_sent_with_its_head_in_one_write_is_not_counted_as_head(url):
    body, content_type = multipart(*[encode(drawn_image(i, size=(200, 200)), "BMP") for i in range(8)])  # ~330 kB
    head = f"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}"
    answer = raw_request(url, head.encode() + b"\r\nConnection: close\r\n\r\n" + body)
    assert answer is not None and answer.status == 200
    assert len(answer.json()["results"]) == 8
