"""Helpers shared by the service tests (no tests here): exported artifacts, a real server, test images."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import httpx
import numpy as np
import uvicorn
from PIL import Image, ImageDraw

import export
from service import create_app
from service.settings import Settings

SAMPLES = Path(__file__).resolve().parent.parent / "demo" / "samples"


@cache
def exported(checkpoint: Path) -> Path:
    """The export stage's artifacts of a checkpoint, beside it (built once per session)."""
    out = checkpoint.parent / "artifacts"
    export.export_artifacts(checkpoint, out, max_batch=8)
    return out


def settings_for(artifacts: Path, **overrides) -> Settings:
    """Settings that serve `artifacts` as they are (never export the demo checkpoint into them)."""
    values = dict(artifacts=artifacts, auto_export=False, backend="onnxruntime", device="cpu", threads=1)
    values |= dict(max_delay_ms=5, preprocess_threads=2, log_level="warning")
    return Settings(**(values | overrides))


def drawn_image(seed: int, size: tuple[int, int] = (28, 28), mode: str = "L") -> Image.Image:
    """A deterministic picture with shapes (so the CAM has something to find), in any PIL mode."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", size, tuple(int(v) for v in rng.integers(0, 80, 3)))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
        x1, y1 = x0 + rng.integers(size[0] // 4, size[0] // 2), y0 + rng.integers(size[1] // 4, size[1] // 2)
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(100, 256, 3)))
    return image.convert(mode)


def sample_images(count: int) -> list[bytes]:
    """PNG bytes: the demo's real Fashion-MNIST samples when present, else drawn ones."""
    samples = sorted(SAMPLES.glob("*.png")) if SAMPLES.is_dir() else []
    out = [path.read_bytes() for path in samples[:count]]
    seed = 0
    while len(out) < count:
        out.append(encode(drawn_image(seed), "PNG"))
        seed += 1
    return out


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


class ServerThread:
    """A real uvicorn server (lifespan on) for one app, on a free local port, in a background thread."""

    def __init__(self, app) -> None:
        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 30.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_ready(url: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        response = httpx.get(f"{url}/readyz")
        if response.status_code == 200:
            return response.json()
        if response.json().get("status") == "failed" or time.monotonic() > deadline:
            raise RuntimeError(f"service not ready: {response.json()}")
        time.sleep(0.02)


@contextmanager
def running(app, *, ready: bool = True) -> Iterator[str]:
    """Serve `app` over real HTTP for the duration of the block; yields its base URL."""
    server = ServerThread(app)
    url = server.start()
    try:
        if ready:
            wait_ready(url)
        yield url
    finally:
        server.stop()


@contextmanager
def serving(artifacts: Path, backend=None, *, ready: bool = True, **overrides) -> Iterator[str]:
    with running(create_app(settings_for(artifacts, **overrides), backend=backend), ready=ready) as url:
        yield url


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from a Prometheus exposition (0 when absent)."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(w in line for w in wanted):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
