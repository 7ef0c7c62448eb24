"""SIGTERM on a real `python -m service` process: /readyz 503 while still serving for the grace, then stop
accepting, answer everything queued, exit 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from support.checkpoints import ROOT, exported
from support.gated import wait_for
from support.images import sample_images
from support.server import free_port, metric


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_serves_through_the_grace_then_drains_queued_requests_and_exits(tiny_checkpoint, tmp_path):
    port = free_port()
    env = os.environ | {
        "VITAE_ARTIFACTS": str(exported(tiny_checkpoint)),
        "VITAE_AUTO_EXPORT": "false",
        "VITAE_BACKEND": "onnxruntime",
        "VITAE_HOST": "127.0.0.1",
        "VITAE_PORT": str(port),
        "VITAE_MAX_BATCH_SIZE": "64",
        "VITAE_MAX_DELAY_MS": "1500",  # requests sit in the queue long enough to be caught by the signal
        "VITAE_BATCH_WAIT_WHEN_IDLE": "true",  # ... even the first, which finds the engine idle
        "VITAE_THREADS": "1",
        # Long enough for a request sent right after the signal to connect on a busy machine.
        "VITAE_DRAIN_GRACE_S": "4",
    }
    log = (tmp_path / "service.log").open("w+")
    process = subprocess.Popen([sys.executable, "-m", "service"], cwd=ROOT, env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, "the service exited during start-up"
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the service did not become ready"
            time.sleep(0.1)

        images = sample_images(9)
        responses: list[httpx.Response | Exception] = [None] * len(images)

        def send(i: int) -> None:
            try:
                files = [("file", ("i.png", images[i], "image/png"))]
                responses[i] = httpx.post(f"{url}/classify", files=files, timeout=30)
            except Exception as exc:  # recorded, asserted below
                responses[i] = exc

        senders = [threading.Thread(target=send, args=(i,)) for i in range(len(images))]
        for sender in senders[:8]:
            sender.start()
        queued = lambda: metric(httpx.get(f"{url}/metrics").text, "vitae_queue_depth", model="classify") >= 8  # noqa: E731
        wait_for(queued, "8 images queued behind the long batch delay")

        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # The grace: not ready, yet a new connection is accepted and its request answered.
        senders[8].start()
        while (ready := httpx.get(f"{url}/readyz", timeout=5)).status_code == 200:
            assert time.monotonic() - signalled < 3, "/readyz stayed 200 after SIGTERM"
            time.sleep(0.05)
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        # After the grace: the port closes.
        while True:
            try:
                httpx.get(f"{url}/healthz", timeout=2)
            except httpx.TransportError:
                break
            assert time.monotonic() - signalled < 30, "the port stayed open"
            time.sleep(0.1)
        assert time.monotonic() - signalled >= 3.5  # not before the 4 s grace (less a little for clock slack)
        for sender in senders:
            sender.join(timeout=30)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in responses), responses
    assert all(r.json()["predictions"] for r in responses)
    log.seek(0)
    assert "stopped" in log.read()
